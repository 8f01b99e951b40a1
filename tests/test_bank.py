"""The concept bank: format, user-id validation, versions and commits, pinned reads, integrity."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_config, photo
from plvm_model.store.banks import BankCache, BankSource
from plvm_model.store.output_schema import RowError
from pipelines.caption import caption
from pipelines.pinned import pin_banks
from pipelines.stage_lists import caption_stages
from pipelines.cli import run
from pipelines.enroll import Enroller
from plvm_model.store.banks import BankError, Concept, BankStore, Bank, encode, version_file
from plvm_model.store.ids import validate_user_id
from s3_endpoint import moto_endpoint, s3_options
from test_resilience import caption_command


def concept(name: str, hidden: int = 8, refs: int = 1, dim: int = 128) -> Concept:
    rng = np.random.default_rng(len(name))
    return Concept(
        name=name,
        face_descriptors=rng.normal(size=(refs, dim)).astype(np.float32),
        soft_tokens=rng.normal(size=(17, hidden)).astype(np.float32),
        head_weight=rng.normal(size=hidden).astype(np.float32),
        references=[f"/photos/{name}-{i}.jpg" for i in range(refs)],
    )


def write_version(root: Path, bank: Bank, version: int = 1) -> Path:
    """``bank`` written as ``version`` as it is, without the checks of a commit (a file damaged in its making)."""
    path = root / bank.user_id / version_file(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(replace(bank, version=version)))
    return path


def test_round_trip_keeps_every_field_and_each_commit_is_a_new_version(tmp_path):
    store = BankStore(str(tmp_path))
    bank = Bank("alice", embedder="dlib-resnet-v1", aligner="plvm-aligner:x", concepts=[concept("Mike", refs=2)])
    store.save(bank)
    bank.concepts.append(concept("Sue"))
    store.save(bank)
    assert sorted(os.listdir(tmp_path / "alice")) == ["concepts.v000001.parquet", "concepts.v000002.parquet"]
    loaded = store.load("alice")
    assert loaded.version == 2 and [c.name for c in loaded.concepts] == ["Mike", "Sue"]
    assert [c.name for c in store.load("alice", 1).concepts] == ["Mike"], "a version is never rewritten"
    a, b = bank.concepts[0], loaded.concepts[0]
    assert (b.name, b.concept_id, b.references) == (a.name, a.concept_id, a.references)
    np.testing.assert_array_equal(b.face_descriptors, a.face_descriptors)
    np.testing.assert_array_equal(b.soft_tokens, a.soft_tokens)
    np.testing.assert_array_equal(b.head_weight, a.head_weight)
    meta = pq.read_schema(tmp_path / "alice" / "concepts.v000002.parquet").metadata
    assert meta[b"plvm.schema_version"] == b"4" and meta[b"plvm.user_id"] == b"alice" and meta[b"plvm.version"] == b"2"
    assert store.load("bob") is None


@pytest.mark.parametrize("user", ["alice", "Bob_2", "a.b-c@example.com", "0"])
def test_valid_user_ids(user):
    assert validate_user_id(user) == user


@pytest.mark.parametrize("user", ["", ".", "..", "../alice", "/etc", "a/b", "a\\b", "al ice", "x" * 129, "é", "a..b"])
def test_user_ids_that_could_leave_the_bank_folder_are_refused(user, tmp_path):
    with pytest.raises(ValueError, match="invalid user id"):
        validate_user_id(user)
    with pytest.raises(ValueError, match="invalid user id"):
        BankStore(str(tmp_path)).load(user)


def test_two_writers_of_one_version_cannot_both_commit(tmp_path):
    store = BankStore(str(tmp_path))
    store.save(Bank("gus", "dlib-resnet-v1", "a", [concept("Ann")]))
    first, second = store.load("gus"), store.load("gus")
    first.concepts.append(concept("Bea"))
    second.concepts.append(concept("Cid"))
    assert store.commit(first) and first.version == 2
    assert not store.commit(second) and second.version == 1, "version 2 is taken: nothing is written"
    with pytest.raises(BankError, match="version 2 of the concept bank .*gus was written by another writer"):
        store.save(second)
    again = store.load("gus")
    again.concepts.append(concept("Cid"))
    assert store.commit(again) and [c.name for c in store.load("gus").concepts] == ["Ann", "Bea", "Cid"]


def test_on_s3_a_version_committed_elsewhere_is_seen_and_wins(tmp_path):
    """Another process's commit (here: another client, without the listing cache of ours) is read at once,
    and a commit of the version it took is refused by the store (a conditional put)."""
    with moto_endpoint() as endpoint:
        options = s3_options(endpoint)
        elsewhere = fsspec.filesystem("s3", skip_instance_cache=True, **options["s3"])
        elsewhere.mkdir("banks")
        store = BankStore("s3://banks/prod", options)
        bank = Bank("ivy", "dlib-resnet-v1", "a", [concept("Ann")])
        store.save(bank)
        stale = store.load("ivy")
        theirs = replace(stale, version=2, concepts=[*stale.concepts, concept("Bea")])
        elsewhere.pipe(f"banks/prod/ivy/{version_file(2)}", encode(theirs))
        assert [c.name for c in store.load("ivy").concepts] == ["Ann", "Bea"]
        stale.concepts.append(concept("Cid"))
        assert not store.commit(stale)
        assert store.load("ivy").version == 2


def test_a_commit_that_fails_leaves_no_version_and_no_temporary_file(tmp_path, monkeypatch):
    store = BankStore(str(tmp_path))
    store.save(Bank("frank", "dlib-resnet-v1", "a", [concept("Gina")]))
    bank = store.load("frank")
    bank.concepts.append(concept("Hank"))

    def crash(*args):
        raise OSError("disk vanished while the version was linked")

    monkeypatch.setattr(os, "link", crash)
    with pytest.raises(OSError, match="disk vanished"):
        store.save(bank)
    assert os.listdir(tmp_path / "frank") == ["concepts.v000001.parquet"]
    assert store.load("frank").version == 1


def test_the_single_file_of_schema_1_is_read_until_the_first_new_version(tmp_path):
    store = BankStore(str(tmp_path))
    bank = Bank("lena", "dlib-resnet-v1", "a", [concept("Max")], version=4)
    table = pq.read_table(pa.BufferReader(encode(bank))).drop_columns(["checksum"])
    meta = {**table.schema.metadata, b"plvm.schema_version": b"1"}
    (tmp_path / "lena").mkdir()
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "lena" / "concepts.parquet")
    legacy = store.load("lena")
    assert legacy.version == 4 and [c.name for c in legacy.concepts] == ["Max"]
    legacy.concepts.append(concept("Nia"))
    store.save(legacy)
    assert (tmp_path / "lena" / "concepts.v000005.parquet").exists()
    assert [c.name for c in store.load("lena").concepts] == ["Max", "Nia"]
    assert [c.name for c in store.load("lena", 4).concepts] == ["Max"], "a run that pinned version 4 still reads it"


def test_a_pinned_version_is_read_while_newer_ones_are_committed(tmp_path):
    store = BankStore(str(tmp_path))
    bank = Bank("ann", "dlib-resnet-v1", "a", [concept("Mike")])
    store.save(bank)
    pinned = BankCache(BankSource(str(tmp_path), versions={"ann": 1, "new": 0}))
    bank.concepts.append(concept("Sue"))
    store.save(bank)
    store.save(Bank("new", "dlib-resnet-v1", "a", [concept("Ola")]))
    assert [c.name for c in pinned.get("ann").concepts] == ["Mike"]
    assert [c.name for c in BankCache(BankSource(str(tmp_path))).get("ann").concepts] == ["Mike", "Sue"]
    with pytest.raises(RowError, match="user 'new' has no concept bank"):
        pinned.get("new")  # enrolled after the run started: left to the next run
    gone = BankCache(BankSource(str(tmp_path), versions={"ann": 7}))
    with pytest.raises(RowError, match="version 7 of the concept bank .*ann is gone"):
        gone.get("ann")


def flip_a_soft_token(path: Path, value: np.float32) -> None:
    """Flip the high exponent bit of ``value`` where its bytes are stored in the file (as noise, they are
    stored as they are, compressed or not): the value comes out about 2**128 times larger."""
    data = bytearray(path.read_bytes())
    at = bytes(data).find(np.float32(value).tobytes())
    assert at > 0 and bytes(data).count(np.float32(value).tobytes()) == 1
    data[at + 3] ^= 0x40
    path.write_bytes(bytes(data))


def tampered_banks(root: Path) -> dict[str, tuple[str, str]]:
    """One bank per way a bank can be damaged: user -> (the error's pattern, the file it names)."""
    good = Bank("x", "dlib-resnet-v1", "a", [concept("Mike"), concept("Sue")])
    flipped = write_version(root, replace(good, user_id="flip"))
    flip_a_soft_token(flipped, good.concepts[1].soft_tokens[3, 5])
    nan = replace(good, user_id="nonfinite", concepts=[concept("Mike"), concept("Sue")])
    nan.concepts[1].face_descriptors[0, 7] = np.nan
    ragged = replace(good, user_id="ragged", concepts=[concept("Mike"), concept("Sue", dim=127)])
    (root / "folder" / version_file(1)).mkdir(parents=True)
    (root / "legacy" / "concepts.parquet").mkdir(parents=True)
    (root / "named").mkdir()
    write_version(root, replace(good, user_id="named")).rename(root / "named" / "concepts.vlatest.parquet")
    meta = write_version(root, replace(good, user_id="meta"))
    table = pq.read_table(meta)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"plvm.version": b"1.5"}), meta)
    (root / "file").write_bytes(b"a file where the user's folder belongs")
    return {
        "flip": (r"concept 'Sue' of user 'flip' in \S+ fails its checksum", flipped.name),
        "nonfinite": (r"concept 'Sue' of user 'nonfinite' in \S+ has face descriptors that are not finite", write_version(root, nan).name),
        "ragged": (r"concept 'Sue' of user 'ragged' in \S+ has descriptors of length 127", write_version(root, ragged).name),
        "folder": ("is a folder, not a bank file", f"folder/{version_file(1)}"),
        "legacy": ("is a folder, not a bank file", "legacy/concepts.parquet"),
        "named": ("is not named with an integer version", "named/concepts.vlatest.parquet"),
        "meta": ("has version '1.5' in its metadata, not 1", f"meta/{version_file(1)}"),
        "file": ("is a file, not a user's bank folder", "file"),
    }  # fmt: skip


