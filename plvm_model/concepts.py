"""From a reference photo to a concept's soft tokens: DINOv2 features through the PLVM Aligner.

This runs once per reference photo, at enrollment; captioning reads the result from the
concept bank and never runs the Aligner again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from plvm_model import random_weights as randomly
from plvm_model.aligner import Aligner, AlignerShape
from plvm_model.faces.detector import Face

REFERENCES = ("image", "face")


def aligner_shape(checkpoint: str | Path | None, overrides: dict | None = None) -> AlignerShape:
    """The shape written beside the checkpoint (``aligner.json``), else PLVM's defaults with ``overrides`` (also
    without a checkpoint: ``None``)."""
    beside = Path(checkpoint).with_name("aligner.json") if checkpoint is not None else None
    if beside is not None and beside.exists():
        return AlignerShape(**json.loads(beside.read_text()))
    return AlignerShape(**(overrides or {}))


def aligner_identity(checkpoint: str | Path, reference: str, shape: AlignerShape, random_weights: bool = False) -> str:
    """Names the vector space of the soft tokens: a bank's concepts fit only the same Aligner setup (with
    ``random_weights``, the seeded random Aligner of ``shape``, whatever ``checkpoint`` says)."""
    if random_weights:
        configuration = json.dumps(shape.to_dict(), sort_keys=True).encode()
        return "plvm-aligner:" + randomly.identity(configuration, reference, shape.output_dim)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]
    return f"plvm-aligner:{digest}:{reference}:{shape.output_dim}"


def face_crop(image: np.ndarray, face: Face, margin: float) -> np.ndarray:
    """A square crop around ``face`` grown by ``margin`` of its size on each side, clipped to the image."""
    x1, y1, x2, y2 = face.box
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * (0.5 + margin)
    h, w = image.shape[:2]
    left, top = max(0, round(cx - half)), max(0, round(cy - half))
    right, bottom = min(w, round(cx + half)), min(h, round(cy + half))
    return image[top:bottom, left:right]


class ConceptEncoder:
    """DINOv2 (transformers) + Aligner. ``reference`` is ``image`` (PLVM) or ``face`` (a crop around the face); with
    ``random_weights`` both are built with random weights (DINOv2 from the configuration in ``dinov2_path``, the
    Aligner of ``shape``) and no checkpoint is read."""

    def __init__(
        self,
        dinov2_path: str,
        aligner_checkpoint: str,
        shape: AlignerShape,
        reference: str = "image",
        face_margin: float = 0.6,
        device: str = "cpu",
        random_weights: bool = False,
    ) -> None:
        from transformers import AutoImageProcessor, Dinov2Model
        from transformers.utils import logging

        if reference not in REFERENCES:
            raise ValueError(f"aligner reference must be one of {REFERENCES}, not {reference!r}")
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        self.reference = reference
        self.face_margin = face_margin
        self.device = torch.device(device)
        self.processor = AutoImageProcessor.from_pretrained(dinov2_path, backend="pil")
        dinov2 = randomly.dinov2(dinov2_path) if random_weights else Dinov2Model.from_pretrained(dinov2_path)
        self.dinov2 = dinov2.eval().to(self.device)
        if self.dinov2.config.hidden_size != shape.embedding_dim:
            raise ValueError(
                f"the Aligner expects {shape.embedding_dim}-d image features, "
                f"{dinov2_path} gives {self.dinov2.config.hidden_size}-d"
            )
        aligner = randomly.aligner(shape) if random_weights else Aligner.from_checkpoint(aligner_checkpoint, shape)
        self.aligner = aligner.to(self.device)
        self.identity = aligner_identity(aligner_checkpoint, reference, shape, random_weights)

    @torch.inference_mode()
    def encode(self, image: np.ndarray, face: Face | None) -> tuple[np.ndarray, np.ndarray]:
        """(soft tokens (num_queries, hidden), head weight (hidden,)) for one reference photo."""
        if self.reference == "face":
            if face is None:
                raise ValueError("the Aligner works on the reference face, and none was given")
            image = face_crop(image, face, self.face_margin)
        pixels = self.processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        features = self.dinov2(pixel_values=pixels.to(self.device)).last_hidden_state
        soft_tokens, head = self.aligner(features)
        return soft_tokens[0].float().cpu().numpy(), head[0].float().cpu().numpy()
