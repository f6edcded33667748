# The README's commands. Each sets up what it needs on a fresh machine, then runs.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU wheel of torch on the dev/CI machines; a machine that already has torch keeps its own.
TORCH_PIN ?= torch==2.13.0
OUT ?= samples.png

.PHONY: setup sample test bench gpu-check clean

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	@# --no-build-isolation skips pyproject's build requirements: bring ninja (fast extension builds).
	@$(PYTHON) -c "import ninja" 2>/dev/null || $(PIP) install -q ninja
	DDPM_FAST_REQUIRE_EXT=$${DDPM_FAST_REQUIRE_EXT:-1} $(PIP) install -q --no-build-isolation -e ".[test,data,plot,diffusers]"

sample: setup
	$(PYTHON) -m ddpm_fast sample --out $(OUT)

# One BLAS/OpenMP thread: the Triton interpreter's dots and torch's CPU kernels oversubscribe 2 cores.
test: setup
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q tests
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q benchmarks --benchmark-disable

bench: setup
	$(PYTHON) -m pytest benchmarks --benchmark-only

# On a lent GPU machine (torch preinstalled, no network): build, CUDA tests, benchmarks, profile in 480 s
# (scripts/gpu_check.sh --plan). No `setup` prerequisite: nothing may be pip-installed there; the script
# builds the extension in place and imports the package from this checkout. STAGES="..." picks stages.
gpu-check:
	bash scripts/gpu_check.sh $(STAGES)

clean:
	rm -rf build *.egg-info ddpm_fast/*.so .pytest_cache .benchmarks
