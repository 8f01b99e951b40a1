"""MyVLM's concept vector for LLaVA: one vector in the LLM's input space, learned with LLaVA frozen.

As in MyVLM (snap-research/MyVLM, ECCV 2024), for LLaVA: the vector starts as a uniform random
vector of unit norm and is appended, L2-normalised, as one extra token right after the
image's projected features (:func:`plvm_model.injection.place_after_image`, the very
placement both engines use when captioning). It is trained on a few captioned photos of the
person with the prompt ``Please caption this image of NAME.``: cross-entropy on the caption's
tokens plus an attention regulariser, ``reg_lambda`` times the mean square of the attention
probabilities of the concept token's row (the concept token as the query, over all heads and
keys), summed over the LLM's layers and the batch's photos, with AdamW (weight decay 1e-4 in
MyVLM), the gradient's norm clipped. Only the vector is a parameter; every LLaVA weight is
frozen and left bit-identical.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from plvm_model import random_weights as randomly
from plvm_model.engines.base import GenerationRequest, LlavaPrompter
from plvm_model.engines.llava_parts import weight_files
from plvm_model.injection import ConceptTokens, PromptTemplate, TokenizedPrompt, place_after_image


def llava_identity(model_path: str | Path, random_weights: bool = False) -> str:
    """Names the LLM input space a MyVLM vector lives in: the checkpoint's config and its weight files' names and
    sizes (not its path, so a bank stays valid where the same checkpoint lies elsewhere); with ``random_weights``,
    the config and the seed of the random weights."""
    path = Path(model_path)
    if random_weights:
        return "llava:" + randomly.identity((path / "config.json").read_bytes(), llava_hidden(path))
    files = [(f.name, f.stat().st_size) for f in weight_files(path)]
    digest = hashlib.sha256(json.dumps([(path / "config.json").read_text(), files]).encode()).hexdigest()[:16]
    return f"llava:{digest}:{llava_hidden(path)}"


def llava_hidden(model_path: Path) -> int:
    """The hidden size of the LLaVA's language model."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).text_config.hidden_size


@dataclass(frozen=True)
class Example:
    """One training photo of the person: RGB uint8 (H, W, 3) and its caption, which names the person."""

    image: np.ndarray
    caption: str


@dataclass
class Batch:
    inputs_embeds: torch.Tensor
    """(B, L, H) text embeddings, padded on the right; the concept's places are filled by :meth:`place`."""
    attention_mask: torch.Tensor
    labels: torch.Tensor
    """The caption's ids (and the end-of-sequence token); -100 elsewhere."""
    pixel_values: torch.Tensor
    prompts: list[TokenizedPrompt]


@dataclass
class TrainingRun:
    vector: np.ndarray
    """(hidden,) float32, as trained (normalised where it is used)."""
    losses: list[float] = field(default_factory=list)
    """The caption's cross-entropy at each step (before that step's update)."""
    regularisation: list[float] = field(default_factory=list)
    """The attention regulariser at each step."""


