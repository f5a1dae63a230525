"""Every config key is validated. The schema is walked from bridgectl/config/compose.py's dataclasses (a key added there is
covered at once): for each key, a value of the wrong type and, where the key has a range or a set of choices, a value
outside it make `bridgectl run` exit 2 with `Error:` naming the key and a `Hint:`, before a run directory exists and
before training starts (a stand-in runner fails the test if it is reached). TRL's names for keys get a hint naming
bridgectl's key (bridgectl/config/trl_names.py)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from omegaconf import OmegaConf
from typer.testing import CliRunner

from bridgectl.cli.app import app
from bridgectl.config.compose import Config, apply_overrides, compose
from bridgectl.config.trl_names import TRL_NAMES
from bridgectl.errors import UserError


def schema_keys(cls: type = Config, prefix: str = "") -> dict[str, typing.Any]:
    """{dotted key: annotated type} of every leaf field; a dataclass-typed field is a section."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        kind = hints[item.name]
        if dataclasses.is_dataclass(kind):
            keys.update(schema_keys(kind, f"{prefix}{item.name}."))
        else:
            keys[f"{prefix}{item.name}"] = kind
    return keys


SCHEMA = schema_keys()


def bare(kind: typing.Any) -> typing.Any:
    """X of Optional[X]."""
    if typing.get_origin(kind) is typing.Union:
        return next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def wrong_types(kind: typing.Any) -> list[str]:
    """Override values of the wrong type for a field of this type (Hydra syntax)."""
    kind = bare(kind)
    origin = typing.get_origin(kind)
    if origin is list:  # a scalar, an element of the wrong type (or a list inside a list of strings)
        return ["abc", "[[1]]" if typing.get_args(kind)[0] is str else "[a]"]
    if origin is dict:
        return ["abc", "{a:[1]}"]
    return {int: ["1.5"], float: ["abc"], bool: ["maybe"], str: ["[1,2]"]}[kind]


def is_number(kind: typing.Any) -> bool:
    return bare(kind) in (int, float)


# Every number is probed with -1; these keys take negative values.
NEGATIVE_OK = {"hpt.gate": "-1: never switch a prompt to SFT (the rl stage)"}

