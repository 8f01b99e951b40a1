"""The configuration table of docs/configuration.md, made from the config models: one row per key.

    .venv/bin/python scripts/config_table.py          # prints the table
    .venv/bin/python scripts/config_table.py --docs   # writes it into docs/configuration.md's "Configuration" section

A test checks that docs/configuration.md holds exactly this table.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines.config import Config

DOCS = REPO / "docs" / "configuration.md"
SECTION = "\n## Configuration\n"
BOUNDS = {Ge: ("ge", ">="), Gt: ("gt", ">"), Le: ("le", "<="), Lt: ("lt", "<")}


def type_name(annotation: Any) -> str:
    """``annotation`` as a YAML reader would name it: ``int``, ``str | null``, ``cohort | none``, ``list[str]``."""
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is tuple and args[1:] == (Ellipsis,):
        return f"list[{type_name(args[0])}]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    return annotation.__name__


def yaml_value(value: Any) -> str:
    """``value`` (JSON-like) as it is written in a YAML config, on one line (JSON is YAML too)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=sys.maxsize, allow_unicode=True)
    text = text.removesuffix("\n...\n").strip()
    return json.dumps(value, ensure_ascii=False) if "\n" in text else text


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def rows(model: BaseModel, prefix: str = "") -> list[str]:
    """One table row per key of ``model`` (a subsection's row, then its keys'), its values as the defaults."""
    out = []
    for name, field in type(model).model_fields.items():
        key, value = prefix + name, getattr(model, name)
        description = cell(" ".join((field.description or "").split()))
        if isinstance(value, BaseModel):
            out.append(f"| `{key}` | section | | {description} |")
            out += rows(value, key + ".")
            continue
        bounds = [f"{BOUNDS[type(m)][1]} {getattr(m, BOUNDS[type(m)][0])}" for m in field.metadata if type(m) in BOUNDS]
        kind = type_name(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
        default = yaml_value(model.model_dump(mode="json", include={name})[name])
        out.append(f"| `{key}` | {cell(kind)} | `{cell(default)}` | {description} |")
    return out


def config_table() -> str:
    """The markdown table of every config key: dotted key, type, default, description."""
    return "\n".join(["| key | type | default | description |", "|---|---|---|---|", *rows(Config())])


def with_table(docs: str, table: str) -> str:
    """``docs`` with the table of its "Configuration" section replaced by ``table``."""
    start = docs.index(SECTION) + len(SECTION)
    end = docs.find("\n## ", start)
    end = len(docs) if end < 0 else end
    lines = docs[start:end].split("\n")
    table_lines = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not table_lines or table_lines != list(range(table_lines[0], table_lines[-1] + 1)):
        raise ValueError(f"{DOCS.name}: the Configuration section must hold one table")
    first, last = table_lines[0], table_lines[-1]
    section = "\n".join(lines[:first] + table.split("\n") + lines[last + 1 :])
    return docs[:start] + section + docs[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", action="store_true", help="write the table into docs/configuration.md")
    args = parser.parse_args()
    if args.docs:
        DOCS.write_text(with_table(DOCS.read_text(), config_table()))
    else:
        print(config_table())


if __name__ == "__main__":
    main()
