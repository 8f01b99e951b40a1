"""The real model's path at full size with random weights: enrollment, a caption run, each engine alone.

    PYTHONPATH=. .venv/bin/python benchmarks/full_size.py [--config configs/full-size-cpu.yaml]
        [--runs transformers,vllm] [--alone transformers,vllm] [--photos 4] [--person thao] [--rounds 1]
        [--face-photos 0] [--data DIR] [--llava FOLDER]

LLaVA-1.5-7B, DINOv2-base and the PLVM Aligner are built from their published configurations
(``plvm_model/published``) with random weights (``models.random_weights``): the config is ``--config`` with
its models set to ``published`` and ``random_weights: true``, every other setting (device, dtype, the engines'
options) as it says. Each step runs in a fresh child process, measured from here with all its descendants
(wall time; peak RSS of the process tree and of its kinds of process; with ``nvidia-smi``, the peak GPU
memory in use on the machine):

1. ``enroll``: one person from her reference photo (``--person``): the face stages, then DINOv2-base and the
   Aligner at PLVM's published shape (17 x 4096 soft tokens from 768-wide features), timed by part inside;
2. for each of ``--runs`` (``ENGINE`` or ``ENGINE:QUANTIZATION``, e.g. ``transformers:8bit``):

   a. ``caption``: ``plvm caption --random-weights`` of ``--photos`` photos of her, the whole pipeline; its
      rows are checked (the output's full schema, the model marked as random weights in the rows and the
      table's metadata, her name in ``concepts``), its stages' seconds come from its summary, and generate's
      new tokens per second (prefill and the vision tower included) from the counters;
   b. ``engine`` (the engines of ``--alone``): the engine alone (vLLM in its environment,
      ``generate.vllm.python``), on the same photos
      with her concept: the prompt checked at the real vocabulary offsets (her concept token's id >= 32064,
      576 image features of 4096 per photo), then the same requests with and without her concept in
      ``plvm`` style, ``--rounds`` times each in alternation after a warm-up request of each: seconds and new
      tokens per second both ways, and their ratio, which is what the concept slots cost (the slot rows'
      writes, a prompt 19 tokens longer, the per-request ``allowed_token_ids`` or logits mask);

3. with ``--face-photos N``: the face stages alone over N sample photos (benchmarks/face_stages.py's pipeline
   side, with the config's ``detect`` settings, ``detect.device`` included): photos per second, Ray's start
   and the models' loading included.

A step that fails (out of memory, an engine that cannot run here) is reported with its exit code and the
last lines it printed, and the others go on. The figures go into this benchmark's section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import (  # noqa: E402
    Meter,
    Recorder,
    add_results_option,
    gpu_memory_used,
    header,
    peak_rss,
    tree_of,
)

DATA = REPO.parent / "shared" / "data" / "yollava-humans"


# The child steps, each in a process of its own.


def step_enroll(run_config: str, banks: str, person: str, reference: str) -> dict:
    """Enroll ``person`` (user ``bench``); the parts' seconds and the process's peak RSS after each."""
    from pipelines.config import load_config
    from pipelines.enroll import Enroller
    from plvm_model.store.banks import BankStore

    parts = {}
    started = time.perf_counter()
    config = load_config(run_config, random_weights=True, bank=banks)
    enroller = Enroller(config)
    parts["face models"] = (time.perf_counter() - started, peak_rss())
    mark = time.perf_counter()
    enroller.encoder  # noqa: B018 - builds DINOv2-base and the Aligner, with random weights
    parts["DINOv2-base + Aligner built"] = (time.perf_counter() - mark, peak_rss())
    mark = time.perf_counter()
    enroller.enroll("bench", person, [reference])
    parts["enroll (face stages, DINOv2, Aligner, bank commit)"] = (time.perf_counter() - mark, peak_rss())
    concept = BankStore(banks).load("bench").concepts[0]
    return {
        "parts": parts,
        "soft_tokens": list(concept.soft_tokens.shape),
        "head_weight": list(concept.head_weight.shape),
        "dinov2_hidden": enroller.encoder.dinov2.config.hidden_size,
    }


def image_features(engine, pixels):
    """The photos' features as the engine computes them: (photos, image tokens, hidden)."""
    import torch

    with torch.inference_mode():
        if engine.name == "vllm":
            return engine.encoders.image_features(pixels.to(engine.encoders.embed_tokens.weight))
        out = engine.model.model.get_image_features(pixel_values=pixels.to(engine.device, engine.dtype),
                                                    return_dict=True).pooler_output  # fmt: skip
        return torch.stack(list(out))


