"""``plvm dataset``: a caption run's output turned into personalized training and evaluation sets, exactly once.

The build reads the output (its parts, pinned with the runs that wrote them, the users' face index and their
banks at the versions those runs read: ``pipelines.dataset.source``), lists it as slices of its parts, and runs
``pipelines.stage_lists.dataset_stages`` over them on Ray: each slice's rows are read, their photos' bytes
checked against the face index, their items made (``operators.items``), their files cut (``operators.photo_files``)
and the slice's shard staged (``operators.shards``). The driver holds the dataset folder's lease, and commits each
shard as it arrives; a killed build goes on with ``--resume`` from the shards it committed, and no item is written
twice. At the end it assembles the JSON formats, writes the card and, last, ``manifest.json``
(``pipelines.dataset.card``). No photo's row passes through the driver: it holds the slices and the counts.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from operators.items import person_key, split_of
from pipelines import stage_lists
from pipelines.config import Config
from pipelines.dataset.card import Counts, card, manifest
from pipelines.dataset.source import Source, pin_source
from pipelines.evaluation.captions import read_truth
from pipelines.runner import preflight
from pipelines.runner.execute import execute
from pipelines.runner.failures import results
from pipelines.runner.progress import Progress
from plvm_model.store import dataset_formats as formats
from plvm_model.store import exports, storage
from plvm_model.store.dataset_folder import DatasetFolder, Shard
from plvm_model.store.errors import ConfigError, OutputExists
from plvm_model.store.ids import key_of, new_run_id
from plvm_model.store.lease import Lease


@dataclass
class DatasetSummary:
    build_id: str
    out: str
    photos: dict[str, int] = field(default_factory=dict)
    """Photos with items, by split."""
    items: dict[str, dict[str, int]] = field(default_factory=dict)
    """Items by split and kind."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Output rows of the chosen users that gave no item, by why."""
    shards: int = 0
    """Shards this build committed."""
    resumed: int = 0
    """Shards committed by the builds it resumed."""
    rows: int = 0
    """Output rows of the chosen users that this build read."""
    wall_s: float = 0.0
    items_per_s: float = 0.0
    """Items of the shards this build committed, per second of its wall time."""
    status: str = "complete"
    """``complete``, or ``already complete`` (``--resume`` of a finished dataset: nothing done)."""

    def lines(self) -> list[str]:
        total = sum(sum(kinds.values()) for kinds in self.items.values())
        splits = ", ".join(f"{s} {n} photos, {sum(self.items.get(s, {}).values())} items" for s, n in self.photos.items())
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items()) or "none"
        resumed = f", {self.resumed} committed before" if self.resumed else ""
        return [
            f"dataset {self.out} ({self.status}): {total} items of {sum(self.photos.values())} photos ({splits or 'none'})",
            f"output rows without items: {dropped}",
            f"build {self.build_id}: {self.shards} shards{resumed}, {self.rows} rows read, wall {self.wall_s:.1f} s, "
            f"{self.items_per_s:.1f} items/s",
        ]


def apart(output_uri: str, out_uri: str) -> None:
    """Refuse a dataset folder inside the output or around it (plain Parquet readers of either would read the
    other's files)."""
    a, b = storage.normalize(output_uri).rstrip("/"), storage.normalize(out_uri).rstrip("/")
    if a == b or b.startswith(a + "/") or a.startswith(b + "/"):
        raise ConfigError(f"the dataset folder {out_uri} and the output {output_uri} must not be one inside the other")


def plan_of(config: Config, source: Source, truth_path: str | None) -> dict:
    """What the build makes, which a resumed build must share: the source as pinned, the options, the truth."""
    parts = hashlib.sha256("\n".join(f"{p} {n}" for p, n in source.parts).encode()).hexdigest()
    truth = None
    if truth_path is not None:
        fs, path = storage.filesystem(truth_path, config.storage)
        truth = {"file": truth_path, "sha256": hashlib.sha256(fs.cat_file(path)).hexdigest()}
    versions: dict[str, list[int]] = {}
    for user, version in sorted(source.banks):
        versions.setdefault(user, []).append(version)
    return {
        "source": {"output": source.uri, "version": source.version, "parts": len(source.parts), "rows": source.rows,
                   "parts_sha256": parts},  # fmt: skip
        "users": list(source.users),
        "bank_versions": versions,
        "options": config.dataset.model_dump(mode="json"),
        "caption_question": config.generate.caption,
        "crops_from": config.decode.model_dump(mode="json"),
        "truth": truth,
        "aligners": sorted({bank.aligner for bank in source.banks.values()}),
        "embedders": sorted({bank.embedder for bank in source.banks.values()}),
    }


