"""Caption throughput of the two engines on the same requests, run as the pipeline's generate stage runs them.

    .venv/bin/python benchmarks/engines.py [--photos N] [--batches 1,16,64] [--rounds R] [--threads T]
                                           [--new-tokens T] [--config configs/local.yaml] [--data DIR]

The requests: the sample people are enrolled from their references (tiny DINOv2 + Aligner),
and each photo (decoded as the decode stage does) gets a caption request with one or two
of their concepts. Each engine runs in a Ray actor, as in the pipeline: the transformers
engine in this environment, vLLM in its own (``generate.vllm.python``), each with the same
number of torch threads (default: the config's generate threads, as the pipeline's actors
run), the config's dtype, quantization and device, and its CPU (and GPU) share. An engine
gets the requests in batches of B, one batch after the other, as the generate stage sends
its batches (B = 16 is that stage's batch in ``configs/local.yaml``: 8 photos x 2 prompts).

Not timed: loading the engines, and a warm-up batch of each size for each engine. Timed:
R rounds over all requests per batch size, alternating which engine goes first, so that
a change of the machine's load falls on both; the table gives each engine's median round
(requests/s, new tokens/s) and the ratio of the medians. Both engines must produce the
same tokens for every request (greedy decoding): the run fails when they do not.

The figures are for the tiny random LLaVA on CPU: they measure the engines' per-request
overhead, not what either engine does with a 7B model on a GPU (see docs/engines.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import Meter, Recorder, add_results_option, header  # noqa: E402
from operators.decode import decode_image  # noqa: E402
from pipelines.config import Config, load_config  # noqa: E402
from pipelines.runner.runtime import init_ray  # noqa: E402
from plvm_model.concepts import ConceptEncoder  # noqa: E402
from plvm_model.engines import GenerationRequest  # noqa: E402
from plvm_model.injection import ConceptTokens  # noqa: E402

ENGINES = ("transformers", "vllm")


def requests_for(config: Config, photos_dir: Path, n: int) -> list[GenerationRequest]:
    paths = config.model_paths()
    encoder = ConceptEncoder(paths.dinov2, paths.aligner, paths.aligner_shape)
    people = sorted(p for p in photos_dir.iterdir() if (p / "ref_img.jpg").exists())
    if not people:
        raise SystemExit(f"no people (PERSON/ref_img.jpg) under {photos_dir}")
    concepts = [
        ConceptTokens(p.name, *encoder.encode(np.asarray(Image.open(p / "ref_img.jpg").convert("RGB")), None))
        for p in people
    ]
    photos = sorted(f for p in people for f in p.glob("[0-9]*.jpg"))
    out = []
    for i in range(n):
        pixels, _, _ = decode_image(
            photos[i % len(photos)].read_bytes(), config.decode.max_side, config.decode.max_pixels
        )
        chosen = [concepts[i % len(concepts)]] + ([concepts[(i + 1) % len(concepts)]] if i % 2 else [])
        out.append(GenerationRequest(pixels, config.generate.caption, chosen))
    return out


def start_engines(config: Config, threads: int, new_tokens: int) -> dict:
    """One Ray actor per engine, loaded with the config's generate options, with ``threads`` torch threads each."""
    import ray

    from plvm_model.engines.transformers_engine import TransformersEngine
    from plvm_model.engines.vllm_engine import VLLMEngine

    generate = config.generate.model_copy(update={"max_new_tokens": new_tokens})
    llava = config.model_paths().llava
    env = {**generate.vllm.env, "OMP_NUM_THREADS": str(threads)}
    vllm = generate.model_copy(update={"engine": "vllm", "vllm": generate.vllm.model_copy(update={"env": env})})
    transformers = generate.model_copy(update={"engine": "transformers"})
    share = {"num_cpus": generate.resources.num_cpus, "num_gpus": generate.resources.num_gpus or None}
    actors = {
        "transformers": ray.remote(TransformersEngine)
        .options(**share, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
        .remote(**transformers.engine_options(llava)),
        "vllm": ray.remote(VLLMEngine)
        .options(**share, runtime_env=vllm.runtime_env())
        .remote(**vllm.engine_options(llava)),
    }
    # waits for both to load, and says what each really runs with
    used = {name: ray.get(actor.__ray_call__.remote(torch_threads)) for name, actor in actors.items()}
    print(f"- torch threads in the engines' actors: {', '.join(f'{k} {v}' for k, v in used.items())}", flush=True)
    return actors


def torch_threads(_engine) -> int:
    import torch

    return torch.get_num_threads()


def run(actor, batches: list) -> list[list[int]]:
    """Token ids of every request, the batches sent one after the other."""
    import ray

    return [ids for batch in batches for ids in ray.get(actor.generate_ids.remote(batch))]


def measure(actors: dict, requests: list[GenerationRequest], batch: int, rounds: int) -> dict:
    """Per engine: the rounds' (seconds, new tokens, CPUs used by other processes), and the token ids."""
    import ray

    batches = [ray.put(requests[i : i + batch]) for i in range(0, len(requests), batch)]
    for actor in actors.values():
        run(actor, batches[:1])  # warm-up
    timings: dict[str, list[tuple[float, int, float]]] = {name: [] for name in actors}
    ids: dict[str, list[list[int]]] = {}
    for r in range(rounds):
        for name in ENGINES if r % 2 == 0 else ENGINES[::-1]:
            with Meter() as meter:
                ids[name] = run(actors[name], batches)
            timings[name].append((meter.wall, sum(len(x) for x in ids[name]), meter.others))
    del batches
    return {"timings": timings, "ids": ids}


def table_row(batch: int, result: dict, n: int) -> tuple[str, bool]:
    """The table's row for one batch size, and whether both engines gave the same tokens."""
    rates, ranges, tokens, others = {}, {}, {}, []
    for name, rounds in result["timings"].items():
        per_round = [n / seconds for seconds, _, _ in rounds]
        rates[name] = statistics.median(per_round)
        ranges[name] = f"{rates[name]:.1f} ({min(per_round):.1f}-{max(per_round):.1f})"
        tokens[name] = rates[name] * rounds[-1][1] / n
        others += [o for _, _, o in rounds]
    ids = result["ids"]
    differ = sum(a != b for a, b in zip(ids["transformers"], ids["vllm"]))
    same = differ == 0 and len(ids["transformers"]) == len(ids["vllm"])
    ratio = rates["vllm"] / rates["transformers"]
    return (
        f"| {batch} | {ranges['transformers']} | {ranges['vllm']} | **{ratio:.2f}x** "
        f"| {tokens['transformers']:.0f}, {tokens['vllm']:.0f} | {min(others):.1f}-{max(others):.1f} "
        f"| {'yes' if same else f'NO: {differ} of {n} differ'} |"
    ), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=64, help="requests (one per photo, the photos cycled)")
    parser.add_argument("--batches", default=None, help="batch sizes, comma-separated (default: 1, the generate "
                        "stage's batch, all requests at once)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per engine (default: the config's)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "yollava-humans"))
    add_results_option(parser)
    args = parser.parse_args()
    config = load_config(args.config)
    threads = args.threads or config.generate.resources.torch_threads()
    stage_batch = config.generate.resources.batch_size * len(config.generate.prompts())
    batches = [int(b) for b in args.batches.split(",")] if args.batches else sorted({1, stage_batch, args.photos})

    record = Recorder(__file__, args.results)
    print(header("Engines: tiny LLaVA on CPU, transformers and vLLM (`benchmarks/engines.py`)"))
    print(f"- command: `{' '.join(['benchmarks/engines.py', *sys.argv[1:]])}`")
    print(f"- {args.photos} caption requests with 1-2 concepts each, up to {args.new_tokens} new tokens, greedy; "
          f"each engine in a Ray actor with {threads} torch thread(s); {args.rounds} rounds, median (range); "
          "other processes' CPUs: how many CPUs the rest of the machine kept busy meanwhile", flush=True)  # fmt: skip
    requests = requests_for(config, Path(args.data), args.photos)
    init_ray(config.ray)
    actors = start_engines(config, threads, args.new_tokens)

    print("\n| batch | transformers requests/s | vLLM requests/s | vLLM / transformers "
          "| new tokens/s (transformers, vLLM) | other processes' CPUs | same tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|", flush=True)
    identical = True
    for batch in batches:
        line, same = table_row(batch, measure(actors, requests, batch, args.rounds), len(requests))
        print(line, flush=True)
        identical &= same
    if not identical:
        raise SystemExit("the engines generated different tokens for the same requests")

    record.write()

if __name__ == "__main__":
    main()
