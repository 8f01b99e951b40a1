"""A dataset's files, as its consumers read them: the folder's layout and each format's record of an item.

A dataset folder (``plvm dataset``) holds, beside its card (``README.md``) and ``manifest.json``:

- ``images/<hh>/<hash>.<ext>``: each photo once, named by the SHA-256 of its bytes, upright (a photo whose EXIF
  orientation turns it is written turned, as PNG; any other is its own bytes);
- ``crops/<hh>/<hash>-<face>.jpg``: the face of each named person, cut from the photo with a margin;
- ``references/<user>/<concept_id>.<ext>``: each person's reference photo (the first the bank holds);
- ``llava_<split>.json``: LLaVA-1.5's fine-tuning JSON (``--data_path``, with ``--image_folder images``);
- ``llamafactory_<split>.json`` and ``dataset_info.json``: LLaMA-Factory's sharegpt format (``--dataset_dir``,
  ``--dataset plvm_<split>``; image paths relative to the folder, its ``media_dir``);
- ``hf/<split>/part-<key>.parquet``: Parquet that ``datasets.load_dataset("parquet", ...)`` reads with the images
  decoded, as TRL's vision SFT takes them (``messages``, ``images``);
- ``plvm-eval/<split>/<user>/``: PLVM's evaluation layout: ``people/<person>/ref_img.<ext>`` and the photos of
  that person alone, ``photos/`` (the other photos asked about) and ``query_ques.json``.

An item is a question about one photo and its answer (``operators.rows.ITEM``); each format renders it as one
record. The JSON formats carry what the trainers do not read under ``extra``: the item's kind, where its answer
came from (``truth``), its user, the person asked about, and the named people's crops and reference photos.
"""

from __future__ import annotations

import re
from typing import Any

FORMATS = ("llava", "hf", "llamafactory", "plvm-eval")
"""The dataset formats ``plvm dataset --format`` writes."""
JSON_LISTS = ("llava", "llamafactory")
"""The formats written as one JSON list per split, assembled from the shards' fragments at the end."""
IMAGE_TOKEN = "<image>"
KINDS = ("caption", "recognition", "choice", "grounding", "vqa")
"""The kinds of item: the caption, "is NAME in this photo?", multiple choice, the box of NAME's face, and the
configured questions with the model's answers."""
_SAFE_NAME = re.compile(r"[\w][\w .'@-]{0,127}")


def image_path(name: str) -> str:
    """A photo's file in the dataset (``name``: ``<hh>/<hash>.<ext>``)."""
    return f"images/{name}"


def crop_path(content_hash: str, face: int) -> str:
    return f"crops/{content_hash[:2]}/{content_hash}-{face}.jpg"


def reference_path(user_id: str, concept_id: str, ext: str) -> str:
    return f"references/{user_id}/{concept_id}.{ext}"


def hf_part(split: str, key: str) -> str:
    return f"hf/{split}/part-{key}.parquet"


def json_list(fmt: str, split: str) -> str:
    """The JSON list of ``fmt`` (``llava`` or ``llamafactory``) for ``split``."""
    return f"{fmt}_{split}.json"


def fragment(fmt: str, split: str, key: str, user_id: str | None = None) -> str:
    """A shard's records of one format and split (and, for ``plvm-eval``, user), as JSON lines, until the end of
    the build assembles them."""
    return "/".join(["_build", "fragments", fmt, split, *([user_id] if user_id else []), f"{key}.jsonl"])


def eval_folder(split: str, user_id: str) -> str:
    """The PLVM evaluation layout of one user's photos in ``split``."""
    return f"plvm-eval/{split}/{user_id}"


def person_folder(name: str, concept_id: str) -> str:
    """A person's folder name in the PLVM layout: the name, where it is a safe file name, else the concept id."""
    return name if _SAFE_NAME.fullmatch(name) and name.strip() == name else concept_id


def extra(item: dict, row: dict, concepts: list[dict]) -> dict[str, Any]:
    """What a JSON record carries beside the trainer's fields."""
    return {"kind": item["kind"], "truth": item["truth"], "user_id": row["user_id"], "person": item["person"],
            "concepts": concepts}  # fmt: skip


def llava_record(item: dict, image_name: str, extras: dict) -> dict[str, Any]:
    """LLaVA-1.5's record: the image relative to the image folder, the first human turn beginning ``<image>\\n``."""
    return {
        "id": item["id"],
        "image": image_name,
        "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{item['question']}"},
                          {"from": "gpt", "value": item["answer"]}],  # fmt: skip
        "extra": extras,
    }


def llamafactory_record(item: dict, image_name: str, extras: dict) -> dict[str, Any]:
    """LLaMA-Factory's sharegpt record in OpenAI roles: one ``<image>`` token per image, the image relative to the
    dataset folder."""
    return {
        "messages": [{"role": "user", "content": f"{IMAGE_TOKEN}{item['question']}"},
                     {"role": "assistant", "content": item["answer"]}],  # fmt: skip
        "images": [image_path(image_name)],
        "extra": extras,
    }


def dataset_info(splits: list[str]) -> dict[str, Any]:
    """LLaMA-Factory's ``dataset_info.json``: one dataset ``plvm_<split>`` per split."""
    entry = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}  # fmt: skip
    return {f"plvm_{split}": {"file_name": json_list("llamafactory", split), **entry} for split in splits}


def hf_features():
    """The ``datasets`` features of the ``hf`` Parquet: ``messages`` as TRL's vision SFT reads them (each content a
    list of ``{type: image}`` and ``{type: text, text}``), ``images`` decoded as images."""
    import datasets

    text = datasets.Value("string")
    concept = {"name": text, "crop": text, "reference": text}
    return datasets.Features({
        "id": text, "kind": text, "truth": text, "user_id": text, "person": text,
        "messages": datasets.List({"role": text, "content": datasets.List({"type": text, "text": text})}),
        "images": datasets.List(datasets.Image()),
        "concepts": datasets.List(concept),
    })  # fmt: skip


def hf_row(item: dict, image: bytes, image_name: str, extras: dict) -> dict[str, Any]:
    """One row of the ``hf`` Parquet: the photo's bytes in ``images``, one image entry in the user's content."""
    return {
        "id": item["id"], "kind": item["kind"], "truth": item["truth"], "user_id": extras["user_id"],
        "person": item["person"],
        "messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                   {"type": "text", "text": item["question"]}]},
                     {"role": "assistant", "content": [{"type": "text", "text": item["answer"]}]}],
        "images": [{"bytes": image, "path": image_path(image_name)}],
        "concepts": extras["concepts"],
    }  # fmt: skip


def query_question(item: dict, ref_img: str, query_img: str) -> dict[str, Any]:
    """A multiple-choice item in PLVM's ``query_ques.json`` shape (paths relative to the file's folder)."""
    return {
        "ref_img": ref_img,
        "query_img": query_img,
        "question": item["sks_question"],
        "multiple_choice": {c["letter"]: c["text"] for c in item["choices"]},
        "correct_answer": item["correct"],
    }
