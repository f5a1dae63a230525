"""What `bridgectl compare` checks before it pools runs into a group, and what it states beside every table.

Seeds are pooled only when nothing else differs. Within a group (runs with equal values of the `--by` keys) every
other key of the runs' resolved config.yaml must agree, apart from the seed and the keys in IGNORED_KEYS, which
change where a run writes, what it logs and how fast it goes, at most the float rounding of its numbers, never what
it computes. A group whose runs differ is refused (exit 2), naming the keys and values, unless the user pools them
on purpose with `--pool KEY`, which the table then states. A key that only some runs of a group have (runs made by
different versions of bridgectl) is not compared.

Between groups, configs differ by design (that is what is compared), but not only by the recipe: every key whose
value differs between the groups of one table is listed with each group's value, a key that is not the compared
thing itself marked `!` (not a `--by` key, not `recipe.*`, not a stage section that only some groups run), and the
fairness facts that follow from the configs are set side by side (FACTS): what trains, for how many updates, at
what compute, on how much data, at which learning rates and length limits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from bridgectl.errors import UserError
from bridgectl.stages import STAGES

IGNORED_KEYS = (
    "seed",
    "recipe.description",
    "tracker.",
    "train.threads",
    "train.device",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_completions_every",
    "train.micro_batch_size",
    "train.fsdp",
    "eval.batch_size",
    "rollout.batch_size",
    "rollout.cpu_packed_weights",
    "rollout.gpu_memory_utilization",
    "rollout.enforce_eager",
    "lora.forward",
    "lora.sampling",
)
"""Keys (a trailing `.`: a whole section) that never change what a run computes: its seed (what seeds vary), where
and how often it writes, its trackers, threads and device, and how its passes are batched, sharded or fused
(micro-batches, FSDP, merged LoRA, packed weights, the sampler's rows at once: equal up to float rounding,
tests/test_micro_batches.py, test_fsdp.py, test_lora_forward.py, test_packed_linear.py)."""


LORA_ONLY_KEYS = ("lora.rank", "lora.alpha")
"""The rank and scaling of the adapters that train theta: nothing uses them unless model.finetune is lora (BRIDGE's
adapter w has bridge.w_rank and bridge.w_alpha)."""


def ignored(key: str) -> bool:
    return any(key == item or (item.endswith(".") and key.startswith(item)) for item in IGNORED_KEYS)


def relevant(flat: dict[str, str]) -> dict[str, str]:
    """The keys of one run's flat_config that can change what it computes: not IGNORED_KEYS, and not the LoRA
    rank and scaling of a full fine-tuning run."""
    full = flat.get("model.finetune") == json.dumps("full")
    return {key: value for key, value in flat.items() if not ignored(key) and not (full and key in LORA_ONLY_KEYS)}


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """Every leaf of a (nested) config as `dotted.key -> its value as JSON`: lists and empty mappings are leaves,
    so values of any type compare and print alike."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return out


def shown(value: str | None) -> str:
    """A flat_config value for people: strings without their quotes; a missing key as `-`."""
    if value is None:
        return "-"
    decoded = json.loads(value)
    return decoded if isinstance(decoded, str) else value


def run_identity(summary_text: str, metrics: bytes) -> str:
    """What makes a run the run it is, wherever its directory lies: its summary.json and metrics.jsonl together
    (their wall-clock times alone tell two runs of one config and seed apart), so a copy of a run directory is the
    same run. As compare.load_runs read them (an absent metrics.jsonl: b"")."""
    digest = hashlib.sha256(summary_text.encode())
    digest.update(b"\0" + metrics)
    return digest.hexdigest()


def pooled_keys(key: str, pool: list[str]) -> bool:
    """Whether `--pool` covers `key`: the key itself or a section above it (`--pool sft` pools every sft.* key)."""
    return any(key == item or key.startswith(item.rstrip(".") + ".") for item in pool)


