"""Dataset stage 4, photo files: what a photo with items puts in the dataset, its upright copy and its named faces.

A trainer reads a photo as its file says, without turning it by its EXIF orientation (LLaVA opens images with
PIL and converts them to RGB, nothing more), while the output's boxes are in the upright photo's pixels. So a
photo whose orientation turns it is written turned, as PNG (lossless); any other is written as its own bytes,
which decode to the source's pixels. Each person present whose face the matcher named gets a crop of that face
(its box with ``crop_margin`` around it, from the decoded working copy), as JPEG. The bytes go.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from operators.base import Resources, RowStage, Stage
from operators.decode import DecodeConfig, decode_image
from operators.items import DatasetConfig
from plvm_model.store.output_schema import ErrorKind, RowError

EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
"""The file ending of each image format written as it is; another is written as PNG."""
_ORIENTATION = 0x0112


def upright(data: bytes) -> tuple[bytes, str]:
    """The photo as a trainer should read it, and its file ending: its own bytes when they need no turn, else
    turned by its EXIF orientation, as PNG."""
    try:
        image = Image.open(io.BytesIO(data))
        turned = image.getexif().get(_ORIENTATION, 1) not in (None, 1)
        if not turned and image.format in EXTENSIONS:
            return data, EXTENSIONS[image.format]
        out = io.BytesIO()
        ImageOps.exif_transpose(image).save(out, "PNG")
    except (OSError, SyntaxError, ValueError) as error:
        raise RowError(ErrorKind.CORRUPT_IMAGE, f"image data is damaged: {error}") from None
    return out.getvalue(), "png"


def crop(pixels, box: list[float], scale: float, margin: float) -> bytes:
    """The face ``box`` (upright pixels) of the working copy ``pixels`` (``scale`` of the photo), with ``margin``
    of the box's size around it, as JPEG."""
    x1, y1, x2, y2 = (v * scale for v in box)
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    height, width = pixels.shape[:2]
    left, top = max(0, int(x1 - dx)), max(0, int(y1 - dy))
    right, bottom = min(width, int(round(x2 + dx))), min(height, int(round(y2 + dy)))
    out = io.BytesIO()
    Image.fromarray(pixels[top:max(bottom, top + 1), left:max(right, left + 1)]).save(out, "JPEG", quality=95)
    return out.getvalue()


class PhotoFiles(RowStage):
    """data + faces + people -> image (upright bytes), image_name, crops; rows without items are passed by."""

    needs = ("data", "content_hash", "faces", "people", "items")
    adds = ("image", "image_name", "crops")
    drops = ("data",)

    def __init__(self, config: DatasetConfig, decode: DecodeConfig) -> None:
        self.config, self.decode = config, decode

    def process(self, row: dict) -> None:
        row["crops"] = []
        if not row["items"]:
            return
        row["image"], ext = upright(row["data"])
        row["image_name"] = f"{row['content_hash'][:2]}/{row['content_hash']}.{ext}"
        named = [p for p in row["people"] if p["face"] >= 0]
        if named:
            pixels, width, _ = decode_image(row["data"], self.decode.max_side, self.decode.max_pixels)
            scale = pixels.shape[1] / width
            for person in named:
                box = row["faces"][person["face"]]["box"]
                data = crop(pixels, box, scale, self.config.crop_margin)
                row["crops"].append({"concept_id": person["concept_id"], "face": person["face"], "data": data})
            self.stat_update("crops", len(named))


def stage(config: DatasetConfig, decode: DecodeConfig, tasks: Resources) -> Stage:
    return Stage.of("photo_files", PhotoFiles, (config, decode), tasks)