# Out-of-range values besides -1 (numbers) and the wrong types. A case is one override or a tuple of them, the key's
# own first (the others set the context the value is out of range in).
OUT_OF_RANGE: dict[str, list] = {
    "rl.importance_sampling_level": ["tokens", "seq"],
    "rl.adv_estimator": ["reinforce_plus_plus", ("rl.adv_estimator=rloo", "rl.scale_rewards=group")],
    "rl.multi_objective_aggregation": [
        "sum",
        ("rl.multi_objective_aggregation=normalize_then_sum", "rl.scale_rewards=batch"),
    ],
    "rl.delta": ["1.1"],
    "rl.top_entropy_quantile": ["0", "1.5"],
    "recipe.stages": ["[]", "[sft,nope]"],
    "recipe.fractions": [
        ("recipe.fractions=[0,1]", "recipe.stages=[sft,rl]"),
        ("recipe.fractions=[1]", "recipe.stages=[sft,rl]"),
    ],
    "recipe.steps": [("recipe.steps=[0,5]", "recipe.stages=[sft,rl]"), ("recipe.steps=[5]", "recipe.stages=[sft,rl]")],
    "task.name": ["nope"],
    "task.modulus": ["0", "1"],
    "task.max_operand": ["0"],
    **{f"task.{key}": ["[0,2]", "[3,2]", "[2]"] for key in ("train_ops", "test_ops", "ood_ops", "pretrain_ops")},
    "task.prompt_template": ["'Answer:'", "'{question} {answer}'"],
    "task.verify_timeout_s": ["0"],
    "task.reward_funcs": ["[nofunction]"],
    "task.reward_weights": ["[1.0]"],  # one weight, no function
    "task.reward_timeout_s": ["0"],
    "model.name": ["nope"],
    "model.init_from": ["/nonexistent/run"],
    "model.dtype": ["int8"],
    "model.finetune": ["qlora"],
    "model.hidden_size": ["0", "130"],  # 130 / 4 heads is no even width
    "model.num_layers": ["0"],
    "model.num_heads": ["0", "3"],
    "model.max_positions": ["0"],
    "model.attn_implementation": ["flash"],
    "model.pretrain.batch_size": ["0"],
    "model.pretrain.lr": ["0"],
    "model.pretrain.trace_fraction": ["1.5"],
    "model.pretrain.seed": ["4294967296"],
    "lora.rank": ["0"],
    "lora.alpha": ["0"],
    "lora.dropout": ["1.0"],
    "lora.target_modules": ["[]"],
    "lora.forward": ["fused"],
    "lora.sampling": ["fused"],
    "optim.adam_beta1": ["1.0"],
    "optim.adam_beta2": ["1.5"],
    "optim.schedule": ["linear"],
    "sft.lr": ["0"],
    "sft.batch_size": ["0"],
    "rl.lr": ["0"],
    "rl.prompts_per_step": ["0"],
    "rl.num_generations": ["0", "1"],
    "rl.epsilon": ["0"],
    "rl.epsilon_high": ["0"],
    "rl.temperature": ["0"],
    "rl.top_p": ["0", "1.5"],
    "rl.min_p": ["1.0"],
    "rl.max_completion_length": ["0"],
    "rl.scale_rewards": ["std"],
    "rl.loss_type": ["ppo"],
    "rl.vllm_importance_sampling_mode": ["sequence"],
    "rl.num_iterations": ["0"],
    "rollout.backend": ["sglang"],
    "rollout.gpu_memory_utilization": ["0", "1.0"],
    "rollout.max_model_len": ["0"],
    "interleaved.rl_steps": ["0"],
    "interleaved.sft_steps": ["0"],
    "bridge.lower": ["half"],
    "bridge.lam": ["1.5"],
    "bridge.lam_start": [("bridge.lam_start=1.5", "bridge.lam_end=0.5")],
    "bridge.lam_end": [("bridge.lam_end=1.5", "bridge.lam_start=0.5")],
    "bridge.alpha": ["0"],
    "bridge.beta": ["0"],
    "bridge.w_rank": ["0"],
    "bridge.w_alpha": ["0"],
    "bridge.shadow": ["ghost"],
    "bridge.optimizer": ["adam"],
    "bridge.upper": ["both"],
    "mix.lr": ["0"],
    "relift.buffer_size": ["0"],
    "relift.sft_lr": ["0"],
    "relift.sft_epochs": ["0"],
    "uft.hint_start": ["1.5"],
    "uft.hint_end": ["1.5"],
    "uft.hint_fraction_of_steps": ["1.5"],
    "uft.hint_chunks": ["0"],
    "uft.lr": ["0"],
    "luffy.off_policy": [("luffy.off_policy=4", "rl.num_generations=4")],  # no on-policy rollout left
    "luffy.gamma": ["0"],
    "luffy.lr": ["0"],
    "srft.lr": ["0"],
    "chord.mu_peak": ["1.5"],
    "chord.mu_valley": ["1.5"],
    "chord.lr": ["0"],
    "hpt.gate": ["-2"],
    "hpt.lr": ["0"],
    "eval.n": ["0"],
    "eval.max_new_tokens": ["0"],
    "eval.batch_size": ["0"],
    "eval.samples": [("eval.samples=2", "eval.k=4")],
    "eval.temperature": ["0"],
    "train.max_steps": ["0"],
    "train.threads": ["-3"],
    "train.device": ["tpu", *([] if torch.cuda.is_available() else ["cuda"])],
    "train.keep_checkpoints": ["0"],
    "tracker.wandb.mode": ["cloud"],
    "seed": ["4294967296"],
}

