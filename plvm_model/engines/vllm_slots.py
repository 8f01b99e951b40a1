"""The vLLM side of the concept slots (``concept_style: plvm``): a worker extension that writes slot rows.

vLLM adds the methods of a ``worker_extension_cls`` to each of its workers, for
``LLM.collective_rpc``; the engine calls :meth:`ConceptSlotWriter.write_concept_rows` by name, so
only token ids and rows of numbers cross into the worker processes (no pickled code; plain lists,
because vLLM's RPC decodes arguments without their types, and a tensor would arrive as its parts). Imported inside
vLLM's workers: it needs torch and the worker's model, nothing of vLLM at import time.
"""

from __future__ import annotations

import torch

SLOT_WRITER = f"{__name__}.ConceptSlotWriter"


@torch.inference_mode()
def write_rows(model: torch.nn.Module, token_ids: list[int], embeddings: torch.Tensor, heads: torch.Tensor) -> None:
    """Writes rows ``token_ids`` of the embedding table (``embeddings``) and the output head (``heads``) of vLLM's
    language model. Each layer holds the rows of its vocabulary shard (tensor parallelism); a pipeline stage
    without the layer has nothing to write. The layer's method then prepares its weight again, as after loading
    (vLLM's CPU build computes the output head from a packed copy of the weight)."""
    for layer, rows in ((model.model.embed_tokens, embeddings), (model.lm_head, heads)):
        if not hasattr(layer, "shard_indices"):  # vLLM's PPMissingLayer
            continue
        method = type(layer.quant_method).__name__
        if method != "UnquantizedEmbeddingMethod":
            raise ValueError(f"concept slots need unquantized embedding and output-head rows, not {method}")
        start, end = layer.shard_indices.org_vocab_start_index, layer.shard_indices.org_vocab_end_index
        for token_id, row in zip(token_ids, rows):
            if start <= token_id < end:
                layer.weight[token_id - start] = row.to(layer.weight.device, layer.weight.dtype)
        layer.quant_method.process_weights_after_loading(layer)


class ConceptSlotWriter:
    """Mixed into each vLLM worker by ``worker_extension_cls``."""

    def write_concept_rows(self, token_ids: list[int], embeddings: list[list[float]], heads: list[list[float]]) -> None:
        write_rows(self.get_model(), token_ids, torch.tensor(embeddings), torch.tensor(heads))