def step_engine(generate_json: str, llava: str, concept_npz: str, photos: list[str], rounds: int) -> dict:
    """Load the engine with random weights, check the layout at the real offsets, time with and without the
    concept (``rounds`` times each)."""
    import numpy as np
    import torch

    from operators.decode import DecodeConfig, decode_image
    from operators.generate import GenerateConfig
    from plvm_model.engines import GenerationRequest, make_engine
    from plvm_model.injection import ConceptTokens

    generate = GenerateConfig.model_validate_json(Path(generate_json).read_text())
    torch.set_num_threads(generate.resources.torch_threads())
    saved = np.load(concept_npz)
    concept = ConceptTokens(str(saved["name"]), saved["soft_tokens"], saved["head_weight"])
    out: dict = {"parts": {}}
    started = time.perf_counter()
    engine = make_engine(generate.engine, **generate.engine_options(llava, random_weights=True))
    out["parts"]["load (random weights)"] = (time.perf_counter() - started, peak_rss())
    decode = DecodeConfig()
    images = [decode_image(Path(p).read_bytes(), decode.max_side, decode.max_pixels)[0] for p in photos]
    with_concept = [GenerationRequest(image, generate.caption, [concept]) for image in images]
    without = [GenerationRequest(image, generate.caption, []) for image in images]
    batch = engine.slot_batches(with_concept)[0][1]
    prompter = engine.prompter
    pixels = prompter.pixel_values(images)
    features = image_features(engine, pixels)
    prompt = prompter.tokenize(with_concept[0], batch.concept_ids[0])
    out["layout"] = {
        "vocabulary": prompter.vocab,
        "tokenizer": len(prompter.tokenizer),
        "image_token_id": prompter.image_token_id,
        "concept_token_ids": sorted({i for ids in batch.concept_ids for i in ids}),
        "image_tokens_in_prompt": prompt.input_ids.count(prompter.image_token_id),
        "prompt_tokens": len(prompt.input_ids),
        "pixels": list(pixels.shape),
        "image_features": list(features.shape),
        "model": engine.model_name,
    }
    mark = time.perf_counter()
    engine.generate_ids(with_concept[:1])
    engine.generate_ids(without[:1])
    out["parts"]["warm-up (1 request with, 1 without)"] = (time.perf_counter() - mark, peak_rss())
    timings: dict[str, list[tuple[float, int]]] = {"with": [], "without": []}
    for r in range(rounds):
        for kind in ("with", "without") if r % 2 == 0 else ("without", "with"):
            mark = time.perf_counter()
            ids = engine.generate_ids(with_concept if kind == "with" else without)
            timings[kind].append((time.perf_counter() - mark, sum(len(x) for x in ids)))
    out["parts"][f"generate, {len(images)} requests x {rounds} x 2"] = (
        sum(t for kind in timings.values() for t, _ in kind), peak_rss())
    out["timings"] = timings
    if torch.cuda.is_available():
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


# The parent: derived configs, the measured children, the report.


