#!/usr/bin/env bash
# benchmarks/full_size.py on a GPU machine, in under 5 minutes: LLaVA-1.5-7B, DINOv2-base and the PLVM Aligner
# with random weights (nothing to download), configs/llava-1.5-7b.yaml as it is (vLLM in float16 with its
# gpu_memory_utilization), except that MTCNN runs on the GPU (detect.device: cuda) and the GPU is shared between
# the detect actors and the engine's actor. Runs, in order:
#   1. the enrollment of one person (DINOv2-base and the Aligner on the GPU, models.device);
#   2. vLLM: a caption run of 4 photos, then the engine alone with and without the person's concept (the concept
#      slots' cost, as a ratio);
#   3. the transformers engine in 8-bit, then in 4-bit (bitsandbytes): a caption run of 4 photos each;
#   4. the face stages alone over 200 sample photos, MTCNN on the GPU: photos per second.
# Each step prints its wall time, peak RSS and peak GPU memory (nvidia-smi); the figures go into
# benchmarks/RESULTS.md (its section benchmarks/full_size.py), headed by the GPU's name.
#
#   benchmarks/full_size_gpu.sh                  # with .venv/bin/python (PYTHON=... for another)
#   benchmarks/full_size_gpu.sh --results -      # print only
# Needs vLLM in that Python (pip install -e ".[vllm]"), bitsandbytes, and the sample photos (DATA=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/yollava-humans}
BUDGET_S=${BUDGET_S:-290}
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "full_size_gpu.sh: no GPU here (nvidia-smi finds none); benchmarks/full_size.py runs on CPU" >&2
    exit 2
fi
CONFIG=$(mktemp --suffix=.yaml)
trap 'rm -f "$CONFIG"' EXIT
"$PYTHON" - "$CONFIG" <<'EOF'
import sys

import yaml

data = yaml.safe_load(open("configs/llava-1.5-7b.yaml"))
detect = data.setdefault("detect", {})
detect["device"] = "cuda"
# Ray places every actor before the run starts: 4 detect actors and the engine's must fit on one GPU together
detect["resources"] = {**detect.get("resources", {}), "num_gpus": 0.05}
data["generate"]["resources"] = {**data["generate"].get("resources", {}), "num_gpus": 0.75}
yaml.safe_dump(data, open(sys.argv[1], "w"), sort_keys=False)
EOF
PYTHONPATH=$PWD timeout "$BUDGET_S" "$PYTHON" benchmarks/full_size.py --config "$CONFIG" --data "$DATA" \
    --runs vllm,transformers:8bit,transformers:4bit --alone vllm --photos 4 --rounds 2 --face-photos 200 "$@"
