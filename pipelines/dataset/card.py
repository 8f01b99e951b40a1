"""A dataset's description: ``manifest.json`` for programs (``plvm forget`` reads which users and people it holds)
and the ``README.md`` dataset card for people, both from the counts the shards carried.

The counts come from the stages' counters (``operators.shards``, ``operators.items``) summed
over every shard committed, by this build and the ones it resumed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from plvm_model.store import dataset_formats as formats

BOX_FORMAT = ("[x1, y1, x2, y2]: the face box's left, top, right and bottom edges as fractions of the upright "
              "photo's width and height (0 to 1, from the top left)")  # fmt: skip


@dataclass
class Counts:
    """What a dataset holds, from the shards' counters."""

    photos: dict[str, int] = field(default_factory=dict)
    """Photos with items, by split."""
    items: dict[str, dict[str, int]] = field(default_factory=dict)
    """Items by split and kind."""
    people: dict[tuple[str, str], dict[str, dict[str, int]]] = field(default_factory=dict)
    """(user, concept id) -> {"photos": {split: n}, "asked": {split: n}}."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Output rows that gave no item, by why."""
    captions: dict[str, int] = field(default_factory=dict)
    """Captions kept, and dropped by why."""
    evaluation: dict[str, list[str]] = field(default_factory=dict)
    """Split -> the users the PLVM layout of the split holds."""
    models: list[dict[str, str]] = field(default_factory=list)
    truth_unenrolled: int = 0
    """Names in the truth file that the photo's user had not enrolled (not in the dataset)."""

    @classmethod
    def of(cls, stats: Counter) -> Counts:
        counts = cls()
        for key, value in sorted(stats.items()):
            stage, _, counter = key.partition(".")
            what, _, rest = counter.partition(":")
            n = int(value)
            if stage == "shards" and what == "photos":
                counts.photos[rest] = n
            elif stage == "shards" and what == "items":
                split, kind = rest.split(":")
                counts.items.setdefault(split, {})[kind] = n
            elif stage == "shards" and what in ("person", "asked"):
                user, concept, split = rest.split(":")
                person = counts.people.setdefault((user, concept), {"photos": {}, "asked": {}})
                person["photos" if what == "person" else "asked"][split] = n
            elif stage == "shards" and what == "eval":
                split, user = rest.split(":")
                counts.evaluation.setdefault(split, []).append(user)
            elif stage == "shards" and what == "model":
                engine, _, model = rest.partition(":")
                counts.models.append({"engine": engine, "model": model})
            elif what == "dropped":  # the shards count the rows with an error, the items stage the others
                counts.dropped[rest] = counts.dropped.get(rest, 0) + n
            elif what == "captions":
                counts.captions[rest] = n
            elif what == "truth" and rest == "unenrolled_names":
                counts.truth_unenrolled = n
        return counts


def manifest(plan: dict, counts: Counts, people: dict[str, dict[str, dict]], files: dict, extra: dict) -> dict:
    """The machine-readable description: the plan, what each format's files are, and what the dataset holds."""
    users = {}
    for user, known in sorted(people.items()):
        listed = []
        for concept_id, person in sorted(known.items(), key=lambda kv: kv[1]["name"]):
            held = counts.people.get((user, concept_id), {"photos": {}, "asked": {}})
            if held["photos"] or held["asked"]:
                listed.append({**person, "concept_id": concept_id, **held})
        users[user] = {"bank_versions": plan["bank_versions"].get(user, []), "people": listed}
    return {
        "format_version": 1,
        **extra,
        "source": plan["source"],
        "users": users,
        "formats": plan["options"]["formats"],
        "files": files,
        "splits": plan["options"]["splits"],
        "split_by": plan["options"]["split_by"],
        "seed": plan["options"]["seed"],
        "negatives": plan["options"]["negatives"],
        "truth": plan["truth"],
        "box_format": BOX_FORMAT,
        "counts": {"photos": counts.photos, "items": counts.items, "dropped": counts.dropped,
                   "captions": counts.captions, "truth_names_not_enrolled": counts.truth_unenrolled},  # fmt: skip
        "models": counts.models,
        "aligners": plan["aligners"],
        "embedders": plan["embedders"],
        "config_hash": plan["config_hash"],
    }


