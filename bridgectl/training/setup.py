"""The training context for a recipe: seeds, device, task, policy and rollout engine, built from the composed config
(what the recipe's stages need decides what is loaded: the frozen reference, paired demonstrations, parameters a
stage adds before sharding). Above the core, which knows no recipe."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from bridgectl.core import distributed, vllm_rollout
from bridgectl.core.context import (
    CountingStream,
    TrainContext,
    check_paired_demonstrations,
    pick_device,
    seed_everything,
)
from bridgectl.core.model import load_policy
from bridgectl.models.sources import base_model_path, load_task
from bridgectl.stages import STAGES, paired_stage, stage_class
from bridgectl.tasks.prompts import prompts_use_chat_template


def build_context(cfg: DictConfig, show_progress: bool = True, skip: dict | None = None) -> TrainContext:
    """Seeds, device, task and policy: everything a stage needs, for `cfg` as composed. `skip`: how many items of
    the sft and rl streams a resumed run already consumed."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.train.device)
    distributed.init_from_environment(device.type)
    distributed.check_batch_split(cfg, distributed.world_size())
    if cfg.rollout.backend == "vllm":
        vllm_rollout.check_usable(device)  # before anything is loaded
    task = load_task(cfg, show_progress=show_progress)
    paired = paired_stage(cfg)
    if paired is not None:  # before any weights load
        check_paired_demonstrations(task, cfg, paired)
    keep_reference = cfg.rl.beta > 0 and any(STAGES[stage].samples_rollouts for stage in cfg.recipe.stages)
    # model.finetune alone decides what trains, in every stage (BRIDGE's theta included: bridge_config.check)
    policy = load_policy(
        cfg.model,
        cfg.lora,
        base_model_path(cfg.model, cfg.task, show_progress),
        device,
        keep_reference,
        finetune=cfg.model.finetune,
        chat_template=prompts_use_chat_template(cfg.task),
    )
    if cfg.train.fsdp and distributed.active():
        prepare = getattr(stage_class(cfg.recipe.stages[0]), "before_sharding", None)
        if prepare is not None:  # parameters a stage adds (BRIDGE's w) must exist before the model is sharded
            prepare(policy, cfg)
        distributed.shard_model(policy)
    engine = None
    if cfg.rollout.backend == "vllm":
        engine = vllm_rollout.engine_for(base_model_path(cfg.model, cfg.task, show_progress=False), cfg, policy)
    return TrainContext(
        cfg=cfg,
        policy=policy,
        task=task,
        device=device,
        rollout_engine=engine,
        sampling_generator=torch.Generator(device=device).manual_seed(cfg.seed),
        sft_examples=CountingStream(lambda: task.sft_examples(cfg.seed), (skip or {}).get("sft", 0)),
        rl_problems=CountingStream(lambda: task.rl_prompts(cfg.seed), (skip or {}).get("rl", 0)),
    )