def build_dataset(config: Config, output_uri: str, out_uri: str, users: list[str] | None = None,
                  truth_path: str | None = None, resume: bool = False, overwrite: bool = False,
                  command: str = "plvm dataset") -> DatasetSummary:  # fmt: skip
    """Build the dataset of ``output_uri`` (its ``users``, default all) into ``out_uri``; see the module. A folder that
    holds a dataset or an unfinished build is refused unless ``resume`` (the same plan: go on) or ``overwrite``."""
    started = time.monotonic()
    apart(output_uri, out_uri)
    source = pin_source(config, output_uri, users)
    truth = read_truth(truth_path) if truth_path is not None else None
    plan = plan_of(config, source, truth_path)
    preflight.check_output(out_uri, config.storage)
    folder, build_id = DatasetFolder(out_uri, config.storage), new_run_id()
    with folder.lease(build_id, config.output.lease_expiry_s) as lease:
        done = begin(folder, plan, resume, overwrite)
        # recorded in the output before a file of it is written: plvm forget removes the datasets of a user's rows
        exports.record(output_uri, config.storage, "dataset", out_uri, list(source.users))
        if done is None:
            held = folder.read_json("manifest.json")["counts"]
            return DatasetSummary(build_id, out_uri, held["photos"], held["items"], held["dropped"],
                                  status="already complete")  # fmt: skip
        build = Build(config, source, folder, build_id, plan, truth)
        summary = build.run(lease, done)
        counts = build.finish(done, command)
    summary.photos, summary.items, summary.dropped = counts.photos, counts.items, counts.dropped
    summary.wall_s = time.monotonic() - started
    summary.items_per_s = build.new_items / summary.wall_s if summary.wall_s else 0.0
    return summary


def begin(folder: DatasetFolder, plan: dict, resume: bool, overwrite: bool) -> dict[str, dict] | None:
    """Under the lease: the shards committed before (none for a new build), or None when ``resume`` finds the
    dataset complete; a folder that holds something else, or another build's dataset, is refused."""
    state = folder.state()
    if state == "foreign":
        raise OutputExists(f"{folder.uri} holds files that no dataset build wrote: give an empty or new folder")
    if overwrite:
        folder.clear()
    elif state == "complete":
        if resume:
            return None
        raise OutputExists(f"{folder.uri} already holds a complete dataset: pass --overwrite to build it again")
    elif state == "building":
        if not resume:
            raise OutputExists(f"{folder.uri} holds an unfinished build: pass --resume to go on with it, or "
                               "--overwrite to start again")  # fmt: skip
        if folder.plan() != plan:
            raise OutputExists(f"{folder.uri} holds an unfinished build of other options or of another version of "
                               "the output: pass --overwrite to start again")  # fmt: skip
        return folder.done()
    folder.set_plan(plan)
    return {}


