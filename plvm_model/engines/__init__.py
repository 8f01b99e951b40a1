"""Generation engines behind one interface: transformers (the reference) and vLLM (production).

:func:`make_engine` builds the one a config names; each engine's module is imported only then (vLLM's and
transformers' imports take seconds).
"""

from __future__ import annotations

from typing import Any

from plvm_model.engines.base import Engine, EngineOptions, GenerationRequest

ENGINES = ("transformers", "vllm")

__all__ = ["ENGINES", "Engine", "EngineOptions", "GenerationRequest", "make_engine"]


def make_engine(kind: str, model_path: str, options: EngineOptions, **engine_args: Any) -> Engine:
    """The engine named ``kind`` for the LLaVA checkpoint at ``model_path``; ``engine_args`` (vllm only) go to
    ``vllm.LLM`` as they are."""
    if kind == "transformers":
        from plvm_model.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_path, options, **engine_args)
    if kind == "vllm":
        from plvm_model.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, options, **engine_args)
    raise ValueError(f"unknown engine {kind!r}; available: {', '.join(ENGINES)}")
