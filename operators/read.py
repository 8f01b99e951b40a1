"""Stage 1, read: the input listing (folder, glob or manifest) and each photo's bytes.

A folder or glob gives photos of one user; a Parquet or CSV manifest gives a ``path`` and,
optionally, a ``user_id`` per row (relative paths are taken from the manifest's folder).
Every listed photo, readable or not, becomes one row: a missing file or a bad manifest row
is that row's error. Paths are listed normalised (``storage.normalize``: absolute, ``.`` and
``..`` resolved), so that a photo has one identity however the input spelled it.
"""

from __future__ import annotations

import io
import posixpath

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pydantic import Field

from operators.base import Resources, Stage, StageConfig
from operators.rows import ErrorKind, RowError, map_rows, to_table
from plvm_model import storage
from plvm_model.bank import validate_user_id
from plvm_model.errors import InputError, InputNotFound

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


class ReadConfig(StageConfig):
    max_bytes: int = Field(200 * 2**20, ge=1, description="A larger file is refused without being read.")


def list_inputs(config: InputConfig, storage_options: storage.StorageOptions | None = None) -> pa.Table:
    """One row (path, user_id, error, error_kind) per input photo."""
    if not config.uri:
        raise InputError("no input given: set input.uri in the config or pass --input")
    uri = storage.normalize(config.uri)  # then the filesystem's listing is normalised too
    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        return _read_manifest(uri, config.user, storage_options)
    try:
        user = validate_user_id(config.user)
    except ValueError as error:
        raise InputError(f"input.user: {error}") from None
    fs, path = storage.filesystem(uri, storage_options)
    if any(ch in path for ch in "*?["):
        paths = sorted(fs.glob(path))
    elif fs.isdir(path):
        endings = tuple(e.lower() for e in config.extensions)
        paths = sorted(
            p for p in fs.find(path) if p.lower().endswith(endings) and not posixpath.basename(p).startswith(".")
        )
    elif fs.exists(path):
        paths = [path]
    else:
        raise InputNotFound(f"input {uri} does not exist")
    rows = [{"path": storage.unstrip(uri, p), "user_id": user} for p in paths]
    return to_table(rows, LISTING_COLUMNS)


def _read_manifest(uri: str, default_user: str, storage_options: storage.StorageOptions | None) -> pa.Table:
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
                convert_options=pa_csv.ConvertOptions(strings_can_be_null=True, column_types={"path": pa.string(),
                                                                                              "user_id": pa.string()}),
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
    return to_table(rows, LISTING_COLUMNS)


class ReadBytes:
    """path -> data (the file's bytes)."""

    def __init__(self, config: ReadConfig, storage_options: storage.StorageOptions | None = None) -> None:
        self.config = config
        self.storage_options = storage_options

    def _read(self, row: dict) -> None:
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_rows(batch, self._read, add=["data"])


def stage(config: ReadConfig, storage_options: storage.StorageOptions | None, tasks: Resources) -> Stage:
    return Stage("read", ReadBytes, (config, storage_options), tasks, needs=("path",), adds=("data",))