def test_a_damaged_or_tampered_bank_is_refused_naming_the_user_the_concept_and_the_file(tmp_path):
    store = BankStore(str(tmp_path))
    for user, (error, file) in tampered_banks(tmp_path).items():
        with pytest.raises(BankError, match=error) as refused:
            store.load(user)
        message = str(refused.value)
        assert file in message and "\n" not in message, message
    (tmp_path / "carol").mkdir()
    (tmp_path / "carol" / version_file(1)).write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(BankError, match=r"carol/concepts.v000001.parquet is damaged and cannot be read: \S"):
        store.load("carol")
    nan = Bank("dan", "dlib-resnet-v1", "a", [concept("Eve")])
    nan.concepts[0].soft_tokens[0, 0] = np.inf
    with pytest.raises(BankError, match="concept 'Eve' of user 'dan' in a new bank has soft tokens that are not finite"):
        store.save(nan)
    assert store.load("dan") is None, "a bank with bad vectors is never committed"


def test_a_bank_of_another_user_or_model_is_refused(tmp_path):
    store = BankStore(str(tmp_path))
    store.save(Bank("dave", "dlib-resnet-v1", "plvm-aligner:a", [concept("Eve")]))
    (tmp_path / "mallory").mkdir()
    (tmp_path / "mallory" / version_file(1)).write_bytes((tmp_path / "dave" / version_file(1)).read_bytes())
    with pytest.raises(BankError, match="belongs to user 'dave'"):
        store.load("mallory")
    with pytest.raises(BankError, match="enrolled with Aligner 'plvm-aligner:a'"):
        store.load("dave").check_compatible(embedder="dlib-resnet-v1", aligner="plvm-aligner:b")


