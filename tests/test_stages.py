"""The stage list's column contract: where columns leave the rows."""

from __future__ import annotations

import pyarrow as pa

from conftest import make_config
from operators.base import Resources, Stage
from pipelines.caption import naming_stages
from pipelines.stages import Barrier, Guarded, drop_early


class Passes:
    """A batch function that returns its batch as it is."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch


def test_a_column_that_a_later_step_drops_leaves_at_its_last_reader(tmp_path):
    steps = {step.name: step for step in drop_early(naming_stages(make_config(tmp_path)))}
    assert "pixels" in steps["embed"].drops  # the last stage that reads them: they never reach the barrier
    assert steps["cohort"].drops == () and steps["detect"].drops == ()
    assert steps["decode"].drops == ("data",)  # decode needs the bytes it drops: it keeps that drop


def test_a_drop_with_no_stage_before_it_stays_with_its_step():
    barrier = Barrier("barrier", lambda ds, values: ds, needs=(), drops=("pixels",))
    reader = Stage("reader", Passes, (), Resources(), needs=("path",))
    assert drop_early([reader, barrier]) == [reader, barrier]  # pixels came with the listing


def test_a_stage_returns_its_rows_without_the_columns_it_drops():
    stage = Stage("reader", Passes, (), Resources(), needs=("pixels",), drops=("pixels",))
    batch = pa.table({"path": ["a.jpg", "b.jpg"], "pixels": [b"\0", b"\1"]})
    assert Guarded(stage, (), tolerate=False)(batch).column_names == ["path"]
