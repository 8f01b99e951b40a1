"""The real model's path at a reduced but faithful shape, with random weights (``models.random_weights``).

The LLaVA is the published llava-hf/llava-1.5-7b-hf configuration (``plvm_model/published``) with its
vocabulary (32064 embedding rows, a 32002-token tokenizer, ``<image>`` at 32000, ``<pad>`` at 32001), its
image size 336 and patch 14 (576 image tokens) and its vision feature layer, but 2 layers and a narrow width:
the token layout at the real vocabulary offsets (concept tokens from 32064 on) is checked against the
independent oracle of test_concept_token.py in both engines, and a caption run writes marked rows. The full
size itself runs in benchmarks/full_size.py (about 14 GB per engine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
import yaml
from PIL import Image

import conftest
from conftest import LOCAL_VLLM, make_config, one_batch, photo
from test_concept_token import check_plvm_layout, expected_rows, layout_cases, plvm_layout
from operators.generate import GenerateConfig
from pipelines.caption import caption
from pipelines.cli import run
from pipelines.enroll import Enroller
from plvm_model.aligner import AlignerShape
from plvm_model.cache import build_once, cache_root
from plvm_model.concepts import ConceptEncoder, aligner_identity
from plvm_model.engines.transformers_engine import TransformersEngine
from plvm_model.injection import ConceptTokens
from plvm_model.published import PUBLISHED_VERSION, build_llava_folder
from plvm_model.random_weights import aligner as random_aligner
from plvm_model.random_weights import llava as random_llava
from plvm_model.store.output_schema import output_schema
from plvm_model.store.output_table import OutputTable, read_output

ray.cloudpickle.register_pickle_by_value(conftest)  # one_batch travels by value to the engine's actor

VOCABULARY, IMAGE_TOKEN, PAD_TOKEN, IMAGE_TOKENS = 32064, 32000, 32001, 576
HIDDEN = 128
REDUCED_TEXT = {"hidden_size": HIDDEN, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4}  # fmt: skip
REDUCED_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "projection_dim": 64}  # fmt: skip
ALIGNER = {"dim": 32, "depth": 1, "dim_head": 16, "heads": 2, "embedding_dim": 768, "output_dim": HIDDEN,
           "ff_mult": 2, "head_hidden": 64}  # fmt: skip
"""A small Aligner on DINOv2-base's 768-wide features (its published configuration, random weights)."""


def reduced_llava() -> Path:
    """The reduced LLaVA's folder (configuration and tokenizer, no weights), built once into the cache."""
    folder = cache_root() / f"published-v{PUBLISHED_VERSION}" / "llava-1.5-reduced-test"
    return build_once(folder, lambda out: build_llava_folder(out, text=REDUCED_TEXT, vision=REDUCED_VISION))


@pytest.fixture(scope="module")
def reduced() -> Path:
    return reduced_llava()


@pytest.fixture(scope="module")
def models(reduced) -> dict:
    """The config's models section of a run at the reduced shape with random weights."""
    return {"llava": str(reduced), "dinov2": "published", "aligner": "published", "aligner_shape": ALIGNER,
            "random_weights": True}  # fmt: skip


@pytest.fixture(scope="module")
def reduced_concepts(models, yollava, tmp_path_factory) -> dict[str, ConceptTokens]:
    """Thao's and Viruss's soft tokens from DINOv2-base and the Aligner, both with random weights."""
    config = make_config(tmp_path_factory.mktemp("concepts"), models=models)
    paths = config.model_paths()
    encoder = ConceptEncoder(paths.dinov2, paths.aligner, paths.aligner_shape, random_weights=True)
    out = {}
    for name, person in (("Thao", "thao"), ("Viruss", "viruss")):
        soft, head = encoder.encode(np.asarray(Image.open(photo(person, "ref_img.jpg")).convert("RGB")), None)
        out[name] = ConceptTokens(name, soft, head)
    return out


@pytest.fixture(scope="module")
def engine(reduced) -> TransformersEngine:
    return TransformersEngine(**GenerateConfig(max_new_tokens=4).engine_options(str(reduced), random_weights=True))


def test_a_random_aligners_identity_names_its_whole_shape():
    """A bank's soft tokens fit only the random Aligner of the same shape, whatever the checkpoint's name."""
    shape = AlignerShape(**ALIGNER)
    same = aligner_identity("published", "image", shape, random_weights=True)
    assert same == aligner_identity("elsewhere", "image", AlignerShape(**ALIGNER), random_weights=True)
    deeper = AlignerShape(**ALIGNER | {"depth": 2})
    assert same != aligner_identity("published", "image", deeper, random_weights=True), "same output, other weights"
    assert same != aligner_identity("published", "face", shape, random_weights=True)


