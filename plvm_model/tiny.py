"""Tiny random models for the embedded default and the tests: LLaVA, DINOv2 and an Aligner.

They are built offline, deterministically (fixed seeds, a word-level tokenizer made from a fixed
text), and cached on first use, so a fresh machine with no model hub runs every stage's
real code. Their outputs are noise: captions from random weights mean nothing.

The LLaVA is saved in the published llava-hf layout (``vision_tower.vision_model.*``),
which both transformers and vLLM load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from plvm_model.aligner import Aligner, AlignerShape
from plvm_model.cache import build_once, cache_root

TINY_VERSION = "2"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# The tiny tokenizer's vocabulary: the words our prompts and captions use.
CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:
Describe this photo in one sentence, naming the people you know. Who is in this photo?
Is he or she in this photo? Where is the person in this photo? What is the person wearing?
a man and a woman are talking in a park. two people smile at the camera. a girl with long
black hair stands in front of a building. a boy wearing a red shirt holds a cup of coffee.
the photo shows a group of friends at a beach at sunset. she is sitting on a chair near the
window. he is walking on a street in the city with trees and cars. left right top bottom
middle center yes no man woman people person face hair dress shirt glasses hat smiling.
Please caption this image of Mike Susan Thao Viruss Phuc Thuytien Will.
"""


@dataclass(frozen=True)
class TinyModels:
    llava: Path
    dinov2: Path
    aligner: Path
    """A PLVM-format state dict (``aligner.pt``) with its shape beside it (``aligner.json``)."""


def ensure_tiny_models(root: Path | None = None) -> TinyModels:
    """Build the tiny models under ``root`` (default: the plvm cache) unless already there."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    base = (root or cache_root()) / f"tiny-v{TINY_VERSION}"
    models = TinyModels(
        base / "llava-tiny-random", base / "dinov2-tiny-random", base / "aligner-tiny-random" / "aligner.pt"
    )
    for target, build in ((models.llava, _build_llava), (models.dinov2, _build_dinov2)):
        build_once(target, build)
    build_once(models.aligner.parent, lambda out: _build_aligner(out, models.llava, models.dinov2))
    return models


def _tokenizer():
    """A word-level tokenizer over the corpus words, so that random generations read as words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(CORPUS.split("\n"), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=2048,
    )


def _build_llava(out: Path) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    _to_llava_hf_layout(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
    ).save_pretrained(out)


def _to_llava_hf_layout(folder: Path) -> None:
    """Rename the vision-tower keys to the published ``vision_tower.vision_model.*`` layout.

    transformers 5 saves them as ``vision_tower.embeddings.*``; vLLM and the published
    llava-hf checkpoints use ``vision_tower.vision_model.embeddings.*``; transformers loads both.
    """
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    prefix = "vision_tower."
    renamed = {
        prefix + "vision_model." + key[len(prefix) :]
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model.")
        else key: value
        for key, value in state.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def _build_dinov2(out: Path) -> None:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
    )
    torch.manual_seed(1)
    Dinov2Model(config).eval().save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 56, "width": 56},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out)


def tiny_aligner_shape(llava: Path, dinov2: Path) -> AlignerShape:
    hidden = json.loads((llava / "config.json").read_text())["text_config"]["hidden_size"]
    features = json.loads((dinov2 / "config.json").read_text())["hidden_size"]
    return AlignerShape(
        dim=32, depth=2, dim_head=16, heads=2, num_queries=17,
        embedding_dim=features, output_dim=hidden, ff_mult=2, head_hidden=64,
    )  # fmt: skip


def _build_aligner(out: Path, llava: Path, dinov2: Path) -> None:
    import torch

    shape = tiny_aligner_shape(llava, dinov2)
    torch.manual_seed(2)
    aligner = Aligner(shape)
    # Random LayerNorm gains make the soft tokens differ from one reference photo to the next.
    with torch.no_grad():
        aligner.norm_out.weight.normal_(1.0, 0.5)
    torch.save(aligner.state_dict(), out / "aligner.pt")
    (out / "aligner.json").write_text(json.dumps(shape.to_dict(), indent=1))
