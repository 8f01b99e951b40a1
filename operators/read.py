"""Stage 1, read: the input listing (folder, glob or manifest) and each photo's bytes.

A folder or glob gives photos of one user; a Parquet or CSV manifest gives a ``path`` and,
optionally, a ``user_id`` per row (relative paths are taken from the manifest's folder).
Every listed photo, readable or not, becomes one row: a missing file or a bad manifest row
is that row's error. Paths are listed normalised (``storage.normalize``: absolute, ``.`` and
``..`` resolved), so that a photo has one identity however the input spelled it.

What may be listed (``plvm_model.store.input_scope``): a folder or glob lists files only, never those
in the run's output folder; a photo outside the allowed roots (``input.allowed``; by default
the input's own folder, or the manifest's) is an ``outside_input_scope`` row that no stage
opens. An input that lists nothing is an error unless ``input.allow_empty`` says it may be.
"""

from __future__ import annotations

import io
import posixpath

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pydantic import Field

from operators.base import Resources, RowStage, Stage, StageConfig
from operators.rows import fail, to_table
from plvm_model.store import storage
from plvm_model.store.errors import InputError, InputNotFound
from plvm_model.store.face_index import content_hash
from plvm_model.store.ids import validate_user_id
from plvm_model.store.input_scope import InputScope
from plvm_model.store.output_schema import ErrorKind, RowError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MANIFEST_EXTENSIONS = (".parquet", ".csv")
LISTING_COLUMNS = ("path", "user_id", "error", "error_kind")


class InputConfig(StageConfig):
    uri: str | None = Field(
        None, description="A folder, a glob, one image, or a `.parquet`/`.csv` manifest (`path`, `user_id`)."
    )
    user: str = Field(
        "default",
        description="The user of a folder's or glob's photos, and of manifest rows without a `user_id` column.",
    )
    extensions: tuple[str, ...] = Field(
        IMAGE_EXTENSIONS,
        description="File endings taken from a folder (case-insensitive); a glob or a manifest takes what it names.",
    )
    allowed: tuple[str, ...] | None = Field(
        None,
        description="The folders or URI prefixes photos may be read from (compared normalised, with their scheme, at "
        "path-segment boundaries); a photo elsewhere is an `outside_input_scope` row, never opened. null: the input's "
        "own folder (a glob's folder before its first wildcard; a manifest's folder).",
    )
    allow_empty: bool = Field(
        False,
        description="An input that lists no photo runs (0 rows) instead of failing (`plvm caption --allow-empty`).",
    )


class ReadConfig(StageConfig):
    max_bytes: int = Field(200 * 2**20, ge=1, description="A larger file is refused without being read.")


def list_inputs(
    config: InputConfig, storage_options: storage.StorageOptions | None = None, output: str | None = None
) -> pa.Table:
    """One row (path, user_id, error, error_kind) per input photo; nothing in ``output`` (the run's output
    folder, with its staging and records) is ever listed as a photo."""
    if not config.uri:
        raise InputError("no input given: set input.uri in the config or pass --input")
    uri = storage.normalize(config.uri)  # then the filesystem's listing is normalised too
    never = () if output is None else (storage.normalize(output),)
    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        scope = _scope(config, uri.rsplit("/", 1)[0], "the manifest's folder", never)
        rows = _read_manifest(uri, config.user, scope, storage_options)
    else:
        rows = _list_files(uri, config, never, storage_options)
    if not rows and not config.allow_empty:
        raise InputError(
            f"input {uri} lists no photos: check the folder, glob or manifest, or pass --allow-empty "
            "(input.allow_empty) if an empty input is expected"
        )
    return to_table(rows, LISTING_COLUMNS)


def _scope(config: InputConfig, default: str, what: str, never: tuple[str, ...]) -> InputScope:
    """``input.allowed``, or ``default`` (``what`` says which folder that is) when it is not given."""
    if config.allowed is not None:
        return InputScope(tuple(storage.normalize(root) for root in config.allowed), "input.allowed", never)
    return InputScope((default,), f"input.allowed is not set, so {what}", never)


