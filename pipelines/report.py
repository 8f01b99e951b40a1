"""Pictures of a run for a person to check by eye: an HTML page and PNG contact sheets.

Each photo is drawn with its face boxes, the name matched to each face (or ``?``) and the
distance, with the caption (or the error) under it. ``plvm report`` draws a caption run's
output; ``plvm eval recognition --report`` draws the evaluation's false matches and misses.
"""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from operators.decode import decode_image
from plvm_model.store import storage
from plvm_model.store.output_table import caption_rows

if TYPE_CHECKING:  # the evaluation imports torch and Ray, which `plvm show` does not need
    from pipelines.evaluation.recognition import RecognitionResult

THUMB = 360
SHEET_COLUMNS = 4
SHEET_ROWS = 4
MATCHED, UNMATCHED = (40, 200, 60), (230, 60, 40)


@dataclass
class Tile:
    path: str
    title: str
    text: str
    faces: list[dict]
    """Output-schema faces (box in original pixels, concept, distance)."""
    width: int
    height: int


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw(tile: Tile, storage_options: storage.StorageOptions | None = None) -> Image.Image:
    """The photo, at most THUMB pixels on a side, with its faces drawn on it."""
    try:
        fs, path = storage.filesystem(tile.path, storage_options)
        pixels, width, _ = decode_image(fs.cat_file(path), THUMB, 10**9)
        image = Image.fromarray(pixels)
    except Exception:  # the report shows what it can; an unreadable photo is a grey tile
        image, width = Image.new("RGB", (THUMB, THUMB * 3 // 4), (90, 90, 90)), tile.width or THUMB
    scale = image.width / width if width else 1.0
    pen = ImageDraw.Draw(image)
    font = _font(13)
    for face in tile.faces:
        x1, y1, x2, y2 = (v * scale for v in face["box"])
        color = MATCHED if face.get("concept") else UNMATCHED
        pen.rectangle((x1, y1, x2, y2), outline=color, width=2)
        distance = face.get("distance")
        label = f"{face.get('concept') or '?'}" + (f" {distance:.2f}" if distance is not None else "")
        box = pen.textbbox((x1, y1), label, font=font)
        top = max(0, y1 - (box[3] - box[1]) - 4)
        pen.rectangle((x1, top, x1 + box[2] - box[0] + 4, top + box[3] - box[1] + 4), fill=color)
        pen.text((x1 + 2, top + 1), label, fill=(255, 255, 255), font=font)
    return image


def contact_sheets(tiles: list[Tile], images: list[Image.Image], out: Path) -> list[Path]:
    """Grids of SHEET_COLUMNS x SHEET_ROWS photos with their titles and texts, as PNG files."""
    font, text_lines = _font(12), 4
    cell_w, cell_h = THUMB + 16, THUMB + 16 + 14 * (text_lines + 1)
    per_sheet = SHEET_COLUMNS * SHEET_ROWS
    sheets = []
    for start in range(0, len(tiles), per_sheet):
        chunk = list(zip(tiles[start : start + per_sheet], images[start : start + per_sheet]))
        rows = (len(chunk) + SHEET_COLUMNS - 1) // SHEET_COLUMNS
        sheet = Image.new("RGB", (cell_w * SHEET_COLUMNS, cell_h * rows), "white")
        pen = ImageDraw.Draw(sheet)
        for i, (tile, image) in enumerate(chunk):
            x, y = (i % SHEET_COLUMNS) * cell_w + 8, (i // SHEET_COLUMNS) * cell_h + 8
            sheet.paste(image, (x, y))
            lines = [tile.title[:60]] + textwrap.wrap(tile.text, 56)[:text_lines]
            for j, line in enumerate(lines):
                pen.text((x, y + THUMB + 4 + 14 * j), line, fill=(0, 0, 0) if j else (20, 20, 140), font=font)
        path = out / f"sheet-{start // per_sheet + 1:03d}.png"
        sheet.save(path)
        sheets.append(path)
    return sheets


def write_report(
    tiles: list[Tile], out_dir: str | Path, title: str, storage_options: storage.StorageOptions | None = None
) -> Path:
    """``out_dir/index.html``, one PNG per photo and the contact sheets; returns the page's path."""
    out = Path(out_dir)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    images = [draw(t, storage_options) for t in tiles]
    cards = []
    for index, (tile, image) in enumerate(zip(tiles, images)):
        name = f"photos/{index:05d}.png"
        image.save(out / name)
        cards.append(
            f'<figure><img src="{name}" alt=""><figcaption><b>{html.escape(tile.title)}</b><br>'
            f"{html.escape(tile.text)}<br><small>{html.escape(tile.path)}</small></figcaption></figure>"
        )
    sheets = contact_sheets(tiles, images, out)
    links = " ".join(f'<a href="{p.name}">{p.name}</a>' for p in sheets)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;width:{THUMB}px;margin:6px;
vertical-align:top}} img{{max-width:{THUMB}px}} figcaption{{font-size:13px}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{len(tiles)} photos. Green: a named face; red: no name matched
(the distance is to the nearest concept). Contact sheets: {links}</p>
{"".join(cards)}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index


def caption_report(results: str, out_dir: str, limit: int, storage_options: storage.StorageOptions | None) -> Path:
    """The report of a caption run's output (a folder of part files, or one Parquet file)."""
    rows = caption_rows(results, storage_options).slice(0, limit).to_pylist()
    tiles = [
        Tile(
            path=row["path"] or "",
            title=f"{Path(row['path'] or '?').name}: {', '.join(row['concepts'] or []) or 'nobody named'}",
            text=f"error: {row['error']}" if row["error"] else row["caption"] or "",
            faces=row["faces"] or [],
            width=row["width"] or 0,
            height=row["height"] or 0,
        )
        for row in rows
    ]
    return write_report(tiles, out_dir, f"plvm captions: {results}", storage_options)


def recognition_report(result: RecognitionResult, out_dir: str) -> Path:
    """The report of a recognition evaluation's errors: each false match and each miss."""
    tiles = []
    for d in result.errors():
        what = "missed" if d.positive else "false match"
        distance = "no face" if d.distance is None else f"nearest face at {d.distance:.3f} from {d.person}"
        text = f"{distance} (threshold {result.threshold})"
        tiles.append(Tile(d.photo, f"{what}: {d.person}", text, d.faces, d.width, d.height))
    return write_report(tiles, out_dir, f"recognition errors ({result.protocol} protocol)")
