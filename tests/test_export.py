"""`bridgectl export`: the exported directory, loaded by plain transformers (and peft for --adapter-only) in a
process where bridgectl cannot be imported, decodes greedily (transformers' own generate()) exactly the completions
that `bridgectl eval`'s path decodes from the run (full weights, LoRA, BRIDGE lower=lora and lower=full), and a
resumable checkpoint's export scores per problem what `bridgectl eval --checkpoint` scored; BRIDGE's two adapters
stacked into one equal the two; bad input exits 2; --push-to-hub sends the directory to the named repo (a stand-in
of the Hub API)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bridgectl.cli.app import app

TINY_RUN = [
    "train.threads=1",
    "train.max_steps=3",
    "train.eval_every=0",
    "rl.prompts_per_step=2",
    "rl.num_generations=2",
    "sft.batch_size=4",
    "eval.n=12",
]

# Runs in a fresh interpreter with bridgectl made unimportable: what a user without bridgectl has. Prints the
# greedy completions of the prompts, decoded with transformers' generate() and the exported generation config.
PLAIN_DECODE = r"""
import json, sys
sys.modules["bridgectl"] = None  # any import of bridgectl now raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
spec = json.loads(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(spec["dir"])
if spec["adapter"]:
    from peft import PeftModel
    base = json.load(open(spec["dir"] + "/adapter_config.json"))["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), spec["dir"])
else:
    model = AutoModelForCausalLM.from_pretrained(spec["dir"])
model.eval()
batch = tokenizer(spec["prompts"], return_tensors="pt", padding=True)
with torch.no_grad():
    # a peft adapter directory holds no generation config: the length is given as `bridgectl eval` decodes
    length = {"max_new_tokens": spec["max_new_tokens"]} if spec["adapter"] else {}
    out = model.generate(**batch, do_sample=False, **length)
print(json.dumps(tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)))
"""


def plain_completions(directory: Path, prompts: dict[str, list[str]], adapter: bool = False) -> dict[str, list[str]]:
    """{split: greedy completions} of the exported model, all splits decoded in one batch by one process."""
    rows = [prompt for split_prompts in prompts.values() for prompt in split_prompts]
    # 48: the tiny model's eval.max_new_tokens, which the merged export's generation config carries itself
    spec = json.dumps({"dir": str(directory), "prompts": rows, "adapter": adapter, "max_new_tokens": 48})
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_DECODE, spec],
        capture_output=True,
        text=True,
        cwd=directory,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    completions = json.loads(done.stdout.strip().splitlines()[-1])
    out, start = {}, 0
    for split, split_prompts in prompts.items():
        out[split], start = completions[start : start + len(split_prompts)], start + len(split_prompts)
    return out


def train(tmp_path: Path, recipe: list[str], *extra: str) -> Path:
    result = CliRunner().invoke(app, ["run", *recipe, *TINY_RUN, *extra, "--out", str(tmp_path), "--name", "r"])
    assert result.exit_code == 0, result.output
    return tmp_path / "r"


def export(run: Path, out: Path, *args: str):
    return CliRunner().invoke(app, ["export", str(run), "--out", str(out), *args])


def eval_reference(run: Path) -> tuple[dict, dict, object]:
    """{split: prompts}, {split: greedy completions} as `bridgectl eval RUN` decodes them (load_for_eval of the
    final weights, the model's own decoder), and the task (its verifier)."""
    from bridgectl.core.evaluate import model_decoder
    from bridgectl.models.sources import load_task
    from bridgectl.training.eval_run import config_for, load_for_eval

    cfg, final = config_for(str(run), [])
    task = load_task(cfg, show_progress=False)
    model, tokenizer = load_for_eval(cfg, final, torch.device("cpu"))
    decode = model_decoder(model, tokenizer)
    prompts = {split: [p.question for p in task.eval_problems(split, cfg.eval.n)] for split in task.eval_splits}
    completions = {split: decode(rows, cfg.eval.max_new_tokens).completions for split, rows in prompts.items()}
    return prompts, completions, task


def final_rewards(run: Path) -> dict:
    """Each problem's greedy reward at the run's last evaluation (eval_problems.jsonl)."""
    rows = [json.loads(line) for line in (run / "eval_problems.jsonl").read_text().splitlines()]
    last = max(row["step"] for row in rows)
    return {row["split"]: row["rewards"] for row in rows if row["step"] == last}


@pytest.mark.parametrize(
    "recipe, adapter_only",
    [  # full weights: bridge's (its adapter w merged into them)
        (["recipe=rl", "model.finetune=lora"], True),
        (["recipe=bridge", "model.finetune=lora"], True),
        (["recipe=bridge", "bridge.lower=full"], False),
    ],
)
@pytest.mark.slow
def test_export_decodes_what_the_run_evaluated(tmp_path, recipe, adapter_only):
    run = train(tmp_path, recipe)
    result = export(run, tmp_path / "model")
    assert result.exit_code == 0, result.output
    written = {p.name for p in (tmp_path / "model").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= written
    assert not any(name.startswith("adapter") for name in written)  # every adapter merged in
    prompts, reference, task = eval_reference(run)
    logged = final_rewards(run)
    exported = plain_completions(tmp_path / "model", prompts)
    assert exported == reference
    for split, rows in prompts.items():
        rewards = task.rewards(exported[split], [p.answer for p in task.eval_problems(split, len(rows))])
        assert rewards == pytest.approx(logged[split])  # and scores what the run logged at its end, problem by problem
    card = (tmp_path / "model" / "README.md").read_text()
    assert recipe[0].split("=")[1] in card and "steps: 3" in card
    if adapter_only:  # one peft adapter over the unchanged base, loaded by peft alone, decodes the same
        result = export(run, tmp_path / "adapter", "--adapter-only")
        assert result.exit_code == 0, result.output
        assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {
            "adapter_config.json",
            "adapter_model.safetensors",
        }
        assert plain_completions(tmp_path / "adapter", prompts, adapter=True) == reference
    else:  # the base weights trained: no adapter form
        result = export(run, tmp_path / "adapter", "--adapter-only")
        assert result.exit_code == 2 and "Error:" in result.output and "drop --adapter-only" in result.output
        assert not (tmp_path / "adapter").exists()


def test_stacked_adapter_equals_the_two_adapters(tmp_path):
    """BRIDGE lower=lora's theta (rank r1) and w (rank r2) as one rank r1 + r2 adapter: per layer, its delta
    B A * alpha/r equals s1 B1 A1 + s2 B2 A2 computed from the run's own two adapter files."""
    from safetensors.torch import load_file

    from bridgectl.training.export import stacked_adapter

    run = train(tmp_path, ["recipe=bridge", "model.finetune=lora"])
    final = run / "checkpoints" / "final"
    config, tensors = stacked_adapter(final)
    parts = [
        (json.loads((d / "adapter_config.json").read_text()), load_file(str(d / "adapter_model.safetensors")))
        for d in (final, final / "w")
    ]
    assert config["r"] == sum(c["r"] for c, _ in parts)
    layers = [key[: -len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")]
    assert layers
    for layer in layers:
        expected = sum(
            t[f"{layer}.lora_B.weight"] @ t[f"{layer}.lora_A.weight"] * (c["lora_alpha"] / c["r"]) for c, t in parts
        )
        scale = config["lora_alpha"] / config["r"]
        got = tensors[f"{layer}.lora_B.weight"] @ tensors[f"{layer}.lora_A.weight"] * scale
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["recipe=bridge", "bridge.lower=full"], ["recipe=rl", "model.finetune=lora"]])
def test_checkpoint_export_scores_what_eval_of_the_checkpoint_scored(tmp_path, recipe):
    run = train(tmp_path, recipe, "train.max_steps=4", "train.checkpoint_every=2")
    evaluated = CliRunner().invoke(
        app, ["eval", str(run), "--checkpoint", "step-000002", "--output", str(tmp_path / "e.json")]
    )
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads((tmp_path / "e.json").read_text())["results"]
    result = export(run, tmp_path / "model", "--checkpoint", "step-000002")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    from bridgectl.config.saved import load_saved
    from bridgectl.models.sources import load_task

    cfg = load_saved(run / "config.yaml")
    task = load_task(cfg, show_progress=False)
    problems = {split: task.eval_problems(split, cfg.eval.n) for split in task.eval_splits}
    prompts = {split: [p.question for p in rows] for split, rows in problems.items()}
    exported = plain_completions(tmp_path / "model", prompts)
    for split, rows in problems.items():
        assert task.rewards(exported[split], [p.answer for p in rows]) == pytest.approx(
            record[split]["per_problem"]["rewards"]
        )
    # the step-2 weights, not the final ones (4 steps): greedy answers may not move in 2 tiny steps, the weights do
    assert export(run, tmp_path / "final").exit_code == 0
    step2, final = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("model", "final"))
    assert step2.keys() == final.keys() and any(not torch.equal(step2[k], final[k]) for k in step2)
    if "model.finetune=lora" in recipe:
        result = export(run, tmp_path / "adapter", "--checkpoint", "step-000002", "--adapter-only")
        assert result.exit_code == 0, result.output
        assert plain_completions(tmp_path / "adapter", prompts, adapter=True) == exported


def test_bad_exports_exit_2(tmp_path):
    (tmp_path / "plain").mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 0\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    cases = [
        (tmp_path / "plain", tmp_path / "o1", [], "not a run directory"),
        (unfinished, tmp_path / "o2", [], "has no checkpoints/final"),
        (unfinished, full, [], "already exists and is not empty"),
        (unfinished, tmp_path / "o3", ["--checkpoint", "step-000002"], "has no checkpoint step-000002"),
    ]
    for run, out, args, message in cases:
        result = export(run, out, *args)
        assert result.exit_code == 2, result.output
        assert "Error:" in result.output and message in " ".join(result.output.split())
        assert out == full or not out.exists()
    assert [p.name for p in full.iterdir()] == ["x"]  # never overwritten


def test_push_to_hub_sends_the_export_to_the_repo(tmp_path, monkeypatch):
    import huggingface_hub

    run = train(tmp_path, ["recipe=rl", "model.finetune=lora", "train.max_steps=1"])
    # offline (the tests' HF_HUB_OFFLINE=1): refused before anything is written
    offline = export(run, tmp_path / "offline", "--push-to-hub", "me/tiny")
    assert offline.exit_code == 2 and "HF_HUB_OFFLINE" in offline.output and "Hint:" in offline.output
    assert not (tmp_path / "offline").exists()
    # a stand-in of the Hub: records what create_repo and upload_folder were asked, and the files of the folder
    calls = []
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
    )

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        calls.append(("upload", repo_id, kw, files))

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    result = export(run, tmp_path / "model", "--push-to-hub", "me/tiny")
    assert result.exit_code == 0, result.output
    assert calls[0] == ("create", "me/tiny", {"repo_type": "model", "exist_ok": True})
    assert calls[1][:2] == ("upload", "me/tiny") and calls[1][2]["repo_type"] == "model"
    assert calls[1][3] == sorted(p.name for p in (tmp_path / "model").iterdir())
    assert "model.safetensors" in calls[1][3] and "README.md" in calls[1][3]
    # the upload failing (no network): exit 2 with the command to upload the complete export later

    def unreachable(self, repo_id, **kw):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    failed = export(run, tmp_path / "model2", "--push-to-hub", "me/tiny")
    assert failed.exit_code == 2 and "hf upload me/tiny" in " ".join(failed.output.split())
    assert (tmp_path / "model2" / "model.safetensors").is_file()
