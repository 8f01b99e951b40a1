# plvm-pipeline's image: the project installed by scripts/setup.sh (as CI installs it), run as the user plvm.
#   docker build -t plvm-pipeline:cpu .                            CPU: torch's CPU-only wheels
#   docker build -t plvm-pipeline:cuda --build-arg VARIANT=cuda .  CUDA: PyPI's CUDA torch at vLLM's pins, and vLLM
# The models are not in the image: mount them at /models, where configs/llava-1.5-7b.yaml looks
# (${PLVM_MODELS:-/models}: llava-1.5-7b-hf/, dinov2-base/, plvm/checkpoint.ckpt), e.g.
#   docker run --gpus all -v /data/models:/models:ro -v /data/photos:/photos plvm-pipeline:cuda \
#     caption --config configs/llava-1.5-7b.yaml --input /photos --output /photos/captions
# The same image runs as a Ray cluster's head and workers on KubeRay (deploy/, docs/deployment.md).
ARG PYTHON=3.11
FROM python:${PYTHON}-slim-bookworm

ARG VARIANT=cpu
# wget: KubeRay's health probes of a Ray pod run it (with bash)
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 plvm

WORKDIR /opt/plvm
COPY . .
RUN case "$VARIANT" in \
      cpu)  PIP_NO_CACHE_DIR=1 scripts/setup.sh --extras "" --torch-index https://download.pytorch.org/whl/cpu ;; \
      cuda) PIP_NO_CACHE_DIR=1 scripts/setup.sh --extras vllm --torch "torch==2.13.0 torchvision==0.28.0" ;; \
      *) echo "VARIANT is cpu or cuda, not $VARIANT" >&2; exit 2 ;; \
    esac

ENV PATH=/opt/plvm/.venv/bin:$PATH \
    PLVM_CACHE=/home/plvm/.cache/plvm \
    RAY_USAGE_STATS_ENABLED=0
USER plvm
ENTRYPOINT ["plvm"]
CMD ["--help"]