def card(manifest: dict) -> str:
    """The ``README.md`` dataset card (with the ``configs`` front matter that lets ``datasets.load_dataset(DIR)``
    find the ``hf`` parts)."""
    splits = list(manifest["splits"])
    hf = manifest["files"].get("hf", {})
    front = []
    if hf:
        front = ["---", "configs:", "- config_name: default", "  data_files:"]
        front += [f"  - split: {split}\n    path: {pattern}" for split, pattern in hf.items()]
        front += ["---", ""]
    counts = manifest["counts"]
    kinds = [k for k in formats.KINDS if any(k in by_kind for by_kind in counts["items"].values())]
    lines = [
        *front,
        "# Personalized photo dataset",
        "",
        f"Built by plvm-pipeline from the caption output `{manifest['source']['output']}` (table version "
        f"{manifest['source']['version']}) with `{manifest['command']}`.",
        "",
        "## Counts",
        "",
        "| split | photos | " + " | ".join(kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
        *(f"| {s} | {counts['photos'].get(s, 0)} | "
          + " | ".join(str(counts["items"].get(s, {}).get(k, 0)) for k in kinds) + " |" for s in splits),
        "",
        "| user | person | " + " | ".join(f"photos in {s}" for s in splits) + " |",
        "|---|---|" + "---|" * len(splits),
        *(f"| {user} | {p['name']} | " + " | ".join(str(p["photos"].get(s, 0)) for s in splits) + " |"
          for user, held in manifest["users"].items() for p in held["people"]),
        "",
        "Output rows that gave no item: " + (", ".join(f"{k} {v}" for k, v in counts["dropped"].items()) or "none")
        + ". Captions: " + (", ".join(f"{k.replace(':', ' ')} {v}" for k, v in counts["captions"].items()) or "none")
        + ".",
        "",
        "## Items",
        "",
        "Who is in a photo (its truth) is the face matcher's names in the output (`truth: matcher`), or a human truth "
        "file's (`truth: file`); `vqa` items are the model's answers (`truth: model`), not truth.",
        "A caption is kept only when the enrolled people it names are exactly those present. Recognition negatives "
        f"are the user's other enrolled people ({manifest['negatives']} per photo, seed {manifest['seed']}). "
        f"Grounding boxes: {manifest['box_format']}.",
        "",
        "## Files",
        "",
        *(f"- `{fmt}`: {where}" for fmt, where in _where(manifest).items()),
        "",
        "## Provenance and privacy",
        "",
        f"Splits {', '.join(f'{k} {v:g}' for k, v in manifest['splits'].items())} by {manifest['split_by']} "
        "(stable: from each photo's content hash or each "
        "person's concept). Bank versions, models, Aligners, the config's hash and the command: `manifest.json`.",
        f"It holds the photos, names, face crops and reference photos of the users {', '.join(manifest['users'])} "
        "only, and of no one those users did not enroll.",
        "",
    ]
    return "\n".join(lines)


def _where(manifest: dict) -> dict[str, str]:
    files = manifest["files"]
    out = {}
    if "llava" in files:
        out["llava"] = (", ".join(f"`{f}`" for f in files["llava"].values()) + " (LLaVA-1.5: `--data_path FILE "
                        "--image_folder images`)")  # fmt: skip
    if "hf" in files:
        out["hf"] = ("`datasets.load_dataset(\"parquet\", data_files={split: \"hf/<split>/*.parquet\"})`, or "
                     "`load_dataset(DIR)`; `messages` and `images` as TRL's vision SFT takes them")  # fmt: skip
    if "llamafactory" in files:
        out["llamafactory"] = "`dataset_info.json` (LLaMA-Factory: `--dataset_dir DIR --dataset plvm_<split>`)"
    if "plvm-eval" in files:
        out["plvm-eval"] = ("`plvm-eval/<split>/<user>/people` (`plvm eval recognition`) and its `query_ques.json` "
                            "(`plvm eval vqa`)")  # fmt: skip
    return out
