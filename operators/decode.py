"""Stage 2, decode: a photo's bytes to an upright 8-bit RGB working copy.

EXIF orientation is applied; RGBA, LA and transparent palette images are laid on white;
CMYK, palette, grayscale, 1-bit, 16-bit and float images become RGB. A file whose header
promises more than ``max_pixels`` is refused before decoding (decompression-bomb guard);
a large one is decoded at reduced scale where the format allows (JPEG draft mode) and
resized so that its long side is at most ``max_side``. ``width``/``height`` are the
photo's upright size; ``pixels`` is the working copy (``pixels_width`` x ``pixels_height``).
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from operators.base import Resources, RowStage, Stage, StageConfig
from plvm_model.store.output_schema import ErrorKind, RowError

_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_DAMAGED = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, ZeroDivisionError)
"""What Pillow's format parsers raise on damaged data: an input fault. Anything else is a bug."""


class DecodeConfig(StageConfig):
    max_side: int = Field(1600, ge=16, description="Long side of the working copy that later stages see.")
    max_pixels: int = Field(
        150_000_000,
        ge=1,
        description="A photo with more pixels is refused (decompression bomb); Pillow's own limit "
        "(about 179 million) applies as well.",
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def _damaged(error: Exception) -> RowError:
    kind = ErrorKind.TRUNCATED if "truncated" in str(error).lower() else ErrorKind.CORRUPT_IMAGE
    return RowError(kind, f"image data is damaged: {error}")


def decode_image(data: bytes, max_side: int, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """(working copy (H, W, 3) uint8, upright width, upright height) of an encoded image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is ours, below
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RowError(ErrorKind.NOT_AN_IMAGE, "not an image file (unknown or damaged format)") from None
    except Image.DecompressionBombError as error:
        raise RowError(ErrorKind.DECOMPRESSION_BOMB, str(error)) from None
    except _DAMAGED as error:
        raise _damaged(error) from None
    width, height = image.size
    if width * height > max_pixels:
        raise RowError(
            ErrorKind.DECOMPRESSION_BOMB, f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels"
        )
    try:
        if image.getexif().get(0x0112) in _ROTATED:
            width, height = height, width
        if image.format == "JPEG" and max(width, height) > 2 * max_side:
            image.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale
        image.load()
        image = _to_rgb(ImageOps.exif_transpose(image))
    except _DAMAGED as error:
        raise _damaged(error) from None
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8), width, height


class Decode(RowStage):
    """data -> pixels, pixels_width, pixels_height, width, height (for rows without pixels yet); the bytes go."""

    needs = ("data",)
    adds = ("width", "height", "pixels", "pixels_width", "pixels_height")
    drops = ("data",)

    def __init__(self, config: DecodeConfig) -> None:
        self.config = config

    def skips(self, row: dict) -> bool:
        return row.get("pixels") is not None

    def process(self, row: dict) -> None:
        if self.skips(row):
            return
        pixels, row["width"], row["height"] = decode_image(row["data"], self.config.max_side, self.config.max_pixels)
        row["pixels_height"], row["pixels_width"] = pixels.shape[:2]
        row["pixels"] = pixels.tobytes()
        self.stat_update("decoded")


class DecodeForFaces(Decode):
    """The decode before detection: it passes by the photos whose faces came from the face index, and keeps
    ``data`` for the decode before the LLM (the run reads each photo once)."""

    drops = ()

    def skips(self, row: dict) -> bool:
        return super().skips(row) or row.get("faces") is not None


def stage(config: DecodeConfig, tasks: Resources, for_faces: bool = False) -> Stage:
    """The decode stage; ``for_faces``: the one before detection (``decode_for_faces``)."""
    if for_faces:
        return Stage.of("decode_for_faces", DecodeForFaces, (config,), tasks)
    return Stage.of("decode", Decode, (config,), tasks)
