"""Generation engines behind one interface: transformers (reference, fallback) and vLLM (production)."""

from plvm_model.engines.base import Engine, GenerationRequest, make_engine

__all__ = ["Engine", "GenerationRequest", "make_engine"]