def mixed_keys(runs: list, by: list[str]) -> dict[str, list[str]]:
    """Within one group: {key: its distinct values as JSON, in order} for every config key whose runs disagree
    (not the --by keys, only keys every run has and uses: relevant). Two runs of one seed count as a difference in
    `seed` (`"0 (x2)"`): they are not two seeds."""
    flats = [relevant(flat_config(run.config)) for run in runs]
    common = set.intersection(*(set(flat) for flat in flats)) if flats else set()
    out = {
        key: list(dict.fromkeys(flat[key] for flat in flats))
        for key in sorted(common)
        if key not in by and len({flat[key] for flat in flats}) > 1
    }
    seeds = [json.dumps(run.value("seed")) for run in runs]
    repeated = [seed for seed in dict.fromkeys(seeds) if seeds.count(seed) > 1]
    if "seed" not in by and repeated:
        out["seed"] = [json.dumps(f"{shown(seed)} (x{seeds.count(seed)})") for seed in repeated]
    return out


def pooling_error(groups: list[tuple[str, list, dict[str, list[str]]]], pool: list[str]) -> UserError | None:
    """The refusal for groups (label, runs, mixed_keys) that pool runs of different configs `--pool` does not
    cover; None when there are none."""
    lines = []
    for label, runs, mixed in groups:
        refused = {key: values for key, values in mixed.items() if not pooled_keys(key, pool)}
        for key, values in refused.items():
            if key == "seed":
                lines.append(f"group {label}: several runs of seed {', '.join(map(shown, values))}: re-runs, not seeds")
                continue
            flats = [flat_config(run.config) for run in runs]
            which = []
            for value in values:
                names = ", ".join(run.path.name for run, flat in zip(runs, flats) if flat.get(key) == value)
                which.append(f"{shown(value)} ({names})")
            lines.append(f"group {label}: {key} = {'; '.join(which)}")
    if not lines:
        return None
    keys = sorted({line.split(": ")[1].split(" = ")[0] for line in lines if " = " in line})
    hint = (
        "split them with --by " + " --by ".join(keys) + " (beside --by recipe), or pool them on purpose with "
        "--pool " + " --pool ".join(keys)
        if keys
        else ""
    )
    if any("re-runs" in line for line in lines):
        hint += ("; " if hint else "") + "leave the repeated runs out, or count them as seeds with --pool seed"
    return UserError(
        "runs with different configs would be pooled as seeds of one group:\n  " + "\n  ".join(lines), hint
    )


# ---- between groups ----------------------------------------------------------------------------------------------
@dataclass
class KeyDifference:
    """A config key whose value differs between the groups of one table."""

    key: str
    """The dotted config key."""
    values: dict[str, str]
    """Group label -> its value for people (`mixed: a, b` where the group pooled several on purpose)."""
    marked: bool
    """True when the difference is not the compared thing itself: not a --by key, not recipe.*, not the section of a
    stage that only some of the groups run."""


def own_section(key: str) -> str | None:
    """The stage whose own config section holds `key` (`bridge` for bridge.lam); None for the shared sections,
    sft.* and rl.* included, which every stage that trains on demonstrations or samples rollouts reads."""
    section = key.split(".")[0]
    return section if section in STAGES and STAGES[section].config is not None else None


def group_value(runs: list, key: str, flats: dict[int, dict[str, str]]) -> str:
    """The group's value of `key` for people; `-` where no run of it has the key or uses it (a stage's own
    section, e.g. bridge.*, when the group's recipe does not run that stage). `flats`: each run's relevant
    flat_config, by id(run) (made once per comparison, not once per key)."""
    stage = own_section(key)
    values = list(
        dict.fromkeys(
            "-"
            if stage is not None and stage not in (run.value("recipe.stages") or [])
            else shown(flats[id(run)].get(key))
            for run in runs
        )
    )
    return values[0] if len(values) == 1 else "mixed: " + ", ".join(values)