def test_plvm_caption_refuses_a_damaged_bank_at_start_in_one_line(tmp_path, tiny_models, capsys):
    """Each damaged bank, a bank of descriptors of a length the run's embedder does not make, and one whose concept
    plvm style cannot serve, through
    the command line (its ``run``, the ``plvm`` program without its process exit): exit code 2, one line naming the user, the concept and the file."""
    banks = tmp_path / "banks"
    banks.mkdir()
    cases = tampered_banks(banks)
    BankStore(str(banks)).save(Bank("short", "dlib-resnet-v1", "a", [concept("Mike", dim=127)]))
    cases["short"] = (r"concept 'Mike' of user 'short' in \S+ has face descriptors of length 127; this run's face "
                      "embedder 'dlib-resnet-v1' makes 128", f"short/{version_file(1)}")  # fmt: skip
    lone = replace(concept("Sue"), soft_tokens=concept("Sue").soft_tokens[:1])  # no context vectors: no PLVM token
    BankStore(str(banks)).save(Bank("lone", "dlib-resnet-v1", "a", [lone]))
    cases["lone"] = (r"user 'lone', \S+: concept 'Sue' cannot be served in concept_style plvm",
                     f"lone/{version_file(1)}")  # fmt: skip
    for user, (error, file) in cases.items():
        (tmp_path / user).mkdir()
        config = make_config(tmp_path / user, bank=str(banks))
        command, _ = caption_command(tmp_path / user, config, [photo("thao", "1.jpg")], user)
        assert run(command[command.index("caption"):]) == 2, user  # any other exception would be raised here
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("plvm caption: error: ") and file in err, err
        assert re.search(error, err), err


