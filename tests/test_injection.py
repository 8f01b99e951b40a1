"""Concept injection is live: the Aligner's vectors reach the LLM and change what it computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_batch, photo
from operators.generate import GenerateConfig, TemplateConfig
from plvm_model.concepts import ConceptEncoder, aligner_shape
from plvm_model.engines import GenerationRequest
from plvm_model.engines.transformers_engine import TransformersEngine
from plvm_model.injection import ConceptTokens, PromptTemplate, TokenizedPrompt, splice, tokenize


def rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def engine(tiny_models):
    return TransformersEngine(**GenerateConfig(max_new_tokens=6).engine_options(str(tiny_models.llava)))


@pytest.fixture(scope="module")
def concepts(tiny_models, yollava):
    encoder = ConceptEncoder(str(tiny_models.dinov2), str(tiny_models.aligner), aligner_shape(tiny_models.aligner))
    out = {}
    for name, person in (("Thao", "thao"), ("Viruss", "viruss")):
        soft, head = encoder.encode(rgb(photo(person, "ref_img.jpg")), None)
        out[name] = ConceptTokens(name, soft, head)
    return out


def llava_expand2square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's padding, written from its description: the photo centred on a square of ``colour``."""
    side = max(image.size)
    square = Image.new(image.mode, (side, side), colour)
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


@pytest.mark.parametrize("size", [(96, 40), (40, 96), (64, 64)])
def test_photos_are_padded_to_a_square_with_the_mean_colour_as_llava_1_5_does(size, tiny_models):
    from transformers import CLIPImageProcessorPil

    photo_ = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    clip = CLIPImageProcessorPil.from_pretrained(str(tiny_models.llava))  # the checkpoint's own processor (PIL)
    mean = tuple(int(x * 255) for x in clip.image_mean)
    padded = clip(images=[llava_expand2square(photo_, mean)], return_tensors="pt")["pixel_values"]
    cropped = clip(images=[photo_], return_tensors="pt")["pixel_values"]
    for aspect, expected in (("pad", padded), ("crop", cropped)):
        engine_ = TransformersEngine(**GenerateConfig(image_aspect=aspect).engine_options(str(tiny_models.llava)))
        assert torch.allclose(engine_.prompter.pixel_values([np.asarray(photo_)]), expected, atol=1e-6), aspect
    assert torch.equal(padded, cropped) == (size[0] == size[1]), "padding changes exactly the photos not square"
    assert GenerateConfig().image_aspect == "pad", "LLaVA-1.5's preprocessing is the default"


def test_template_and_spans(engine):
    prompter = engine.prompter
    text = PromptTemplate(**TemplateConfig().model_dump()).render("Who is here?", ["Mike", "Susan"])
    assert "Mike is <concept>. Susan is <concept>. USER: <image>\nWho is here? ASSISTANT:" in text
    prompt = tokenize(prompter.tokenizer, text, 16, prompter.n_image, prompter.image_token_id, prompter.placeholder_id)
    assert [i for _, i in prompt.concept_spans] == [0, 1]
    (a, _), (b, _) = prompt.concept_spans
    assert b - a > 16, "text separates the two runs"
    start, length = prompt.image_span
    assert prompt.input_ids[start : start + length] == [prompter.image_token_id] * length
    assert prompt.input_ids[0] == prompter.tokenizer.bos_token_id


def test_splice_refuses_soft_tokens_of_another_width():
    prompt = TokenizedPrompt(input_ids=[0] * 10, concept_spans=[(2, 0)], image_span=(8, 2))
    wrong = ConceptTokens("X", np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="enrolled for another model"):
        splice(torch.zeros(10, 4), prompt, [wrong])