def test_random_weights_are_the_same_in_every_build(reduced, models, reduced_concepts, tmp_path):
    """Every build is seeded: an enrollment's soft tokens come out the same in another process (whatever it drew
    from torch's generator before), and so does the LLaVA."""
    torch.rand(7)
    paths = make_config(tmp_path, models=models).model_paths()
    encoder = ConceptEncoder(paths.dinov2, paths.aligner, paths.aligner_shape, random_weights=True)
    soft, head = encoder.encode(np.asarray(Image.open(photo("thao", "ref_img.jpg")).convert("RGB")), None)
    assert np.array_equal(soft, reduced_concepts["Thao"].soft_tokens)
    assert np.array_equal(head, reduced_concepts["Thao"].head_weight)
    for build in (lambda: random_aligner(paths.aligner_shape), lambda: random_llava(reduced, torch.float32, "cpu")):
        first = build().state_dict()
        torch.rand(7)
        second = build().state_dict()
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_reduced_model_has_the_real_vocabulary_and_image_shapes(engine):
    prompter = engine.prompter
    assert (prompter.vocab, prompter.image_token_id, prompter.placeholder_id) == (VOCABULARY, IMAGE_TOKEN, PAD_TOKEN)
    assert len(prompter.tokenizer) == PAD_TOKEN + 1 and prompter.n_image == IMAGE_TOKENS
    assert engine.model.get_input_embeddings().weight.shape == (VOCABULARY + 8, HIDDEN), "8 concept slots after it"
    assert engine.model_name == "llava-1.5-reduced-test (random weights)"
    wide = np.zeros((300, 500, 3), np.uint8)
    pixels = prompter.pixel_values([wide])
    assert pixels.shape == (1, 3, 336, 336), "padded to a square, then 336 px"
    with torch.no_grad():
        features = engine.model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    assert torch.cat(list(features)).shape == (IMAGE_TOKENS, HIDDEN)


def test_the_token_layout_at_the_real_vocabulary_offsets_is_plvms(engine, reduced_concepts):
    batch = check_plvm_layout(engine, layout_cases(reduced_concepts))
    assert batch.concept_ids[0] == [VOCABULARY], "the first concept token is the first row past the 32064"
    assert batch.concept_ids[1] == [VOCABULARY + 1, VOCABULARY]
    assert min(i for ids in batch.concept_ids for i in ids) >= VOCABULARY
    ids = engine.generate_ids(layout_cases(reduced_concepts)[:2])
    assert all(ids) and all(0 <= i < VOCABULARY + engine.concept_slots for row in ids for i in row)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_random_weights_are_quantized_as_a_checkpoint_would_be(reduced, reduced_concepts, quantization):
    import bitsandbytes as bnb

    options = GenerateConfig(max_new_tokens=2, quantization=quantization).engine_options(str(reduced), True)
    engine = TransformersEngine(**options)
    kind = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    linear = {name: type(m) for name, m in engine.model.named_modules() if isinstance(m, torch.nn.Linear)}
    language = {name: t for name, t in linear.items() if name.startswith("model.language_model.")}
    assert len(language) == 2 * 7 and all(issubclass(t, kind) for t in language.values())
    layer = engine.model.get_submodule(next(iter(language)))
    if quantization == "8bit":
        assert layer.state.threshold == 6.0, "transformers' llm_int8_threshold, as a checkpoint loaded in 8 bits"
    else:
        settings = (layer.weight.quant_type, layer.weight.compress_statistics, layer.compute_dtype)
        assert settings == ("nf4", False, torch.float32), "NF4 without double quantization, float32 compute"
    rest = {name: t for name, t in linear.items() if name not in language}
    assert "lm_head" in rest and any(n.startswith("model.vision_tower.") for n in rest)
    assert all(t is torch.nn.Linear for t in rest.values()), "the vision tower, projector and head stay unquantized"
    assert all(engine.generate_ids(layout_cases(reduced_concepts)[:1]))


