"""Configs are data, validated at start: a bad key or value is an error naming it."""

from __future__ import annotations

import runpy
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from conftest import REPO
from pipelines.config import Config, ConfigError, load_config

SHIPPED = ["local.yaml", "llava-1.5-7b.yaml", "full-size-cpu.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid(name):
    random_weights = name == "full-size-cpu.yaml"  # it runs only with --random-weights
    config = load_config(REPO / "configs" / name, random_weights=random_weights)
    assert config.detect.long_side == 1024 and config.models.random_weights == random_weights


def restated(data: dict[str, Any], defaults: BaseModel, prefix: str = "") -> list[str]:
    """The dotted keys of ``data`` whose value is the default's (``${VAR}`` values are never defaults)."""
    out = []
    for key, value in data.items():
        default = getattr(defaults, key)
        if isinstance(default, BaseModel) and isinstance(value, dict):
            out += restated(value, default, f"{prefix}{key}.")
        elif alone(defaults, key, value) == default:
            out.append(prefix + key)
    return out


def alone(defaults: BaseModel, key: str, value: Any) -> Any:
    """``value`` as the config model of ``defaults`` reads it for ``key``, the other keys at their defaults (None:
    a value that is valid only with other keys, such as ``models.llava: published``, is never a default)."""
    try:
        return getattr(type(defaults).model_validate({key: value}), key)
    except ValidationError:
        return None


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_list_only_what_differs_from_the_defaults(name):
    data = yaml.safe_load((REPO / "configs" / name).read_text())
    assert restated(data, Config()) == [], f"configs/{name} restates defaults of the config models"


def test_the_docs_configuration_table_is_the_generated_one():
    script = runpy.run_path(str(REPO / "scripts" / "config_table.py"))
    docs = (REPO / "docs" / "configuration.md").read_text()
    table = script["config_table"]()
    assert "| `generate.vllm.engine_args` |" in table
    assert script["with_table"](docs, table) == docs, "regenerate it: python scripts/config_table.py --docs"


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("detect:\n  long_sid: 800\nmatch:\n  threshold: -1\ngenerate:\n  engine: tensorrt\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    text = str(error.value)
    assert "detect.long_sid: unknown key" in text
    assert "match.threshold" in text and "generate.engine" in text
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_environment_variables_and_overrides(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("bank: ${BANK_ROOT}/banks\noutput:\n  uri: ${OUT_ROOT:-/tmp/default-out}\n")
    monkeypatch.setenv("BANK_ROOT", "s3://photos")
    monkeypatch.delenv("OUT_ROOT", raising=False)
    config = load_config(path, input__uri="/photos/2024", input__user="alice", output__uri=None)
    assert config.bank == "s3://photos/banks"
    assert config.output.uri == "/tmp/default-out"
    assert (config.input.uri, config.input.user) == ("/photos/2024", "alice")


def test_a_section_given_in_part_keeps_its_defaults_for_the_rest():
    tasks = Config.model_validate({"tasks": {"batch_size": 4}}).tasks
    assert tasks == Config().tasks.model_copy(update={"batch_size": 4})
    vllm = Config.model_validate({"generate": {"vllm": {"max_model_len": 1024}}}).generate.vllm
    assert vllm == Config().generate.vllm.model_copy(update={"max_model_len": 1024})


def test_vllm_options_pass_through_except_those_the_engine_sets():
    given = {"max_model_len": 1024, "engine_args": {"kv_cache_dtype": "fp8", "swap_space": 2}}
    args = load_config(None, generate__vllm=given).generate.vllm.llm_args()
    assert args["max_model_len"] == 1024 and args["kv_cache_dtype"] == "fp8" and args["swap_space"] == 2
    assert "tensor_parallel_size" in args and not args.keys() & {"python", "env", "engine_args"}
    with pytest.raises(ConfigError, match=r"generate\.vllm: .*engine_args: dtype, seed: set by the vllm engine itself"):
        load_config(None, generate__vllm={"engine_args": {"dtype": "float16", "seed": 1}})
    with pytest.raises(ConfigError, match=r"generate\.vllm: .*give max_model_len as its own key"):
        load_config(None, generate__vllm={"engine_args": {"max_model_len": 2048}})
