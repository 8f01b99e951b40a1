"""``plvm dataset``: a caption run's output as training and evaluation sets that their consumers read as they are.

One caption run over sample photos of two users is made once for the module, and one dataset of it in every
format; the checkers below are written from each consumer's documented rules (LLaVA's "Finetune on custom data",
TRL's vision datasets as ``datasets`` loads them, LLaMA-Factory's data README, PLVM's ``query_ques.json``), not
from the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, make_config, photo
from PIL import Image
from test_resilience import killed_when, write_manifest

from pipelines.caption import caption
from pipelines.cli import run
from pipelines.enroll import enroll
from plvm_model.store.exports import exports
from plvm_model.store.output_table import read_output

ANN = {"Thao": "thao", "Viruss": "viruss", "Tien": "thuytien"}
"""The people user ann enrolled (name -> sample folder); willinvietnam's photos show nobody she enrolled."""
ANN_PHOTOS = [photo(p, f"{i}.jpg") for p in ("thao", "viruss", "thuytien", "willinvietnam") for i in range(4)]
BOB_PHOTOS = [photo("phuc-map", f"{i}.jpg") for i in range(3)]
KINDS = {"caption", "recognition", "choice", "grounding", "vqa"}


@dataclass(frozen=True)
class Archive:
    root: Path
    config_file: Path
    output: str
    hashes: dict[str, str]
    """Content hash -> the sample photo's path."""


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory, yollava, tiny_models, ray_local) -> Archive:
    """A caption run over 16 photos of ann (3 people enrolled) and 3 of bob (phuc-map enrolled as Phuc)."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "m.csv").write_text("path,user_id\n" + "".join(f"{p},ann\n" for p in ANN_PHOTOS)
                                + "".join(f"{p},bob\n" for p in BOB_PHOTOS))  # fmt: skip
    config = make_config(root, input={"uri": str(root / "m.csv")}, dataset={"splits": {"train": 0.5, "test": 0.5}})
    for name, person in ANN.items():
        enroll(config, "ann", name, [photo(person, "ref_img.jpg")])
    enroll(config, "bob", "Phuc", [photo("phuc-map", "ref_img.jpg")])
    caption(config)
    config_file = root / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return Archive(root, config_file, config.output.uri, {sha256(p): p for p in ANN_PHOTOS + BOB_PHOTOS})


def build(archive: Archive, out: Path, *options: str, capsys=None) -> dict:
    """``plvm dataset`` of the archive into ``out``; its summary (the last line printed)."""
    code = run(["dataset", "--config", str(archive.config_file), archive.output, "--out", str(out), *options])
    printed = capsys.readouterr() if capsys is not None else None
    assert code == 0, printed
    return json.loads(printed.out.strip().splitlines()[-1]) if printed else {}


@pytest.fixture(scope="module")
def built(archive, tmp_path_factory) -> Path:
    """The dataset of ann's photos in every format."""
    out = tmp_path_factory.mktemp("built") / "ds"
    build(archive, out, "--user", "ann")
    return out


def output_rows(archive: Archive) -> dict[str, dict]:
    return {r["path"]: r for r in read_output(archive.output).to_pylist()}


def llava_items(folder: Path) -> list[dict]:
    return [item for f in sorted(folder.glob("llava_*.json")) for item in json.loads(f.read_text())]


def source_of(archive: Archive, image_name: str) -> str:
    """The sample photo a dataset image is: its name holds its content hash."""
    return archive.hashes[Path(image_name).stem[:64]]


def check_llava(file: Path, image_folder: Path) -> int:
    """LLaVA's documented fine-tuning format: a JSON list of samples, each with a unique ``id``, an ``image`` path
    relative to the image folder, and ``conversations`` of ``{from, value}`` turns, human and gpt in turn from a
    human one, whose value begins ``<image>\\n``; one image per sample."""
    samples = json.loads(file.read_text())
    assert isinstance(samples, list)
    ids = [s["id"] for s in samples]
    assert len(ids) == len(set(ids)), "ids are unique"
    for sample in samples:
        assert isinstance(sample["id"], str) and isinstance(sample["image"], str)
        assert not Path(sample["image"]).is_absolute() and ".." not in Path(sample["image"]).parts
        assert (image_folder / sample["image"]).is_file(), sample["image"]
        turns = sample["conversations"]
        assert turns and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(isinstance(t["value"], str) and t["value"] for t in turns)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
    return len(samples)


