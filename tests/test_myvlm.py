"""MyVLM concepts: training with LLaVA frozen, the mixed bank, gating by the face matcher, serving by both
engines, and the caption metric."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import LOCAL_VLLM, make_config, photo
from PIL import Image

from operators import match, prompt
from plvm_model.store.banks import BankSource
from operators.generate import GenerateConfig
from operators.rows import injected_tokens, to_table
from plvm_model.store.output_schema import output_schema
from plvm_model.store.output_table import read_output
from pipelines.caption import caption
from pipelines.stage_lists import face_stages
from pipelines.evaluation.captions import score_captions
from plvm_model.concept_token import mentions
from pipelines.cli import run
from pipelines.config import MyVLMConfig
from pipelines.enroll import EnrollError, enroll, training_captions
from pipelines.runner.loop import InProcess
from plvm_model.store.banks import BankError, Concept, BankStore, Bank
from plvm_model.engines import GenerationRequest
from plvm_model.engines.transformers_engine import TransformersEngine
from plvm_model.faces import embedder_class
from plvm_model.injection import ConceptTokens
from plvm_model.myvlm import Example, MyVLMTrainer, llava_identity

THAO = [photo("thao", f"{i}.jpg") for i in range(3)]
CAPTION = "Thao is smiling."
# Sizes for the tiny random LLaVA (2 layers, hidden 128): one vector can steer the first words of one short
# caption there, not learn a different caption per photo, so the three photos share one caption. MyVLM's AdamW
# at learning rate 1.0 moves a vector that is normalised where it is used by ever smaller angles as its norm grows:
# 300 steps (about 8 s) take the loss from 6.9 to 2.7 and every training photo's greedy caption to "Thao is
# smiling ...", while the untrained vector's captions are other words of the vocabulary (seeded: deterministic).
TRAINING = MyVLMConfig(steps=300).model_dump(exclude={"dtype", "device", "threads"})  # MyVLM's values but the steps
PROMPT = TRAINING["prompt"]


def rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def untrained_vector(hidden: int, seed: int = 42) -> np.ndarray:
    """The trainer's starting vector for ``seed``."""
    start = torch.rand(hidden, generator=torch.Generator().manual_seed(seed))
    return (start / start.norm()).numpy()


@pytest.fixture(scope="module")
def trainer(tiny_models):
    options = GenerateConfig().engine_options(str(tiny_models.llava))["options"]
    return MyVLMTrainer(str(tiny_models.llava), template=options.template, image_aspect="pad",
                        concept_style=options.concept_style, dtype="float32", device="cpu")  # fmt: skip


@pytest.fixture(scope="module")
def trained(trainer, yollava):
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine: ~300 s instead of ~8 s
    try:
        result = trainer.train([Example(rgb(p), CAPTION) for p in THAO], "Thao", **TRAINING)
    finally:
        torch.set_num_threads(threads)
    return result, before


def test_only_the_vector_learns_and_every_llava_weight_stays_bit_identical(trainer, trained):
    result, before = trained
    after = trainer.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "training changed a LLaVA weight"
    vector = torch.nn.Parameter(torch.as_tensor(result.vector))
    batch = trainer.batch([Example(rgb(THAO[0]), CAPTION)], PROMPT.format(name="Thao"), "Thao")
    ce, regulariser = trainer.losses(vector, batch, reg_lambda=0.0075)
    (ce + regulariser).backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0 and regulariser > 0
    assert all(p.grad is None and not p.requires_grad for p in trainer.model.parameters())


def test_training_halves_the_loss_and_the_captions_name_the_person(trained, tiny_models):
    result, _ = trained
    assert result.losses[-1] <= result.losses[0] / 2, (result.losses[0], result.losses[-1])
    engine = TransformersEngine(**GenerateConfig(max_new_tokens=8).engine_options(str(tiny_models.llava)))

    def captions(vector: np.ndarray) -> list[str]:
        concept = ConceptTokens("Thao", vector[None, :].astype(np.float32), method="myvlm")
        return engine.generate([GenerationRequest(rgb(p), PROMPT.format(name="Thao"), [concept]) for p in THAO])

    untrained, learned = captions(untrained_vector(len(result.vector))), captions(result.vector)
    assert all(mentions(c, "Thao") for c in learned), learned
    assert not any(mentions(c, "Thao") for c in untrained), untrained


