"""The engine interface, and the LLaVA prompt handling both engines share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image

from plvm_model.concept_token import check_servable, concept_key, decode_with_names, plan_slots, tokenize_plvm
from plvm_model.injection import ConceptTokens, PromptTemplate, TokenizedPrompt, plvm_concepts, tokenize


@dataclass(frozen=True)
class EngineOptions:
    """What both engines take from the config's ``generate`` section, as one object (the vllm engine also takes
    ``vllm.LLM``'s own arguments beside it)."""

    template: PromptTemplate
    image_aspect: str
    """``pad`` (to a square, LLaVA-1.5's way) or ``crop`` (the processor's centre crop)."""
    max_new_tokens: int
    dtype: str
    quantization: str | None
    device: str
    concept_style: str
    """``plvm`` (a concept token per person) or ``sentence``."""
    concept_slots: int
    """``plvm`` style: concept tokens the engine holds at once."""
    random_weights: bool = False
    """The LLaVA built from its configuration with random weights (``models.random_weights``), none read."""


@dataclass
class GenerationRequest:
    image: np.ndarray
    """RGB uint8 (H, W, 3)."""
    question: str
    concepts: list[ConceptTokens] = field(default_factory=list)
    """Injected in this order, one concept sentence each (``NAME is <concept>.``, or PLVM's ``<sks> is ...``)."""


class Engine(Protocol):
    name: str
    model_name: str
    new_tokens: int
    """Tokens generated so far, over all calls."""

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        """Greedy answers, one per request, in order."""
        ...


class LlavaPrompter:
    """Tokenizer, image processor and template of one LLaVA checkpoint (a local folder)."""

    def __init__(self, model_path: str, template: PromptTemplate, image_aspect: str, concept_style: str) -> None:
        from transformers import AutoConfig, AutoProcessor, LlavaImageProcessorPil

        self.template = template
        self.concept_style = concept_style
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
        self.vocab = self.config.text_config.vocab_size
        """Rows of the LLM's own vocabulary; concept slots follow them (``concept_style: plvm``)."""

    def tokenize(self, request: GenerationRequest, concept_ids: list[int] | None = None) -> TokenizedPrompt:
        """The request's prompt: a placeholder after the image per MyVLM concept, and per PLVM concept a sentence
        (``sentence`` style) or its concept token, whose id is in ``concept_ids`` (its slot; ``plvm`` style)."""
        plvm = plvm_concepts(request.concepts)
        n_context = {len(c.context) for c in plvm}
        if len(n_context) > 1:
            raise ValueError(f"concepts with different numbers of soft tokens in one prompt: {sorted(n_context)}")
        runs = dict(
            n_context=n_context.pop() if n_context else 0,
            n_image=self.n_image,
            image_token_id=self.image_token_id,
            placeholder_id=self.placeholder_id,
            n_after_image=len(request.concepts) - len(plvm),
        )
        if self.concept_style == "plvm":
            concept_ids = concept_ids or []
            if len(concept_ids) != len(plvm):
                raise ValueError(f"{len(plvm)} PLVM concepts need as many concept token ids, not {concept_ids}")
            for concept in plvm:
                check_servable(concept, self.config.text_config.hidden_size)
            return tokenize_plvm(self.tokenizer, self.template, request.question, concept_ids, **runs)
        text = self.template.render(request.question, [c.name for c in plvm])
        return tokenize(self.tokenizer, text, **runs)

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


@dataclass
class SlotBatch:
    """Requests served together in ``plvm`` style: each one's concept token ids, and the rows of the slots."""

    requests: list[GenerationRequest]
    concept_ids: list[list[int]]
    """Per request, the token id of each of its PLVM concepts, in its order (a MyVLM concept has none)."""
    rows: dict[int, ConceptTokens]
    """Token id -> the concept whose rows (input row 0, head weight) that slot holds."""

    def allowed_slots(self, row: int) -> list[int]:
        """The concept token ids request ``row`` may emit: its own concepts'."""
        return sorted(set(self.concept_ids[row]))


class LlavaEngine:
    """What both engines share: greedy token ids per request, decoded to text.

    In ``plvm`` style a batch is served in groups whose distinct concepts fit in the engine's
    ``concept_slots``: the engine writes each group's slot rows (:meth:`write_slots`) and generates
    with every request limited to its own concepts' slots (:meth:`generate_batch`).
    """

    name: str
    model_name: str
    prompter: LlavaPrompter
    concept_slots: int
    new_tokens: int = 0

    def generate_batch(self, batch: SlotBatch) -> list[list[int]]:
        """Greedy new token ids for each request of ``batch`` (up to the first end-of-sequence token)."""
        raise NotImplementedError

    def write_slots(self, rows: dict[int, ConceptTokens]) -> None:
        """Writes each concept's row 0 into the embedding table and its head weight into the output head."""
        raise NotImplementedError

    def slot_batches(self, requests: list[GenerationRequest]) -> list[tuple[list[int], SlotBatch]]:
        """(indices into ``requests``, batch) groups that serve ``requests``: one group in ``sentence`` style."""
        if self.prompter.concept_style != "plvm":
            return [(list(range(len(requests))), SlotBatch(requests, [[] for _ in requests], {}))]
        out = []
        concepts = [plvm_concepts(r.concepts) for r in requests]
        for group in plan_slots(concepts, self.concept_slots):
            members = [requests[i] for i in group.requests]
            ids = [[self.prompter.vocab + group.slots[concept_key(c)] for c in concepts[i]] for i in group.requests]
            rows = {i: c for j, own in zip(group.requests, ids) for i, c in zip(own, concepts[j])}
            out.append((group.requests, SlotBatch(members, ids, rows)))
        return out

    def _generate(self, requests: list[GenerationRequest]) -> list[tuple[list[int], dict[int, str]]]:
        """Per request: the new token ids and the names of the concept tokens among them."""
        out: list = [None] * len(requests)
        for indices, batch in self.slot_batches(requests):
            if batch.rows:
                self.write_slots(batch.rows)
            for index, ids, own in zip(indices, self.generate_batch(batch), batch.concept_ids):
                out[index] = (ids, {i: c.name for i, c in zip(own, plvm_concepts(requests[index].concepts))})
                self.new_tokens += len(ids)
        return out

    def generate_ids(self, requests: list[GenerationRequest]) -> list[list[int]]:
        """Greedy new token ids for each request; in ``plvm`` style a concept token is its slot's id."""
        return [ids for ids, _ in self._generate(requests)]

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        """The answers' text, each emitted concept token written as its person's name."""
        return [decode_with_names(ids, names, self.prompter.decode) for ids, names in self._generate(requests)]
