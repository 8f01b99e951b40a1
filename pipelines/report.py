"""Pictures of a run for a person to check by eye: an HTML page and PNG contact sheets, and a people page per user
with suggested people (a contact sheet of face crops per cluster).

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

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from operators.decode import decode_image
from plvm_model.store import storage
from plvm_model.store.output_table import caption_rows
from plvm_model.store.people import People

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
    tiles: list[Tile],
    out_dir: str | Path,
    title: str,
    storage_options: storage.StorageOptions | None = None,
    extra: str = "",
) -> Path:
    """``out_dir/index.html``, one PNG per photo and the contact sheets (and ``extra`` HTML after the intro); returns
    the page's path."""
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
(the distance is to the nearest concept). Contact sheets: {links}</p>{extra}
{"".join(cards)}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page)
    return index


def caption_report(results: str, out_dir: str, limit: int, storage_options: storage.StorageOptions | None,
                   people: list[tuple[str, Path]] | None = None) -> Path:  # fmt: skip
    """The report of a caption run's output (a folder of part files, or one Parquet file), linking the ``people``
    pages (user, page) made beside it."""
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
    links = " ".join(f'<a href="{html.escape(page.name)}">{html.escape(user)}</a>' for user, page in people or [])
    extra = f"<p>Suggested people (the faces nobody named, clustered): {links}</p>" if links else ""
    return write_report(tiles, out_dir, f"plvm captions: {results}", storage_options, extra)


CROP = 112
"""The side of a face crop on the people page."""
CROPS_PER_CLUSTER = 24


def face_crop(pixels: np.ndarray, scale: float, box: list[float]) -> Image.Image:
    """A square crop around ``box`` (in the photo's pixels; ``scale``: working copy / photo), with a margin."""
    x1, y1, x2, y2 = (v * scale for v in box)
    side = max(x2 - x1, y2 - y1) * 1.4
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    image = Image.fromarray(pixels)
    return image.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))).resize(
        (CROP, CROP)
    )


def people_page(user: str, people: People, index: pa.Table, out_dir: str | Path,
                storage_options: storage.StorageOptions | None = None) -> Path:  # fmt: skip
    """``out_dir/people-<user>.html``: a contact sheet per open cluster of ``people``, largest first, with up to
    :data:`CROPS_PER_CLUSTER` face crops each (the representative first), from the photos of the user's current
    face index rows ``index``."""
    out = Path(out_dir)
    folder = out / f"people-{user}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = {h: (p, w, f) for h, p, w, f in zip(*(index.column(c).to_pylist()
                                                 for c in ("content_hash", "path", "width", "faces")))}  # fmt: skip
    decoded: dict[str, tuple[np.ndarray, float] | None] = {}
    sections = []
    for cluster in people.suggestions():
        order = sorted(range(cluster.size), key=lambda i: (i != cluster.representative, -cluster.quality[i]))
        crops = []
        for i in order[:CROPS_PER_CLUSTER]:
            digest, number = cluster.faces[i]
            if digest not in rows:
                continue
            path, width, faces = rows[digest]
            if path not in decoded:
                try:
                    fs, where = storage.filesystem(path, storage_options)
                    pixels, upright, _ = decode_image(fs.cat_file(where), 4 * THUMB, 10**9)
                    decoded[path] = (pixels, pixels.shape[1] / (upright or width or 1))
                except Exception:  # the page shows what it can
                    decoded[path] = None
            if decoded[path] is None:
                continue
            name = f"{cluster.cluster_id:05d}-{i:04d}.png"
            face_crop(*decoded[path], faces[number]["box"]).save(folder / name)
            best = " best" if i == cluster.representative else ""
            crops.append(f'<img class="face{best}" src="{folder.name}/{name}" alt="face {number} of '
                         f'{html.escape(Path(path).name)}" title="{html.escape(path)}">')  # fmt: skip
        sections.append(f'<section id="cluster-{cluster.cluster_id}"><h2>Cluster {cluster.cluster_id}: '
                        f'<span class="size">{cluster.size}</span> faces, quality {cluster.score:.2f}</h2>'
                        f'{"".join(crops)}</section>')  # fmt: skip
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>suggested people of {html.escape(user)}</title>
<style>body{{font-family:sans-serif;margin:1em}} img{{width:{CROP}px;height:{CROP}px;margin:2px}}
img.best{{outline:3px solid #2a2}} section{{margin-bottom:1.5em}}</style></head>
<body><h1>Suggested people of {html.escape(user)}</h1><p>{len(sections)} clusters of faces nobody named, largest
first (the best face outlined). Name one with <code>plvm enroll --from-cluster ID --name NAME</code>.</p>
{"".join(sections)}
</body></html>
"""
    path = out / f"people-{user}.html"
    path.write_text(page)
    return path


def recognition_report(result: RecognitionResult, out_dir: str) -> Path:
    """The report of a recognition evaluation's errors: each false match and each miss."""
    tiles = []
    for d in result.errors():
        what = "missed" if d.positive else "false match"
        distance = "no face" if d.distance is None else f"nearest face at {d.distance:.3f} from {d.person}"
        text = f"{distance} (threshold {result.threshold})"
        tiles.append(Tile(d.photo, f"{what}: {d.person}", text, d.faces, d.width, d.height))
    return write_report(tiles, out_dir, f"recognition errors ({result.protocol} protocol)")
