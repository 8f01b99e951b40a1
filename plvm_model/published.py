"""The real models' published configurations, as loadable folders without weights, for runs with random weights.

``plvm_model/published/`` holds the published ``config.json`` and image-processor files of
llava-hf/llava-1.5-7b-hf and facebook/dinov2-base (their sources: its README.md).
:func:`ensure_published_models` makes model folders of them in the cache: the files as they
are and, for the LLaVA, a tokenizer built here with the published vocabulary's size and special
ids. No folder holds weights: ``models.random_weights`` builds each model from its configuration
(:mod:`plvm_model.random_weights`), which is all that shapes, vocabulary offsets and memory
depend on.

:func:`build_llava_folder` also writes a LLaVA folder of the published configuration with some
fields changed (fewer layers, a smaller width), for tests at a reduced but faithful shape.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plvm_model.cache import build_once, cache_root

PUBLISHED = Path(__file__).resolve().with_name("published")
LLAVA = "llava-1.5-7b-hf"
DINOV2 = "dinov2-base"
PUBLISHED_VERSION = "1"
BASE_VOCABULARY = 32000
"""Llama's tokenizer: the ids below are its pieces; ``<image>`` and ``<pad>`` are added after them."""
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"


@dataclass(frozen=True)
class PublishedModels:
    llava: Path
    dinov2: Path


def ensure_published_models(root: Path | None = None) -> PublishedModels:
    """The folders of the published LLaVA and DINOv2 configurations under ``root`` (default: the plvm cache),
    built unless already there."""
    base = (root or cache_root()) / f"published-v{PUBLISHED_VERSION}"
    models = PublishedModels(base / LLAVA, base / DINOV2)
    build_once(models.llava, build_llava_folder)
    build_once(models.dinov2, lambda out: _copy_files(PUBLISHED / DINOV2, out))
    return models


def _copy_files(source: Path, out: Path) -> None:
    for file in source.glob("*.json"):
        shutil.copy(file, out / file.name)


def build_llava_folder(out: Path, text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None) -> None:
    """The published LLaVA configuration in ``out`` with its tokenizer; ``text`` and ``vision`` change fields of
    ``text_config`` and ``vision_config`` (a reduced model for tests)."""
    _copy_files(PUBLISHED / LLAVA, out)
    if text or vision:
        config = json.loads((out / "config.json").read_text())
        config["text_config"].update(text or {})
        config["vision_config"].update(vision or {})
        (out / "config.json").write_text(json.dumps(config, indent=2))
    published_tokenizer().save_pretrained(out)


def published_tokenizer():
    """A tokenizer of the published LLaVA's size and special ids, built offline: ``<unk>`` 0, ``<s>`` 1, ``</s>``
    2, byte tokens ``<0x00>``-``<0xFF>`` at 3-258 (as Llama's), whole words of the project's prompts, fillers up
    to 32000, then ``<image>`` 32000 and ``<pad>`` 32001. Word-level: its words are not Llama's pieces."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from plvm_model.tiny import CORPUS

    split = pre_tokenizers.Whitespace()
    words = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    words += [w for w in dict.fromkeys(piece for piece, _ in split.pre_tokenize_str(CORPUS)) if w not in words]
    words += [f"<unused{i}>" for i in range(BASE_VOCABULARY - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True), AddedToken(PAD_TOKEN, special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=4096,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", IMAGE_TOKEN, PAD_TOKEN)}
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, IMAGE_TOKEN: BASE_VOCABULARY, PAD_TOKEN: BASE_VOCABULARY + 1}
    if ids != expected or len(tokenizer) != BASE_VOCABULARY + 2:
        raise RuntimeError(f"the published tokenizer's special ids are {ids} ({len(tokenizer)} tokens)")
    return tokenizer
