"""The built-in tiny model: the shipped base matches the default settings (so a fresh machine never pretrains),
other settings are built once into the cache, deterministically, and pretraining teaches the task."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bridgectl.config.compose import compose
from bridgectl.core.losses import make_sft_batch, sft_loss
from bridgectl.core.rollout import generate
from bridgectl.models import tiny
from bridgectl.tasks.arith import ArithTask

SMALL = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.pretrain.steps=60",
    "model.pretrain.batch_size=32",
    "model.pretrain.lr=1e-2",
]


def test_default_settings_use_the_shipped_weights():
    cfg = compose([])
    assert tiny.base_model_dir(cfg.model, cfg.task, show_progress=False) == tiny.SHIPPED_DIR
    shipped = json.loads((tiny.SHIPPED_DIR / "pretrain.json").read_text())
    assert shipped == tiny.pretrain_fingerprint(cfg.model, cfg.task)


def test_shipped_base_has_headroom_and_writes_traces_when_sampling():
    cfg = compose([])
    model = AutoModelForCausalLM.from_pretrained(tiny.SHIPPED_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny.SHIPPED_DIR)
    tokenizer.padding_side = "left"
    problems = ArithTask(cfg.task).eval_problems("test", 100)
    questions = [p.question for p in problems]
    greedy = generate(model, tokenizer, questions, 48, greedy=True)
    accuracy = sum(ArithTask.reward(c, p.answer) for c, p in zip(greedy.completions, problems)) / len(problems)
    assert 0.05 <= accuracy <= 0.40  # some right, most not: SFT and RL have something to do
    sampled = generate(model, tokenizer, questions, 48, temperature=1.0, generator=torch.Generator().manual_seed(0))
    traces = [(c, p) for c, p in zip(sampled.completions, problems) if ";" in c]
    direct = [(c, p) for c, p in zip(sampled.completions, problems) if ";" not in c]
    assert 0.1 <= len(traces) / len(problems) <= 0.6
    trace_accuracy = sum(ArithTask.reward(c, p.answer) for c, p in traces) / len(traces)
    direct_accuracy = sum(ArithTask.reward(c, p.answer) for c, p in direct) / len(direct)
    assert trace_accuracy > direct_accuracy + 0.2  # what RL from the base can discover


def test_other_settings_build_once_into_the_cache_deterministically(bridgectl_cache, tmp_path):
    cfg = compose(SMALL)
    built = tiny.base_model_dir(cfg.model, cfg.task, show_progress=False)
    assert built != tiny.SHIPPED_DIR and built.parent == bridgectl_cache
    assert tiny.base_model_dir(cfg.model, cfg.task, show_progress=False) == built  # cached, not rebuilt
    again = tiny.pretrain(cfg.model, cfg.task, tmp_path / "again", show_progress=False)
    first, second = load_file(built / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert AutoTokenizer.from_pretrained(built)("1+2=")["input_ids"][0] == 1  # BOS, loads like any tokenizer


def test_pretraining_lowers_the_loss_on_held_out_task_text(bridgectl_cache):
    cfg = compose(SMALL)
    tokenizer = tiny.build_tokenizer()
    untrained = tiny.build_model(cfg.model, len(tokenizer), seed=cfg.model.pretrain.seed)
    trained = AutoModelForCausalLM.from_pretrained(tiny.base_model_dir(cfg.model, cfg.task, show_progress=False))
    problems = ArithTask(cfg.task).eval_problems("test", 64)
    batch = make_sft_batch(tokenizer, [p.question for p in problems], [p.trace_completion for p in problems], "cpu")
    with torch.no_grad():
        assert sft_loss(trained, batch) < 0.7 * sft_loss(untrained, batch)


def test_zero_pretraining_steps_keep_the_random_initialisation(tmp_path):
    cfg = compose([*SMALL, "model.pretrain.steps=0"])
    built = tiny.pretrain(cfg.model, cfg.task, tmp_path / "random", show_progress=False)
    expected = tiny.build_model(cfg.model, len(tiny.build_tokenizer()), seed=cfg.model.pretrain.seed).state_dict()
    saved = load_file(built / "model.safetensors")
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