class Build:
    """One build, with the folder's lease held: its references, its shards, its finish."""

    def __init__(self, config: Config, source: Source, folder: DatasetFolder, build_id: str, plan: dict,
                 truth: dict[str, list[str]] | None) -> None:  # fmt: skip
        self.config, self.source, self.folder, self.build_id, self.plan = config, source, folder, build_id, plan
        self.digest = key_of(json.dumps(plan, sort_keys=True))
        self.listing = source.slices(config.dataset.photos_per_shard, self.digest)
        self.people, self.references, self.folders = self.copy_references()
        self.truth = truth
        self.new_items = 0

    def copy_references(self) -> tuple[dict[str, dict[str, dict]], dict[str, str], dict[str, str]]:
        """Each chosen user's people (by bank version, the newest's name last), their first reference photo copied
        into the dataset where it can be read, and their folder names in the PLVM layout."""
        people: dict[str, dict[str, dict]] = {}
        references, folders = {}, {}
        for (user, _), bank in sorted(self.source.banks.items()):
            for concept in bank.concepts:
                key = person_key(user, concept.concept_id)
                taken = {f for k, f in folders.items() if k.startswith(f"{user}/") and k != key}
                name = formats.person_folder(concept.name, concept.concept_id)
                folders[key] = name if name not in taken else concept.concept_id
                if key not in references and concept.references:
                    copied = self.copy_reference(user, concept.concept_id, concept.references[0])
                    if copied is not None:
                        references[key] = copied
                person = {"name": concept.name, "reference": references.get(key)}
                people.setdefault(user, {})[concept.concept_id] = person
        return people, references, folders

    def copy_reference(self, user: str, concept_id: str, uri: str) -> str | None:
        """The reference photo ``uri`` copied into the dataset: its path there, or None when it cannot be read (the
        person goes without a reference photo, and out of the PLVM layout)."""
        try:
            fs, path = storage.filesystem(uri, self.config.storage)
            data = fs.cat_file(path)
        except OSError:
            return None
        ext = posixpath.splitext(uri)[1].lstrip(".").lower() or "jpg"
        copied = formats.reference_path(user, concept_id, ext)
        self.folder.write(copied, data)
        return copied

    def run(self, lease: Lease, done: dict[str, dict]) -> DatasetSummary:
        """The shards not committed yet, each committed as it arrives."""
        config = self.config
        keys = self.listing.column("shard")
        todo = self.listing.filter(pc.invert(pc.is_in(keys, value_set=pa.array(list(done), pa.string()))))
        summary = DatasetSummary(self.build_id, self.folder.uri, resumed=len(done))
        splits = list(config.dataset.splits)
        if todo.num_rows:
            steps = stage_lists.dataset_stages(config, self.folder.uri, self.source.users, self.source.runs,
                                               self.source.index, self.digest, self.source.roster(), self.truth,
                                               self.references, self.folders)  # fmt: skip
            todo = todo.drop_columns(["shard"])
            progress = Progress(sum(todo.column("part_rows").to_pylist()), config.ray)
            for row in results(execute(todo, steps, config.ray, config.run, 1)):
                lease.check()
                shard = Shard(**row)
                replaces = [formats.hf_part(s, shard.shard) for s in splits]
                done[shard.shard] = self.folder.commit(shard, self.build_id, replaces)
                self.new_items += sum(v for k, v in shard.stats or [] if k.startswith("shards.items:"))
                summary.shards += 1
                summary.rows += shard.rows
                progress.update(shard.rows)
        return summary

    @staticmethod
    def stats(done: dict[str, dict]) -> Counter:
        """The stages' counts over every shard committed."""
        total: Counter = Counter()
        for record in done.values():
            total.update(dict(map(tuple, record["stats"] or [])))
        return +total  # the positive counts, as a sum of Counters keeps

    def finish(self, done: dict[str, dict], command: str) -> Counts:
        """The JSON formats assembled, the PLVM layout's references and questions, the card and the manifest; what
        the dataset holds."""
        config, folder = self.config, self.folder
        order = {key: i for i, key in enumerate(self.listing.column("shard").to_pylist())}
        written = [f for record in sorted(done.values(), key=lambda r: order[r["shard"]]) for f in record["files"]]
        counts = Counts.of(self.stats(done))
        kinds, splits = config.dataset.formats, list(config.dataset.splits)
        files: dict[str, dict] = {}
        for fmt in (f for f in formats.JSON_LISTS if f in kinds):
            files[fmt] = {}
            for split in splits:
                prefix = posixpath.dirname(formats.fragment(fmt, split, "k")) + "/"
                folder.assemble(formats.json_list(fmt, split), [f for f in written if f.startswith(prefix)])
                files[fmt][split] = formats.json_list(fmt, split)
        if "llamafactory" in kinds:
            folder.write_json("dataset_info.json", formats.dataset_info(splits))
        if "hf" in kinds:
            files["hf"] = {s: f"hf/{s}/*.parquet" for s in splits if any(f.startswith(f"hf/{s}/") for f in written)}
        held = {key for key, person in counts.people.items() if person["photos"] or person["asked"]}
        if "plvm-eval" in kinds:
            files["plvm-eval"] = {}
            for split, users in sorted(counts.evaluation.items()):
                files["plvm-eval"][split] = [self.evaluation(split, user, held, written) for user in sorted(users)]
        for user, known in self.people.items():
            for concept_id, person in known.items():
                if (user, concept_id) not in held and person["reference"]:
                    folder.fs.rm(folder.path(person["reference"]))  # a person the dataset holds nothing of
        config_hash = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
        extra = {"build_id": self.build_id, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "command": command}  # fmt: skip
        described = manifest(self.plan | {"config_hash": config_hash}, counts, self.people, files, extra)
        folder.finish(described, card(described))
        return counts

    def evaluation(self, split: str, user: str, held: set[tuple[str, str]], written: list[str]) -> str:
        """The PLVM layout of ``user``'s photos in ``split``: each person's reference as ``ref_img`` (the people the
        dataset holds, of that split when split by person), and ``query_ques.json``; its folder."""
        where = formats.eval_folder(split, user)
        by_person = self.config.dataset.split_by == "person"
        for concept_id, person in self.people.get(user, {}).items():
            key = person_key(user, concept_id)
            if (user, concept_id) not in held or person["reference"] is None:
                continue
            if by_person and split_of(key, self.config.dataset.splits) != split:
                continue
            ext = posixpath.splitext(person["reference"])[1]
            data = self.folder.fs.cat_file(self.folder.path(person["reference"]))
            self.folder.write(f"{where}/people/{self.folders[key]}/ref_img{ext}", data)
        prefix = posixpath.dirname(formats.fragment("plvm-eval", split, "k", user)) + "/"
        self.folder.assemble(f"{where}/query_ques.json", [f for f in written if f.startswith(prefix)])
        return where