def test_the_embeddings_reaching_the_llm_are_the_aligners_output(engine, concepts, yollava):
    image = rgb(photo("thao", "0.jpg"))
    requests = [
        GenerationRequest(image, "Describe this photo.", [concepts["Thao"]]),
        GenerationRequest(image, "Who is in this photo?", [concepts["Viruss"], concepts["Thao"]]),
    ]
    seen: list[torch.Tensor] = []
    language_model = engine.model.model.language_model
    hook = language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    try:
        engine.generate_ids(requests)
    finally:
        hook.remove()
    prefill = seen[0]
    batch = engine.prepare(one_batch(engine, requests))
    assert prefill.shape == batch.inputs_embeds.shape
    for row, request in enumerate(requests):
        prompt, offset = batch.prompts[row], batch.offsets[row]
        assert len(prompt.concept_spans) == len(request.concepts)
        for start, index in prompt.concept_spans:
            injected = prefill[row, offset + start : offset + start + 16]
            expected = torch.from_numpy(request.concepts[index].soft_tokens[1:])
            assert torch.equal(injected, expected), f"row {row} concept {index}"
        start, length = prompt.image_span
        with torch.no_grad():
            image_features = engine.model.get_image_features(pixel_values=batch.pixel_values[row : row + 1])
        placed = prefill[row, offset + start : offset + start + length]
        assert torch.allclose(placed, image_features.pooler_output[0], atol=1e-6), "LLaVA placed the photo"


def test_another_concept_changes_the_logits(engine, concepts, yollava):
    image = rgb(photo("thao", "1.jpg"))

    def logits(soft_tokens: np.ndarray) -> torch.Tensor:
        request = GenerationRequest(
            image, "Who is this?", [ConceptTokens("Thao", soft_tokens, concepts["Thao"].head_weight)]
        )
        batch = engine.prepare(one_batch(engine, [request]))
        with torch.no_grad():
            out = engine.model(
                inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
            )
        return out.logits[0, -1]

    thao, viruss = concepts["Thao"].soft_tokens, concepts["Viruss"].soft_tokens
    assert torch.equal(logits(thao), logits(thao.copy()))
    assert (logits(thao) - logits(viruss)).abs().max() > 1e-3
    plain = engine.generate_ids([GenerationRequest(image, "Who is this?", [])])
    named = engine.generate_ids([GenerationRequest(image, "Who is this?", [concepts["Thao"]])])
    assert plain != named


def test_batched_generation_equals_one_by_one(engine, concepts, yollava):
    image = rgb(photo("viruss", "2.jpg"))
    requests = [
        GenerationRequest(image, "Describe this photo.", [concepts["Viruss"]]),
        GenerationRequest(image, "Who is here?", []),
        GenerationRequest(image, "Where is everyone standing in this photo?", [concepts["Thao"], concepts["Viruss"]]),
    ]
    assert engine.generate_ids(requests) == [engine.generate_ids([r])[0] for r in requests]


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_bitsandbytes_quantized_engine_injects_and_generates(quantization, tiny_models, concepts, yollava):
    config = GenerateConfig(max_new_tokens=4, quantization=quantization)
    quantized = TransformersEngine(**config.engine_options(str(tiny_models.llava)))
    kinds = {type(m).__name__ for m in quantized.model.model.language_model.modules()}
    assert kinds & {"Linear8bitLt", "Linear4bit"}, "the language model's layers are quantized"
    assert type(quantized.model.lm_head).__name__ == "Linear", "the output head stays in full precision"
    vision = {type(m).__name__ for m in quantized.model.model.vision_tower.modules()}
    projector = {type(m).__name__ for m in quantized.model.model.multi_modal_projector.modules()}
    assert "Linear" in vision and not vision & {"Linear8bitLt", "Linear4bit"}, "so does the vision tower"
    assert not projector & {"Linear8bitLt", "Linear4bit"}
    image = rgb(photo("thao", "0.jpg"))
    ids = quantized.generate_ids([GenerationRequest(image, "Who is this?", [concepts["Thao"]])])
    assert len(ids) == 1 and len(ids[0]) > 0
    with pytest.raises(ValueError, match="choose one of 8bit, 4bit"):
        TransformersEngine(**GenerateConfig(quantization="fp8").engine_options(str(tiny_models.llava)))
