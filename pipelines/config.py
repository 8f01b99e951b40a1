"""The run configuration: a YAML file validated into the stages' config models.

Unknown keys and wrong types are errors naming the key (``detect.long_sid: unknown key``).
``${VAR}`` in a string takes the environment variable's value (``${VAR:-default}`` when it
is unset or empty), so credentials and machine paths can stay out of the file; an unset
``${VAR}`` without a default is an error naming it and its key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from operators.base import Resources, StageConfig
from operators.decode import DecodeConfig
from operators.detect import DetectConfig
from operators.embed import EmbedConfig
from operators.generate import GenerateConfig
from operators.index import IndexConfig
from operators.items import DatasetConfig
from operators.match import MatchConfig
from operators.prompt import PromptConfig
from operators.read import InputConfig, ReadConfig
from operators.write import OutputConfig
from pipelines.runner.settings import RayConfig, RunConfig
from plvm_model.store.errors import ConfigError

if TYPE_CHECKING:  # the Aligner's module imports torch, which a command that only reads a config does not need
    from plvm_model.aligner import AlignerShape

MODELS = ("llava", "dinov2", "aligner")
PUBLISHED = "published"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ModelsConfig(StageConfig):
    """Local paths of the models, ``tiny`` for the random test models built on first use, or ``published`` for the
    real models' published configurations without weights (with ``random_weights``)."""

    llava: str = Field(
        "tiny",
        description="The LLaVA-1.5 checkpoint (a llava-hf folder); `published`: llava-hf/llava-1.5-7b-hf's published "
        "configuration, without weights (needs `random_weights`).",
    )
    dinov2: str = Field(
        "tiny",
        description="The DINOv2 checkpoint whose features the Aligner reads; `published`: facebook/dinov2-base's "
        "published configuration, without weights (needs `random_weights`).",
    )
    aligner: str = Field(
        "tiny",
        description="A PLVM Aligner checkpoint (state dict); its shape from `aligner.json` beside it or "
        "`aligner_shape`; `published`: no checkpoint, the shape of `aligner_shape` (needs `random_weights`).",
    )
    aligner_shape: dict[str, int] = Field(
        {}, description="The Aligner's hyperparameters (`dim`, `depth`, `heads`, `num_queries`, ...)."
    )
    aligner_reference: Literal["image", "face"] = Field(
        "image", description="What the Aligner sees: the whole reference photo (PLVM) or a crop around the face."
    )
    device: str = Field("cpu", description="torch device of DINOv2 and the Aligner at enrollment.")
    random_weights: bool = Field(
        False,
        description="Build every model (LLaVA, DINOv2, the Aligner) from its configuration with random weights in "
        "the configured dtype, reading no weights: the real path at its real shapes where no weights can be had. "
        "Its captions are noise, and marked so (the rows' `model`, the output's metadata, `plvm show`, every "
        "summary). Takes effect only with the command-line flag `--random-weights`; without it the config is "
        "refused.",
    )

    @model_validator(mode="after")
    def _published_needs_random_weights(self) -> ModelsConfig:
        named = [kind for kind in MODELS if getattr(self, kind) == PUBLISHED]
        if named and not self.random_weights:
            raise ValueError(
                f"models.{named[0]}: '{PUBLISHED}' is a published configuration without weights: it needs "
                "models.random_weights: true"
            )
        return self


class MyVLMConfig(StageConfig):
    """Training of a MyVLM concept vector at enrollment (``plvm enroll --method myvlm``); MyVLM's values for LLaVA."""

    prompt: str = Field(
        "Please caption this image of {name}.", description="The instruction each training caption answers."
    )
    steps: int = Field(100, ge=1, description="Optimizer steps, each on `batch_size` of the training photos.")
    batch_size: int = Field(4, ge=1, description="Training photos per step.")
    learning_rate: float = Field(1.0, gt=0, description="AdamW's learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW's weight decay.")
    max_grad_norm: float = Field(0.05, gt=0, description="The vector's gradient is clipped to this norm.")
    reg_lambda: float = Field(
        0.0075, ge=0, description="Weight of the attention regulariser (the concept token's attention probabilities)."
    )
    seed: int = Field(42, description="Seed of the vector's initialisation and of the photos' order.")
    dtype: str = Field("float32", description="torch dtype of the frozen LLaVA while training (`bfloat16` on GPU).")
    device: str = Field("cpu", description="torch device of the training (`cuda` for the 7B).")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads of the training (null: torch's default, one per core)."
    )