@pytest.mark.vllm
def test_vllm_with_dummy_weights_builds_the_same_layout(reduced, reduced_concepts, vllm_env, ray_local):
    """vLLM with ``load_format: dummy``: its prompt embeddings at the real offsets are PLVM's layout (rows from its
    own random embedding table), with 576 image features, and it generates within the vocabulary and the slots."""
    from plvm_model.engines.vllm_engine import VLLMEngine

    config = GenerateConfig.model_validate(LOCAL_VLLM | {"max_new_tokens": 4, "concept_slots": 2})
    actor = ray_local.remote(VLLMEngine).options(num_cpus=0.5, runtime_env=config.runtime_env())
    actor = actor.remote(**config.engine_options(str(reduced), random_weights=True))
    requests = layout_cases(reduced_concepts)

    def prepared(engine):
        batch = one_batch(engine, requests)
        return batch.concept_ids, engine.prepare(batch), engine.encoders.embed_tokens.weight.detach().clone()

    try:
        concept_ids, embeds, table = ray_local.get(actor.__ray_call__.remote(prepared))
        generated = ray_local.get(actor.generate_ids.remote(requests[:2]))
        model_name = ray_local.get(actor.__ray_call__.remote(lambda engine: engine.model_name))
    finally:
        ray_local.kill(actor)
    assert concept_ids[0] == [VOCABULARY] and concept_ids[1] == [VOCABULARY + 1, VOCABULARY]
    tokenizer = engine_tokenizer(reduced)
    for row, request in enumerate(requests):
        layout = plvm_layout(tokenizer, GenerateConfig().template.system, request.question, request.concepts,
                             IMAGE_TOKENS)  # fmt: skip
        ids, rows = expected_rows(layout, request, concept_ids[row], table)
        assert embeds[row].shape == (len(rows), HIDDEN), f"request {row}"
        assert ids.count("image") == IMAGE_TOKENS
        for position, want in enumerate(rows):
            if want is not None:
                assert torch.equal(embeds[row][position], want.to(embeds[row].dtype)), (row, position)
    assert all(0 <= i < VOCABULARY + 2 for row in generated for i in row) and all(generated)
    assert model_name.endswith("(random weights)")


def engine_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_a_caption_run_with_random_weights_writes_marked_rows(tmp_path, models, yollava, ray_local, capsys):
    config = make_config(tmp_path, models=models, input={"uri": photo("thao", "0.jpg"), "user": "una"},
                         generate={"max_new_tokens": 3, "questions": []})  # fmt: skip
    Enroller(config).enroll("una", "Thao", [photo("thao", "ref_img.jpg")])
    summary = caption(config)
    assert summary.rows == 1 and not summary.errors and summary.random_weights
    assert summary.lines()[-1].startswith("models: RANDOM WEIGHTS")
    table = read_output(config.output.uri)
    assert table.schema.names == output_schema().names
    row = table.to_pylist()[0]
    assert row["concepts"] == ["Thao"] and row["model"] == "llava-1.5-reduced-test (random weights)"
    assert OutputTable(config.output.uri).holds_random_weights(), "the table's metadata says so"
    capsys.readouterr()
    assert run(["show", config.output.uri]) == 0
    assert capsys.readouterr().out.startswith("RANDOM WEIGHTS: 1 of 1 rows were written by models with random weights")


def test_random_weights_run_only_with_the_flag(tmp_path, capsys):
    random = tmp_path / "random.yaml"
    random.write_text(yaml.safe_dump({"models": {"llava": "published", "dinov2": "published", "aligner": "published",
                                                 "random_weights": True}}))  # fmt: skip
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"bank": str(tmp_path / "banks")}))
    published = tmp_path / "published.yaml"
    published.write_text(yaml.safe_dump({"models": {"llava": "published"}}))
    caption = ["caption", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--user", "una"]
    for argv, words in [
        ([*caption, "--config", str(random)], "models.random_weights is true"),
        (["show", str(tmp_path), "--config", str(random)], "pass --random-weights"),
        ([*caption, "--config", str(plain), "--random-weights"], "does not set models.random_weights: true"),
        ([*caption, "--config", str(published)], "'published' is a published configuration without weights"),
    ]:
        capsys.readouterr()
        assert run(argv) == 2, argv
        error = capsys.readouterr().err
        assert words in error and "Traceback" not in error, error
    assert not (tmp_path / "out").exists()


def test_the_mark_stays_with_the_rows_it_marks(tmp_path):
    output = OutputTable(str(tmp_path / "out"))
    schema = output_schema()
    output.prepare(schema)
    assert not output.holds_random_weights()
    output.prepare(schema, random_weights=True)
    assert output.holds_random_weights()
    output.prepare(schema)
    assert output.holds_random_weights(), "a later run without random weights leaves the earlier rows marked"
    output.prepare(schema, overwrite=True)
    assert not output.holds_random_weights(), "an overwrite without random weights removes them and the mark"
