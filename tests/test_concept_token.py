"""PLVM's concept token ``<sks>`` (``concept_style: plvm``) in the transformers engine.

The layout is checked against an implementation written here from PLVM's published
description, independently of the engine's code; the vLLM engine's side is in test_vllm.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_config, one_batch, photo
from operators.generate import GenerateConfig
from plvm_model.concepts import ConceptEncoder, aligner_shape
from plvm_model.engines import GenerationRequest
from plvm_model.engines.transformers_engine import TransformersEngine
from plvm_model.injection import ConceptTokens


def rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def engine_with(tiny_models, **options) -> TransformersEngine:
    return TransformersEngine(**GenerateConfig(max_new_tokens=6, **options).engine_options(str(tiny_models.llava)))


@pytest.fixture(scope="module")
def engine(tiny_models):
    return engine_with(tiny_models)


@pytest.fixture(scope="module")
def concepts(tiny_models, yollava):
    encoder = ConceptEncoder(str(tiny_models.dinov2), str(tiny_models.aligner), aligner_shape(tiny_models.aligner))
    out = {}
    for name, person in (("Thao", "thao"), ("Viruss", "viruss"), ("Tien", "thuytien")):
        soft, head = encoder.encode(rgb(photo(person, "ref_img.jpg")), None)
        out[name] = ConceptTokens(name, soft, head)
    return out


def plvm_layout(tokenizer, system: str, question: str, concepts: list[ConceptTokens], n_image: int) -> list[tuple]:
    """PLVM's token layout, from its description: BOS, the system text, then per PLVM concept ``<sks>``, the ids of
    "is" without BOS, 16 soft tokens, the id of "."; then "USER: ", the image, MyVLM's vector per MyVLM concept
    (MyVLM's description: right after the image's features), and the question split at ``<sks>`` (pieces without
    surrounding spaces) with the first PLVM concept's token put back, then " ASSISTANT:" ends it.
    Items: ("id", id), ("sks", concept), ("soft", concept, row), ("image",), ("vector", concept); a concept is its
    index in ``concepts``."""

    def ids(text: str) -> list[tuple]:
        return [("id", i) for i in tokenizer(text).input_ids[1:]]  # the ids without the BOS

    plvm = [i for i, c in enumerate(concepts) if c.method == "plvm"]
    out = [("id", tokenizer.bos_token_id), *ids(system)]
    for concept in plvm:
        out += [("sks", concept), *ids("is"), *[("soft", concept, row) for row in range(1, 17)]]
        out.append(("id", tokenizer.convert_tokens_to_ids(".")))
    out += ids("USER: ") + [("image",)] * n_image
    out += [("vector", i) for i, c in enumerate(concepts) if c.method == "myvlm"]
    pieces = ("\n" + question + " ASSISTANT:").split("<sks>")
    for i, piece in enumerate(pieces):
        out += ids(piece.strip(" "))
        if i < len(pieces) - 1:
            out.append(("sks", plvm[0]))
    return out


def expected_rows(layout: list[tuple], request: GenerationRequest, concept_ids: list[int], table: torch.Tensor):
    """The ids and input embedding rows the layout asks for (None where the photo's features go, or where a
    placeholder's id is the engine's choice); ``concept_ids`` are the PLVM concepts' token ids, in order."""
    plvm = [i for i, c in enumerate(request.concepts) if c.method == "plvm"]
    ids, rows = [], []
    for item in layout:
        if item[0] == "id":
            ids.append(item[1])
            rows.append(table[item[1]])
        elif item[0] == "sks":
            ids.append(concept_ids[plvm.index(item[1])])
            rows.append(torch.from_numpy(request.concepts[item[1]].soft_tokens[0]))
        elif item[0] == "soft":
            ids.append(None)
            rows.append(torch.from_numpy(request.concepts[item[1]].soft_tokens[item[2]]))
        elif item[0] == "vector":
            ids.append(None)
            vector = torch.from_numpy(request.concepts[item[1]].soft_tokens[0])
            rows.append(torch.nn.functional.normalize(vector, dim=0))
        else:
            ids.append("image")
            rows.append(None)
    return ids, rows


def myvlm_concept(name: str, hidden: int, seed: int) -> ConceptTokens:
    """A MyVLM concept with a random (untrained) vector of the LLM's width, not of unit norm."""
    vector = np.random.default_rng(seed).normal(size=(1, hidden)).astype(np.float32)
    return ConceptTokens(name, vector, method="myvlm")


