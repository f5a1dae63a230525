"""Config composition, stage budgets, user recipe files, the tokenizer's save/load, and config docstrings."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from conftest import shipped_recipe
from omegaconf import OmegaConf
from typer.testing import CliRunner

import bridgectl.config.compose as config_module
from bridgectl.cli.app import app
from bridgectl.config.compose import CONF_DIR, compose, stage_budgets, validate
from bridgectl.errors import UserError

SHIPPED = {
    group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for group in ("recipe", "task", "model", "experiment")
}


def flatten(node, prefix=""):
    """{dotted.key: value} of a plain container."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def test_shipped_options_include_the_documented_ones():
    assert {"interleaved", "rl", "sft", "two_stage"} <= set(SHIPPED["recipe"])
    assert {"paper-qwen2.5-3b", "smollm2-gsm8k"} <= set(SHIPPED["experiment"])
    assert "arith" in SHIPPED["task"]
    assert "tiny" in SHIPPED["model"]
    assert config_module.group_options("recipe") == SHIPPED["recipe"]


def test_every_shipped_recipe_runs_registered_stages_and_every_stage_is_buildable():
    """One registry (bridgectl/stages/__init__.py): every stage a shipped recipe names is in it, and every entry
    names a class with a step() in its own module."""
    from bridgectl.stages import STAGES, stage_class

    used = set()
    for option in SHIPPED["recipe"]:
        stages = list(compose([f"recipe={option}"]).recipe.stages)
        assert set(stages) <= set(STAGES), (option, stages)
        used.update(stages)
    assert used == set(STAGES)  # and no registered stage lacks a recipe
    for kind in STAGES:
        cls = stage_class(kind)
        assert cls.__module__ == f"bridgectl.stages.{STAGES[kind].module}" and callable(cls.step)
        assert cls.name == kind


@pytest.mark.slow
@pytest.mark.parametrize("group,option", [(g, o) for g, options in SHIPPED.items() for o in options])
def test_every_shipped_yaml_composes_validates_and_is_applied(group, option):
    # what some options need besides their file (model=hf names no model of its own)
    required = {("model", "hf"): {"model.name_or_path": "org/some-model"}}.get((group, option), {})
    cfg = compose([f"{group}={option}", *(f"{key}={value}" for key, value in required.items())])
    validate(cfg)  # composing validated already; validating again must not raise either
    path = CONF_DIR / group / f"{option}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # ${oc.env:HOME} as composing resolves it
    raw.pop("defaults", None)  # an experiment's choice of model and task
    # `@package _global_` files (recipes, experiments, model=hf) set keys of any section; the others their group's
    is_global = path.read_text().startswith("# @package _global_")
    expected = flatten(raw) if is_global else flatten(raw, f"{group}.")
    assert expected
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == required.get(key, value), key


def test_default_config_uses_the_default_recipe_of_config_yaml():
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]
    default_recipe = next(item["recipe"] for item in defaults if isinstance(item, dict) and "recipe" in item)
    expected = shipped_recipe(default_recipe)
    cfg = compose([])
    assert cfg.recipe.name == expected["name"]
    assert list(cfg.recipe.stages) == expected["stages"]
    assert cfg.train.max_steps == expected["max_steps"]


def test_overrides_win_over_recipe_defaults():
    cfg = compose(["recipe=sft", "train.max_steps=7", "seed=3", "rl.num_generations=4"])
    assert (cfg.recipe.name, cfg.train.max_steps, cfg.seed, cfg.rl.num_generations) == ("sft", 7, 3, 4)


# ---- stage budgets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", SHIPPED["recipe"])
def test_stage_budgets_of_shipped_recipes(recipe):
    expected = shipped_recipe(recipe)  # read from the YAML file
    budgets = stage_budgets(compose([f"recipe={recipe}"]))
    assert len(budgets) == len(expected["stages"])
    assert sum(budgets) == expected["max_steps"]
    for got, share in zip(budgets, expected["budgets"]):
        assert share is None or got == share


