"""Built-in model `tiny`: a ~1M-parameter Llama with a character-level tokenizer, pretrained on task text.

The base weights come from a short deterministic pretraining run on the `arith` task's own text (never on its test
bucket): mostly direct answers (`4+9*3=#1`) and a minority of step-by-step traces at every length. That mixture is
what makes every recipe have something to do (measured; docs/quickstart.md's "The built-in task and model"):
  - greedy decoding answers directly and gets a minority of problems right, so SFT on traces has something to teach;
  - sampling at temperature 1 writes a trace some of the time, and those traces are right far more often than direct
    answers, so RL from the base has something to discover.

The weights for the default settings ship inside the package (`bridgectl/assets/tiny-base/`), so a fresh machine's
first run needs no pretraining; any other setting (a different modulus, model size or pretraining budget) is built
on first use into `$BRIDGECTL_CACHE` (default `~/.cache/bridgectl`) with a progress bar. `bridgectl build-tiny`
rebuilds the shipped weights exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bridgectl.core.losses import make_sft_batch
from bridgectl.core.ui import console, progress_bar
from bridgectl.tasks.arith import ArithTask

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list("0123456789+-*=;#")
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-base"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer that saves and loads like any transformers tokenizer (tokenizer.json)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # Like Llama tokenizers: BOS is prepended when special tokens are requested.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_model(model_cfg, vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=4 * model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def pretrain_fingerprint(model_cfg, task_cfg) -> dict:
    """Everything the pretrained weights depend on; the cache key is its hash."""
    return {
        "model": {k: getattr(model_cfg, k) for k in ("hidden_size", "num_layers", "num_heads", "max_positions")},
        "pretrain": asdict(model_cfg.pretrain)
        if hasattr(model_cfg.pretrain, "__dataclass_fields__")
        else dict(model_cfg.pretrain),
        "task": {
            "modulus": task_cfg.modulus,
            "max_operand": task_cfg.max_operand,
            "pretrain_ops": list(task_cfg.pretrain_ops),
        },
    }


def _fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def pretrain(model_cfg, task_cfg, out_dir: Path, show_progress: bool = True) -> Path:
    """Deterministic pretraining of the base model on task text; writes a transformers model directory."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the only one
    spec = model_cfg.pretrain
    tokenizer = build_tokenizer()
    model = build_model(model_cfg, len(tokenizer), seed=spec.seed)
    problems = ArithTask(task_cfg).pretrain_problems(seed=spec.seed)
    rng = random.Random(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(  # (steps=0 keeps the random init: for benchmarks at scale)
        optimizer, max_lr=spec.lr, total_steps=max(1, spec.steps), pct_start=0.05, anneal_strategy="cos"
    )
    model.train()
    with progress_bar(enabled=show_progress) as progress:
        task_id = progress.add_task("pretraining tiny base", total=spec.steps, info="")
        for _ in range(spec.steps):
            n_trace = sum(rng.random() < spec.trace_fraction for _ in range(spec.batch_size))
            batch = [next(problems) for _ in range(spec.batch_size)]
            # Traces and direct answers go in separate sub-batches so short rows are not padded to trace length.
            loss_total, token_total = 0.0, 0
            for sub_batch, with_trace in ((batch[:n_trace], True), (batch[n_trace:], False)):
                if not sub_batch:
                    continue
                # the question is not scored: its digits are random, there is nothing to learn from them
                batch = make_sft_batch(
                    tokenizer,
                    [p.question for p in sub_batch],
                    [p.trace_completion if with_trace else p.direct_completion for p in sub_batch],
                    device="cpu",
                )
                input_ids, labels = batch.input_ids, batch.labels
                logits = model(input_ids=input_ids, attention_mask=batch.attention_mask).logits
                token_loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)),
                    labels[:, 1:].reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                loss_total = loss_total + token_loss
                token_total += int((labels[:, 1:] != -100).sum())
            loss = loss_total / token_total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            progress.update(task_id, advance=1, info=f"loss {loss.item():.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "pretrain.json").write_text(json.dumps(pretrain_fingerprint(model_cfg, task_cfg), indent=2))
    return out_dir


def cache_root() -> Path:
    return Path(os.environ.get("BRIDGECTL_CACHE", Path.home() / ".cache" / "bridgectl"))


def base_model_dir(model_cfg, task_cfg, show_progress: bool = True) -> Path:
    """The directory of pretrained base weights for these settings: shipped, cached, or built now."""
    fingerprint = pretrain_fingerprint(model_cfg, task_cfg)
    shipped = SHIPPED_DIR / "pretrain.json"
    if shipped.exists() and json.loads(shipped.read_text()) == fingerprint:
        return SHIPPED_DIR
    cached = cache_root() / f"tiny-{_fingerprint_hash(fingerprint)}"
    if not (cached / "pretrain.json").exists():
        console.print(f"Building the tiny base model for these settings (once) into {cached}")
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        pretrain(model_cfg, task_cfg, tmp, show_progress=show_progress)
        try:
            tmp.rename(cached)  # atomic: a killed build never leaves a half-written cache entry
        except OSError:  # another process finished the same build first: theirs is identical (deterministic)
            shutil.rmtree(tmp, ignore_errors=True)
    return cached