def _list_files(
    uri: str, config: InputConfig, never: tuple[str, ...], storage_options: storage.StorageOptions | None
) -> list[dict]:
    """The files of a folder, a glob or one file (``uri`` normalised), without those of ``never``."""
    try:
        user = validate_user_id(config.user)
    except ValueError as error:
        raise InputError(f"input.user: {error}") from None
    fs, path = storage.filesystem(uri, storage_options)
    wildcard = next((i for i, ch in enumerate(uri) if ch in "*?["), None)
    if wildcard is not None:
        root, what = uri[:wildcard].rsplit("/", 1)[0], "the glob's folder"
        paths = [p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"]
    elif fs.isdir(path):
        root, what = uri, "the input folder"
        endings = tuple(e.lower() for e in config.extensions)
        paths = [p for p in fs.find(path) if p.lower().endswith(endings) and not posixpath.basename(p).startswith(".")]
    elif fs.exists(path):
        root, what, paths = uri, "the input file", [path]
    else:
        raise InputNotFound(f"input {uri} does not exist")
    scope = _scope(config, root, what, never)
    rows = []
    for found in sorted(paths):
        row = {"path": storage.unstrip(uri, found), "user_id": user}
        if scope.excluded(row["path"]) is not None:
            continue  # the output's own parts, staging and records
        if (refusal := scope.refusal(row["path"])) is not None:
            fail(row, ErrorKind.OUTSIDE_INPUT_SCOPE, refusal)
        rows.append(row)
    return rows


def _read_manifest(
    uri: str, default_user: str, scope: InputScope, storage_options: storage.StorageOptions | None
) -> list[dict]:
    """The manifest's rows; ``uri`` is normalised, and so is each row's path (a row without one is ``uri#row=N``)."""
    fs, path = storage.filesystem(uri, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise InputNotFound(f"manifest {uri} does not exist") from None
    ragged: list = []  # CSV lines with a wrong number of fields: each still gets its row

    def keep_ragged(row) -> str:
        ragged.append(row)
        return "skip"

    try:
        if path.lower().endswith(".csv"):
            table = pa_csv.read_csv(
                io.BytesIO(data),
                read_options=pa_csv.ReadOptions(use_threads=False),  # so that bad lines know their number
                parse_options=pa_csv.ParseOptions(invalid_row_handler=keep_ragged),
                # only an empty cell is missing: a user or a file may be called "nan", "NULL" or "NA"
                convert_options=pa_csv.ConvertOptions(strings_can_be_null=True, null_values=[""],
                                                      column_types={"path": pa.string(), "user_id": pa.string()}),
            )  # fmt: skip
        else:
            table = pq.read_table(io.BytesIO(data))
    except pa.ArrowException as error:
        raise InputError(f"manifest {uri} cannot be read: {error}") from None
    if "path" not in table.column_names:
        raise InputError(f"manifest {uri} has no 'path' column (columns: {table.column_names})")
    base = uri.rsplit("/", 1)[0]
    users = table.column("user_id").to_pylist() if "user_id" in table.column_names else None
    rows = []
    for index, raw_path in enumerate(table.column("path").to_pylist()):
        path = None if raw_path is None else str(raw_path).strip() or None
        if path is not None and "://" not in path and not path.startswith("/"):
            path = f"{base}/{path}"  # relative to the manifest's folder
        row = {"path": None if path is None else storage.normalize(path)}
        row["user_id"] = default_user if users is None else users[index]
        where = f"manifest {uri} row {index + 1}"
        if row["path"] is None:
            # The row still needs an identity: its place in the manifest.
            row.update(path=f"{uri}#row={index + 1}", error=f"{where}: 'path' is empty",
                       error_kind=ErrorKind.BAD_MANIFEST_ROW)  # fmt: skip
        elif (refusal := scope.refusal(row["path"])) is not None:
            fail(row, ErrorKind.OUTSIDE_INPUT_SCOPE, f"{where}: {refusal}")
        elif row["user_id"] is None or str(row["user_id"]).strip() == "":
            row.update(error=f"{where}: 'user_id' is empty", error_kind=ErrorKind.BAD_MANIFEST_ROW)
        else:
            row["user_id"] = str(row["user_id"]).strip()
            try:
                validate_user_id(row["user_id"])
            except ValueError as error:
                row.update(error=f"{where}: {error}", error_kind=ErrorKind.INVALID_USER)
        rows.append(row)
    for bad in ragged:
        rows.append(
            {
                "path": f"{uri}#line={bad.number}",
                "user_id": default_user,
                "error": f"manifest {uri} line {bad.number} has {bad.actual_columns} fields, "
                f"expected {bad.expected_columns}: {bad.text!r}",
                "error_kind": ErrorKind.BAD_MANIFEST_ROW,
            }
        )
    return rows


class ReadBytes(RowStage):
    """path -> data (the file's bytes), content_hash (their SHA-256: the photo's key in the face index)."""

    needs = ("path",)
    adds = ("data", "content_hash")

    def __init__(self, config: ReadConfig, storage_options: storage.StorageOptions | None = None) -> None:
        self.config = config
        self.storage_options = storage_options

    def process(self, row: dict) -> None:
        fs, path = storage.filesystem(row["path"], self.storage_options)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise RowError(ErrorKind.MISSING_FILE, "file not found") from None
        if size is not None and size > self.config.max_bytes:
            raise RowError(ErrorKind.TOO_LARGE, f"file of {size} bytes is over the limit of {self.config.max_bytes}")
        row["data"] = fs.cat_file(path)
        if not row["data"]:
            raise RowError(ErrorKind.EMPTY_FILE, "file is empty (0 bytes)")
        row["content_hash"] = content_hash(row["data"])
        self.stat_update("bytes", len(row["data"]))


def stage(config: ReadConfig, storage_options: storage.StorageOptions | None, tasks: Resources) -> Stage:
    return Stage.of("read", ReadBytes, (config, storage_options), tasks)
