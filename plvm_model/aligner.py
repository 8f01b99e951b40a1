"""The PLVM Aligner: DINOv2 features of a reference photo through a Perceiver resampler.

PLVM (Pham et al., CVPRW 2025) turns a reference photo of a person into
``num_queries`` vectors in the LLM's input-embedding space (the first is the name word,
the rest are context tokens) and one vector for the LLM's output head (the name token's
row of ``lm_head``). This module re-implements that resampler so that a PLVM checkpoint
loads by its published state-dict keys::

    latents                               (1, num_queries, dim)
    proj_in.{weight,bias}                 embedding_dim -> dim
    layers.{i}.0.{norm1,norm2}.{weight,bias}
    layers.{i}.0.{to_q,to_kv,to_out}.weight
    layers.{i}.1.{0,1,3}.*                LayerNorm, Linear(dim, dim*ff_mult), GELU, Linear back
    proj_out.{weight,bias}                dim -> output_dim
    norm_out.{weight,bias}
    linear_weight_mapping.{0,2,4}.*       CLS feature -> head_hidden -> head_hidden -> output_dim
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class AlignerShape:
    """Hyper-parameters of the resampler; the defaults are PLVM's published LLaVA-1.5-7B ones."""

    dim: int = 768
    depth: int = 4
    dim_head: int = 64
    heads: int = 16
    num_queries: int = 17
    embedding_dim: int = 768
    """Width of the image features (DINOv2-base: 768)."""
    output_dim: int = 4096
    """Hidden size of the LLM."""
    ff_mult: int = 4
    head_hidden: int = 1024
    """Width of the MLP that produces the output-head vector."""

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class PerceiverAttention(nn.Module):
    """Latents attend to the image features concatenated with themselves."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        batch, n_latents, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((features, latents), dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, n_latents, -1))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Aligner(nn.Module):
    """Image features (B, N, embedding_dim), CLS first -> (soft tokens (B, Q, out), head vector (B, out))."""

    def __init__(self, shape: AlignerShape = AlignerShape()) -> None:
        super().__init__()
        self.shape = shape
        s = shape
        self.latents = nn.Parameter(torch.randn(1, s.num_queries, s.dim) / s.dim**0.5)
        self.proj_in = nn.Linear(s.embedding_dim, s.dim)
        self.proj_out = nn.Linear(s.dim, s.output_dim)
        self.norm_out = nn.LayerNorm(s.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(s.dim, s.dim_head, s.heads), _feed_forward(s.dim, s.ff_mult)])
            for _ in range(s.depth)
        )
        self.linear_weight_mapping = nn.Sequential(
            nn.Linear(s.embedding_dim, s.head_hidden),
            nn.GELU(),
            nn.Linear(s.head_hidden, s.head_hidden),
            nn.GELU(),
            nn.Linear(s.head_hidden, s.output_dim),
        )

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.linear_weight_mapping(features[:, 0, :])
        x = self.proj_in(features)
        latents = self.latents.expand(features.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents)), head

    @classmethod
    def from_checkpoint(cls, path: str | Path, shape: AlignerShape) -> Aligner:
        """Load a PLVM checkpoint (a plain state dict, as ``torch.save`` wrote it) strictly."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        model = cls(shape)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{path} is not a PLVM Aligner checkpoint of shape {shape}: {error}") from None
        return model.eval()