def test_a_run_reads_the_bank_versions_pinned_at_its_start(tmp_path, yollava, tiny_models, ray_local):
    """A concept enrolled while the run goes (here: as its stages are built, after the start) names no one
    in that run; the run's record says which version it read, and the next run pins the new one."""
    config = make_config(tmp_path, input={"uri": str(yollava / "thao" / "[0-1].jpg"), "user": "kim"})
    enroller = Enroller(config)
    enroller.enroll("kim", "Viruss", [photo("viruss", "ref_img.jpg")])

    def enrolled_meanwhile(config, **kwargs):
        enroller.enroll("kim", "Thao", [photo("thao", "ref_img.jpg")])
        return caption_stages(config, **kwargs)

    summary = caption(config, stages=enrolled_meanwhile)
    assert summary.banks == {"kim": 1} and summary.rows == 2 and not summary.errors and summary.faces >= 2
    assert summary.matched == 0, "Thao was enrolled after the run pinned version 1"
    record = json.loads((tmp_path / "out" / "_runs" / f"{summary.run_id}.json").read_text())
    assert record["banks"] == {"kim": 1}
    assert pin_banks(["kim"], config) == {"kim": 2}


def test_rejected_faces_are_stored_checksummed_and_a_bank_of_schema_3_is_read_without_them(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(2, 128)).astype(np.float32)
    concept = Concept("Mike", vectors[:1], rng.normal(size=(17, 8)).astype(np.float32),
                      rng.normal(size=8).astype(np.float32), ["/mike.jpg"], rejected=vectors[1:])  # fmt: skip
    store = BankStore(str(tmp_path))
    store.save(Bank("ann", "dlib-resnet-v1", "aligner-x", [concept]))
    (read,) = store.load("ann").concepts
    np.testing.assert_array_equal(read.rejections, vectors[1:])
    assert read.checksum() == concept.checksum() != replace(concept, rejected=None).checksum()
    path = tmp_path / "ann" / "concepts.v000001.parquet"
    table = pq.read_table(path)
    doctored = table.set_column(table.schema.get_field_index("rejected"), "rejected",
                                pa.array([[]], table.schema.field("rejected").type))  # fmt: skip
    pq.write_table(doctored, path)
    with pytest.raises(BankError, match="fails its checksum"):
        store.load("ann")
    plain = replace(concept, rejected=None)
    store = BankStore(str(tmp_path / "three"))
    store.save(Bank("ann", "dlib-resnet-v1", "aligner-x", [plain]))
    path = tmp_path / "three" / "ann" / "concepts.v000001.parquet"
    table = pq.read_table(path).drop_columns(["rejected"])  # as schema 3 wrote it
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"plvm.schema_version": b"3"}), path)
    (read,) = store.load("ann").concepts
    assert read.rejected is None and read.rejections.shape == (0, 128) and read.checksum() == plain.checksum()
