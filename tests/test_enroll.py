"""Enrollment: real faces in, a bank row out; refusals leave the bank as it was."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, make_config, photo
from pipelines.enroll import EnrollError, choose_face, enroll
from plvm_model.store.banks import BankStore
from plvm_model.concepts import ConceptEncoder
from plvm_model.faces import Face


def side_by_side(paths: list[str], height: int, out: str) -> str:
    images = [Image.open(p).convert("RGB") for p in paths]
    images = [im.resize((round(im.width * height / im.height), height)) for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in images), height), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    canvas.save(out)
    return out


def with_small_stranger(main: str, stranger: str, out: str) -> str:
    canvas = Image.open(main).convert("RGB")
    small = Image.open(stranger).convert("RGB")
    small = small.resize((canvas.width // 4, round(small.height * canvas.width / 4 / small.width)))
    canvas.paste(small, (0, canvas.height - small.height))
    canvas.save(out)
    return out


@pytest.fixture
def config(tmp_path, tiny_models):
    return make_config(tmp_path)


def test_enrolling_stores_descriptor_and_the_aligner_soft_tokens(config, yollava, tiny_models):
    result = enroll(config, "alice", "Thao", [photo("thao", "ref_img.jpg")])
    assert result.created and result.added == 1
    bank = BankStore(config.bank).load("alice")
    (concept,) = bank.concepts
    assert concept.name == "Thao" and concept.face_descriptors.shape == (1, 128)
    assert bank.embedder == "dlib-resnet-v1" and bank.aligner.startswith("plvm-aligner:")
    paths = config.model_paths()
    encoder = ConceptEncoder(paths.dinov2, paths.aligner, paths.aligner_shape)
    expected, head = encoder.encode(np.asarray(Image.open(photo("thao", "ref_img.jpg")).convert("RGB")), None)
    np.testing.assert_allclose(concept.soft_tokens, expected, atol=1e-5)
    np.testing.assert_allclose(concept.head_weight, head, atol=1e-5)

    again = enroll(config, "alice", "Thao", [photo("thao", "ref_img.jpg"), photo("thao", "3.jpg")])
    assert (again.created, again.added, again.references) == (False, 1, 2)
    (extended,) = BankStore(config.bank).load("alice").concepts
    assert extended.face_descriptors.shape == (2, 128)
    np.testing.assert_array_equal(extended.soft_tokens, concept.soft_tokens), "soft tokens stay the first photo's"


def test_a_photo_without_a_face_is_refused_and_nothing_is_written(config, yollava, tmp_path):
    empty = tmp_path / "wall.png"
    Image.fromarray(np.full((300, 400, 3), 180, np.uint8)).save(empty)
    with pytest.raises(EnrollError, match="wall.png: no face found"):
        enroll(config, "bob", "Nobody", [str(empty)])
    assert BankStore(config.bank).load("bob") is None

    enroll(config, "bob", "Viruss", [photo("viruss", "ref_img.jpg")])
    with pytest.raises(EnrollError, match="no face found"):
        enroll(config, "bob", "Thao", [photo("thao", "ref_img.jpg"), str(empty)])
    assert os.listdir(tmp_path / "banks" / "bob") == ["concepts.v000001.parquet"], "no version was committed"


def test_several_similar_faces_need_a_choice(config, yollava, tmp_path):
    pair = side_by_side([photo("thao", "ref_img.jpg"), photo("viruss", "ref_img.jpg")], 500, str(tmp_path / "pair.jpg"))
    with pytest.raises(EnrollError, match="2 faces of similar size and no way to choose.*--face"):
        enroll(config, "carol", "Viruss", [pair])
    assert BankStore(config.bank).load("carol") is None
    enroll(config, "carol", "Viruss", [pair], face_index=1)
    enroll(config, "carol", "Viruss2", [photo("viruss", "ref_img.jpg")])
    first, alone = BankStore(config.bank).load("carol").concepts
    assert np.linalg.norm(first.face_descriptors[0] - alone.face_descriptors[0]) < 0.3, "--face 1 took the right face"


def test_a_clearly_larger_face_is_taken_over_a_small_stranger(config, yollava, tmp_path):
    shot = with_small_stranger(photo("thao", "ref_img.jpg"), photo("viruss", "ref_img.jpg"), str(tmp_path / "s.jpg"))
    enroll(config, "dave", "Thao", [shot])
    enroll(config, "dave", "Thao-alone", [photo("thao", "ref_img.jpg")])
    with_stranger, alone = BankStore(config.bank).load("dave").concepts
    assert np.linalg.norm(with_stranger.face_descriptors[0] - alone.face_descriptors[0]) < 0.3


def test_face_policies_choose_the_dominant_face_or_the_centred_one():
    def face(x1, y1, x2, y2):
        return Face((x1, y1, x2, y2), 0.99, ((0, 0),) * 5)

    big_corner, small_centre = face(0, 0, 300, 300), face(450, 450, 550, 550)  # 9x the area; centre at (500, 500)
    assert choose_face([big_corner, small_centre], (1000, 1000), "p") == 0
    assert choose_face([big_corner, small_centre], (1000, 1000), "p", policy="centre") == 1
    assert choose_face([big_corner, small_centre], (1000, 1000), "p", face_index=0, policy="centre") == 0
    similar = [face(0, 400, 200, 600), face(420, 380, 620, 580), face(800, 400, 1000, 600)]
    with pytest.raises(EnrollError, match="3 faces of similar size"):
        choose_face(similar, (1000, 1000), "p")
    assert choose_face(similar, (1000, 1000), "p", policy="centre") == 1
    with pytest.raises(EnrollError, match="no face found"):
        choose_face([], (1000, 1000), "p", policy="centre")


def test_centre_policy_enrolls_the_middle_of_three_similar_faces(config, yollava, tmp_path):
    refs = [photo("thao", "ref_img.jpg"), photo("viruss", "ref_img.jpg"), photo("thuytien", "ref_img.jpg")]
    trio = side_by_side(refs, 400, str(tmp_path / "trio.jpg"))
    with pytest.raises(EnrollError, match="3 faces of similar size"):
        enroll(config, "fay", "Viruss", [trio])
    enroll(config, "fay", "Viruss", [trio], face_policy="centre")
    enroll(config, "fay", "Viruss-alone", [photo("viruss", "ref_img.jpg")])
    centred, alone = BankStore(config.bank).load("fay").concepts
    assert np.linalg.norm(centred.face_descriptors[0] - alone.face_descriptors[0]) < 0.3, "centre took the middle face"


@pytest.mark.parametrize("name", ["", "   ", "a<b", "x" * 101, "tab\tname"])
def test_bad_names_are_refused(config, name):
    with pytest.raises(EnrollError, match="invalid concept name"):
        enroll(config, "erin", name, ["unused.jpg"])


@contextlib.contextmanager
def photos_served_together(files: dict[str, str], together: int) -> Iterator[str]:
    """``http://127.0.0.1:PORT``, serving ``files`` (name -> path); the first ``together`` downloads are all
    answered only once all of them have been asked for."""
    arrived, everyone = [], threading.Event()
    lock = threading.Lock()

    class Photos(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            with lock:
                arrived.append(self.path)
                if len(arrived) >= together:
                    everyone.set()
            everyone.wait(timeout=300)
            self.answer(body=True)

        def answer(self, body: bool) -> None:
            data = Path(files[self.path.lstrip("/")]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Photos)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_concurrent_enrollments_into_one_bank_keep_every_person(config, yollava, tmp_path):
    """Two ``plvm enroll`` processes read the same version of one user's bank, then both commit: each
    downloads its reference photo, which is sent only once both asked for theirs (so both loaded the bank)."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    people = {"Thao": photo("thao", "ref_img.jpg"), "Viruss": photo("viruss", "ref_img.jpg")}
    with photos_served_together({f"{name}.jpg": path for name, path in people.items()}, len(people)) as url:
        running = {
            name: subprocess.Popen(
                [sys.executable, "-m", "pipelines.cli", "enroll", "--config", str(config_file), "--user", "pat",
                 "--name", name, f"{url}/{name}.jpg"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for name in people
        }  # fmt: skip
        done = {name: process.communicate(timeout=600) for name, process in running.items()}
    for name, process in running.items():
        assert process.returncode == 0, done[name][1][-3000:]
        assert f"enrolled '{name}'" in done[name][0]
    bank = BankStore(config.bank).load("pat")
    assert sorted(c.name for c in bank.concepts) == ["Thao", "Viruss"] and bank.version == 2
    assert sum("was committed by another writer" in err for _, err in done.values()) == 1, "the commits raced"
