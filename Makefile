# bridgectl: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install demo test bench gpu-check clean

install: $(VENV)/.installed

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(VENV)/bin/bridgectl run

test: install
	WANDB_MODE=disabled $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache

bench: install
	$(VENV)/bin/pip install -q -e '.[bench]'  # TRL, for the comparison with GRPOTrainer (benchmark only)
	$(PY) benchmarks/bench_bridge.py

# On a GPU machine: a ~0.5B-parameter model (Qwen2.5-0.5B's shape, random weights) through rl and bridge steps in
# bf16; writes benchmarks/gpu_results.md (step time, rollout tokens/s, peak memory). Not yet run on a GPU.
gpu-check: install
	$(PY) benchmarks/gpu_check.py
