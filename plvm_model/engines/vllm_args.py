"""The keyword arguments of ``vllm.LLM`` that the vLLM engine sets itself; every other one passes through.

Apart from ``vllm_engine`` (which imports torch and vLLM) so that a config can be checked when it is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ENGINE_SET = {
    "model": "the language model exported from the LLaVA checkpoint",
    "tokenizer": "the LLaVA checkpoint's",
    "enable_prompt_embeds": "always on: the prompt, concepts included, reaches vLLM as embeddings",
    "quantization": "the engine's quantization option, generate.quantization, mapped to vLLM's method",
    "dtype": "the engine's dtype option, generate.dtype",
    "seed": "fixed, for reproducible runs",
    "worker_extension_cls": "the concept slots' writer in concept_style plvm",
    "load_format": "the checkpoint's weights, or dummy (random) weights with models.random_weights",
}


def refuse_engine_set(engine_args: Mapping[str, Any]) -> None:
    """A ValueError naming each key of ``engine_args`` that the engine sets itself, and where it comes from."""
    taken = [key for key in engine_args if key in ENGINE_SET]
    if taken:
        reasons = "; ".join(f"{key}: {ENGINE_SET[key]}" for key in taken)
        raise ValueError(f"engine_args: {', '.join(taken)}: set by the vllm engine itself ({reasons})")