# Keys other than numbers and booleans (every boolean value means something) for which no value is out of range.
NO_RANGE = {
    "recipe.name": "a label for tables and `compare`",
    "recipe.description": "free text for `bridgectl recipes`",
    **{
        f"task.{key}": "a data source, checked when the data loads, before any weights (a missing file exits 2 and "
        "leaves no run directory: tests/test_bad_inputs.py)"
        for key in ("path", "sft_path", "rl_path", "eval_sets")
    },
    **{
        f"task.{key}": "a Hub configuration or split name, checked by datasets when the data loads"
        for key in ("subset", "train_split", "eval_split")
    },
    **{
        f"task.{key}": "a column name, checked against the rows when the data loads (tests/test_bad_inputs.py)"
        for key in ("question_field", "trace_field", "answer_field")
    },
    "task.system_prompt": "free text (refused with task=arith, a check across keys)",
    "model.name_or_path": "a Hub id or directory, checked when the model loads (a missing directory exits 2)",
    **{f"tracker.wandb.{key}": "a W&B name" for key in ("project", "entity", "group")},
}


def cases() -> list[tuple[str, tuple[str, ...], str]]:
    """(key, overrides, kind of check) for every key of the schema."""
    found = []
    for key, kind in SCHEMA.items():
        found += [(key, (f"{key}={value}",), "type") for value in wrong_types(kind)]
        if is_number(kind) and key not in NEGATIVE_OK:
            found.append((key, (f"{key}=-1",), "range"))
        for case in OUT_OF_RANGE.get(key, []):
            found.append((key, case if isinstance(case, tuple) else (f"{key}={case}",), "range"))
    return found


CASES = cases()


@pytest.fixture
def training_started(training_refused):
    """Bad values must be refused before training (conftest.training_refused)."""
    return training_refused


def run_cli(tmp_path, *args: str):
    result = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "runs"), "--name", "x"])
    return result, " ".join(result.output.split())  # rich wraps long lines


def assert_refused(result, said: str, tmp_path, started: list, error_says: str) -> None:
    assert result.exit_code == 2, said
    assert said.startswith("Error:") and error_says in said.split("Hint:")[0], said
    assert "Hint:" in said and said.split("Hint:", 1)[1].strip(), said
    assert "Traceback" not in result.output and started == []
    assert not (tmp_path / "runs").exists()


def test_every_key_is_probed_or_listed_with_a_reason():
    """A new key that is neither a number nor a boolean needs its out-of-range values here, or a reason why it has
    none; and every key named in the tables exists."""
    named = set(NEGATIVE_OK) | set(OUT_OF_RANGE) | set(NO_RANGE)
    assert named - set(SCHEMA) == set(), "tables name keys the schema lacks"
    assert set(OUT_OF_RANGE) & set(NO_RANGE) == set()
    unprobed = [
        key
        for key, kind in SCHEMA.items()
        if not is_number(kind) and bare(kind) is not bool and key not in OUT_OF_RANGE and key not in NO_RANGE
    ]
    assert unprobed == [], f"give these keys out-of-range values in OUT_OF_RANGE or a reason in NO_RANGE: {unprobed}"
    assert len(SCHEMA) > 100 and {key for key, _, _ in CASES} == set(SCHEMA)


@pytest.mark.parametrize("key, overrides, check", CASES, ids=[" ".join(o) for _, o, _ in CASES])
def test_bad_value_exits_2_before_anything_is_written(tmp_path, training_started, key, overrides, check):
    result, said = run_cli(tmp_path, *overrides)
    # a wrong type names the key and what it takes; a value out of range names the key in the error
    assert_refused(result, said, tmp_path, training_started, f"bad value for '{key}" if check == "type" else key)
    if check == "type":
        assert key in said.split("Hint:", 1)[1], said


@pytest.mark.parametrize(
    "override",
    [
        "seed=-1",
        "train.threads=-3",
        "train.device=tpu",
        "model.hidden_size=130",
        "+rl.learning_rate=1",
        "~seed",
        "lora.target_modules=[[1]]",
    ],
)
def test_dry_run_refuses_what_run_refuses(tmp_path, training_started, override):
    """`--dry-run` goes through the same checks: the same message, exit 2, nothing written."""
    run, said = run_cli(tmp_path, override)
    dry, dry_said = run_cli(tmp_path, "--dry-run", override)
    assert_refused(run, said, tmp_path, training_started, "")
    assert (dry.exit_code, dry_said) == (2, said)