@pytest.mark.vllm
def test_vllm_and_transformers_give_identical_tokens_with_myvlm_concepts(vllm_engine, concepts, trained, tiny_models,
                                                                        ray_local):  # fmt: skip
    """A MyVLM vector alone, beside a PLVM concept, and two of them: the same greedy tokens from both engines, in
    ``concept_style: plvm`` (the default; test_vllm.py mixes one in both styles)."""
    result, _ = trained
    thao = ConceptTokens("Thao", result.vector[None, :], method="myvlm")
    other = ConceptTokens("Sue", untrained_vector(len(result.vector), seed=7)[None, :], method="myvlm")
    image = rgb(THAO[0])
    requests = [
        GenerationRequest(image, PROMPT.format(name="Thao"), [thao]),
        GenerationRequest(image, "Who is in this photo?", [concepts["Viruss"], thao]),
        GenerationRequest(image, "Who is in this photo?", [thao, other]),
        GenerationRequest(image, "Who is in this photo?", [concepts["Viruss"]]),
    ]
    reference = TransformersEngine(**GenerateConfig(max_new_tokens=12).engine_options(str(tiny_models.llava)))
    expected = [reference.generate_ids([r])[0] for r in requests]
    got = ray_local.get(vllm_engine.generate_ids.remote(requests))
    assert got == expected and all(got)
    assert got[1] != got[3], "the MyVLM vector changes the tokens beside a PLVM concept"
    assert mentions(reference.prompter.decode(got[0]), "Thao")


def test_a_bank_mixes_plvm_and_myvlm_concepts_and_checks_each(tmp_path):
    rng = np.random.default_rng(0)
    plvm = Concept("Mike", rng.normal(size=(1, 128)).astype(np.float32), rng.normal(size=(17, 8)).astype(np.float32),
                   rng.normal(size=8).astype(np.float32), ["/mike.jpg"])  # fmt: skip
    myvlm = Concept.myvlm("Sue", rng.normal(size=(3, 128)).astype(np.float32), rng.normal(size=8).astype(np.float32),
                          "llava:abc:8", ["/sue-0.jpg", "/sue-1.jpg", "/sue-2.jpg"])  # fmt: skip
    store = BankStore(str(tmp_path))
    store.save(Bank("ann", "dlib-resnet-v1", "aligner-x", [plvm, myvlm]))
    loaded = store.load("ann")
    assert [(c.name, c.method) for c in loaded.concepts] == [("Mike", "plvm"), ("Sue", "myvlm")]
    np.testing.assert_array_equal(loaded.concepts[1].vector, myvlm.vector)
    assert loaded.concepts[1].vector_model == "llava:abc:8" and loaded.concepts[1].soft_tokens.shape == (0, 8)
    (mike, sue) = (c.tokens() for c in loaded.concepts)
    assert mike.method == "plvm" and sue.method == "myvlm" and sue.soft_tokens.shape == (1, 8)

    loaded.check_servable("llava:abc:8")
    with pytest.raises(BankError, match="MyVLM concept 'Sue' of user 'ann' .* trained for the LLaVA 'llava:abc:8'"):
        loaded.check_servable("llava:other:8")
    wide = Concept.myvlm("Tom", myvlm.face_descriptors, np.ones(16, np.float32), "llava:abc:16", ["/tom.jpg"])
    with pytest.raises(BankError, match="concept 'Tom' .* hidden size 16, the bank's first concept 'Mike' for 8"):
        store.save(Bank("bob", "dlib-resnet-v1", "aligner-x", [plvm, wide]))

    path = tmp_path / "ann" / "concepts.v000001.parquet"
    table = pq.read_table(path)
    methods = table.column_names.index("method")
    relabelled = table.set_column(methods, "method", [["plvm", "plvm"]]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(relabelled, path)
    with pytest.raises(BankError, match="concept 'Sue' of user 'ann' .* fails its checksum"):
        store.load("ann")


def test_a_bank_of_schema_2_is_read_as_plvm_concepts(tmp_path):
    rng = np.random.default_rng(1)
    concept = Concept("Mike", rng.normal(size=(1, 128)).astype(np.float32), rng.normal(size=(17, 8)).astype(np.float32),
                      rng.normal(size=8).astype(np.float32), ["/mike.jpg"])  # fmt: skip
    store = BankStore(str(tmp_path))
    store.save(Bank("ann", "dlib-resnet-v1", "aligner-x", [concept]))
    path = tmp_path / "ann" / "concepts.v000001.parquet"
    table = pq.read_table(path).drop_columns(["method", "vector", "vector_model"])  # as schema 2 wrote it
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"plvm.schema_version": b"2"}), path)
    (read,) = store.load("ann").concepts
    assert read.method == "plvm" and read.checksum() == concept.checksum()
    np.testing.assert_array_equal(read.soft_tokens, concept.soft_tokens)


