"""PLVM's concept token ``<sks>``: its prompt layout, its rows in the LLM's vocabulary, its name in the text.

PLVM (``concept_style: plvm``) gives each concept a token of its own. The Aligner's row 0 is
that token's input embedding, rows 1.. are context vectors, and its MLP head's output is the
token's row of the output head, so the model can *emit* the token; the emitted token is shown
as the person's name. The prompt is PLVM's ``personalized`` conversation: the system text, then
``<sks> is <context vectors>.`` per concept, then the user's turn, in which each ``<sks>`` of
the question is the concept token again.

The engines serve several concepts at once through *slots*: ``n_slots`` extra rows of the
embedding table and the output head, after the model's own ``vocab`` rows. A batch's distinct
concepts take one slot each (:func:`plan_slots` splits a batch whose concepts do not fit), the
engine writes their rows, and each request may emit only its own concepts' slots.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from plvm_model.injection import IMAGE_MARK, ConceptTokens, PromptTemplate, TokenizedPrompt

CONCEPT_TOKEN = "<sks>"


def concept_key(concept: ConceptTokens) -> str:
    """One concept's identity within a batch: its name and vectors."""
    digest = hashlib.sha256(concept.name.encode())
    for array in (concept.soft_tokens, concept.head_weight):
        digest.update(b"-" if array is None else array.tobytes())
    return digest.hexdigest()


def check_servable(concept: ConceptTokens, hidden: int) -> None:
    """A ValueError naming ``concept`` when it lacks what PLVM's token needs (an input row, context vectors, a
    head row of the LLM's width)."""
    head = concept.head_weight
    if concept.soft_tokens.ndim != 2 or len(concept.soft_tokens) < 2 or head is None or head.shape != (hidden,):
        raise ValueError(
            f"concept {concept.name!r} cannot be served in concept_style plvm: it needs soft tokens (the token's "
            f"input row and context vectors) and a head weight of the LLM's hidden size {hidden}"
        )


@dataclass(frozen=True)
class SlotGroup:
    """Requests (indices into the batch) served together, and the slot of each of their concepts (by key)."""

    requests: list[int]
    slots: dict[str, int]


def plan_slots(concepts: list[list[ConceptTokens]], n_slots: int) -> list[SlotGroup]:
    """Consecutive requests grouped so that each group's distinct concepts fit in ``n_slots`` slots."""
    groups: list[SlotGroup] = []
    for index, own in enumerate(concepts):
        keys = list(dict.fromkeys(concept_key(c) for c in own))
        if len(keys) > n_slots:
            raise ValueError(f"a prompt injects {len(keys)} concepts, more than generate.concept_slots ({n_slots})")
        if not groups or len(groups[-1].slots.keys() | keys) > n_slots:
            groups.append(SlotGroup([], {}))
        group = groups[-1]
        group.requests.append(index)
        for key in keys:
            group.slots.setdefault(key, len(group.slots))
    return groups


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def tokenize_plvm(
    tokenizer,
    template: PromptTemplate,
    question: str,
    concept_ids: list[int],
    n_context: int,
    n_image: int,
    image_token_id: int,
    placeholder_id: int,
    n_after_image: int = 0,
) -> TokenizedPrompt:
    """PLVM's token layout: BOS, the system text, ``<sks> is <n_context vectors>.`` for each PLVM concept (its
    token id from ``concept_ids``), the turn up to ``<image>``, the image and ``n_after_image`` placeholders (one
    per MyVLM concept), then the rest of the turn split at ``<sks>`` (each piece without its surrounding spaces),
    the concept token put back between the pieces."""
    period = tokenizer.convert_tokens_to_ids(".")
    if period is None or period == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no '.' token, which PLVM's concept sentence ends with")
    turn = template.turn.format(question=question)
    if turn.count(IMAGE_MARK) != 1:
        raise ValueError(f"the prompt template's turn needs one {IMAGE_MARK}: {template.turn!r}")
    before, after = turn.split(IMAGE_MARK)
    out = TokenizedPrompt(input_ids=[tokenizer.bos_token_id, *_ids(tokenizer, template.system.strip())])
    for index, token_id in enumerate(concept_ids):
        out.token_positions.append((len(out.input_ids), index))
        out.input_ids += [token_id, *_ids(tokenizer, "is")]
        out.concept_spans.append((len(out.input_ids), index))
        out.input_ids += [placeholder_id] * n_context + [period]
    out.input_ids += _ids(tokenizer, before)
    out.append_image(n_image, image_token_id, n_after_image, placeholder_id)
    pieces = after.split(CONCEPT_TOKEN)
    if len(pieces) > 1 and len(concept_ids) != 1:
        raise ValueError(
            f"a question with {CONCEPT_TOKEN} needs exactly one PLVM concept, this one has {len(concept_ids)}"
        )
    for i, piece in enumerate(pieces):
        if piece.strip(" "):
            out.input_ids += _ids(tokenizer, piece.strip(" "))
        if i < len(pieces) - 1:
            out.token_positions.append((len(out.input_ids), 0))
            out.input_ids.append(concept_ids[0])
    return out


_WORD_START = re.compile(r"^\w")


def decode_with_names(token_ids: list[int], names: dict[int, str], decode: Callable[[list[int]], str]) -> str:
    """The text of ``token_ids``, each concept token (an id of ``names``) written as its person's name.

    The runs between concept tokens are decoded as they are; a name is separated by a space from the
    words around it, not from punctuation that follows it (``Mike's``, ``Mike.``).
    """
    text, run = "", []

    def flush() -> None:
        nonlocal text, run
        piece = decode(run).strip() if run else ""
        if piece:
            text += (" " if text and _WORD_START.match(piece) else "") + piece
        run = []

    for token in token_ids:
        if token in names:
            flush()
            text += (" " if text else "") + names[token]
        else:
            run.append(token)
    flush()
    return text.strip()


def mentions(text: str, name: str) -> bool:
    """Whether ``text`` holds ``name`` as a whole word (or words), case ignored."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None