class PeopleConfig(StageConfig):
    """Suggested people (``plvm people suggest``): the faces nobody named, clustered; measured in
    docs/people.md."""

    uri: str | None = Field(
        None, description="Root of the people tables (per user: the clusters). null: `OUTPUT/_people`, beside the "
        "face index."
    )
    threshold: float = Field(
        0.44, gt=0, description="Faces at most this far apart (dlib distance) are joined in the graph that Chinese "
        "whispers clusters."
    )
    min_size: int = Field(3, ge=1, description="The smallest cluster; faces of smaller groups stay unclustered.")
    join_threshold: float = Field(
        0.42, gt=0, description="A new face joins the open cluster of its nearest clustered face at most this far "
        "away (the incremental pass)."
    )
    min_face_px: float = Field(
        40, ge=0, description="Faces whose box's shorter side is smaller (in the photo's pixels) are not clustered."
    )
    min_score: float = Field(0.95, ge=0, le=1, description="Faces MTCNN scored lower are not clustered.")
    good_face_px: float = Field(
        120, gt=0, description="A face's quality is its score times its shorter side over this, at most 1."
    )
    keys: int = Field(
        5, ge=1, description="Faces of a cluster kept as the person's match keys by `plvm enroll --from-cluster` "
        "and `plvm people merge --name`."
    )

    def root(self, output_uri: str) -> str:
        """The people tables' root for the output ``output_uri``."""
        from plvm_model.store import storage

        return self.uri or storage.join(output_uri, "_people")


@dataclass(frozen=True)
class ModelPaths:
    llava: str
    dinov2: str
    aligner: str
    """The Aligner's checkpoint (``published``: none, with random weights)."""
    aligner_shape: AlignerShape
    aligner_reference: str
    random_weights: bool = False
    """Every model built from its configuration with random weights (``models.random_weights``)."""

    @cached_property
    def aligner_identity(self) -> str:
        from plvm_model.concepts import aligner_identity

        return aligner_identity(self.aligner, self.aligner_reference, self.aligner_shape, self.random_weights)


class Config(StageConfig):
    input: InputConfig = Field(InputConfig(), description="The photos (`plvm caption --input`, `--user`).")
    bank: str = Field("banks", description="Root URI of the users' concept banks.")
    output: OutputConfig = Field(OutputConfig(), description="Where the rows go (`--output`).")
    index: IndexConfig = Field(
        IndexConfig(), description="The face index: the faces every run found, reused by later runs."
    )
    storage: dict[str, dict[str, Any]] = Field(
        {}, description="fsspec options per URI scheme, e.g. `s3: {endpoint_url: ..., key: ..., secret: ...}`."
    )
    ray: RayConfig = Field(RayConfig(), description="The Ray the run uses.")
    run: RunConfig = Field(
        RunConfig(), description="How a run treats failures of the system, and where it pushes its metrics."
    )
    models: ModelsConfig = Field(
        ModelsConfig(), description="Local paths of the models, or `tiny` for random test models built on first use."
    )
    read: ReadConfig = Field(ReadConfig(), description="Stage 1: each photo's bytes.")
    decode: DecodeConfig = Field(DecodeConfig(), description="Stage 2: an upright RGB working copy.")
    detect: DetectConfig = Field(DetectConfig(), description="Stage 3: faces and 5-point landmarks (MTCNN).")
    embed: EmbedConfig = Field(EmbedConfig(), description="Stage 4: a descriptor per face.")
    match: MatchConfig = Field(MatchConfig(), description="Stage 5: faces against the photo owner's concept bank.")
    prompt: PromptConfig = Field(PromptConfig(), description="Stage 6: the concepts each prompt injects.")
    generate: GenerateConfig = Field(GenerateConfig(), description="Stage 7: captions and answers from LLaVA.")
    myvlm: MyVLMConfig = Field(MyVLMConfig(), description="Training of MyVLM concepts (`plvm enroll --method myvlm`).")
    people: PeopleConfig = Field(
        PeopleConfig(), description="Suggested people: the faces nobody named, clustered (`plvm people`)."
    )
    dataset: DatasetConfig = Field(
        DatasetConfig(), description="Training and evaluation sets built from an output (`plvm dataset`)."
    )
    tasks: Resources = Field(
        Resources(concurrency=2, num_cpus=0.25, batch_size=8),
        description="Resources of the model-free stages (read, decode, match, prompt, write); `concurrency` is the "
        "most tasks of each stage at once. The decode and align of a photo's faces run in the detect actors' "
        "batch calls, with `detect.resources`.",
    )

    @model_validator(mode="after")
    def _slots_hold_a_prompt(self) -> Config:
        if self.generate.concept_style == "plvm" and self.generate.concept_slots < self.prompt.max_concepts:
            raise ValueError(
                f"generate.concept_slots ({self.generate.concept_slots}) must be at least prompt.max_concepts "
                f"({self.prompt.max_concepts}): every concept of a prompt needs its own concept token"
            )
        return self

    def model_paths(self) -> ModelPaths:
        """The models' local paths, building the tiny ones (``tiny``) or the published configurations' folders
        (``published``) first where named."""
        from plvm_model.concepts import aligner_shape

        m = self.models
        named = {kind: getattr(m, kind) for kind in MODELS}
        if "tiny" in named.values():
            from plvm_model.tiny import ensure_tiny_models

            tiny = ensure_tiny_models()
            named = {k: str(getattr(tiny, k)) if v == "tiny" else v for k, v in named.items()}
        if PUBLISHED in (named["llava"], named["dinov2"]):
            from plvm_model.published import ensure_published_models

            published = ensure_published_models()
            named |= {k: str(getattr(published, k)) for k in ("llava", "dinov2") if named[k] == PUBLISHED}
        for kind, path in named.items():
            if path != PUBLISHED and not Path(path).exists():
                raise ConfigError(f"models.{kind}: {path} does not exist (give a local path, 'tiny' or 'published')")
        shape = aligner_shape(None if named["aligner"] == PUBLISHED else named["aligner"], m.aligner_shape)
        return ModelPaths(
            llava=named["llava"],
            dinov2=named["dinov2"],
            aligner=named["aligner"],
            aligner_shape=shape,
            aligner_reference=m.aligner_reference,
            random_weights=m.random_weights,
        )


