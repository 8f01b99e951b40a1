"""The import structure: no circle, no import from a layer above, no private name taken across layers."""

from __future__ import annotations

import runpy

from conftest import REPO


def test_the_layers_import_only_downward_and_in_no_circle():
    script = runpy.run_path(str(REPO / "scripts" / "import_graph.py"))
    edges = script["graph"]()
    assert len(edges) > 50, "every module of the packages is read"
    assert any(target == "plvm_model.store.banks" for target, _ in edges["operators.match"]), "imports are found"
    assert script["problems"](edges) == []


def test_the_checker_finds_an_upward_import_a_circle_and_a_private_name():
    script = runpy.run_path(str(REPO / "scripts" / "import_graph.py"))
    edges = {
        "operators.read": [("pipelines.config", [])],
        "pipelines.caption": [("pipelines.rematch", [])],
        "pipelines.rematch": [("pipelines.caption", [])],
        "pipelines.cli.archive": [("pipelines.caption", ["_private"])],
    }
    found = script["problems"](edges)
    assert any(line.startswith("upward: operators.read") for line in found)
    assert "circle: pipelines.caption -> pipelines.rematch" in found
    assert any(line.startswith("private: pipelines.cli.archive") for line in found)
