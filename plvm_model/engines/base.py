"""The engine interface, and the LLaVA prompt handling both engines share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from plvm_model.injection import ConceptTokens, PromptTemplate, TokenizedPrompt, tokenize


@dataclass
class GenerationRequest:
    image: np.ndarray
    """RGB uint8 (H, W, 3)."""
    question: str
    concepts: list[ConceptTokens] = field(default_factory=list)
    """Injected in this order, one ``NAME is <concept>.`` sentence each."""


class Engine(Protocol):
    name: str
    model_name: str

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        """Greedy answers, one per request, in order."""
        ...


class LlavaPrompter:
    """Tokenizer, image processor and template of one LLaVA checkpoint (a local folder)."""

    def __init__(self, model_path: str, template: PromptTemplate, image_aspect: str) -> None:
        from transformers import AutoConfig, AutoProcessor, LlavaImageProcessorPil

        self.template = template
        # The PIL backends: the same pixels in every environment (the vLLM one has no torchvision).
        self.processor = AutoProcessor.from_pretrained(model_path, backend="pil")
        # LLaVA's own image processor with the checkpoint's settings (the same pixels as its CLIP processor),
        # which can also pad a photo to a square with the mean colour first, as LLaVA-1.5 was trained
        self.image_processor = LlavaImageProcessorPil.from_pretrained(model_path)
        self.pad = image_aspect == "pad"
        self.tokenizer = self.processor.tokenizer
        self.config = AutoConfig.from_pretrained(model_path)
        vision = self.config.vision_config
        self.n_image = (vision.image_size // vision.patch_size) ** 2 + (
            1 if self.config.vision_feature_select_strategy == "full" else 0
        )
        self.image_token_id = self.config.image_token_id
        pad = self.tokenizer.pad_token_id
        self.placeholder_id = pad if pad is not None else self.tokenizer.unk_token_id

    def tokenize(self, request: GenerationRequest) -> TokenizedPrompt:
        """The prompt's ids: a sentence per PLVM concept, a placeholder after the image per MyVLM concept."""
        plvm = [c for c in request.concepts if c.method == "plvm"]
        text = self.template.render(request.question, [c.name for c in plvm])
        n_context = {len(c.context) for c in plvm}
        if len(n_context) > 1:
            raise ValueError(f"concepts with different numbers of soft tokens in one prompt: {sorted(n_context)}")
        return tokenize(
            self.tokenizer,
            text,
            n_context=n_context.pop() if n_context else 0,
            n_image=self.n_image,
            image_token_id=self.image_token_id,
            placeholder_id=self.placeholder_id,
            n_after_image=len(request.concepts) - len(plvm),
        )

    def pixel_values(self, images: list[np.ndarray]):
        """The vision tower's input: each photo padded to a square (``image_aspect: pad``) or centre-cropped."""
        pil = [Image.fromarray(image) for image in images]
        return self.image_processor(images=pil, do_pad=self.pad, return_tensors="pt")["pixel_values"]

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def until_eos(self, token_ids: list[int]) -> list[int]:
        """The ids before the first end-of-sequence token."""
        eos = self.tokenizer.eos_token_id
        return token_ids[: token_ids.index(eos)] if eos in token_ids else token_ids


class LlavaEngine:
    """What both engines share: greedy token ids per request, decoded to text."""

    name: str
    model_name: str
    prompter: LlavaPrompter

    def generate_ids(self, requests: list[GenerationRequest]) -> list[list[int]]:
        raise NotImplementedError

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        return [self.prompter.decode(ids) for ids in self.generate_ids(requests)]


def make_engine(kind: str, **options: Any) -> Engine:
    """The engine named ``kind`` (``transformers`` or ``vllm``) built with its config options."""
    if kind == "transformers":
        from plvm_model.engines.transformers_engine import TransformersEngine

        return TransformersEngine(**options)
    if kind == "vllm":
        from plvm_model.engines.vllm_engine import VLLMEngine

        return VLLMEngine(**options)
    raise ValueError(f"unknown engine {kind!r}; available: transformers, vllm")