def derived_config(base: Path, llava: str | None = None) -> dict:
    """``base`` with the models set to the published configurations and random weights; ``llava``: another LLaVA
    configuration's folder instead (the Aligner's output then follows its width)."""
    data = yaml.safe_load(base.read_text()) or {}
    models = {**data.get("models", {}), "llava": llava or "published", "dinov2": "published", "aligner": "published",
              "random_weights": True}  # fmt: skip
    if llava:
        from plvm_model.myvlm import llava_hidden

        models["aligner_shape"] = {**models.get("aligner_shape", {}), "output_dim": llava_hidden(Path(llava))}
    data["models"] = models
    return data


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def measured(command: list[str], env: dict | None = None) -> tuple[Meter, int, str]:
    """Run ``command`` in a child process, measured with all its descendants; (meter, exit code, its output)."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})  # fmt: skip
        with Meter(tree_of(process), gpu=gpu_memory_used() is not None) as meter:
            code = process.wait()
        out.seek(0)
        return meter, code, out.read()


def child(step: str, *args: str, python: str = sys.executable, env: dict | None = None) -> tuple[Meter, int, dict]:
    """A child step of this script; (meter, exit code, what it printed as its last JSON line, or its tail)."""
    meter, code, output = measured([python, __file__, "--step", step, *args], env=env)
    lines = output.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if code == 0 else {"failed": lines[-12:]}
    except (json.JSONDecodeError, IndexError):
        result = {"failed": lines[-12:]}
    return meter, code, result


def gib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**30:.1f}"


def kinds(meter: Meter, top: int = 3) -> str:
    """The largest peaks of the kinds of process, in GiB."""
    largest = sorted(meter.peak_by_kind.items(), key=lambda item: -item[1])[:top]
    return ", ".join(f"{kind} {gib(rss)}" for kind, rss in largest)


def row(step: str, meter: Meter, code: int, what: str) -> str:
    status = "" if code == 0 else f"**failed (exit {code})**: "
    return (f"| {step} | {meter.wall:.0f} | {gib(meter.peak)} | {gib(meter.peak_gpu)} | {meter.others:.1f} | "
            f"{status}{what} |")  # fmt: skip


def caption_step(name: str, run_yaml: str, banks: str, photos_glob: str, work: Path, engine: str) -> tuple:
    """``plvm caption`` of the photos with the run's config; (meter, code, summary, checks of the rows)."""
    from plvm_model.store.output_schema import output_schema
    from plvm_model.store.output_table import OutputTable, read_output

    output = work / f"out-{name}"
    command = [sys.executable, "-m", "pipelines.cli", "caption", "--config", run_yaml, "--random-weights",
               "--engine", engine, "--bank", banks, "--user", "bench", "--input", photos_glob,
               "--output", str(output)]  # fmt: skip
    meter, code, printed = measured(command)
    lines = printed.strip().splitlines()
    if code != 0:
        return meter, code, {"failed": lines[-12:]}, {}
    summary = json.loads(lines[-1])
    table = read_output(str(output))
    rows = table.to_pylist()
    checks = {
        "full schema": table.schema.names == output_schema().names,
        "rows marked (model)": all(r["model"].endswith("(random weights)") for r in rows),
        "table metadata marked": OutputTable(str(output)).holds_random_weights(),
        "rows with the person": sum(bool(r["concepts"]) for r in rows),
        "rows": len(rows),
        "errors": [r["error"] for r in rows if r["error"]],
    }
    return meter, code, summary, checks


def stage_figures(summary: dict) -> str:
    stages = summary.get("stages", {})
    parts = [f"{stage} {c.get('seconds', 0):.1f} s" for stage, c in stages.items() if c.get("seconds", 0) >= 0.05]
    generate = stages.get("generate", {})
    tokens, seconds = generate.get("new_tokens", 0), generate.get("seconds", 0)
    rate = f"; generate: {tokens:g} new tokens for {generate.get('prompts', 0):g} prompts, {tokens / seconds:.2f} " \
           "tokens/s (prefill and vision tower included)" if seconds else ""
    return "stage seconds in their workers: " + ", ".join(parts) + rate


def engine_figures(result: dict) -> list[str]:
    layout, timings = result["layout"], result["timings"]
    lines = [
        f"layout: vocabulary {layout['vocabulary']} rows (tokenizer {layout['tokenizer']}, `<image>` "
        f"{layout['image_token_id']}), concept token id(s) {layout['concept_token_ids']}, "
        f"{layout['image_tokens_in_prompt']} image tokens in a {layout['prompt_tokens']}-token prompt, pixels "
        f"{layout['pixels']}, image features {layout['image_features']}, model `{layout['model']}`",
    ]
    rates = {}
    for kind, runs in timings.items():
        seconds, tokens = sum(t for t, _ in runs), sum(n for _, n in runs)
        rates[kind] = (seconds / len(runs), tokens / seconds if seconds else 0.0)
        lines.append(f"{kind} her concept: {rates[kind][0]:.1f} s per batch, {rates[kind][1]:.2f} new tokens/s")
    if rates["without"][0]:
        lines.append(f"concept slots' cost: **{rates['with'][0] / rates['without'][0]:.2f}x** the time of the same "
                     f"requests without the concept (tokens/s {rates['with'][1] / rates['without'][1]:.2f}x)")
    if "cuda_max_allocated" in result:
        lines.append(f"torch's peak CUDA allocation in the process: {gib(result['cuda_max_allocated'])} GiB")
    return lines


