"""The concept bank: format, user-id validation, damaged files, atomic writes."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from plvm_model.bank import BankError, Concept, ConceptBank, UserBank, validate_user_id


def concept(name: str, hidden: int = 8, refs: int = 1) -> Concept:
    rng = np.random.default_rng(len(name))
    return Concept(
        name=name,
        face_descriptors=rng.normal(size=(refs, 128)).astype(np.float32),
        soft_tokens=rng.normal(size=(17, hidden)).astype(np.float32),
        head_weight=rng.normal(size=hidden).astype(np.float32),
        references=[f"/photos/{name}-{i}.jpg" for i in range(refs)],
    )


def test_round_trip_keeps_every_field_and_versions_the_bank(tmp_path):
    store = ConceptBank(str(tmp_path))
    bank = UserBank("alice", embedder="dlib-resnet-v1", aligner="plvm-aligner:x", concepts=[concept("Mike", refs=2)])
    store.save(bank)
    store.save(bank)
    loaded = store.load("alice")
    assert loaded.version == 2
    (a,), (b,) = bank.concepts, loaded.concepts
    assert (b.name, b.concept_id, b.references) == (a.name, a.concept_id, a.references)
    np.testing.assert_array_equal(b.face_descriptors, a.face_descriptors)
    np.testing.assert_array_equal(b.soft_tokens, a.soft_tokens)
    np.testing.assert_array_equal(b.head_weight, a.head_weight)
    meta = pq.read_schema(tmp_path / "alice" / "concepts.parquet").metadata
    assert meta[b"plvm.schema_version"] == b"1" and meta[b"plvm.user_id"] == b"alice"
    assert store.load("bob") is None


@pytest.mark.parametrize("user", ["alice", "Bob_2", "a.b-c@example.com", "0"])
def test_valid_user_ids(user):
    assert validate_user_id(user) == user


@pytest.mark.parametrize("user", ["", ".", "..", "../alice", "/etc", "a/b", "a\\b", "al ice", "x" * 129, "é", "a..b"])
def test_user_ids_that_could_leave_the_bank_folder_are_refused(user, tmp_path):
    with pytest.raises(ValueError, match="invalid user id"):
        validate_user_id(user)
    with pytest.raises(ValueError, match="invalid user id"):
        ConceptBank(str(tmp_path)).load(user)


def test_a_damaged_bank_is_refused_with_its_location(tmp_path):
    store = ConceptBank(str(tmp_path))
    (tmp_path / "carol").mkdir()
    (tmp_path / "carol" / "concepts.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(BankError, match=r"carol/concepts.parquet is damaged"):
        store.load("carol")


def test_a_bank_of_another_user_or_model_is_refused(tmp_path):
    store = ConceptBank(str(tmp_path))
    store.save(UserBank("dave", "dlib-resnet-v1", "plvm-aligner:a", [concept("Eve")]))
    (tmp_path / "mallory").mkdir()
    (tmp_path / "mallory" / "concepts.parquet").write_bytes((tmp_path / "dave" / "concepts.parquet").read_bytes())
    with pytest.raises(BankError, match="belongs to user 'dave'"):
        store.load("mallory")
    with pytest.raises(BankError, match="enrolled with Aligner 'plvm-aligner:a'"):
        store.load("dave").check_compatible(embedder="dlib-resnet-v1", aligner="plvm-aligner:b")


def test_a_write_that_fails_leaves_the_previous_bank_whole(tmp_path, monkeypatch):
    store = ConceptBank(str(tmp_path))
    store.save(UserBank("frank", "dlib-resnet-v1", "a", [concept("Gina")]))
    before = (tmp_path / "frank" / "concepts.parquet").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk vanished during the rename")

    monkeypatch.setattr(store.fs, "mv", crash)
    bank = store.load("frank")
    bank.concepts.append(concept("Hank"))
    with pytest.raises(OSError):
        store.save(bank)
    assert (tmp_path / "frank" / "concepts.parquet").read_bytes() == before
    assert [p.name for p in (tmp_path / "frank").iterdir()] == ["concepts.parquet"], "no temporary file is left"
