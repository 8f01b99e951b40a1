"""The stage list's column contract (where columns leave the rows) and stages joined into one batch call."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray

from conftest import make_config, photo
from operators.base import Resources, Stage
from operators.decode import decode_image
from operators.read import LISTING_COLUMNS
from operators.rows import to_table, working_faces
from pipelines.stage_lists import face_stages, naming_stages
from operators.base import Barrier, joined
from pipelines.runner.loop import Guarded, InProcess, apply, calls, drop_early
from plvm_model.faces import DlibEmbedder

# Ray's workers cannot import the tests: the batch functions below travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Passes:
    """A batch function that returns its batch as it is."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch


def test_a_column_that_a_later_step_drops_leaves_at_its_last_reader(tmp_path):
    steps = {step.name: step for step in drop_early(naming_stages(make_config(tmp_path)))}
    assert steps["align"].drops == ("pixels",)  # the last stage that reads them: they never reach the barrier
    assert steps["cohort"].drops == () and steps["detect"].drops == ()
    assert steps["decode"].drops == ("data",)  # decode needs the bytes it drops: it keeps that drop
    assert steps["embed"].drops == ("chips",)


def test_a_drop_with_no_stage_before_it_stays_with_its_step():
    barrier = Barrier("barrier", lambda ds, values: ds, needs=(), drops=("pixels",))
    reader = Stage("reader", Passes, (), Resources(), needs=("path",))
    assert drop_early([reader, barrier]) == [reader, barrier]  # pixels came with the listing


def test_a_stage_returns_its_rows_without_the_columns_it_drops():
    stage = Stage("reader", Passes, (), Resources(), needs=("pixels",), drops=("pixels",))
    batch = pa.table({"path": ["a.jpg", "b.jpg"], "pixels": [b"\0", b"\1"]})
    assert Guarded(stage, (), tolerate=False)(batch).column_names == ["path"]


class StampsProcess:
    """A batch function that adds a column ``name``: the id of the process it ran in."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.append_column(self.name, pa.array([os.getpid()] * batch.num_rows))


class InProcessOf:
    """A batch function that adds ``same``: whether each row's ``columns`` hold the id of this very process."""

    def __init__(self, *columns: str) -> None:
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        pids = zip(*(batch.column(c).to_pylist() for c in self.columns), strict=True)
        return batch.append_column("same", pa.array([set(p) == {os.getpid()} for p in pids]))


def stamping(name: str, **fields) -> Stage:
    return Stage(name, StampsProcess, (name,), Resources(num_cpus=0.1, batch_size=2), adds=(name,), **fields)


def test_joined_stages_run_in_one_call_of_the_actor_and_what_they_drop_never_leaves_it(ray_local):
    import ray.data

    steps = joined(
        stamping("before", needs=("path",)),
        stamping("actor", needs=("before",), actors=True),
        Stage("after", InProcessOf, ("before", "actor"), Resources(num_cpus=0.1), needs=("before", "actor"),
              adds=("same",), drops=("before",)),  # fmt: skip
    )
    assert [[stage.name for stage in call] for call in calls(steps)] == [["before", "actor", "after"]]
    ds = apply(ray.data.from_arrow(pa.table({"path": [f"{i}.jpg" for i in range(6)]})), steps, False, 0)
    rows = ds.take_all()
    assert len(rows) == 6 and all(row["same"] for row in rows)  # both task stages ran in the actor's process
    assert "before" not in rows[0]  # dropped inside the call: it never reached Ray's object store


def test_a_call_joins_at_most_one_actor_pool_and_never_a_barrier():
    pool = stamping("pool", needs=(), actors=True)
    with pytest.raises(ValueError, match="join two actor pools"):
        calls(joined(pool, replace(pool, name="other")))
    barrier = Barrier("barrier", lambda ds, values: ds, needs=())
    with pytest.raises(ValueError, match="cannot join the barrier"):
        calls([*joined(pool, stamping("task", needs=()))[:1], barrier])
    with pytest.raises(ValueError, match="none follows"):
        calls(joined(pool, stamping("task", needs=()))[:1])


def test_the_face_stages_embed_the_chips_the_embedder_cuts_from_the_whole_photo(tmp_path, yollava):
    """The embed actors get each face's chips (bytes), not the photo: the descriptors are the embedder's own."""
    config = make_config(tmp_path)
    path = photo("thao", "0.jpg")
    listing = to_table([{"index": 0, "path": path, "user_id": "u"}], ("index", *LISTING_COLUMNS))
    rows = InProcess(face_stages(config))(listing)
    image, _, _ = decode_image(Path(path).read_bytes(), config.decode.max_side, config.decode.max_pixels)
    expected = DlibEmbedder(**config.embed.options).embed(image, working_faces(rows.to_pylist()[0]))
    got = np.array([face["embedding"] for face in rows.column("faces")[0].as_py()], np.float32)
    assert len(got) >= 1 and "chips" not in rows.column_names
    np.testing.assert_array_equal(got, expected)
