"""The PLVM Aligner: published checkpoint keys and shapes, and the resampler's arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from plvm_model.aligner import Aligner, AlignerShape


def published_state_dict(depth: int = 4, dim: int = 768, out: int = 4096) -> dict[str, torch.Tensor]:
    """A random state dict with the key names and shapes of PLVM's released LLaVA-1.5-7B Aligner."""
    shapes = {
        "latents": (1, 17, dim),
        "proj_in.weight": (dim, 768),
        "proj_in.bias": (dim,),
        "proj_out.weight": (out, dim),
        "proj_out.bias": (out,),
        "norm_out.weight": (out,),
        "norm_out.bias": (out,),
        "linear_weight_mapping.0.weight": (1024, 768),
        "linear_weight_mapping.0.bias": (1024,),
        "linear_weight_mapping.2.weight": (1024, 1024),
        "linear_weight_mapping.2.bias": (1024,),
        "linear_weight_mapping.4.weight": (out, 1024),
        "linear_weight_mapping.4.bias": (out,),
    }
    for i in range(depth):
        shapes |= {
            f"layers.{i}.0.norm1.weight": (dim,),
            f"layers.{i}.0.norm1.bias": (dim,),
            f"layers.{i}.0.norm2.weight": (dim,),
            f"layers.{i}.0.norm2.bias": (dim,),
            f"layers.{i}.0.to_q.weight": (1024, dim),
            f"layers.{i}.0.to_kv.weight": (2048, dim),
            f"layers.{i}.0.to_out.weight": (dim, 1024),
            f"layers.{i}.1.0.weight": (dim,),
            f"layers.{i}.1.0.bias": (dim,),
            f"layers.{i}.1.1.weight": (4 * dim, dim),
            f"layers.{i}.1.3.weight": (dim, 4 * dim),
        }
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=generator) * 0.02 for k, s in shapes.items()}


def test_a_checkpoint_with_the_published_keys_loads_and_runs(tmp_path):
    state = published_state_dict()
    path = tmp_path / "checkpoint.ckpt"
    torch.save(state, path)
    aligner = Aligner.from_checkpoint(path, AlignerShape())
    assert set(aligner.state_dict()) == set(state)
    assert torch.equal(aligner.state_dict()["layers.3.0.to_kv.weight"], state["layers.3.0.to_kv.weight"])
    features = torch.randn(2, 257, 768)  # DINOv2-base: CLS + 16x16 patches
    with torch.no_grad():
        soft, head = aligner(features)
    assert soft.shape == (2, 17, 4096) and head.shape == (2, 4096)
    assert not torch.allclose(soft[0], soft[1]), "different photos give different soft tokens"


def test_a_checkpoint_of_another_shape_or_other_keys_is_refused(tmp_path):
    state = published_state_dict()
    torch.save(state, tmp_path / "ok.ckpt")
    with pytest.raises(ValueError, match="not a PLVM Aligner checkpoint"):
        Aligner.from_checkpoint(tmp_path / "ok.ckpt", AlignerShape(output_dim=5120))
    del state["norm_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="norm_out.bias"):
        Aligner.from_checkpoint(tmp_path / "bad.ckpt", AlignerShape())


def test_resampler_arithmetic_matches_the_plvm_formulation():
    """Latents attend to [features; latents] with softmax((q s)(k s)^T) v, s = dim_head ** -1/4."""
    torch.manual_seed(0)
    shape = AlignerShape(dim=16, depth=1, dim_head=4, heads=2, num_queries=3, embedding_dim=8, output_dim=12,
                         ff_mult=2, head_hidden=10)  # fmt: skip
    aligner = Aligner(shape).eval()
    x = torch.randn(1, 5, 8)
    attention, ff = aligner.layers[0]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(1, t.shape[1], shape.heads, -1).transpose(1, 2)

    feats = attention.norm1(aligner.proj_in(x))
    latents = attention.norm2(aligner.latents)
    q = split(attention.to_q(latents))
    k, v = (split(t) for t in attention.to_kv(torch.cat([feats, latents], 1)).chunk(2, -1))
    s = 1 / math.sqrt(math.sqrt(shape.dim_head))
    weights = torch.softmax((q * s) @ (k * s).transpose(-2, -1), dim=-1)
    attended = attention.to_out((weights @ v).transpose(1, 2).reshape(1, shape.num_queries, -1)) + aligner.latents
    expected = aligner.norm_out(aligner.proj_out(ff(attended) + attended))
    with torch.no_grad():
        soft, head = aligner(x)
        assert torch.allclose(soft, expected, atol=1e-5)
        assert torch.allclose(head, aligner.linear_weight_mapping(x[:, 0]), atol=1e-6), "head vector from CLS feature"
