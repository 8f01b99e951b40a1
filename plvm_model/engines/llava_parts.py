"""The parts of a LLaVA checkpoint that run outside vLLM, and its language model as a text-only checkpoint.

vLLM receives whole prompts as embeddings (``prompt_embeds``): the caller computes the
photo's features (vision tower + projector, as LLaVA does) and the text embeddings, so
vLLM only needs the language model. :func:`text_only_checkpoint` writes that model as a
plain ``LlamaForCausalLM`` folder (once, cached), which spares vLLM LLaVA's multimodal
machinery: on CPU builds that machinery needs a torchvision the CPU wheel cannot use.
:class:`LlavaEncoders` loads only the vision tower, projector and embedding table from the
checkpoint, not the multi-GB language model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plvm_model import random_weights as randomly
from plvm_model.cache import build_once, cache_root

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)  # fmt: skip

# Key prefixes of the two LLaVA layouts (llava-hf's published one, and transformers 5's).
_LANGUAGE = ("language_model.model.", "model.language_model.")
_LM_HEAD = ("language_model.lm_head.", "lm_head.")
_VISION = ("vision_tower.", "model.vision_tower.")
_PROJECTOR = ("multi_modal_projector.", "model.multi_modal_projector.")


def weight_files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        return [model_path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = model_path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{model_path} has no safetensors weights (model.safetensors or an index)")
    return [single]


def _tensors(model_path: Path, prefixes: tuple[str, ...]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(prefix, rest of the key, tensor) for each weight under one of ``prefixes``."""
    for file in weight_files(model_path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                for prefix in prefixes:
                    if key.startswith(prefix):
                        yield prefix, key[len(prefix) :], f.get_tensor(key)
                        break


class LlavaEncoders(torch.nn.Module):
    """Vision tower, projector and token embeddings of a LLaVA checkpoint, computed as LLaVA does (with
    ``random_weights``: of its configuration, with random weights; no weight is read)."""

    def __init__(
        self, model_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu", random_weights: bool = False
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        path = Path(model_path)
        self.config = AutoConfig.from_pretrained(path)
        torch.manual_seed(randomly.SEED)  # with random weights, the modules' own initialisation is their weights
        self.vision_tower = AutoModel.from_config(self.config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(self.config)
        text = self.config.text_config
        self.embed_tokens = torch.nn.Embedding(text.vocab_size, text.hidden_size)
        if not random_weights:
            self._load(path)
        self.to(device=device, dtype=dtype).eval()

    def _load(self, path: Path) -> None:
        """The checkpoint's vision tower, projector and embedding table."""
        # The vision tower's own keys may or may not start with "vision_model.", as may the file's.
        nested = any(k.startswith("vision_model.") for k in self.vision_tower.state_dict())
        state = {}
        for prefix, rest, tensor in _tensors(path, _VISION + _PROJECTOR + _LANGUAGE):
            if prefix in _VISION:
                rest = rest.removeprefix("vision_model.")
                state["vision_tower." + ("vision_model." + rest if nested else rest)] = tensor
            elif prefix in _PROJECTOR:
                state["multi_modal_projector." + rest] = tensor
            elif rest.startswith("embed_tokens."):
                state[rest] = tensor
        self.load_state_dict(state, strict=True)

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, image tokens, hidden): the vision feature layer(s) through the projector."""
        layer = self.config.vision_feature_layer
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        layers = [layer] if isinstance(layer, int) else list(layer)
        selected = [hidden[i][:, 1:] if self.config.vision_feature_select_strategy == "default" else hidden[i]
                    for i in layers]  # fmt: skip
        return self.multi_modal_projector(torch.cat(selected, dim=-1))


def _fingerprint(model_path: Path, weights: bool) -> str:
    stats = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in weight_files(model_path)] if weights else []
    stats.append(("config.json", (model_path / "config.json").read_text()))
    return hashlib.sha256(json.dumps([str(model_path.resolve()), stats]).encode()).hexdigest()[:16]


def _with_rows(tensor: torch.Tensor, extra_rows: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros((extra_rows, *tensor.shape[1:]))]) if extra_rows else tensor


def text_only_checkpoint(model_path: str, extra_rows: int = 0, weights: bool = True) -> Path:
    """A ``LlamaForCausalLM``-style folder of the LLaVA's language model and tokenizer, built once in the cache.

    ``extra_rows`` zero rows are added after the vocabulary, to the embedding table and the output head
    (the concept slots of ``concept_style: plvm``, written per batch by the engine). Without ``weights``, the
    folder holds the configuration and tokenizer only (vLLM's ``load_format="dummy"`` makes random weights).
    """
    source = Path(model_path)

    def build(out: Path) -> None:
        config = json.loads((source / "config.json").read_text())
        text = dict(config["text_config"])
        if extra_rows and text.get("tie_word_embeddings"):
            raise ValueError(
                f"{source.name} ties its output head to its embedding table: PLVM's concept token needs its own row "
                "in each (use concept_style sentence)"
            )
        from transformers import AutoConfig

        text["vocab_size"] = AutoConfig.from_pretrained(source).text_config.vocab_size + extra_rows
        text.setdefault("model_type", "llama")
        text["architectures"] = [text.get("architectures", ["LlamaForCausalLM"])[0]]
        text.setdefault("torch_dtype", config.get("torch_dtype") or config.get("dtype") or "float32")
        (out / "config.json").write_text(json.dumps(text, indent=1))
        files = weight_files(source) if weights else []
        weight_map = {}
        for index, file in enumerate(files):
            name = "model.safetensors" if len(files) == 1 else f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
            shard = {}
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    prefix = next((p for p in _LANGUAGE + _LM_HEAD if key.startswith(p)), None)
                    if prefix is not None:
                        head = "lm_head." if prefix in _LM_HEAD else "model."
                        tensor = f.get_tensor(key)
                        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                            tensor = _with_rows(tensor, extra_rows)
                        shard[head + key[len(prefix) :]] = tensor
            if shard:
                save_file(shard, out / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
        if len(files) > 1:
            (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copy(source / name, out / name)

    slots = f"-slots{extra_rows}" if extra_rows else ""
    kind = "" if weights else "-config"
    return build_once(cache_root() / "text-only" / f"{source.name}-{_fingerprint(source, weights)}{slots}{kind}", build)