def test_two_stage_splits_its_steps_in_half():
    expected = shipped_recipe("two_stage")
    assert expected["stages"] == ["sft", "rl"] and expected["max_steps"] % 2 == 0
    half = expected["max_steps"] // 2
    assert stage_budgets(compose(["recipe=two_stage"])) == [half, half]
    assert stage_budgets(compose(["recipe=two_stage", "train.max_steps=300"])) == [150, 150]


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["recipe=two_stage", "recipe.fractions=[0.2,0.8]", "train.max_steps=100"], [20, 80]),
        (["recipe=two_stage", "recipe.fractions=[1,3]", "train.max_steps=40"], [10, 30]),  # fractions need not sum to 1
        (["recipe=two_stage", "recipe.fractions=[0.2,0.8]", "train.max_steps=7"], [1, 6]),  # 1.4 -> 1, rest to last
        (["recipe=two_stage", "recipe.fractions=null", "train.max_steps=9"], [4, 5]),  # equal shares when null
        (["recipe.stages=[sft,rl,sft]", "recipe.fractions=[1,1,2]", "train.max_steps=20"], [5, 5, 10]),
    ],
)
def test_stage_budgets_split_by_fractions(overrides, expected):
    cfg = compose(overrides)
    assert stage_budgets(cfg) == expected
    assert sum(stage_budgets(cfg)) == cfg.train.max_steps


def test_recipe_steps_override_fractions_and_max_steps():
    cfg = compose(["recipe=two_stage", "recipe.steps=[7,3]", "train.max_steps=1000"])
    assert stage_budgets(cfg) == [7, 3]


def _budgets(fractions, max_steps):
    stages = ["sft", "rl", "sft", "rl"][: len(fractions)]
    return stage_budgets(
        OmegaConf.create(
            {"recipe": {"stages": stages, "fractions": fractions, "steps": None}, "train": {"max_steps": max_steps}}
        )
    )


FRACTION_SETS = [
    [0.5, 0.5],
    [0.3, 0.7],
    [0.1, 0.9],
    [1, 1, 1],
    [0.2, 0.3, 0.5],
    [0.25, 0.25, 0.25, 0.25],
    [0.9, 0.1],
    [0.95, 0.05],
    [0.5, 0.5, 0.01],
]


def test_stage_budgets_always_sum_to_max_steps():
    """`train.max_steps` is the total over all stages (TrainConfig's docstring); every stage gets at least one step
    and about its share. Only budgets that can give every stage a step (max_steps >= stages) are asked for."""
    wrong = []
    for fractions in FRACTION_SETS:
        for max_steps in range(len(fractions), 61):
            budgets = _budgets(fractions, max_steps)
            assert all(b >= 1 for b in budgets)
            for b, f in zip(budgets, fractions):
                assert abs(b - max_steps * f / sum(fractions)) <= len(fractions), (fractions, max_steps, budgets)
            if sum(budgets) != max_steps:
                wrong.append((fractions, max_steps, budgets))
    assert wrong == [], f"{len(wrong)} budgets do not sum to train.max_steps, e.g. {wrong[:4]}"


@pytest.mark.parametrize(
    "overrides",
    [
        ["recipe.stages=[sft,rl,sft,rl]", "train.max_steps=6"],  # equal shares: 1.5 rounds to 2 three times
        ["recipe=two_stage", "recipe.fractions=[0.95,0.05]", "train.max_steps=10"],  # 9.5 rounds to 10
    ],
)
def test_stage_budgets_sum_to_max_steps_on_composed_configs(overrides):
    cfg = compose(overrides)
    budgets = stage_budgets(cfg)
    assert len(budgets) == len(cfg.recipe.stages) and all(b >= 1 for b in budgets)
    assert sum(budgets) == cfg.train.max_steps, budgets


# ---- a user recipe file through the CLI --------------------------------------------------------------------
RECIPE_FILE = """\
recipe:
  name: mine
  description: my own recipe
  stages: [sft, rl]
  fractions: [0.25, 0.75]
train:
  max_steps: 40
"""


def _dry_run(tmp_path, monkeypatch, *args):
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(app, ["run", "--dry-run", "--out", str(tmp_path / "runs"), *args])