def layout_cases(concepts) -> list[GenerationRequest]:
    """Prompts with 0-2 PLVM concepts; the last two mix in MyVLM concepts (a vector after the image each)."""
    image = rgb(photo("thao", "0.jpg"))
    thao, viruss = concepts["Thao"], concepts["Viruss"]
    sue, ann = (myvlm_concept(name, thao.soft_tokens.shape[-1], seed) for seed, name in enumerate(("Sue", "Ann")))
    return [
        GenerationRequest(image, "Is <sks> in this photo?", [thao]),
        GenerationRequest(image, "Describe this photo in one sentence.", [viruss, thao]),
        GenerationRequest(image, "Where is <sks>? Is <sks> smiling?", [viruss]),
        GenerationRequest(image, "Who is in this photo?", []),
        GenerationRequest(image, "Is <sks> in this photo?", [sue, thao]),
        GenerationRequest(image, "Describe this photo in one sentence.", [viruss, sue, thao, ann]),
    ]


def test_the_engine_builds_plvms_token_layout(engine, concepts):
    prompter = engine.prompter
    batch = check_plvm_layout(engine, layout_cases(concepts))
    assert batch.concept_ids[0] == [prompter.vocab], "concept tokens follow the vocabulary"
    assert batch.concept_ids[1] == [prompter.vocab + 1, prompter.vocab], "one token per concept, kept across the batch"
    assert batch.concept_ids[5] == [prompter.vocab + 1, prompter.vocab], "a MyVLM concept takes no token"


def check_plvm_layout(engine: TransformersEngine, requests: list[GenerationRequest]):
    """Asserts that the ids and input embeddings the engine prepares for ``requests`` (as one slot batch) are
    PLVM's layout (:func:`plvm_layout`); the batch."""
    prompter = engine.prompter
    batch = one_batch(engine, requests)
    prepared = engine.prepare(batch)
    table = engine.model.get_input_embeddings().weight
    for row, request in enumerate(requests):
        layout = plvm_layout(prompter.tokenizer, GenerateConfig().template.system, request.question,
                             request.concepts, prompter.n_image)  # fmt: skip
        ids, rows = expected_rows(layout, request, batch.concept_ids[row], table)
        prompt, offset = prepared.prompts[row], prepared.offsets[row]
        assert len(prompt.input_ids) == len(ids), f"request {row}"
        for position, (want_id, want_row) in enumerate(zip(ids, rows)):
            got_id = prompt.input_ids[position]
            if want_id == "image":
                assert got_id == prompter.image_token_id
            elif want_id is not None:
                assert got_id == want_id, f"request {row}, position {position}"
            if want_row is not None:
                got_row = prepared.inputs_embeds[row, offset + position]
                assert torch.equal(got_row, want_row.to(got_row.dtype)), f"request {row}, position {position}"
    return batch


def test_a_question_with_the_concept_token_needs_exactly_one_concept(engine, concepts):
    image = rgb(photo("thao", "0.jpg"))
    two = GenerationRequest(image, "Is <sks> here?", [concepts["Thao"], concepts["Viruss"]])
    with pytest.raises(ValueError, match="needs exactly one PLVM concept, this one has 2"):
        engine.generate([two])


def test_the_concept_tokens_logit_is_the_hidden_state_times_its_head_weight(engine, concepts):
    requests = layout_cases(concepts)[:2]
    batch = one_batch(engine, requests)
    engine.write_slots(batch.rows)
    inputs = engine.prepare(batch)
    with torch.no_grad():
        hidden = engine.model.model(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values
        ).last_hidden_state[:, -1]
        logits = engine.model(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values
        ).logits[:, -1]
    for row, request in enumerate(requests):
        for token_id, concept in zip(batch.concept_ids[row], request.concepts):
            expected = hidden[row] @ torch.from_numpy(concept.head_weight)
            assert torch.allclose(logits[row, token_id], expected, rtol=1e-5, atol=1e-5), (row, concept.name)


def winning(engine: TransformersEngine, request: GenerationRequest) -> ConceptTokens:
    """``request``'s first concept with a head weight along the first step's final hidden state, long enough to
    beat every word of the vocabulary."""
    inputs = engine.prepare(one_batch(engine, [request]))
    with torch.no_grad():
        out = engine.model.model(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values
        )
        hidden = out.last_hidden_state[0, -1]
        best = engine.model.lm_head(hidden)[: engine.prompter.vocab].max()
    head = hidden * (best.abs() + 10) / hidden.dot(hidden)
    concept = request.concepts[0]
    return ConceptTokens(concept.name, concept.soft_tokens, head.numpy().astype(np.float32))