class MyVLMTrainer:
    """A frozen LlavaForConditionalGeneration (eager attention, whose probabilities the regulariser reads) and the
    prompt layout of the engines in ``concept_style`` (a prompt with no PLVM concept, the vector after the image)."""

    def __init__(
        self, model_path: str, *, template: PromptTemplate, image_aspect: str, concept_style: str, dtype: str,
        device: str, random_weights: bool = False,
    ) -> None:  # fmt: skip
        from transformers import LlavaForConditionalGeneration
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.prompter = LlavaPrompter(model_path, template, image_aspect, concept_style)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        if random_weights:
            self.model = randomly.llava(model_path, self.dtype, device, attn_implementation="eager")
        else:
            self.model = LlavaForConditionalGeneration.from_pretrained(
                model_path, dtype=self.dtype, attn_implementation="eager"
            ).to(self.device)
        self.model.eval()  # no dropout: the model is a fixed function of the vector
        self.model.requires_grad_(False)
        self.hidden = self.model.config.text_config.hidden_size
        self.identity = llava_identity(model_path, random_weights)

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` the tokenizer can only write as its unknown token (the concept's name must not be)."""
        unk = self.prompter.tokenizer.unk_token_id
        words = text.split()
        return [
            w
            for w in words
            if unk is not None and unk in self.prompter.tokenizer(w, add_special_tokens=False).input_ids
        ]

    @torch.no_grad()
    def batch(self, examples: list[Example], question: str, name: str) -> Batch:
        """The model inputs of ``examples``: the prompt with one place after the image, then the caption."""
        tokenizer = self.prompter.tokenizer
        placeholder = ConceptTokens(name, np.zeros((1, self.hidden), np.float32), method="myvlm")
        prompts, rows, labels = [], [], []
        for example in examples:
            prompt = self.prompter.tokenize(GenerationRequest(example.image, question, [placeholder]))
            answer = tokenizer(" " + example.caption.strip(), add_special_tokens=False).input_ids
            answer.append(tokenizer.eos_token_id)
            prompts.append(prompt)
            rows.append(prompt.input_ids + answer)
            labels.append([-100] * len(prompt.input_ids) + answer)
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.prompter.placeholder_id, dtype=torch.long)
        label_ids = torch.full((len(rows), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels)):
            ids[i, : len(row)], label_ids[i, : len(row)], mask[i, : len(row)] = (
                torch.tensor(row),
                torch.tensor(label),
                1,
            )
        embeds = self.model.get_input_embeddings()(ids.to(self.device))
        pixels = self.prompter.pixel_values([e.image for e in examples]).to(self.device, self.dtype)
        return Batch(embeds, mask.to(self.device), label_ids.to(self.device), pixels, prompts)

    def losses(self, vector: torch.Tensor, batch: Batch, reg_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption cross-entropy, attention regulariser) with ``vector`` placed after each photo's features."""
        embeds = batch.inputs_embeds.clone()
        for row, prompt in enumerate(batch.prompts):
            place_after_image(embeds[row], prompt, vector[None, :])
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=batch.attention_mask,
            pixel_values=batch.pixel_values,
            labels=batch.labels,
            output_attentions=reg_lambda > 0,
        )
        regulariser = torch.zeros((), device=self.device)
        if reg_lambda > 0:
            for probabilities in out.attentions:  # (B, heads, L, L) per layer
                for row, prompt in enumerate(batch.prompts):
                    regulariser = (
                        regulariser + reg_lambda * probabilities[row, :, prompt.after_image[0]].float().pow(2).mean()
                    )
        return out.loss.float(), regulariser

    def train(
        self,
        examples: list[Example],
        name: str,
        *,
        prompt: str,
        steps: int,
        learning_rate: float,
        batch_size: int,
        reg_lambda: float,
        max_grad_norm: float,
        weight_decay: float,
        seed: int,
        on_step: Callable[[int, float, float], None] | None = None,
    ) -> TrainingRun:
        """The concept vector of ``name`` learned from ``examples``; ``prompt`` has ``{name}``. Each step is one
        update on ``batch_size`` photos (the photos in a seeded random order, again each pass); ``on_step(step,
        cross-entropy, regulariser)`` after each."""
        generator = torch.Generator().manual_seed(seed)
        initial = torch.rand(self.hidden, generator=generator)
        vector = torch.nn.Parameter((initial / initial.norm()).to(self.device))
        optimizer = torch.optim.AdamW([vector], lr=learning_rate, weight_decay=weight_decay)
        question = prompt.format(name=name)
        order: list[int] = []
        batches: dict[tuple[int, ...], Batch] = {}
        run = TrainingRun(vector=np.zeros(0, np.float32))
        for step in range(steps):
            chosen: list[int] = []
            while len(chosen) < min(batch_size, len(examples)):
                if not order:
                    order = torch.randperm(len(examples), generator=generator).tolist()
                chosen.append(order.pop())
            key = tuple(chosen)
            if key not in batches:
                batches[key] = self.batch([examples[i] for i in key], question, name)
            ce, regulariser = self.losses(vector, batches[key], reg_lambda)
            (ce + regulariser).backward()
            torch.nn.utils.clip_grad_norm_([vector], max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            run.losses.append(ce.item())
            run.regularisation.append(regulariser.item())
            if on_step is not None:
                on_step(step, run.losses[-1], run.regularisation[-1])
        run.vector = vector.detach().float().cpu().numpy()
        return run
