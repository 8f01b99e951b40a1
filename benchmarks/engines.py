"""Caption throughput of the two engines on the same photos, model and injected concepts.

    .venv/bin/python benchmarks/engines.py [--photos N] [--batch B] [--new-tokens T] [--config configs/local.yaml]

One run: the concepts are enrolled from the sample references (tiny Aligner), each photo
gets a caption request with one or two concepts, and the same requests go to the
transformers engine (in this process, batches of B) and to the vLLM engine (an actor in
the vLLM environment, all requests at once, as the pipeline's stage sends a batch). Both
are warmed up first. It prints requests/s and generated tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines.config import load_config  # noqa: E402
from pipelines.runtime import init_ray  # noqa: E402
from plvm_model.concepts import ConceptEncoder  # noqa: E402
from plvm_model.engines import GenerationRequest  # noqa: E402
from plvm_model.engines.transformers_engine import TransformersEngine  # noqa: E402
from plvm_model.injection import ConceptTokens  # noqa: E402


def requests_for(config, photos_dir: Path, n: int) -> list[GenerationRequest]:
    paths = config.model_paths()
    encoder = ConceptEncoder(paths.dinov2, paths.aligner, paths.aligner_shape)
    people = sorted(p for p in photos_dir.iterdir() if (p / "ref_img.jpg").exists())
    concepts = [
        ConceptTokens(p.name, encoder.encode(np.asarray(Image.open(p / "ref_img.jpg").convert("RGB")), None)[0])
        for p in people
    ]
    photos = sorted(f for p in people for f in p.glob("[0-9]*.jpg"))
    out = []
    for i in range(n):
        image = np.asarray(Image.open(photos[i % len(photos)]).convert("RGB"))
        chosen = [concepts[i % len(concepts)]] + ([concepts[(i + 1) % len(concepts)]] if i % 2 else [])
        out.append(GenerationRequest(image, config.generate.caption, chosen))
    return out


def timed(run, requests) -> tuple[float, int]:
    run(requests[:4])  # warm-up
    start = time.perf_counter()
    ids = run(requests)
    return time.perf_counter() - start, sum(len(x) for x in ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="transformers engine batch size")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--config", default=str(REPO / "configs" / "local.yaml"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "yollava-humans"))
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    config = load_config(args.config)
    generate = config.generate.model_copy(
        update={"engine": "vllm", "max_new_tokens": args.new_tokens, "vllm": config.generate.vllm.model_copy(
            update={"env": {**config.generate.vllm.env, "OMP_NUM_THREADS": str(threads)}})}
    )  # fmt: skip
    requests = requests_for(config, Path(args.data), args.photos)
    llava = config.model_paths().llava

    import torch

    torch.set_num_threads(threads)
    reference = TransformersEngine(**generate.model_copy(update={"engine": "transformers"}).engine_options(llava))

    def run_transformers(reqs):
        return [ids for i in range(0, len(reqs), args.batch) for ids in reference.generate_ids(reqs[i : i + args.batch])]

    results = {"transformers": timed(run_transformers, requests)}
    del reference

    init_ray(config.ray)
    import ray

    from plvm_model.engines.vllm_engine import VLLMEngine

    actor = (
        ray.remote(VLLMEngine)
        .options(num_cpus=0.5, runtime_env=generate.runtime_env())
        .remote(**generate.engine_options(llava))
    )
    results["vllm"] = timed(lambda reqs: ray.get(actor.generate_ids.remote(reqs)), requests)

    print(f"{len(requests)} caption requests, tiny LLaVA ({llava}), up to {args.new_tokens} new tokens, "
          f"{threads} CPU threads")  # fmt: skip
    rates = {}
    for name, (seconds, tokens) in results.items():
        rates[name] = (len(requests) / seconds, tokens / seconds)
        print(f"{name:13s} {rates[name][0]:7.2f} requests/s {rates[name][1]:8.1f} tokens/s ({tokens} tokens)")
    ratio = rates["vllm"][0] / rates["transformers"][0]
    print(f"ratio vllm/transformers: {ratio:.2f}x requests/s, {rates['vllm'][1] / rates['transformers'][1]:.2f}x tokens/s")


if __name__ == "__main__":
    main()
