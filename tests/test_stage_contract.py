"""The stage contract (bridgectl/stages/base.py) and checkpoints reading it (core/checkpoint.py):

every registered stage is a Stage, with nothing abstract left
every optimizer and LR scheduler a built stage holds, wherever in its attributes (sub-stages too), is declared
by its optimizers(), under the name checkpoints have always saved it under: its attribute path (the format)
checkpoints save what optimizers() and state_dict() declare, not what the attributes hold
the shared pieces: a counting stage's state is its step counter; a stage that keeps no state refuses some"""

from __future__ import annotations

import inspect

import pytest
import torch

from bridgectl.config.compose import compose
from bridgectl.core.checkpoint import load_stage_state, stage_state
from bridgectl.stages import STAGES, build_stage, stage_class
from bridgectl.stages.base import CountingStage, Stage
from bridgectl.training.setup import build_context

SMALL = [
    "train.threads=1",
    "rl.prompts_per_step=2",
    "rl.num_generations=4",
    "rl.max_completion_length=8",
    "sft.batch_size=4",
]

ONE = {"optimizer", "scheduler"}
SAVED_NAMES = {  # the names trainer.pt holds each stage's optimizer and scheduler states under (recorded runs')
    **{kind: ONE for kind in ("sft", "rl", "mix", "chord", "hpt", "luffy", "srft", "uft")},
    "relift": ONE | {"sft_optimizer", "sft_scheduler"},
    "interleaved": {"rules.rl.optimizer", "rules.rl.scheduler", "rules.sft.optimizer", "rules.sft.scheduler"},
    "bridge": {f"{level}_{kind}" for level in ("lower", "upper", "shadow") for kind in ("optimizer", "scheduler")},
}
OPTIMIZING = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)


def held(value, path: str = "") -> dict[str, object]:
    """Every optimizer and scheduler reachable from a stage's attributes, by attribute path (`rules.rl.optimizer`),
    through sub-stages, dicts, lists and tuples."""
    if isinstance(value, OPTIMIZING):
        return {path: value}
    if isinstance(value, Stage):
        items = vars(value).items()
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {}
    found = {}
    for name, item in items:
        found.update(held(item, f"{path}.{name}" if path else str(name)))
    return found


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_registered_stage_is_a_stage(kind):
    cls = stage_class(kind)
    assert issubclass(cls, Stage) and not inspect.isabstract(cls), kind
    assert cls.name == kind


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_a_stage_declares_every_optimizer_it_holds_under_its_attribute_path(kind):
    ctx = build_context(compose([f"recipe={kind}", *SMALL]), show_progress=False)
    stage = build_stage(kind, ctx, 4)
    declared = stage.optimizers()
    assert set(declared) == SAVED_NAMES[kind]
    assert {name: id(item) for name, item in declared.items()} == {path: id(item) for path, item in held(stage).items()}
    entry, _ = stage_state(stage)
    assert set(entry["optimizers"]) == SAVED_NAMES[kind]


@pytest.mark.parametrize(
    "overrides, levels", [(["bridge.upper=none"], ("lower",)), (["bridge.shadow=lookahead"], ("lower", "upper"))]
)
def test_bridge_declares_only_the_levels_its_configuration_has(overrides, levels):
    stage = build_stage("bridge", build_context(compose(["recipe=bridge", *SMALL, *overrides]), show_progress=False), 4)
    assert set(stage.optimizers()) == {f"{level}_{kind}" for level in levels for kind in ("optimizer", "scheduler")}
    assert set(stage.optimizers()) == set(held(stage))


class _OneParameterStage(CountingStage):
    """A counting stage over a stand-in context: one parameter, one SGD, and an optimizer it does not declare."""

    name = "probe"

    def __init__(self) -> None:  # no TrainContext: the contract alone is under test
        self.ctx = None
        self.params = [torch.nn.Parameter(torch.ones(2))]
        self.optimizer = torch.optim.SGD(self.params, lr=0.5, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.undeclared = torch.optim.SGD(self.params, lr=0.1)
        self.updates = 0

    def step(self):
        self.params[0].grad = torch.ones(2)
        self.optimizer.step()
        self.scheduler.step()
        self.updates += 1


def test_checkpoints_save_and_restore_what_the_stage_declares_not_what_its_attributes_hold():
    stage = _OneParameterStage()
    for _ in range(3):
        stage.step()
    entry, tensors = stage_state(stage)
    assert set(entry["optimizers"]) == {"optimizer", "scheduler"} and entry["state"] == {"updates": 3}
    assert tensors == {}
    fresh = _OneParameterStage()
    load_stage_state(fresh, entry, tensors)
    assert fresh.updates == 3 and fresh.scheduler.last_epoch == 3
    momentum = fresh.optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, stage.optimizer.state_dict()["state"][0]["momentum_buffer"])


def test_a_stage_that_keeps_no_state_refuses_state():
    class Stateless(Stage):
        name = "stateless"

        def step(self):
            raise NotImplementedError

        def optimizers(self) -> dict:
            return {}

    assert Stateless().state_dict() == {}
    Stateless().load_state_dict({})
    with pytest.raises(TypeError, match=r"holds state \(updates\) for the Stateless, which keeps none"):
        load_stage_state(Stateless(), {"optimizers": {}, "state": {"updates": 2}}, {})
    with pytest.raises(TypeError, match="Can't instantiate abstract class"):
        type("NoOptimizers", (Stage,), {"step": lambda self: None})()
