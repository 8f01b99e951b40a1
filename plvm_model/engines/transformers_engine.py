"""The reference engine: transformers' LlavaForConditionalGeneration, concepts through ``inputs_embeds``.

The prompt's text embeddings come from the model's own embedding table, the concepts'
context vectors are written over their placeholder runs, and LLaVA's own code computes
the image features from ``pixel_values`` and places them at the ``<image>`` run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from plvm_model import random_weights as randomly
from plvm_model.engines.base import EngineOptions, LlavaEngine, LlavaPrompter, SlotBatch
from plvm_model.injection import ConceptTokens, TokenizedPrompt, splice

QUANTIZATIONS = ("8bit", "4bit")
FULL_PRECISION = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
"""What stays unquantized, as PLVM runs LLaVA in 8-bit (transformers matches these as prefixes of module names)."""


@dataclass
class PreparedBatch:
    inputs_embeds: torch.Tensor
    """(B, L, H), padded on the left."""
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    prompts: list[TokenizedPrompt]
    offsets: list[int]
    """Left padding of each row: a prompt's span ``start`` sits at ``offset + start``."""


def _quantization_config(quantization: str | None):
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization {quantization!r} is not supported by the transformers engine; "
            f"choose one of {', '.join(QUANTIZATIONS)} (bitsandbytes) or none"
        )
    from transformers import BitsAndBytesConfig

    keep = list(FULL_PRECISION)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=keep
    )


class SlotMask:
    """A logits processor: each row of the batch may emit only its own concept slots (``concept_style: plvm``)."""

    def __init__(self, batch: SlotBatch, vocab: int, slots: int, device: torch.device) -> None:
        self.blocked = torch.ones((len(batch.requests), vocab + slots), dtype=torch.bool, device=device)
        self.blocked[:, :vocab] = False
        for row in range(len(batch.requests)):
            self.blocked[row, batch.allowed_slots(row)] = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.masked_fill(self.blocked, float("-inf"))


class TransformersEngine(LlavaEngine):
    name = "transformers"

    def __init__(self, model_path: str, options: EngineOptions) -> None:
        from transformers import LlavaForConditionalGeneration
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.prompter = LlavaPrompter(model_path, options.template, options.image_aspect, options.concept_style)
        self.concept_slots = options.concept_slots
        self.max_new_tokens = options.max_new_tokens
        self.dtype = getattr(torch, options.dtype)
        device = options.device
        quantization_config = _quantization_config(options.quantization)
        if options.random_weights:
            self.model = randomly.llava(model_path, self.dtype, device, quantization_config)
        else:
            self.model = LlavaForConditionalGeneration.from_pretrained(
                model_path,
                dtype=self.dtype,
                quantization_config=quantization_config,
                device_map=device if quantization_config else None,
            ).eval()
            if quantization_config is None:
                self.model.to(device)
        self.device = torch.device(device)
        self.model_name = randomly.marked(Path(model_path).name, options.random_weights)
        if options.concept_style == "plvm":
            self._add_slots()

    @torch.inference_mode()
    def _add_slots(self) -> None:
        """``concept_slots`` zero rows after the vocabulary, in the embedding table and the output head."""
        if self.model.config.get_text_config().tie_word_embeddings:
            raise ValueError(
                f"{self.model_name} ties its output head to its embedding table: PLVM's concept token needs its own "
                "row in each (use concept_style sentence)"
            )
        vocab = self.prompter.vocab
        self.model.resize_token_embeddings(vocab + self.concept_slots, mean_resizing=False)
        self.model.get_input_embeddings().weight[vocab:] = 0
        self.model.get_output_embeddings().weight[vocab:] = 0

    @torch.inference_mode()
    def write_slots(self, rows: dict[int, ConceptTokens]) -> None:
        embeddings, head = self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight
        for token_id, concept in rows.items():
            embeddings[token_id] = torch.as_tensor(concept.soft_tokens[0], dtype=embeddings.dtype)
            head[token_id] = torch.as_tensor(concept.head_weight, dtype=head.dtype)

    @torch.inference_mode()
    def prepare(self, batch: SlotBatch) -> PreparedBatch:
        """The model inputs for ``batch``: spliced embeddings, mask and pixel values."""
        requests = batch.requests
        prompts = [self.prompter.tokenize(r, ids) for r, ids in zip(requests, batch.concept_ids)]
        longest = max(len(p.input_ids) for p in prompts)
        ids = torch.full((len(prompts), longest), self.prompter.placeholder_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        offsets = []
        for row, prompt in enumerate(prompts):
            offset = longest - len(prompt.input_ids)
            ids[row, offset:] = torch.tensor(prompt.input_ids)
            mask[row, offset:] = 1
            offsets.append(offset)
        embeds = self.model.get_input_embeddings()(ids.to(self.device))
        for row, (prompt, request) in enumerate(zip(prompts, requests)):
            splice(embeds[row], prompt, request.concepts, offset=offsets[row])
        pixel_values = self.prompter.pixel_values([r.image for r in requests]).to(self.device, self.dtype)
        return PreparedBatch(embeds, mask.to(self.device), pixel_values, prompts, offsets)

    @torch.inference_mode()
    def generate_batch(self, batch: SlotBatch) -> list[list[int]]:
        from transformers import LogitsProcessorList

        inputs = self.prepare(batch)
        masks = []
        if self.prompter.concept_style == "plvm":
            masks.append(SlotMask(batch, self.prompter.vocab, self.concept_slots, self.device))
        out = self.model.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values,
            logits_processor=LogitsProcessorList(masks),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.prompter.tokenizer.pad_token_id,
            eos_token_id=self.prompter.tokenizer.eos_token_id,
        )
        return [self.prompter.until_eos(row) for row in out.tolist()]