def test_a_name_the_tokenizer_cannot_write_is_found(trainer):
    assert trainer.unknown_words("Thao") == [] and trainer.unknown_words("Thao Xyzzy") == ["Xyzzy"]


def test_training_captions_must_cover_the_photos_and_name_the_person():
    images = ["/p/a.jpg", "s3://b/b.jpg"]
    assert training_captions(images, {"a.jpg": "Thao smiles.", "b.jpg": "thao at a beach."}, "Thao") == [
        "Thao smiles.", "thao at a beach."]  # fmt: skip
    with pytest.raises(EnrollError, match="no caption for b.jpg"):
        training_captions(images, {"a.jpg": "Thao smiles."}, "Thao")
    with pytest.raises(EnrollError, match="captions of b.jpg do not name 'Thao'"):
        training_captions(images, {"a.jpg": "Thao smiles.", "b.jpg": "Thaos at a beach."}, "Thao")
    with pytest.raises(EnrollError, match="captions for photos not given: c.jpg"):
        training_captions(images, {"a.jpg": "Thao.", "b.jpg": "Thao.", "c.jpg": "Thao."}, "Thao")


@pytest.fixture(scope="module")
def mixed_bank(tmp_path_factory, yollava):
    """User una's bank: Thao enrolled by ``plvm enroll --method myvlm`` (20 steps), Viruss a PLVM concept; the config
    (with a caption prompt the tiny model was trained on) and a manifest of a photo of each and of a stranger."""
    tmp_path = tmp_path_factory.mktemp("mixed")
    manifest = tmp_path / "m.csv"
    photos = [photo("thao", "5.jpg"), photo("viruss", "1.jpg"), photo("phuc-map", "1.jpg")]
    manifest.write_text("path,user_id\n" + "".join(f"{p},una\n" for p in photos))
    config = make_config(tmp_path, input={"uri": str(manifest)}, myvlm={"steps": 20, "threads": 1},
                         match={"normalization": "none"}, generate={"caption": PROMPT.format(name="Thao")})  # fmt: skip
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({f"{i}.jpg": CAPTION for i in range(3)}))
    threads = torch.get_num_threads()  # the enrollment sets myvlm.threads for its process, which is pytest's here
    try:
        code = run(["enroll", "--config", str(config_file), "--user", "una", "--name", "Thao", "--method", "myvlm",
                    "--captions", str(captions), *THAO])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    enroll(config, "una", "Viruss", [photo("viruss", "ref_img.jpg")])
    return config, config_file, photos