def _plain(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines; compare with whitespace normalised


@pytest.mark.parametrize("filename", ["mine.yaml", "my-recipe.yml", "sub/v1.2.yaml"])
def test_user_recipe_file_via_cli(tmp_path, monkeypatch, filename):
    path = tmp_path / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECIPE_FILE)
    result = _dry_run(tmp_path, monkeypatch, f"recipe={filename}")
    assert result.exit_code == 0, result.output
    # 40 steps split 1:3
    assert "plan: recipe mine: sft x 10, rl x 30 steps" in _plain(result.output)
    assert not (tmp_path / "runs").exists()


def test_user_recipe_file_by_absolute_path_and_overrides_still_win(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text(RECIPE_FILE)
    result = _dry_run(tmp_path, monkeypatch, "train.max_steps=8", f"recipe={path}")
    assert result.exit_code == 0, result.output
    assert "plan: recipe mine: sft x 2, rl x 6 steps" in _plain(result.output)
    result = _dry_run(tmp_path, monkeypatch, f"recipe={path}", "recipe.steps=[3,4]")
    assert result.exit_code == 0, result.output
    assert "plan: recipe mine: sft x 3, rl x 4 steps" in _plain(result.output)


def test_user_recipe_file_is_validated_like_any_recipe(tmp_path, monkeypatch):
    (tmp_path / "bad_stage.yaml").write_text("recipe:\n  name: bad\n  stages: [sft, nope]\n")
    result = _dry_run(tmp_path, monkeypatch, "recipe=bad_stage.yaml")
    assert result.exit_code == 2
    assert "unknown stage 'nope'" in result.output


def test_user_recipe_can_be_composed_after_registration(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(RECIPE_FILE)
    name = config_module.register_recipe_file(path)
    assert name in config_module.group_options("recipe")
    cfg = compose([f"recipe={name}"])
    assert cfg.recipe.name == "mine" and list(cfg.recipe.stages) == ["sft", "rl"] and cfg.train.max_steps == 40
    assert stage_budgets(cfg) == [10, 30]


# ---- tokenizer ---------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    from bridgectl.models.tiny import CHARACTERS, SPECIAL_TOKENS, build_tokenizer

    build_tokenizer().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "4+9*3-5*3=9*3=7;#6"
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    ids = loaded(text)["input_ids"]
    assert ids == [vocab["<s>"]] + [vocab[c] for c in text]  # one id per character, BOS prepended
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        vocab["<s>"],
        vocab["</s>"],
        vocab["<pad>"],
    )
    assert len(loaded) == len(vocab)
    loaded.padding_side = "left"
    batch = loaded(["1+2=", text], padding=True)
    assert batch["input_ids"][0] == [vocab["<pad>"]] * (len(text) - 4) + [vocab["<s>"]] + [vocab[c] for c in "1+2="]
    assert batch["attention_mask"][0] == [0] * (len(text) - 4) + [1] * 5


# ---- house rule: every config field has a docstring --------------------------------------------------------
def _is_dataclass(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (isinstance(target, ast.Name) and target.id == "dataclass") or (
            isinstance(target, ast.Attribute) and target.attr == "dataclass"
        ):
            return True
    return False


def test_every_config_field_has_a_docstring():
    """The shared sections (schema.py) and every registered stage's own section (stages/<stage>_config.py)."""
    import bridgectl.config.schema as schema
    from bridgectl.stages import STAGES

    modules = [schema] + [importlib.import_module(info.config.__module__) for info in STAGES.values() if info.config]
    assert len(modules) >= 10
    classes = [
        node
        for module in modules
        for node in ast.parse(Path(module.__file__).read_text()).body
        if isinstance(node, ast.ClassDef) and _is_dataclass(node)
    ]
    assert len(classes) >= 20
    missing = []
    for cls in classes:
        body = cls.body
        for index, statement in enumerate(body):
            if not isinstance(statement, ast.AnnAssign):
                continue
            following = body[index + 1] if index + 1 < len(body) else None
            documented = (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
                and following.value.value.strip()
            )
            if not documented:
                missing.append(f"{cls.name}.{statement.target.id}")
    assert missing == [], f"config fields without a docstring: {missing}"


def test_real_models_get_real_model_settings_and_the_command_line_still_wins():
    tiny = compose([])
    real = compose(["model=hf", "model.name_or_path=org/some-model"])
    assert tiny.train.micro_batch_size == 0 and not tiny.model.gradient_checkpointing
    assert real.train.micro_batch_size > 0 and real.model.gradient_checkpointing
    assert real.rl.max_completion_length >= 1024 and real.eval.max_new_tokens >= 1024
    assert real.rl.lr < tiny.rl.lr and real.bridge.alpha < tiny.bridge.alpha
    chosen = compose(
        [
            "model=hf",
            "model.name_or_path=org/some-model",
            "rl.max_completion_length=2048",
            "train.micro_batch_size=2",
            "recipe=rl",
        ]
    )
    assert chosen.rl.max_completion_length == 2048 and chosen.train.micro_batch_size == 2


def test_experiments_pick_their_model_and_task():
    paper = compose(["experiment=paper-qwen2.5-3b"])
    assert (paper.model.name, paper.task.name, paper.bridge.lower, paper.bridge.w_rank) == ("hf", "math", "full", 16)
    assert paper.rl.prompts_per_step == 64 and paper.rl.num_generations == 5 and paper.bridge.alpha == 5e-7
    laptop = compose(["experiment=smollm2-gsm8k", "recipe=rl"])
    assert (laptop.model.name, laptop.task.name, laptop.recipe.name) == ("hf", "gsm8k", "rl")


def test_a_config_saved_before_the_renames_reads_as_it_trained(tmp_path):
    """A config.yaml written before `interleave` became `interleaved` and before model.finetune alone decided what
    trains: its section reads under the new name, and a BRIDGE run that set bridge.lower=lora (with model.finetune
    left at full, which it then ignored) reads back as what it trained, LoRA, and validates."""
    from bridgectl.config.saved import config_text, load_saved

    data = OmegaConf.to_container(compose(["interleaved.rl_steps=3"]), resolve=True)
    data["interleave"] = data.pop("interleaved")
    data["bridge"]["lower"], data["model"]["finetune"] = "lora", "full"
    path = tmp_path / "config.yaml"
    path.write_text(config_text(data))
    cfg = load_saved(path)
    assert cfg.interleaved.rl_steps == 3 and "interleave" not in cfg
    assert (cfg.model.finetune, cfg.bridge.lower) == ("lora", "lora")
    validate(cfg)
    with pytest.raises(UserError, match="model.finetune alone decides"):
        compose(["bridge.lower=lora"])  # a new run: the mismatch is refused, naming the one key
    assert compose(["model.finetune=lora"]).bridge.lower is None


def test_a_renamed_section_is_hinted_under_its_new_name():
    with pytest.raises(UserError) as caught:
        compose(["interleave.rl_steps=2"])
    assert "the interleave section is now interleaved" in caught.value.hint


def test_luffy_refuses_the_reward_scalings_it_would_ignore_and_pairs_only_with_off_policy_members():
    """luffy.std_normalize decides luffy's scaling, so rl.scale_rewards=none (once accepted, then ignored) is
    refused naming it; srft honours none. luffy trains on demonstrations only with off-policy group members, and the
    check before weights load (paired_stage) follows that rule, as the stage's own does."""
    from bridgectl.stages import paired_stage

    for scaling in ("none", "batch"):
        with pytest.raises(UserError, match="luffy.std_normalize") as caught:
            compose(["recipe=luffy", f"rl.scale_rewards={scaling}"])
        assert "rl.scale_rewards=group" in caught.value.hint
    compose(["recipe=srft", "rl.scale_rewards=none"])
    compose(["recipe=luffy", "luffy.std_normalize=false"])
    assert paired_stage(compose(["recipe=luffy"])) == "luffy"
    assert paired_stage(compose(["recipe=luffy", "luffy.off_policy=0"])) is None
    assert paired_stage(compose(["recipe=two_stage"])) is None and paired_stage(compose(["recipe=uft"])) == "uft"