def parts_figures(result: dict) -> str:
    return "; ".join(f"{part} {seconds:.1f} s (peak RSS {gib(rss)} GiB)" for part, (seconds, rss)
                     in result["parts"].items())  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "full-size-cpu.yaml"))
    parser.add_argument("--runs", default="transformers,vllm",
                        help="ENGINE[:QUANTIZATION] of each caption run, comma-separated (default transformers,vllm)")
    parser.add_argument("--photos", type=int, default=4, help="photos of the person captioned (1-10)")
    parser.add_argument("--person", default="thao", help="the sample person enrolled and captioned")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds of each engine with and without")
    parser.add_argument("--alone", default="transformers,vllm",
                        help="the engines also run alone (step 2b), comma-separated (default: both)")
    parser.add_argument("--face-photos", type=int, default=0,
                        help="also time the face stages alone over this many sample photos (0: not)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--llava", help="another LLaVA configuration's folder than the published one (a reduced "
                                        "one, for a quick check of this script; the Aligner follows its width)")
    parser.add_argument("--step", choices=("enroll", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()
    if args.step:
        if args.step == "engine":
            print(json.dumps(step_engine(*args.args[:3], photos=args.args[3:], rounds=args.rounds)))
        else:
            print(json.dumps(step_enroll(*args.args)))
        return
    if not 1 <= args.photos <= 10:
        parser.error("--photos: 1 to 10 (the sample photos 0.jpg ... 9.jpg of one person)")
    runs = [tuple(r.split(":", 1)) if ":" in r else (r, None) for r in args.runs.split(",") if r]
    for engine, _ in runs:
        if engine not in ("transformers", "vllm"):
            parser.error(f"--runs: unknown engine {engine!r} (transformers or vllm)")
    person = Path(args.data) / args.person
    reference = person / "ref_img.jpg"
    photos = [str(person / f"{i}.jpg") for i in range(args.photos)]
    if not reference.exists() or not all(Path(p).exists() for p in photos):
        raise SystemExit(f"{person}: needs ref_img.jpg and 0.jpg ... {args.photos - 1}.jpg")

    from pipelines.config import load_config
    from plvm_model.store.banks import BankStore

    with tempfile.TemporaryDirectory(prefix="full-size-") as tmp:
        work = Path(tmp)
        data = derived_config(Path(args.config), args.llava)
        run_yaml = write_yaml(work / "run.yaml", data)
        config = load_config(run_yaml, random_weights=True)
        banks = str(work / "banks")
        record = Recorder(__file__, args.results)
        print(header("The real model at full size with random weights (`benchmarks/full_size.py`)"))
        print(f"- command: `{' '.join(['benchmarks/full_size.py', *sys.argv[1:]])}`")
        llava = f"the LLaVA of {args.llava}" if args.llava else "LLaVA-1.5-7B"
        print(f"- models: {llava}, DINOv2-base and the Aligner from their published configurations with random "
              f"weights; generate: dtype {config.generate.dtype} on {config.generate.device}, "
              f"{config.generate.max_new_tokens} new tokens at most, greedy; {args.photos} photos of "
              f"{args.person} after her enrollment from one reference photo")
        print("- each step a fresh process, measured from outside with all its descendants: wall seconds, peak RSS "
              "of the process tree in GiB, peak GPU memory in use on the machine in GiB (nvidia-smi), and the CPUs "
              "that other processes kept busy meanwhile (others)\n", flush=True)
        print("| step | wall s | peak RSS | peak GPU | others | what |")
        print("|---|---|---|---|---|---|")
        notes: list[str] = []
        meter, code, result = child("enroll", run_yaml, banks, args.person.capitalize(), str(reference))
        if code == 0:
            what = (f"soft tokens {result['soft_tokens']}, head weight {result['head_weight']} from DINOv2's "
                    f"{result['dinov2_hidden']}-wide features")  # fmt: skip
            notes.append(f"enroll, by part (peak RSS so far): {parts_figures(result)}")
        else:
            what = " / ".join(result["failed"][-3:])
        print(row("enroll", meter, code, what), flush=True)
        if code != 0:
            record.write()
            raise SystemExit("the enrollment failed: nothing to caption")
        concept = BankStore(banks).load("bench").concepts[0]
        import numpy as np

        concept_npz = str(work / "concept.npz")
        np.savez(concept_npz, name=concept.name, soft_tokens=concept.soft_tokens, head_weight=concept.head_weight)
        photos_glob = str(person / f"[0-{args.photos - 1}].jpg")
        llava_folder = config.model_paths().llava
        for engine, quantization in runs:
            name = engine + (f":{quantization}" if quantization else "")
            generate = config.generate.model_copy(update={"engine": engine, "quantization": quantization})
            run_data = {**data, "generate": {**data.get("generate", {}), "quantization": quantization}}
            this_yaml = write_yaml(work / f"run-{name.replace(':', '-')}.yaml", run_data)
            meter, code, summary, checks = caption_step(name.replace(":", "-"), this_yaml, banks, photos_glob, work,
                                                        engine)  # fmt: skip
            if code == 0:
                what = (f"{summary['rows']} rows, {summary['wall_s']:.0f} s in the run; generate actor peak "
                        f"{gib(meter.peak_by_kind.get('actor Generate'))} GiB")  # fmt: skip
                notes.append(f"caption {name}: {stage_figures(summary)}; rows checked: {checks}; largest processes "
                             f"(GiB): {kinds(meter)}")  # fmt: skip
            else:
                what = " / ".join(summary["failed"][-3:])
            print(row(f"caption {name}", meter, code, what), flush=True)
            if engine not in args.alone.split(","):
                continue
            generate_json = work / f"generate-{name.replace(':', '-')}.json"
            generate_json.write_text(generate.model_dump_json())
            runtime = generate.runtime_env() or {}  # vLLM's own Python and variables, as its actors get them
            meter, code, result = child("engine", "--rounds", str(args.rounds), str(generate_json), llava_folder,
                                        concept_npz, *photos, python=runtime.get("py_executable", sys.executable),
                                        env=runtime.get("env_vars"))  # fmt: skip
            if code == 0:
                what = "; ".join(engine_figures(result)[1:])
                notes.append(f"engine {name} alone: {engine_figures(result)[0]}; by part: {parts_figures(result)}")
            else:
                what = " / ".join(result["failed"][-3:])
            print(row(f"engine {name} alone", meter, code, what), flush=True)
        if args.face_photos:
            print(row(*face_stages(config, data, work, banks, Path(args.data), args.face_photos)), flush=True)
        print()
        for note in notes:
            print(f"- {note}")
        record.write()


def face_stages(config, data: dict, work: Path, banks: str, root: Path, n: int) -> tuple:
    """The face stages alone over ``n`` sample photos, with the run's detect settings (face_stages.py's pipeline)."""
    from benchmarks.face_stages import measure

    files = sorted(str(p) for p in root.glob("*/[0-9]*.jpg"))
    paths = (files * (n // max(1, len(files)) + 1))[:n]
    photos_file = work / "face-photos.txt"
    photos_file.write_text("\n".join(paths))
    faces = {k: v for k, v in data.items() if k != "models"}  # the face stages read no LLaVA, DINOv2 or Aligner
    meter, named = measure("pipeline", str(photos_file), write_yaml(work / "faces.yaml", faces), banks)
    what = (f"{n} photos, **{n / meter.wall:.2f} photos/s** (Ray's start and the models' loading included), "
            f"{named} faces named; detect.device {config.detect.device}")  # fmt: skip
    return "face stages", meter, 0, what


if __name__ == "__main__":
    main()
