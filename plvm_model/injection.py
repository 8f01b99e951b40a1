"""Concept injection: prompts whose embedding sequence carries each concept's soft tokens.

A prompt is written with two markers, ``<concept>`` (where a concept's context vectors go)
and ``<image>`` (where the photo's features go). For the photo of Mike and Susan the text
``"... Mike is <concept>. Susan is <concept>. USER: <image>\\nDescribe the photo. ASSISTANT:"``
becomes token ids with placeholder runs, and :func:`splice` writes the vectors into the
embedding sequence at those runs. Both engines consume the result: transformers through
``inputs_embeds`` (its own LLaVA code places the image features), vLLM through
``prompt_embeds`` (the image features spliced here as well).

A MyVLM concept has no sentence: its one learned vector is appended right after the
image's features (placeholders after the ``<image>`` run), L2-normalised as MyVLM appends
it (:func:`place_after_image`, which its trainer uses as well).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the bank and the model-free stages use this module without torch
    import torch

CONCEPT_MARK = "<concept>"
IMAGE_MARK = "<image>"
_MARKS = re.compile(f"({re.escape(CONCEPT_MARK)}|{re.escape(IMAGE_MARK)})")


@dataclass(frozen=True)
class ConceptTokens:
    """What the Aligner made of one concept's reference photo (stored in the bank)."""

    name: str
    soft_tokens: np.ndarray
    """(num_queries, hidden): the name-word vector first, then the context vectors."""
    head_weight: np.ndarray | None = None
    """(hidden,): the name token's row of the LLM's output head."""
    method: str = "plvm"
    """``plvm``: the soft tokens above; ``myvlm``: ``soft_tokens`` is the (1, hidden) learned vector, appended
    after the image's features."""

    @property
    def context(self) -> np.ndarray:
        """The vectors injected after ``NAME is``."""
        return self.soft_tokens[1:]


def plvm_concepts(concepts: list[ConceptTokens]) -> list[ConceptTokens]:
    """The PLVM concepts of ``concepts``, in order: those with concept sentences (and, in ``concept_style: plvm``,
    concept tokens); the MyVLM ones are a vector each after the image."""
    return [c for c in concepts if c.method == "plvm"]


@dataclass(frozen=True)
class PromptTemplate:
    """A conversation format: the system text, one concept sentence per name, the turn (the config's
    ``generate.template``, LLaVA-1.5's format with PLVM's concept sentences by default)."""

    system: str
    concept: str
    """A sentence with ``{name}`` and ``<concept>``."""
    turn: str
    """The user's turn with ``<image>`` and ``{question}``, up to the assistant's answer."""

    def render(self, question: str, names: list[str]) -> str:
        parts = [self.system, *(self.concept.format(name=n) for n in names), self.turn.format(question=question)]
        return " ".join(p for p in parts if p)


@dataclass
class TokenizedPrompt:
    input_ids: list[int]
    concept_spans: list[tuple[int, int]] = field(default_factory=list)
    """(start, PLVM concept index) of each run of context vectors, in order."""
    image_span: tuple[int, int] | None = None
    """(start, length) of the image placeholder run."""
    after_image: tuple[int, int] = (0, 0)
    """(start, length) of the MyVLM vectors' placeholders, right after the image run."""
    token_positions: list[tuple[int, int]] = field(default_factory=list)
    """(position, PLVM concept index) of each concept token (``concept_style: plvm``): it gets the concept's row 0."""

    def append_image(self, n_image: int, image_token_id: int, n_after_image: int, placeholder_id: int) -> None:
        """The image's run of ``n_image`` ids, then ``n_after_image`` placeholders (one per MyVLM concept)."""
        self.image_span = (len(self.input_ids), n_image)
        self.input_ids += [image_token_id] * n_image
        self.after_image = (len(self.input_ids), n_after_image)
        self.input_ids += [placeholder_id] * n_after_image


def tokenize(
    tokenizer,
    text: str,
    n_context: int,
    n_image: int,
    image_token_id: int,
    placeholder_id: int,
    n_after_image: int = 0,
) -> TokenizedPrompt:
    """Token ids for ``text``; each ``<concept>`` becomes ``n_context`` placeholders, ``<image>`` ``n_image``
    followed by ``n_after_image`` placeholders (one per MyVLM concept).

    Pieces between markers are tokenized separately (the first with the BOS token), so a
    concept's vectors never merge with the text around them.
    """
    out = TokenizedPrompt(input_ids=[])
    concept_index = 0
    for i, piece in enumerate(p for p in _MARKS.split(text) if p):
        if piece == CONCEPT_MARK:
            out.concept_spans.append((len(out.input_ids), concept_index))
            out.input_ids += [placeholder_id] * n_context
            concept_index += 1
        elif piece == IMAGE_MARK:
            if out.image_span is not None:
                raise ValueError("a prompt holds one <image>")
            out.append_image(n_image, image_token_id, n_after_image, placeholder_id)
        else:
            out.input_ids += tokenizer(piece, add_special_tokens=(i == 0)).input_ids
    if out.image_span is None:
        raise ValueError(f"the prompt template has no {IMAGE_MARK}: {text!r}")
    return out


def splice(
    embeds: torch.Tensor,
    prompt: TokenizedPrompt,
    concepts: list[ConceptTokens],
    image_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Write each PLVM concept's context vectors and concept-token rows, each MyVLM concept's vector (in
    ``concepts``' order) and the image features, if given, into ``embeds`` (L, H).

    ``offset`` shifts every span, for sequences padded on the left. Returns ``embeds``.
    """
    import torch

    plvm = plvm_concepts(concepts)
    for concept in concepts:
        if concept.soft_tokens.shape[-1] != embeds.shape[-1]:
            raise ValueError(
                f"concept {concept.name!r} has vectors of width {concept.soft_tokens.shape[-1]}, "
                f"the LLM's hidden size is {embeds.shape[-1]}: the bank was enrolled for another model"
            )
    for start, index in prompt.concept_spans:
        vectors = torch.as_tensor(plvm[index].context, dtype=embeds.dtype, device=embeds.device)
        embeds[offset + start : offset + start + len(vectors)] = vectors
    for position, index in prompt.token_positions:
        embeds[offset + position] = torch.as_tensor(plvm[index].soft_tokens[0], dtype=embeds.dtype)
    myvlm = [c.soft_tokens[0] for c in concepts if c.method == "myvlm"]
    if myvlm:
        place_after_image(embeds, prompt, torch.as_tensor(np.stack(myvlm), device=embeds.device), offset)
    if image_features is not None:
        start, length = prompt.image_span
        embeds[offset + start : offset + start + length] = image_features.to(embeds.dtype)
    return embeds


def place_after_image(embeds: torch.Tensor, prompt: TokenizedPrompt, vectors: torch.Tensor, offset: int = 0) -> None:
    """Write MyVLM concept vectors (k, H), L2-normalised, over the ``k`` placeholders right after the image run of
    ``embeds`` (L, H) (differentiable in ``vectors``: the trainer places its vector with this too)."""
    import torch

    start, length = prompt.after_image
    if len(vectors) != length:
        raise ValueError(f"{len(vectors)} MyVLM vectors for a prompt with {length} places after the image")
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1).to(embeds.dtype)
    embeds[offset + start : offset + start + length] = unit