def differences(groups: dict[str, list], by: list[str]) -> list[KeyDifference]:
    """The config keys whose values differ between `groups` (label -> runs; one table's), with each group's
    value."""
    if len(groups) < 2:
        return []
    flats = {id(run): relevant(flat_config(run.config)) for runs in groups.values() for run in runs}
    keys = sorted({key for flat in flats.values() for key in flat})
    stages = [{kind for run in runs for kind in (run.value("recipe.stages") or [])} for runs in groups.values()]
    partial = (set.union(*stages) - set.intersection(*stages)) if stages else set()
    out = []
    for key in keys:
        if key in ("recipe.name", "recipe.description") and "recipe" in by:
            continue  # the groups' own labels
        values = {label: group_value(runs, key, flats) for label, runs in groups.items()}
        if len(set(values.values()) - {"-"}) > 1:  # `-`: a group that has no such setting, not another one
            itself = key in by or key.startswith("recipe.") or own_section(key) in partial
            out.append(KeyDifference(key, values, marked=not itself))
    return out


def _mean(values: list) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(np.mean(numbers)) if numbers else None


def _number(value: float | None) -> str:
    """Counts whole below a million (`38417`), larger ones and rates in three digits (`4.56e+12`, `0.0001`)."""
    if value is None:
        return "-"
    if abs(value) >= 1e6 or abs(value) < 1:
        return f"{value:.3g}"
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.3g}"


def _trains(runs: list) -> str:
    """What trains: full weights, or LoRA rank / alpha on its targets (and BRIDGE's adapter w)."""
    run = runs[0]
    finetune = run.value("model.finetune")
    text = (
        "full weights"
        if finetune == "full"
        else (
            f"LoRA r={run.value('lora.rank')} alpha={run.value('lora.alpha')} on "
            f"{','.join(run.value('lora.target_modules') or [])}"
        )
    )
    if "bridge" in (run.value("recipe.stages") or []) and run.value("bridge.upper") != "none":
        text += f" + w r={run.value('bridge.w_rank')}"
    return text


def learning_rates(runs: list) -> str:
    """The learning rates the group's stages use (StageInfo.learning_rates), as `key=value`."""
    run = runs[0]
    keys = dict.fromkeys(
        key for kind in (run.value("recipe.stages") or []) if kind in STAGES for key in STAGES[kind].learning_rates
    )
    return " ".join(f"{key}={_number(run.value(key)) if run.value(key) is not None else '-'}" for key in keys) or "-"


def completion_limit(runs: list) -> str:
    """Most tokens a rollout may generate (stages that sample), and an evaluation answer."""
    run = runs[0]
    samples = any(STAGES[kind].samples_rollouts for kind in (run.value("recipe.stages") or []) if kind in STAGES)
    rollout = f"rollouts {run.value('rl.max_completion_length')}, " if samples else ""
    return f"{rollout}eval {run.value('eval.max_new_tokens')}"


def _data(runs: list, stream: str) -> str:
    seen = [run.summary["data"].get(stream) for run in runs if isinstance(run.summary.get("data"), dict)]
    seen = [s for s in seen if isinstance(s, dict)]
    if not seen or not any(s.get("used") for s in seen):
        return "-"
    return f"{_number(_mean([s.get('used') for s in seen]))} ({_number(_mean([s.get('distinct') for s in seen]))})"


FACTS = [
    ("trainable params", lambda runs: _number(_mean([r.summary.get("trainable_params") for r in runs]))),
    ("trains", _trains),
    ("updates", lambda runs: _number(_mean([r.summary.get("steps") for r in runs]))),
    ("FLOPs", lambda runs: _number(_mean([r.summary.get("flops") for r in runs]))),
    ("tokens generated", lambda runs: _number(_mean([r.summary.get("gen_tokens") for r in runs]))),
    ("tokens trained", lambda runs: _number(_mean([r.summary.get("train_tokens") for r in runs]))),
    ("SFT examples (distinct)", lambda runs: _data(runs, "sft")),
    ("RL prompts (distinct)", lambda runs: _data(runs, "rl")),
    ("learning rates", learning_rates),
    ("length limits", completion_limit),
]
"""(name, runs -> text): the fairness facts set side by side under every comparison. Each is read from the runs'
summary.json (means over the group's runs) or config.yaml (settings a group shares); `-` where runs made by earlier
versions did not record it."""


def facts(runs: list) -> dict[str, str]:
    """The group's FACTS."""
    return {name: fact(runs) for name, fact in FACTS}