def test_llava_json_follows_llavas_documented_format(built, archive):
    counted = 0
    for file in sorted(built.glob("llava_*.json")):
        counted += check_llava(file, built / "images")
    assert counted > 0 and {i["extra"]["kind"] for i in llava_items(built)} == KINDS
    images = {i["image"] for i in llava_items(built)}
    for name in images:  # the photos are the sample photos' bytes (none of them is turned by EXIF)
        assert (built / "images" / name).read_bytes() == Path(source_of(archive, name)).read_bytes()


def test_hf_parquet_loads_through_datasets_with_its_images_decoded(built, archive):
    import datasets

    manifest = json.loads((built / "manifest.json").read_text())
    files = {split: str(built / pattern) for split, pattern in manifest["files"]["hf"].items()}
    loaded = datasets.load_dataset("parquet", data_files=files)
    assert isinstance(loaded["train"].features["images"].feature, datasets.Image)
    assert sum(len(loaded[s]) for s in loaded) == len(llava_items(built)), "one row per item, as in every format"
    row = loaded["test"][0]
    for message in row["messages"]:
        assert message["role"] in ("user", "assistant") and isinstance(message["content"], list)
    images_in_content = sum(c["type"] == "image" for m in row["messages"] for c in m["content"])
    assert images_in_content == len(row["images"]) == 1
    decoded = row["images"][0]
    assert isinstance(decoded, Image.Image)
    same = [p for p in ANN_PHOTOS if np.array_equal(np.asarray(Image.open(p).convert("RGB")),
                                                    np.asarray(decoded.convert("RGB")))]  # fmt: skip
    assert len(same) == 1 and sha256(same[0])[:16] == row["id"][:16], "the source photo's pixels"
    assert datasets.load_dataset(str(built))["test"].num_rows == len(loaded["test"]), "and by the card's configs"


