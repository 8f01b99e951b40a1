"""Dataset stage 5, shards: a slice's items rendered in each format and staged, for the driver to commit.

One call per slice of the source (``shard``: its key). Files named by content (the photos, the face crops, the
PLVM layout's photos) are written in place, whole, by the task itself: two tries write the same bytes under the
same name. What belongs to the slice alone (its ``hf`` Parquet part per split, and its records of the JSON formats
as JSON lines) is staged under ``_build/staging/<key>.<try>/`` with the paths it takes in the dataset; the
driver moves them there and records the shard done (``plvm_model.store.dataset_folder``). The stage's rows are
the shards (one, or none for a slice without rows of the chosen users), with the counts of every stage.

Counters (``shards.<counter>``): ``photos:<split>``, ``items:<split>:<kind>``, ``person:<user>:<concept>:<split>``
(photos of the person) and ``asked:<user>:<concept>:<split>`` (items about them), ``eval:<split>:<user>`` (what
the PLVM layout of that split holds of the user), ``model:<engine>:<model>``, and ``dropped:<error_kind>`` for rows
with an error.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from collections import defaultdict
from functools import cached_property

import pyarrow as pa
import pyarrow.parquet as pq

from operators.base import Resources, RowStage, Stage
from operators.items import person_key
from operators.rows import COLUMNS, STATS, stats_of, with_stats
from plvm_model.store import dataset_formats as formats
from plvm_model.store import storage
from plvm_model.store.dataset_folder import DatasetFolder

SHARD = pa.schema([("shard", pa.string()), ("staged", pa.string()), ("files", pa.list_(pa.string())),
                   ("rows", pa.int64()), (STATS, COLUMNS[STATS])])  # fmt: skip
"""The stage's rows: one per shard staged (``plvm_model.store.dataset_folder.Shard``'s fields)."""


class WriteShards(RowStage):
    """A slice's rows (with their items and files) -> one staged shard (see the module)."""

    needs = ("shard", "path", "user_id", "model", "engine", "content_hash", "split", "people", "items", "image",
             "image_name", "crops")  # fmt: skip
    adds = ("staged", "files", "rows", STATS)

    def __init__(self, uri: str, storage_options: storage.StorageOptions | None, kinds: tuple[str, ...],
                 references: dict[str, str], folders: dict[str, str]) -> None:  # fmt: skip
        """``kinds``: the formats written; ``references``: ``user/concept_id`` -> the person's reference photo in
        the dataset (people whose reference could not be read have none); ``folders``: the same -> the person's
        folder name in the PLVM layout."""
        self.uri, self.storage_options, self.kinds = uri, storage_options, kinds
        self.references, self.folders = references, folders

    # both made in the worker, on first use: the driver builds the stage, and never imports `datasets`
    @cached_property
    def hf_schema(self) -> pa.Schema:
        return formats.hf_features().arrow_schema

    @cached_property
    def folder(self) -> DatasetFolder:
        return DatasetFolder(self.uri, self.storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not batch.num_rows:
            return SHARD.empty_table()
        key = batch.column("shard")[0].as_py()
        lines: dict[str, list[str]] = defaultdict(list)  # a fragment of a JSON format -> its records
        hf: dict[str, list[dict]] = defaultdict(list)
        for row in batch.to_pylist():
            if row["error"] is not None:
                self.stat_update(f"dropped:{row['error_kind']}")
            elif row["items"]:
                self.photo(row, key, lines, hf)
        staged = self.folder.staging(key, uuid.uuid4().hex[:8])
        files = []
        for split, rows in sorted(hf.items()):
            data = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, schema=self.hf_schema), data)
            files.append(self.stage_file(staged, formats.hf_part(split, key), data.getvalue()))
        for name, records in sorted(lines.items()):
            files.append(self.stage_file(staged, name, "".join(r + "\n" for r in records).encode()))
        shard = {"shard": [key], "staged": [staged], "files": [files], "rows": [batch.num_rows], STATS: [None]}
        return with_stats(pa.table(shard, schema=SHARD), stats_of(batch))

    def stage_file(self, staged: str, relative: str, data: bytes) -> str:
        path = posixpath.join(staged, relative)
        self.folder.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.folder.fs.pipe_file(path, data)
        return relative

    def put(self, relative: str, data: bytes) -> None:
        """A file named by its content: written whole unless it is there."""
        if not self.folder.fs.exists(self.folder.path(relative)):
            self.folder.write(relative, data)

    def photo(self, row: dict, key: str, lines: dict[str, list[str]], hf: dict[str, list[dict]]) -> None:
        """One photo's files, records and counts."""
        split, user, name = row["split"], row["user_id"], row["image_name"]
        if {"llava", "llamafactory"} & set(self.kinds):
            self.put(formats.image_path(name), row["image"])
        crops = {c["face"]: formats.crop_path(row["content_hash"], c["face"]) for c in row["crops"]}
        if {"llava", "llamafactory", "hf"} & set(self.kinds):
            for c in row["crops"]:
                self.put(crops[c["face"]], c["data"])
        concepts = [{"name": p["name"], "crop": crops.get(p["face"]),
                     "reference": self.references.get(person_key(user, p["concept_id"]))} for p in row["people"]]  # fmt: skip
        for item in row["items"]:
            extras = formats.extra(item, row, concepts)
            if "llava" in self.kinds:
                lines[formats.fragment("llava", split, key)].append(json.dumps(formats.llava_record(item, name, extras)))
            if "llamafactory" in self.kinds:
                record = formats.llamafactory_record(item, name, extras)
                lines[formats.fragment("llamafactory", split, key)].append(json.dumps(record))
            if "hf" in self.kinds:
                hf[split].append(formats.hf_row(item, row["image"], name, extras))
            self.stat_update(f"items:{split}:{item['kind']}")
            if item["concept_id"]:
                self.stat_update(f"asked:{user}:{item['concept_id']}:{split}")
        if "plvm-eval" in self.kinds:
            self.evaluation(row, key, lines)
        self.stat_update(f"photos:{split}")
        self.stat_update(f"model:{row['engine']}:{row['model']}")
        for person in row["people"]:
            self.stat_update(f"person:{user}:{person['concept_id']}:{split}")

    def evaluation(self, row: dict, key: str, lines: dict[str, list[str]]) -> None:
        """The photo in PLVM's layout: in its person's folder when it shows exactly one enrolled person who has a
        reference photo, and its multiple-choice items in ``query_ques.json`` (about people with a reference)."""
        split, user = row["split"], row["user_id"]
        folder = formats.eval_folder(split, user)
        ext = posixpath.splitext(row["image_name"])[1]
        file = f"{row['content_hash'][:16]}{ext}"
        known = {p["concept_id"] for p in row["people"] if person_key(user, p["concept_id"]) in self.references}
        if len(row["people"]) == 1 and known:
            query = f"people/{self.folders[person_key(user, row['people'][0]['concept_id'])]}/{file}"
            self.put(f"{folder}/{query}", row["image"])
            self.stat_update(f"eval:{split}:{user}")
        else:
            query = f"photos/{file}"
        asked = [i for i in row["items"]
                 if i["kind"] == "choice" and person_key(user, i["concept_id"]) in self.references]  # fmt: skip
        if asked and query.startswith("photos/"):
            self.put(f"{folder}/{query}", row["image"])
        for item in asked:
            person = person_key(user, item["concept_id"])
            ref_img = f"people/{self.folders[person]}/ref_img{posixpath.splitext(self.references[person])[1]}"
            record = formats.query_question(item, ref_img, query)
            lines[formats.fragment("plvm-eval", split, key, user)].append(json.dumps(record))
            self.stat_update(f"eval:{split}:{user}")


def stage(uri: str, storage_options: storage.StorageOptions | None, kinds: tuple[str, ...],
          references: dict[str, str], folders: dict[str, str], tasks: Resources) -> Stage:  # fmt: skip
    """One call per slice (``batch_size`` 1 of the listing, with the stages joined before it)."""
    resources = tasks.model_copy(update={"batch_size": 1})
    args = (uri, storage_options, kinds, references, folders)
    return Stage.of("shards", WriteShards, args, resources, keeps_rows=False)