def _expand(value: Any, key: str = "") -> Any:
    """``value`` with each ``${VAR}`` replaced by the variable's value; an unset one without a default is an
    error naming it and ``key`` (the dotted key it is under), never an empty string that turns
    ``${ROOT}/banks`` into ``/banks``."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: _variable(m, key), value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _variable(match: re.Match, key: str) -> str:
    """The value of ``${NAME}`` or ``${NAME:-default}``: the default when the variable is unset or empty."""
    name, default = match.group(1), match.group(2)
    if os.environ.get(name):
        return os.environ[name]
    if default is not None:
        return default
    if name in os.environ:  # set to the empty string: the user's own choice
        return ""
    raise ConfigError(f"{key}: the environment variable {name} is not set (set it, or give a default ${{{name}:-...}})")


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _config_text(path: str) -> str:
    """The text of a config: a local file, any fsspec URI, or ``env:NAME`` (an environment variable)."""
    if path.startswith("env:"):
        if path[4:] not in os.environ:
            raise ConfigError(f"config {path}: the environment variable {path[4:]} is not set")
        return os.environ[path[4:]]
    if "://" in path:
        import fsspec

        with fsspec.open(path, "r") as f:
            return f.read()
    return Path(path).read_text()


def load_config(path: str | Path | None = None, *, random_weights: bool = False, **overrides: Any) -> Config:
    """The config at ``path`` (or the defaults), with dotted-key ``overrides`` (``input__uri=...``) applied.

    ``path`` is a file, an fsspec URI, or ``env:NAME`` for YAML held in an environment variable
    (how ``submit.py`` ships a config to a cluster job). ``random_weights`` says that the command line asked for
    random weights (``--random-weights``): a config that sets ``models.random_weights`` is refused without it, and
    it without such a config, so that a run with random weights is never made by accident.
    """
    data: dict[str, Any] = {}
    source = str(path) if path else "(defaults)"
    if path:
        try:
            data = yaml.safe_load(_config_text(str(path))) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    try:
        data = _expand(data)
    except ConfigError as error:
        raise ConfigError(f"config {source}: {error}") from None
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split("__")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None
    if config.models.random_weights and not random_weights:
        raise ConfigError(
            f"config {source}: models.random_weights is true, which builds every model with random weights (its "
            "output is noise): pass --random-weights to run it so"
        )
    if random_weights and not config.models.random_weights:
        raise ConfigError(f"--random-weights: config {source} does not set models.random_weights: true")
    return config