def test_cuda_on_a_machine_without_it_exits_2(tmp_path, training_started, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result, said = run_cli(tmp_path, "train.device=cuda")
    assert_refused(result, said, tmp_path, training_started, "train.device=cuda")
    assert "train.device=cpu" in said.split("Hint:")[1]


@pytest.mark.parametrize(
    "override, error",
    [
        ("+seedx=1", "unknown key 'seedx'"),  # Hydra's + adds a key despite the schema
        ("+rl.foo=1", "unknown key 'rl.foo'"),
        ("~seed", "'seed' has no value"),  # and ~ deletes one
        ("~rl", "'rl.lr' has no value"),
        ("rl=5", "bad value for 'rl'"),  # a section given a value
        ("seed=${nope}", "bad value for 'seed'"),  # an interpolation of no key
        ("seed=${rl.lr}", "bad value for 'seed'"),  # ... or of a value of another type
    ],
)
@pytest.mark.slow
def test_odd_overrides_are_refused(tmp_path, training_started, override, error):
    result, said = run_cli(tmp_path, override)
    assert_refused(result, said, tmp_path, training_started, error)


# ---- TRL's names -------------------------------------------------------------------------------------------
def hinted_keys() -> list[str]:
    return [item for keys, _ in TRL_NAMES.values() for item in keys]


def test_every_hinted_key_exists_and_every_hinted_value_composes():
    for item in hinted_keys():
        key, _, value = item.partition("=")
        assert key in SCHEMA, item
        if value:  # a choice: it composes and validates
            assert str(OmegaConf.select(compose([item]), key)) == value


def test_every_name_is_trls():
    """GRPOConfig, SFTConfig (both TrainingArguments) and ModelConfig of the installed TRL (1.16 when written), or
    GRPOTrainer's own arguments (reward_funcs); max_prompt_length is GRPOConfig's in earlier releases."""
    import inspect

    trl = pytest.importorskip("trl")
    names = {item.name for cls in (trl.GRPOConfig, trl.SFTConfig, trl.ModelConfig) for item in dataclasses.fields(cls)}
    names |= set(inspect.signature(trl.GRPOTrainer.__init__).parameters)
    assert set(TRL_NAMES) - names <= {"max_prompt_length", "torch_dtype"}  # torch_dtype: ModelConfig's before dtype


def section_lacking(name: str) -> str:
    """`section.name` for a section that has no key of that name."""
    return next(f"{section}.{name}" for section in ("train", "rl", "sft") if f"{section}.{name}" not in SCHEMA)


@pytest.mark.parametrize("name", sorted(TRL_NAMES))
def test_trl_name_bare_and_in_a_section_hints_bridgectls_key(name):
    keys, note = TRL_NAMES[name]
    for written in ([name] if name not in SCHEMA else []) + [section_lacking(name)]:
        with pytest.raises(UserError) as refused:
            compose([f"{written}=1"])
        assert refused.value.message == f"unknown key '{written}'"
        hint = refused.value.hint
        assert all(key in hint for key in keys) and note in hint, hint
        assert keys or "no such setting" in hint


@pytest.mark.parametrize(
    "override, says",
    [
        ("learning_rate=1e-5", ["rl.lr", "sft.lr"]),
        ("rl.per_device_train_batch_size=4", ["rl.prompts_per_step", "rl.num_generations", "sft.batch_size"]),
        ("max_prompt_length=512", ["prompts are not truncated"]),
        ("train.num_train_epochs=3", ["budgets are in steps", "train.max_steps"]),
        ("use_vllm=true", ["rollout.backend=vllm"]),
    ],
)
def test_trl_names_through_the_cli(tmp_path, training_started, override, says):
    result, said = run_cli(tmp_path, override)
    assert_refused(result, said, tmp_path, training_started, f"unknown key '{override.split('=')[0]}'")
    assert all(text in said.split("Hint:")[1] for text in says), said


def test_trl_names_are_hinted_when_resuming_too():
    """`--resume RUN learning_rate=...` applies overrides to the saved config (apply_overrides), not through Hydra."""
    with pytest.raises(UserError) as refused:
        apply_overrides(compose([]), ["learning_rate=1e-5"])
    assert "rl.lr" in refused.value.hint and "sft.lr" in refused.value.hint