def test_myvlm_enrollment_and_a_mixed_bank_in_one_run_gated_by_the_face_matcher(mixed_bank, ray_local, capsys):
    """``plvm enroll --method myvlm`` trained Thao's vector; Viruss is a PLVM concept of the same bank; one caption run
    (``concept_style: plvm``, the default: the MyVLM concept needs no concept token) serves both. Thao's vector
    reaches only the prompts of photos where the face matcher found Thao."""
    config, config_file, photos = mixed_bank
    bank = BankStore(config.bank).load("una")
    thao, viruss = bank.concepts
    assert (thao.method, viruss.method) == ("myvlm", "plvm") and thao.face_descriptors.shape == (3, 128)
    assert thao.vector_model == llava_identity(config.model_paths().llava) and thao.references == THAO

    source = BankSource(config.bank)
    space = embedder_class(config.embed.kind).space
    recognise = InProcess([*face_stages(config), match.stage(config.match, source, space, config.tasks),
                           prompt.stage(config.prompt, source, bank.aligner, config.tasks)])  # fmt: skip
    rows = recognise(to_table([{"path": p, "user_id": "una"} for p in photos], ["path", "user_id"])).to_pylist()
    injected = {row["path"]: injected_tokens(row) for row in rows}
    (served,) = injected[photos[0]]
    assert served.method == "myvlm" and served.soft_tokens.shape == (1, 128)
    np.testing.assert_array_equal(served.soft_tokens[0], thao.vector)
    assert [(t.name, t.method) for t in injected[photos[1]]] == [("Viruss", "plvm")]
    assert injected[photos[2]] == [], "a face that matches no concept gets no vector"

    assert run(["caption", "--config", str(config_file)]) == 0
    out = read_output(config.output.uri).sort_by("path").to_pylist()
    assert [r["concepts"] for r in out] == [[], ["Thao"], ["Viruss"]] and not any(r["error"] for r in out)

    elsewhere = Concept.myvlm("Thao", thao.face_descriptors, thao.vector, "llava:0123456789abcdef:128", THAO)
    BankStore(config.bank).save(Bank("ivy", bank.embedder, bank.aligner, [elsewhere]))
    ivy = config_file.with_name("ivy.csv")
    ivy.write_text(f"path,user_id\n{photos[0]},ivy\n")
    capsys.readouterr()
    assert run(["caption", "--config", str(config_file), "--input", str(ivy), "--output", str(ivy.with_suffix(""))]) == 2
    error = capsys.readouterr().err
    assert (
        "MyVLM concept 'Thao' of user 'ivy'" in error and "trained for the LLaVA 'llava:0123456789abcdef:128'" in error
    )
    assert len(error.strip().splitlines()) == 1


@pytest.mark.vllm
def test_the_vllm_engine_serves_a_mixed_bank_as_the_transformers_engine_does(mixed_bank, vllm_env, tmp_path, ray_local):
    config, _, photos = mixed_bank
    outputs = {}
    for engine in ("transformers", "vllm"):
        generate = GenerateConfig.model_validate(config.generate.model_dump() | LOCAL_VLLM | {"engine": engine})
        output = config.output.model_copy(update={"uri": str(tmp_path / engine)})
        run_config = config.model_copy(update={"generate": generate, "output": output})
        assert caption(run_config).rows == len(photos)
        outputs[engine] = read_output(run_config.output.uri).sort_by("path")
    for column in ("concepts", "caption", "answers"):
        assert outputs["vllm"].column(column).to_pylist() == outputs["transformers"].column(column).to_pylist()
    assert outputs["vllm"].column("engine").to_pylist() == ["vllm"] * len(photos)


def test_eval_captions_scores_recall_and_false_mentions_per_person(tmp_path, capsys):
    rows = [
        {"path": "/a.jpg", "user_id": "u", "concepts": ["Thao"], "caption": "Thao is smiling."},
        {"path": "/b.jpg", "user_id": "u", "concepts": ["Thao", "Mike"], "caption": "thao and a man."},
        {"path": "/c.jpg", "user_id": "u", "concepts": [], "caption": "Mike at a beach."},
        {"path": "/d.jpg", "user_id": "u", "concepts": ["Mike"], "caption": None, "error": "engine_timeout"},
    ]
    table = to_table(rows, ["path", "user_id", "concepts", "caption", "error"])
    scores = score_captions(table, None, "recognised")
    assert (scores.photos, scores.without_caption) == (3, 1)
    assert scores.recall == pytest.approx(2 / 3) and scores.false_mention_rate == pytest.approx(1 / 3)
    assert (scores.people["Thao"].named, scores.people["Thao"].present) == (2, 2)
    assert (scores.people["Mike"].named, scores.people["Mike"].falsely_named) == (0, 1)

    output = tmp_path / "part.parquet"
    full = [{**r, "faces": [], "answers": []} for r in rows]
    pq.write_table(to_table(full, output_schema().names).cast(output_schema()), output)
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"/a.jpg": ["Thao"], "/b.jpg": ["Thao"], "/c.jpg": ["Mike"]}))
    assert run(["eval", "captions", str(output), "--truth", str(truth)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    assert summary["truth"] == f"file {truth}" and summary["recall"] == 1.0
    assert summary["false_mention_rate"] == 0.0 and summary["people"]["Mike"]["recall"] == 1.0
    assert any(line.strip().startswith("Thao: recall 1.0000 (2/2)") for line in printed)
