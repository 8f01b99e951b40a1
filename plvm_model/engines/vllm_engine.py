"""The production engine: vLLM, with the whole prompt given as embeddings (``prompt_embeds``).

The prompt's embedding sequence is built here exactly as the transformers engine's is
(text embeddings from the model's table, each concept's context vectors, and the photo's
features from LLaVA's vision tower and projector) and vLLM generates from it with the
LLaVA's language model. This is the one input route that carries the concept vectors:
vLLM's own image inputs cannot be mixed with them. The crash cases measured with vLLM's
image inputs (pixel images next to ``image_embeds``, ``image_embeds`` of different
lengths in one batch) cannot arise, because no request carries ``multi_modal_data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from plvm_model import random_weights as randomly
from plvm_model.engines.base import EngineOptions, LlavaEngine, LlavaPrompter, SlotBatch
from plvm_model.engines.llava_parts import LlavaEncoders, text_only_checkpoint
from plvm_model.engines.vllm_args import refuse_engine_set
from plvm_model.engines.vllm_slots import SLOT_WRITER
from plvm_model.injection import ConceptTokens, splice

# Our name -> vLLM's quantization method, per platform.
GPU_QUANTIZATIONS = {"fp8": "fp8", "4bit": "bitsandbytes", "bitsandbytes": "bitsandbytes"}
CPU_QUANTIZATIONS = {"fp8": "fp8_per_channel"}


def vllm_quantization(quantization: str | None, on_cpu: bool, dtype: str) -> str | None:
    """vLLM's method for ``quantization``, or a ValueError that says what this platform offers."""
    if quantization is None:
        return None
    table = CPU_QUANTIZATIONS if on_cpu else GPU_QUANTIZATIONS
    where = "vLLM's CPU build" if on_cpu else "vLLM on GPU"
    if quantization not in table:
        offered = ", ".join(sorted(table))
        raise ValueError(
            f"quantization {quantization!r} is not supported by the vllm engine on this platform ({where} offers: "
            f"{offered}); the transformers engine offers bitsandbytes 8bit and 4bit"
        )
    if on_cpu and dtype not in ("bfloat16", "float16"):
        raise ValueError(f"{where} runs fp8 weights with dtype bfloat16 or float16, not {dtype}")
    return table[quantization]


class VLLMEngine(LlavaEngine):
    name = "vllm"

    def __init__(self, model_path: str, options: EngineOptions, engine_args: dict[str, Any] | None = None) -> None:
        """``engine_args`` go to ``vllm.LLM`` as they are, except those the engine sets itself (refused)."""
        engine_args = engine_args or {}
        refuse_engine_set(engine_args)
        from transformers.utils import logging

        logging.set_verbosity_error()
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        self.prompter = LlavaPrompter(model_path, options.template, options.image_aspect, options.concept_style)
        self.concept_slots = options.concept_slots
        slots = options.concept_slots if options.concept_style == "plvm" else 0
        dtype = options.dtype
        random_weights = options.random_weights
        self.encoders = LlavaEncoders(model_path, getattr(torch, dtype), options.device, random_weights)
        self.llm = LLM(
            model=str(text_only_checkpoint(model_path, extra_rows=slots, weights=not random_weights)),
            tokenizer=model_path,
            enable_prompt_embeds=True,
            dtype=dtype,
            quantization=vllm_quantization(options.quantization, current_platform.is_cpu(), dtype),
            seed=0,
            worker_extension_cls=SLOT_WRITER if slots else "",
            load_format="dummy" if random_weights else "auto",
            **engine_args,
        )
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        # Concept tokens lie beyond the tokenizer: our code turns them into names (LlavaEngine.generate)
        self.sampling = SamplingParams(temperature=0.0, max_tokens=options.max_new_tokens, detokenize=slots == 0)
        self.vocabulary = list(range(self.prompter.vocab))
        self.model_name = randomly.marked(Path(model_path).name, random_weights)

    def write_slots(self, rows: dict[int, ConceptTokens]) -> None:
        """Through vLLM's own worker RPC, into every worker (our worker extension's method; ids and rows of float32
        values as plain lists, exact through vLLM's serialization, in process or across processes)."""
        ids = list(rows)
        embeddings = [rows[i].soft_tokens[0].tolist() for i in ids]
        heads = [rows[i].head_weight.tolist() for i in ids]
        self.llm.collective_rpc("write_concept_rows", args=(ids, embeddings, heads))

    @torch.inference_mode()
    def prepare(self, batch: SlotBatch) -> list[torch.Tensor]:
        """Each request's whole prompt as one (length, hidden) embedding sequence."""
        requests = batch.requests
        prompts = [self.prompter.tokenize(r, ids) for r, ids in zip(requests, batch.concept_ids)]
        for prompt, request in zip(prompts, requests):
            if len(prompt.input_ids) + self.sampling.max_tokens > self.max_model_len:
                raise ValueError(
                    f"a prompt of {len(prompt.input_ids)} tokens ({len(request.concepts)} concepts) leaves no room "
                    f"for {self.sampling.max_tokens} new tokens within max_model_len {self.max_model_len}"
                )
        pixels = self.prompter.pixel_values([r.image for r in requests])
        features = self.encoders.image_features(pixels.to(self.encoders.embed_tokens.weight))
        out = []
        for prompt, request, image in zip(prompts, requests, features):
            ids = torch.tensor(prompt.input_ids, device=image.device)
            # a concept token's row is not in the encoders' table: splice writes it
            ids[ids >= self.prompter.vocab] = self.prompter.placeholder_id
            embeds = self.encoders.embed_tokens(ids)
            out.append(splice(embeds, prompt, request.concepts, image_features=image).cpu())
        return out

    def sampling_params(self, batch: SlotBatch) -> list:
        """Greedy sampling per request; in ``plvm`` style each request may emit only its own concept tokens."""
        from vllm import SamplingParams

        if self.prompter.concept_style != "plvm":
            return [self.sampling] * len(batch.requests)
        return [
            SamplingParams(
                temperature=0.0,
                max_tokens=self.sampling.max_tokens,
                detokenize=False,
                allowed_token_ids=self.vocabulary + batch.allowed_slots(row),
            )
            for row in range(len(batch.requests))
        ]

    def generate_batch(self, batch: SlotBatch) -> list[list[int]]:
        embeds = self.prepare(batch)
        prompts = [{"prompt_embeds": e} for e in embeds]
        outputs = self.llm.generate(prompts, self.sampling_params(batch), use_tqdm=False)
        return [self.prompter.until_eos(list(output.outputs[0].token_ids)) for output in outputs]
