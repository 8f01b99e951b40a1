"""Models built from their configuration with random weights (``models.random_weights``): no checkpoint is read.

Shapes, vocabulary offsets and memory do not depend on the weights' values, so the real
models' published configurations (:mod:`plvm_model.published`) run the whole real path at
full size where no weights can be downloaded. What they write is noise, and is marked so: the
rows' ``model`` (:func:`marked`), the output table's metadata, every summary.

Each model is allocated once, in its dtype and on its device, and initialised there
(transformers' ``from_config`` under that dtype), so the peak memory is one copy of the weights.
Every build is seeded, so an enrollment's Aligner and DINOv2 are the same in every process: the
soft tokens in a bank mean the same (nothing) to every run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the driver of a caption run prints mode_line without torch
    import torch

SEED = 0
MARK = "random weights"


def marked(model_name: str, random_weights: bool) -> str:
    """The name a model's output carries: ``NAME (random weights)`` for a model with random weights."""
    return f"{model_name} ({MARK})" if random_weights else model_name


def identity(configuration: bytes, *parts: object) -> str:
    """What names a random-weight model: the seed, a digest of its configuration (all its weights' shapes depend
    on), then ``parts``."""
    digest = hashlib.sha256(configuration).hexdigest()[:16]
    return ":".join([f"random-seed{SEED}", digest, *map(str, parts)])


def llava(model_path: str | Path, dtype: torch.dtype, device: str, quantization_config=None, **model_args):
    """A ``LlavaForConditionalGeneration`` of the configuration in ``model_path``, with random weights in ``dtype``
    on ``device``. ``quantization_config`` (transformers' ``BitsAndBytesConfig``) then quantizes its linear layers
    with bitsandbytes as it says, as transformers does when it loads a checkpoint with it."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    torch.manual_seed(SEED)
    # quantized layers are made on the CPU and moved to the device one by one, each as it is quantized
    with torch.device("cpu" if quantization_config is not None else device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, **model_args)
    if quantization_config is not None:
        quantize(model, quantization_config, device)
        model.to(device)
    return model.eval()


def quantize(model: torch.nn.Module, config, device: str) -> None:
    """Replace each ``nn.Linear`` of ``model`` outside the modules that ``config`` (a ``BitsAndBytesConfig``) skips
    with the bitsandbytes layer that transformers makes of it for that config (8-bit, or 4-bit of its type, compute
    dtype and double quantization), holding its weights, quantized as it moves to ``device``."""
    import bitsandbytes as bnb
    import torch

    keep = config.llm_int8_skip_modules or []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or any(name.startswith(prefix) for prefix in keep):
            continue
        parent_name, _, child = name.rpartition(".")
        bias = module.bias is not None
        if config.load_in_8bit:
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias, has_fp16_weights=False,
                                        threshold=config.llm_int8_threshold, device="meta")  # fmt: skip
            layer.weight = bnb.nn.Int8Params(module.weight.data, requires_grad=False, has_fp16_weights=False)
        else:  # 4 bits
            four = {"compress_statistics": config.bnb_4bit_use_double_quant, "quant_type": config.bnb_4bit_quant_type,
                    "quant_storage": config.bnb_4bit_quant_storage}  # fmt: skip
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias,
                                      compute_dtype=config.bnb_4bit_compute_dtype, device="meta", **four)  # fmt: skip
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, module=layer, **four)
        if bias:
            layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        setattr(model.get_submodule(parent_name), child, layer.to(device))


def dinov2(model_path: str | Path):
    """A ``Dinov2Model`` of the configuration in ``model_path`` with random weights."""
    import torch
    from transformers import AutoConfig, Dinov2Model

    torch.manual_seed(SEED)
    return Dinov2Model(AutoConfig.from_pretrained(model_path))


def aligner(shape):
    """A PLVM Aligner of ``shape`` (:class:`plvm_model.aligner.AlignerShape`) with random weights."""
    import torch

    from plvm_model.aligner import Aligner

    torch.manual_seed(SEED)
    return Aligner(shape).eval()


def mode_line(random_weights: bool) -> str:
    """The line every summary prints about the models' weights."""
    if random_weights:
        return f"models: {MARK.upper()} (models.random_weights, --random-weights): every caption and answer is noise"
    return "models: weights read from their checkpoints"
