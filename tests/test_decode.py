"""Read and decode: every file yields its row; unusual images decode, damaged ones get a named error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from operators.decode import Decode, DecodeConfig
from operators.rows import row_pixels
from operators.read import ReadBytes, ReadConfig
from operators.rows import to_table


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height``: a decompression bomb's signature."""
    data = io.BytesIO()
    Image.new("RGB", (1, 1)).save(data, "PNG")
    raw = bytearray(data.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    raw[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    raw[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4 : ihdr + 13])))
    return bytes(raw)


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def _exif_rotated() -> bytes:
    image = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return _encoded(image, "JPEG", exif=exif)


def _run(files: dict[str, bytes], tmp_path: Path, missing: tuple[str, ...] = (), **decode) -> dict[str, dict]:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = [*files, *missing]
    listing = to_table([{"path": str(tmp_path / n), "user_id": "u"} for n in names], ["path", "user_id"])
    batch = Decode(DecodeConfig(**decode))(ReadBytes(ReadConfig())(listing))
    assert batch.num_rows == len(names)
    return {Path(r["path"]).name: r for r in batch.to_pylist()}


def test_bad_files_get_named_errors_and_good_ones_are_unaffected(tmp_path):
    good = _encoded(Image.new("RGB", (64, 48), (200, 10, 10)), "JPEG")
    rows = _run(
        {
            "good.jpg": good,
            "empty.jpg": b"",
            "text.jpg": b"this is a text file, not a photo\n" * 10,
            "truncated.jpg": good[: len(good) // 2],
            "garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8,
            "bomb.png": _png_claiming(60_000, 60_000),
        },
        tmp_path,
        missing=("missing.jpg",),
    )
    expected = {
        "empty.jpg": "empty_file",
        "text.jpg": "not_an_image",
        "truncated.jpg": "truncated",
        "bomb.png": "decompression_bomb",
        "missing.jpg": "missing_file",
    }
    for name, kind in expected.items():
        assert rows[name]["error_kind"] == kind, rows[name]
        assert name in rows[name]["error"], "the error names the file"
        assert rows[name]["pixels"] is None
    assert rows["garbage.jpg"]["error_kind"] in ("not_an_image", "corrupt_image", "truncated")
    assert rows["good.jpg"]["error"] is None
    assert (rows["good.jpg"]["width"], rows["good.jpg"]["height"]) == (64, 48)
    assert "data" not in rows["good.jpg"], "the encoded bytes are dropped after decoding"


def test_unusual_but_valid_images_decode_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (0, 0, 255, 0))
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([255, 0, 0] * 256)
    gradient16 = Image.fromarray((np.arange(100, dtype=np.uint16).reshape(10, 10) * 650))
    rows = _run(
        {
            "rgba.png": _encoded(rgba, "PNG"),
            "palette.png": _encoded(palette, "PNG"),
            "palette_transparent.png": _encoded(palette, "PNG", transparency=0),
            "cmyk.jpg": _encoded(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), "JPEG", quality=100),
            "gray16.png": _encoded(gradient16, "PNG"),
            "gray.png": _encoded(Image.new("L", (10, 10), 77), "PNG"),
            "bilevel.png": _encoded(Image.new("1", (10, 10), 1), "PNG"),
            "rotated.jpg": _exif_rotated(),
            "tiny.png": _encoded(Image.new("RGB", (2, 3), (1, 2, 3)), "PNG"),
        },
        tmp_path,
    )
    for name, row in rows.items():
        assert row["error"] is None, row["error"]
        assert row_pixels(row).shape == (row["height"], row["width"], 3), name
    center = {name: row_pixels(row)[row["height"] // 2, row["width"] // 2].tolist() for name, row in rows.items()}
    assert center["rgba.png"] == [255, 255, 255], "transparent pixels are laid on white"
    assert center["palette.png"] == [255, 0, 0]
    assert center["palette_transparent.png"] == [255, 255, 255]
    assert center["cmyk.jpg"][0] > 200 and center["cmyk.jpg"][1] < 60, "CMYK cyan 0 / magenta+yellow full is red"
    assert center["gray.png"] == [77, 77, 77]
    assert center["bilevel.png"] == [255, 255, 255]
    gray16 = row_pixels(rows["gray16.png"])[..., 0]
    assert gray16.min() == 0 and 200 < gray16.max() < 255, "16-bit values are scaled, not clipped"
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (20, 40), "EXIF rotation applied"
    assert (rows["tiny.png"]["width"], rows["tiny.png"]["height"]) == (2, 3)


def test_huge_image_is_resized_and_keeps_its_size_on_record(tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (3000, 4500, 3), dtype=np.uint8))
    rows = _run({"big.jpg": _encoded(big, "JPEG", quality=70)}, tmp_path, max_side=1000)
    row = rows["big.jpg"]
    assert row["error"] is None
    assert (row["width"], row["height"]) == (4500, 3000)
    assert max(row["pixels_width"], row["pixels_height"]) == 1000
    assert row["pixels_width"] / row["pixels_height"] == pytest.approx(1.5, rel=0.01)


def test_pixel_limit_is_configurable(tmp_path):
    rows = _run({"a.png": _encoded(Image.new("RGB", (100, 100)), "PNG")}, tmp_path, max_pixels=5000)
    assert rows["a.png"]["error_kind"] == "decompression_bomb"
    assert "10000 pixels" in rows["a.png"]["error"] or "100x100" in rows["a.png"]["error"]
