"""The cohort barrier: every face of a run embedded before any is matched, and the concepts' scales.

With ``match.normalization: cohort`` a concept's scale is measured on its user's cohort (the
bank's other concepts and the faces of the user's photos; the rule is
``plvm_model.faces.matching.MatchRule``). The photos' pixels do not cross the barrier (it drops
them, and the pipeline drops them already at their last reader, the align stage, inside the
detect actor: they never enter the object store); the faces are kept, small; the caption run keeps the photos' bytes and decodes them once more for the LLM).
It materializes the run and computes every user's scales: in the driver when the faces fit in
``match.cohort_gather_mb``, else by a groupby on the cluster.

In a caption run the user's faces are those of the user's whole face index (:class:`IndexCohort`:
this run's photos are committed to it before the barrier), so a resumed or nightly run names
a face as one run over the whole archive would; evaluation measures over the run's own faces.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from operators.base import Barrier
from operators.match import MatchConfig, Scales
from operators.rows import as_row_faces, face_vectors, to_table
from plvm_model.store.banks import BankCache, BankSource
from plvm_model.store.face_index import IndexSource
from plvm_model.store.output_schema import RowError

SCALE_SCHEMA = pa.schema([("user_id", pa.string()), ("concept_id", pa.string()), ("scale", pa.float64())])


class CohortScales:
    """All rows of one user (with face embeddings) -> (user_id, concept_id, scale) per concept of the bank."""

    def __init__(
        self,
        config: MatchConfig,
        banks: BankSource,
        embedder_space: str | None = None,
    ) -> None:
        self.rule = config.rule()
        self.banks = BankCache(banks, embedder_space)

    def __call__(self, group: pa.Table) -> pa.Table:
        out: dict[str, list] = {"user_id": [], "concept_id": [], "scale": []}
        user = group.column("user_id")[0].as_py() if group.num_rows else None
        try:
            bank = self.banks.get(user)
        except (RowError, ValueError):  # no usable bank, or no valid user id: the match stage reports it
            return pa.table(out, schema=SCALE_SCHEMA)
        run = face_vectors(group.column("faces"), bank.concepts[0].face_descriptors.shape[1])
        scales = self.rule.scales([c.face_descriptors for c in bank.concepts], run)
        for concept, scale in zip(bank.concepts, scales):
            if scale is not None:
                out["user_id"].append(user)
                out["concept_id"].append(concept.concept_id)
                out["scale"].append(scale)
        return pa.table(out, schema=SCALE_SCHEMA)


def cohort_scales(
    rows,
    config: MatchConfig,
    banks: BankSource,
    embedder_space: str | None = None,
) -> Scales:
    """Every user's concept scales from ``rows`` with face embeddings (a materialized Ray dataset or a table)."""
    scales = CohortScales(config, banks, embedder_space)
    if not isinstance(rows, pa.Table) and rows.size_bytes() <= config.cohort_gather_mb * 2**20:
        import ray

        rows = pa.concat_tables([t.select(["user_id", "faces"]) for t in ray.get(rows.to_arrow_refs())])
    if isinstance(rows, pa.Table):
        users = pc.unique(rows.column("user_id")).to_pylist()
        found = [scales(rows.filter(pc.equal(rows.column("user_id"), user))) for user in users]
        out = pa.concat_tables(found).to_pylist() if found else []
    else:
        # one partition per block at most
        partitions = max(1, min(200, rows.num_blocks()))
        grouped = rows.select_columns(["user_id", "faces"]).groupby("user_id", num_partitions=partitions)
        out = grouped.map_groups(scales.__call__, batch_format="pyarrow").take_all()
    return {(r["user_id"], r["concept_id"]): r["scale"] for r in out}


@dataclass(frozen=True)
class IndexCohort:
    """The cohort of a caption run: the current faces of its users' face index, but those of the photos
    ``exclude`` names (content hashes of photos deleted from the archive)."""

    source: IndexSource
    users: tuple[str, ...]
    exclude: frozenset[str] = frozenset()

    def faces(self) -> pa.Table:
        """(user_id, faces with their ``embedding``) per current index row of the users, column by column (an
        archive of a million photos takes about a GB here, not a Python object per face)."""
        index, tables = self.source.open(), []
        excluded = pa.array(sorted(self.exclude), pa.string())
        for user in self.users:
            rows = index.read(user, self.source.embedder).select(["content_hash", "faces"])
            rows = rows.filter(pc.invert(pc.is_in(rows.column("content_hash"), value_set=excluded)))
            users = pa.array([user] * rows.num_rows, pa.string())
            tables.append(pa.table({"user_id": users, "faces": as_row_faces(rows.column("faces"))}))
        return pa.concat_tables(tables) if tables else to_table([], ["user_id", "faces"])


def barrier(config: MatchConfig, banks: BankSource, embedder_space: str, index: IndexCohort | None = None) -> Barrier:
    """The cohort barrier step: hands the scales on as ``scales`` (the match stage's :class:`FromRun` argument),
    measured over ``index``'s faces if given, else over the run's."""

    def run(ds, values: dict) -> object:
        ds = ds.materialize()  # with every face of the run committed to the index
        if index is None:
            values["scales"] = cohort_scales(ds, config, banks, embedder_space)
            return ds
        faces = index.faces()
        if faces.nbytes > config.cohort_gather_mb * 2**20:
            import ray.data

            faces = ray.data.from_arrow(faces).materialize()
        values["scales"] = cohort_scales(faces, config, banks, embedder_space)
        return ds

    return Barrier("cohort", run, needs=("user_id", "faces"), drops=("pixels",))