def test_llamafactory_records_hold_one_image_per_image_token(built):
    info = json.loads((built / "dataset_info.json").read_text())
    assert set(info) == {"plvm_train", "plvm_test"}
    counted = 0
    for entry in info.values():
        assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages", "images": "images"}
        tags = entry["tags"]
        for record in json.loads((built / entry["file_name"]).read_text()):
            messages = record[entry["columns"]["messages"]]
            roles = [m[tags["role_tag"]] for m in messages]
            assert roles == [tags["user_tag"], tags["assistant_tag"]] * (len(roles) // 2)
            tokens = sum(m[tags["content_tag"]].count("<image>") for m in messages)
            images = record[entry["columns"]["images"]]
            assert tokens == len(images) == 1
            assert all((built / image).is_file() for image in images), "relative to the dataset folder (media_dir)"
            counted += 1
    assert counted == len(llava_items(built))


def test_recognition_items_answer_as_the_face_matcher_named_the_photo(built, archive):
    rows = output_rows(archive)
    asked = Counter()
    for item in llava_items(built):
        if item["extra"]["kind"] != "recognition":
            continue
        person, answer = item["extra"]["person"], item["conversations"][1]["value"]
        named = rows[source_of(archive, item["image"])]["concepts"]
        assert person in ANN and answer.startswith("Yes" if person in named else "No"), (item, named)
        assert item["conversations"][0]["value"] == f"<image>\nIs {person} in this photo?"
        asked[answer.split(",")[0]] += 1
    assert asked["Yes"] > 0 and asked["No"] > 0
    nobody = [i for i in llava_items(built) if "willinvietnam" in source_of(archive, i["image"])]
    assert {i["extra"]["kind"] for i in nobody} - {"caption", "vqa"} == {"recognition", "choice"}
    assert all(i["conversations"][1]["value"].startswith("No") for i in nobody if i["extra"]["kind"] == "recognition")


def test_grounding_boxes_are_the_named_faces_and_kept_captions_name_exactly_who_is_there(built, archive):
    rows = output_rows(archive)
    kinds = Counter()
    for item in llava_items(built):
        row, kind = rows[source_of(archive, item["image"])], item["extra"]["kind"]
        answer = item["conversations"][1]["value"]
        if kind == "grounding":  # the box of the face the matcher named, as fractions of the photo's size
            box, size = json.loads(answer), (row["width"], row["height"]) * 2
            faces = [f["box"] for f in row["faces"] if f["concept"] == item["extra"]["person"]]
            assert all(0 <= v <= 1 for v in box) and box[0] < box[2] and box[1] < box[3], item
            expected = [[min(max(v / s, 0), 1) for v, s in zip(face, size)] for face in faces]
            assert any(box == pytest.approx(e, abs=6e-4) for e in expected), (item, expected)
        elif kind == "caption":
            said = {name for name in ANN if re.search(rf"(?<!\w){name}(?!\w)", answer, re.IGNORECASE)}
            assert said == set(row["concepts"] or []) & set(ANN), (answer, row["concepts"])
        kinds[kind] += 1
    assert kinds["grounding"] > 0 and kinds["caption"] > 0


def test_the_dataset_holds_only_the_chosen_users_photos_and_people(built, archive):
    bob = {sha256(p) for p in BOB_PHOTOS}
    names = [str(p.relative_to(built)) for p in built.rglob("*") if p.is_file()]
    assert not [n for n in names if any(h in n or h[:16] in n for h in bob)], "no photo of bob's"
    items = llava_items(built)  # the model's own words aside (the tiny LLaVA's vocabulary holds the sample names)
    assert {i["extra"]["user_id"] for i in items} == {"ann"}
    assert {i["extra"]["person"] for i in items} - {None} == set(ANN)
    assert {c["name"] for i in items for c in i["extra"]["concepts"]} == set(ANN)
    assert not any("Phuc" in i["conversations"][0]["value"] for i in items)
    text = (built / "manifest.json").read_text() + (built / "README.md").read_text()
    assert "Phuc" not in text and '"bob"' not in text
    assert {p.name for p in built.glob("plvm-eval/*/*")} == {p.name for p in built.glob("references/*")} == {"ann"}
    manifest = json.loads((built / "manifest.json").read_text())
    assert list(manifest["users"]) == ["ann"]
    assert {p["name"] for p in manifest["users"]["ann"]["people"]} == set(ANN)
    recorded = [(e.kind, e.users) for e in exports(archive.output).values() if e.uri == str(built)]
    assert recorded == [("dataset", ["ann"])], "recorded in the output, where plvm forget finds it"
    crops = {c["crop"] for i in llava_items(built) for c in i["extra"]["concepts"]} - {None}
    assert crops and all((built / c).is_file() for c in crops)
    references = {c["reference"] for i in llava_items(built) for c in i["extra"]["concepts"]}
    assert references == {p["reference"] for p in manifest["users"]["ann"]["people"] if p["photos"]}


def test_the_manifest_and_card_count_what_the_files_hold(built):
    manifest = json.loads((built / "manifest.json").read_text())
    items = llava_items(built)
    for split, file in manifest["files"]["llava"].items():
        kinds = Counter(i["extra"]["kind"] for i in json.loads((built / file).read_text()))
        assert kinds == Counter(manifest["counts"]["items"].get(split, {})), split
    assert sum(manifest["counts"]["photos"].values()) == len({i["image"] for i in items})
    assert manifest["source"]["version"] is not None and manifest["users"]["ann"]["bank_versions"] == [3]
    assert manifest["aligners"] and manifest["embedders"] == ["dlib-resnet-v1"] and manifest["models"]
    assert manifest["seed"] == 0 and manifest["config_hash"] and manifest["command"].startswith("plvm dataset")
    for person in manifest["users"]["ann"]["people"]:
        assert set(person) >= {"concept_id", "name", "reference", "photos", "asked"}
    card = (built / "README.md").read_text()
    assert "configs:" in card and "| test |" in card and "Thao" in card
    assert not (built / "_build").exists(), "the build's own files are gone"


def photos_by_split(folder: Path) -> dict[str, set[str]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {split: {Path(i["image"]).stem for i in json.loads((folder / file).read_text())}
            for split, file in manifest["files"]["llava"].items()}  # fmt: skip


def test_splits_are_disjoint_and_stay_when_the_archive_grows(built, archive, tmp_path, capsys):
    before = photos_by_split(built)
    assert all(before.values()) and not set.intersection(*before.values()), "no photo is in two splits"
    grown = tmp_path / "grown"
    shutil.copytree(archive.output, grown)
    data = yaml.safe_load(archive.config_file.read_text())
    more = [photo(p, f"{i}.jpg") for p in ("thao", "viruss") for i in range(4, 8)]
    data["output"]["uri"] = str(grown)
    data["input"]["uri"] = write_manifest(tmp_path / "more.csv", more, "ann")
    (tmp_path / "grown.yaml").write_text(yaml.safe_dump(data))
    assert run(["caption", "--config", str(tmp_path / "grown.yaml"), "--resume"]) == 0
    capsys.readouterr()
    out = tmp_path / "ds"
    assert run(["dataset", "--config", str(tmp_path / "grown.yaml"), str(grown), "--out", str(out), "--user", "ann",
                "--format", "llava"]) == 0  # fmt: skip
    after = photos_by_split(out)
    for split, photos in before.items():
        assert photos <= after[split], "every photo keeps its split"
    assert sum(map(len, after.values())) > sum(map(len, before.values()))

    by_person = tmp_path / "by-person"
    assert run(["dataset", "--config", str(archive.config_file), archive.output, "--out", str(by_person), "--user",
                "ann", "--format", "llava", "--split-by", "person", "--negatives", "3"]) == 0  # fmt: skip
    people: dict[str, set[str]] = {}
    for split, file in json.loads((by_person / "manifest.json").read_text())["files"]["llava"].items():
        for item in json.loads((by_person / file).read_text()):
            people.setdefault(split, set()).update(c["name"] for c in item["extra"]["concepts"])
            if item["extra"]["person"]:
                people[split].add(item["extra"]["person"])
    assert len(people) == 2 and not set.intersection(*people.values()), f"no person in two splits: {people}"


def test_a_truth_file_decides_who_is_in_a_photo(archive, tmp_path, capsys):
    thao, viruss = photo("thao", "0.jpg"), photo("viruss", "0.jpg")
    truth = {p: [name for name, folder in ANN.items() if f"/{folder}/" in p] for p in ANN_PHOTOS}
    truth[viruss] = ["Thao", "Someone"]  # wrong on purpose: the file is believed, and Someone is nobody of ann's
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    out = tmp_path / "ds"
    summary = build(archive, out, "--user", "ann", "--format", "llava", "--truth", str(tmp_path / "truth.json"),
                    "--negatives", "2", capsys=capsys)  # fmt: skip
    items = llava_items(out)
    assert {i["extra"]["truth"] for i in items} == {"file", "model"}
    of_viruss = [i for i in items if source_of(archive, i["image"]) == viruss and i["extra"]["kind"] == "recognition"]
    said = {i["extra"]["person"]: i["conversations"][1]["value"].startswith("Yes") for i in of_viruss}
    assert said == {"Thao": True, "Viruss": False, "Tien": False}
    assert not any(i["extra"]["kind"] == "grounding" for i in items if source_of(archive, i["image"]) == viruss), (
        "no box: the matcher named no face of that photo Thao"
    )
    assert any(i["extra"]["kind"] == "grounding" and i["extra"]["person"] == "Thao" for i in items
               if source_of(archive, i["image"]) == thao)  # fmt: skip
    assert json.loads((out / "manifest.json").read_text())["counts"]["truth_names_not_enrolled"] == 1
    assert summary["status"] == "complete"


def eval_layout(built: Path) -> Path:
    """The PLVM layout of ann's photos of a split that holds at least two people with photos."""
    for folder in sorted(built.glob("plvm-eval/*/ann/people")):
        if sum(1 for p in folder.iterdir() if len(list(p.iterdir())) > 1) >= 2:
            return folder
    raise AssertionError(f"no split of {built} holds two people's photos")


def test_the_plvm_eval_layout_scores_in_plvm_eval_recognition_as_the_face_judge_did(built, archive, capsys):
    people = eval_layout(built)
    rows, hashes = output_rows(archive), {h[:16]: p for h, p in archive.hashes.items()}
    folders = {p.name: [hashes[f.stem] for f in p.iterdir() if f.stem != "ref_img"] for p in people.iterdir()}
    assert all(len(list(p.glob("ref_img.*"))) == 1 for p in people.iterdir())
    positive = [name in rows[path]["concepts"] for name, paths in folders.items() for path in paths]
    negative = [name not in rows[path]["concepts"] for name in folders for other, paths in folders.items()
                if other != name for path in paths]  # fmt: skip
    assert run(["eval", "recognition", "--config", str(archive.config_file), str(people)]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (scored["n_positive"], scored["n_negative"]) == (len(positive), len(negative))
    assert scored["positive_accuracy"] == sum(positive) / len(positive)
    assert scored["negative_accuracy"] == sum(negative) / len(negative)

    questions = people.parent / "query_ques.json"
    asked = json.loads(questions.read_text())
    assert asked and all(set(q) == {"ref_img", "query_img", "question", "multiple_choice", "correct_answer"}
                         and "<sks>" in q["question"] and q["correct_answer"] in q["multiple_choice"]
                         and set(q["multiple_choice"]) <= {"A", "B", "C"} for q in asked)  # fmt: skip
    assert run(["eval", "vqa", "--config", str(archive.config_file), str(questions)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == len(asked)


def test_a_killed_build_resumes_and_writes_no_item_twice(built, archive, tmp_path):
    data = yaml.safe_load(archive.config_file.read_text())
    data["dataset"]["photos_per_shard"] = 1
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "ds"
    command = [sys.executable, "-m", "pipelines.cli", "dataset", "--config", str(config_file), archive.output,
               "--out", str(out), "--user", "ann", "--format", "llava,hf"]  # fmt: skip
    # each command starts its own embedded Ray: a subprocess joining the session's by RAY_ADDRESS is sent to the
    # machine's address, where the session's Ray, bound to 127.0.0.1, does not listen
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)}
    status = killed_when(command, env, lambda: bool(list(out.glob("_build/done/*.json"))))
    assert status == -signal.SIGKILL, "the build was killed while it ran"
    done = len(list(out.glob("_build/done/*.json")))
    assert 0 < done < len(ANN_PHOTOS) and not (out / "manifest.json").exists(), "killed half way, not complete"

    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "--resume" in refused.stderr, refused.stderr
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["resumed"] == done and summary["shards"] + done == len(ANN_PHOTOS)
    ids = [i["id"] for i in llava_items(out)]
    assert len(ids) == len(set(ids)), "no item twice"
    assert set(ids) == {i["id"] for i in llava_items(built)}, "the same items as a build that was not killed"
    import pyarrow.parquet as pq

    hf_ids = pq.read_table(out / "hf", columns=["id"]).column("id").to_pylist()
    assert sorted(hf_ids) == sorted(ids)


@pytest.mark.parametrize("case", ["no rows", "no face index", "bank version gone", "unknown format", "fractions"])
def test_bad_input_is_one_line_and_exit_2_and_nothing_is_written(archive, tmp_path, capsys, case):
    data = yaml.safe_load(archive.config_file.read_text())
    output, options = Path(archive.output), []
    if case == "no rows":
        output = tmp_path / "empty"
        output.mkdir()
    elif case == "no face index":
        output = tmp_path / "out"
        shutil.copytree(archive.output, output, ignore=shutil.ignore_patterns("_faces"))
    elif case == "bank version gone":
        shutil.copytree(data["bank"], tmp_path / "banks")
        (tmp_path / "banks" / "ann" / "concepts.v000003.parquet").unlink()
        data["bank"] = str(tmp_path / "banks")
    elif case == "unknown format":
        options = ["--format", "llava,coco"]
    else:
        options = ["--split", "train=0.8,test=0.3"]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "ds"
    code = run(["dataset", "--config", str(config_file), str(output), "--out", str(out), "--user", "ann", *options])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("plvm dataset: error: "), err
    expected = {"no rows": "holds no rows", "no face index": "face index", "bank version gone": "version 3",
                "unknown format": "'coco'", "fractions": "sum to 1.1, not 1"}[case]  # fmt: skip
    assert expected in err, err
    assert not out.exists(), "nothing written"


def test_a_photo_changed_or_gone_since_it_was_captioned_gives_no_item(tmp_path, yollava, tiny_models, ray_local,
                                                                       capsys):  # fmt: skip
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        shutil.copy(photo("thao", f"{i}.jpg"), photos / f"{i}.jpg")
    config = make_config(tmp_path, input={"uri": str(photos), "user": "kim"})
    enroll(config, "kim", "Thao", [photo("thao", "ref_img.jpg")])
    caption(config)
    shutil.copy(photo("viruss", "0.jpg"), photos / "1.jpg")  # other bytes under the captioned path
    (photos / "2.jpg").unlink()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp_path / "ds"
    assert run(["dataset", "--config", str(config_file), config.output.uri, "--out", str(out), "--format", "llava"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dropped"] == {"changed_since_captioned": 1, "missing_file": 1}
    kept = sha256(str(photos / "0.jpg"))
    assert {i["image"] for i in llava_items(out)} == {f"{kept[:2]}/{kept}.jpg"}