def test_a_concept_token_that_wins_is_emitted_and_written_as_the_name(tiny_models, engine, concepts):
    image = rgb(photo("thao", "1.jpg"))
    question = "Describe this photo in one sentence."
    thao = winning(engine, GenerationRequest(image, question, [concepts["Thao"]]))
    requests = [
        GenerationRequest(image, question, [thao]),
        GenerationRequest(image, question, [concepts["Viruss"]]),
        GenerationRequest(image, question, []),
    ]
    batch = one_batch(engine, requests)
    ids = engine.generate_ids(requests)
    thao_id = batch.concept_ids[0][0]
    assert ids[0][0] == thao_id, "the concept token wins the first step"
    assert thao_id not in ids[1] + ids[2], "another prompt never emits a concept it does not inject"
    texts = engine.generate(requests)
    assert texts[0].startswith("Thao "), texts[0]
    assert "Thao" not in texts[1] + texts[2]
    sentence = engine_with(tiny_models, concept_style="sentence")
    as_enrolled = GenerationRequest(image, question, [concepts["Thao"]])
    assert sentence.generate_ids(requests[:1]) == sentence.generate_ids([as_enrolled]), "sentence style: head unused"


def test_a_batch_with_more_concepts_than_slots_is_served_in_parts(tiny_models, engine, concepts):
    image = rgb(photo("viruss", "2.jpg"))
    thao, viruss, tien = concepts["Thao"], concepts["Viruss"], concepts["Tien"]
    requests = [
        GenerationRequest(image, "Who is in this photo?", [thao, viruss]),
        GenerationRequest(image, "Is <sks> in this photo?", [tien]),
        GenerationRequest(image, "Describe this photo.", [viruss, tien]),
        GenerationRequest(image, "Describe this photo.", []),
    ]
    small = engine_with(tiny_models, concept_slots=2)
    assert [indices for indices, _ in small.slot_batches(requests)] == [[0], [1, 2, 3]]
    one_by_one = [engine.generate([r])[0] for r in requests]
    assert small.generate(requests) == one_by_one == engine.generate(requests)
    with pytest.raises(ValueError, match="injects 3 concepts, more than generate.concept_slots"):
        small.generate([GenerationRequest(image, "Who?", [thao, viruss, tien])])


def test_a_checkpoint_with_plvms_keys_drives_a_caption_run(tmp_path, yollava, tiny_models, ray_local):
    """An Aligner checkpoint with exactly PLVM's state-dict keys, whose head MLP is set to make Thao's token win
    the caption's first step: the run enrolls Thao with it and the caption starts with her name."""
    from operators.decode import decode_image
    from plvm_model.store.output_table import read_output
    from pipelines.caption import caption
    from pipelines.enroll import Enroller
    from test_aligner import published_state_dict

    state = torch.load(tiny_models.aligner, weights_only=True)
    shape = aligner_shape(tiny_models.aligner)
    assert set(state) == set(published_state_dict(depth=shape.depth)), "the tiny Aligner has PLVM's keys"
    last = "linear_weight_mapping.4"
    state[f"{last}.weight"] = torch.zeros_like(state[f"{last}.weight"])  # the head vector is the bias alone

    def checkpoint(name: str, head: torch.Tensor):
        folder = tmp_path / name
        folder.mkdir()
        torch.save(state | {f"{last}.bias": head}, folder / "aligner.pt")
        (folder / "aligner.json").write_text((tiny_models.aligner.parent / "aligner.json").read_text())
        return make_config(tmp_path, models={"aligner": str(folder / "aligner.pt")}, bank=str(tmp_path / name),
                           input={"uri": photo("thao", "0.jpg"), "user": "una"},
                           output={"uri": str(tmp_path / name / "out")},
                           generate={"max_new_tokens": 4, "questions": []})  # fmt: skip

    neutral = checkpoint("neutral", torch.zeros(shape.output_dim))
    Enroller(neutral).enroll("una", "Thao", [photo("thao", "ref_img.jpg")])
    concept = Enroller(neutral).store.load("una").concepts[0].tokens()
    engine = TransformersEngine(**neutral.generate.engine_options(str(tiny_models.llava)))
    image, _, _ = decode_image(Path(photo("thao", "0.jpg")).read_bytes(), neutral.decode.max_side,
                               neutral.decode.max_pixels)  # fmt: skip
    head = torch.from_numpy(winning(engine, GenerationRequest(image, neutral.generate.caption, [concept])).head_weight)

    config = checkpoint("winning", head)
    Enroller(config).enroll("una", "Thao", [photo("thao", "ref_img.jpg")])
    enrolled = Enroller(config).store.load("una").concepts[0]
    assert np.array_equal(enrolled.soft_tokens, concept.soft_tokens), "the head MLP does not touch the soft tokens"
    assert np.allclose(enrolled.head_weight, head.numpy())
    summary = caption(config)
    assert summary.rows == 1 and not summary.errors
    row = read_output(config.output.uri).to_pylist()[0]
    assert row["concepts"] == ["Thao"]
    assert row["caption"].startswith("Thao"), row["caption"]
