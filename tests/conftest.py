"""Shared fixtures: offline environment, a private cache directory, tiny random models."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Set before anything imports transformers / wandb / bridgectl, so no test can reach the network or ~/.cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
_SESSION_CACHE = tempfile.mkdtemp(prefix="bridgectl-test-cache-")
os.environ["BRIDGECTL_CACHE"] = _SESSION_CACHE
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)  # also after --collect-only or a crash

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

TINY_MODEL_CFG = SimpleNamespace(hidden_size=32, num_layers=1, num_heads=2, max_positions=96)


@pytest.fixture(scope="session", autouse=True)
def bridgectl_cache():
    """The session's private BRIDGECTL_CACHE (set at import time, before bridgectl is imported; removed at exit)."""
    assert os.environ["BRIDGECTL_CACHE"] == _SESSION_CACHE
    return Path(_SESSION_CACHE)


@pytest.fixture(autouse=True)
def _isolate_user_recipes():
    """`recipe=path.yaml` registers the file process-wide; forget it after each test so tests stay independent."""
    from bridgectl.config import schema

    saved = set(schema.user_recipes)
    yield
    schema.user_recipes.clear()
    schema.user_recipes.update(saved)


@pytest.fixture(scope="session")
def tokenizer():
    from bridgectl.models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A tiny random Llama (not the shipped weights), in eval mode, on one CPU thread."""
    import torch

    from bridgectl.models.tiny import build_model

    torch.set_num_threads(1)
    model = build_model(TINY_MODEL_CFG, len(tokenizer), seed=0)
    model.eval()
    return model


@pytest.fixture
def task_cfg():
    """The default `task` section, typed by the dataclass schema (a fresh copy per test)."""
    from omegaconf import OmegaConf

    from bridgectl.config.compose import Config

    return OmegaConf.structured(Config).task


def shipped_recipe(name: str) -> dict:
    """What a shipped recipe YAML asks for, read straight from the file: its stages, its train.max_steps, and each
    stage's exact share of the steps (None where the share is not a whole number)."""
    from omegaconf import OmegaConf

    from bridgectl.config.schema import CONF_DIR, TrainConfig

    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "recipe" / f"{name}.yaml"))
    stages = list(raw["recipe"]["stages"])
    max_steps = raw.get("train", {}).get("max_steps", TrainConfig().max_steps)
    fractions = raw["recipe"].get("fractions") or [1] * len(stages)
    shares = [max_steps * f / sum(fractions) for f in fractions]
    exact = [int(s) if abs(s - round(s)) < 1e-9 else None for s in shares]
    return {"name": raw["recipe"]["name"], "stages": stages, "max_steps": max_steps, "budgets": exact}


@pytest.fixture
def training_refused(monkeypatch):
    """A stand-in runner for tests of bad input, which must be refused before any training: a started run fails at
    once (exit 1, not 2) instead of training for minutes. The fixture's value lists the runs that were started."""
    import sys
    import types

    started = []

    def refuse(cfg, run_path, show_progress=True, resume=False, tags=None):
        started.append(run_path)
        raise RuntimeError("training was started")

    monkeypatch.setitem(sys.modules, "bridgectl.training.runner", types.SimpleNamespace(run=refuse))
    return started
