"""The stages' counters as a run reports them: added up over the parts it committed, by stage, one line each.

Each stage's counts travel with its rows (``operators.rows.STATS``) as ``<stage>.<counter>``: ``rows``,
``seconds`` (in its workers), ``errors.<kind>`` (the row errors it gave) and the batch function's own; the write
stage hands them on with each part it stages (``Staged.stats``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from plvm_model.store.output_table import Staged


def totals(parts: Iterable[Staged]) -> Counter:
    """The counts of every stage over ``parts``."""
    return sum((Counter(dict(part.stats or [])) for part in parts), Counter())


def by_stage(counts: Counter) -> dict[str, dict[str, float]]:
    """``<stage>.<counter>`` counts as {stage: {counter: value}}, the stages in the order they first appear."""
    out: dict[str, dict[str, float]] = {}
    for key, value in counts.items():
        stage, counter = key.split(".", 1)
        out.setdefault(stage, {})[counter] = round(value, 3) if counter == "seconds" else value
    return out


def stage_lines(stages: dict[str, dict[str, float]]) -> list[str]:
    """One line per stage: its rows, its seconds in its workers, then its own counters and its errors."""
    lines = []
    for stage, counts in stages.items():
        rest = ", ".join(f"{k} {v:g}" for k, v in counts.items() if k not in ("rows", "seconds"))
        lines.append(f"stage {stage}: {counts.get('rows', 0):g} rows, {counts.get('seconds', 0):.1f} s"
                     + (f", {rest}" if rest else ""))  # fmt: skip
    return lines
