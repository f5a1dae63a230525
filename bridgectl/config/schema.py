"""The config schema: typed dataclasses registered with Hydra, the single source of truth for every key, its type,
its default and its docstring. The shared sections are here; each stage's own section is its dataclass in
stages/<stage>_config.py, added by the stage registry (stages/__init__.py). Torch-free: every compose reads it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from bridgectl.stages import STAGES

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class RecipeConfig:
    name: str = MISSING
    """Recipe name, shown in tables and used to group runs in `compare`."""
    description: str = ""
    """One line for `bridgectl recipes`."""
    stages: list[str] = field(default_factory=list)
    """Stage kinds run in order, e.g. [sft, rl]: any stage of the registry (bridgectl/stages/__init__.py;
    `bridgectl recipes` lists them)."""
    fractions: Optional[list[float]] = None
    """Share of `train.max_steps` given to each stage; equal shares when null."""
    steps: Optional[list[int]] = None
    """Explicit step budget per stage; overrides `fractions` and `train.max_steps` when set."""


@dataclass
class TaskConfig:
    name: str = "arith"
    """Task: arith (built in, generated), or gsm8k, math, jsonl (read from files or the Hub; tasks/data.py)."""
    modulus: int = 10
    """Every intermediate result is reduced modulo this (10: each trace step is a single-digit fact)."""
    max_operand: int = 9
    """Operands are drawn from 1..max_operand."""
    train_ops: list[int] = field(default_factory=lambda: [2, 4])
    """[min, max] operations in SFT examples and RL prompts."""
    test_ops: list[int] = field(default_factory=lambda: [3, 4])
    """[min, max] operations in the held-out `test` split."""
    ood_ops: list[int] = field(default_factory=lambda: [5, 5])
    """[min, max] operations in the `ood` split (longer than anything SFT or RL trains on)."""
    pretrain_ops: list[int] = field(default_factory=lambda: [1, 5])
    """[min, max] operations in the tiny model's pretraining text."""
    path: Optional[str] = None
    """(gsm8k, math, jsonl) SFT and RL data: a local .jsonl/.json/.parquet file or directory, or a Hub dataset name."""
    sft_path: Optional[str] = None
    """(dataset tasks) SFT traces from another source than task.path (e.g. traces distilled from a stronger model)."""
    rl_path: Optional[str] = None
    """(dataset tasks) RL prompts from another source than task.path."""
    eval_sets: Dict[str, str] = field(default_factory=dict)
    """(dataset tasks) evaluation sets, split name -> source, e.g. {test: data/math500.jsonl, gsm8k: gsm8k.jsonl}."""
    subset: Optional[str] = None
    """(dataset tasks) Hub dataset configuration, e.g. main for openai/gsm8k."""
    train_split: str = "train"
    """(dataset tasks) Hub split read for SFT and RL."""
    eval_split: str = "test"
    """(dataset tasks) Hub split read for each evaluation set."""
    question_field: Optional[str] = None
    """(dataset tasks) field holding the question (default: question; problem for math)."""
    trace_field: Optional[str] = None
    """(dataset tasks) field holding the reasoning trace for SFT (default: trace; answer for gsm8k; solution for
    math)."""
    answer_field: Optional[str] = None
    """(dataset tasks) field holding the gold answer (default: answer; gsm8k reads it after `####`; math falls back
    to the solution's last \\boxed{})."""
    prompt_template: str = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    """(dataset tasks) the prompt around {question} (SimpleRL style by default), before the model's chat template."""
    chat_template: bool = True
    """(dataset tasks) wrap prompts in the tokenizer's chat template when it has one (a plain prompt otherwise)."""
    verify_timeout_s: int = 5
    """(dataset tasks) time limit of one math-verify check, in seconds (a check that overruns scores 0)."""
    system_prompt: Optional[str] = None
    """(dataset tasks) a system message put before every prompt's conversation (rows that open with their own
    system turn keep it); needs the tokenizer's chat template."""
    reward_funcs: list[str] = field(default_factory=list)
    """The training reward as a weighted sum of functions, TRL's convention (tasks/rewards.py): `verifier` (the
    task's own check), `pkg.module:function` or `path/to/file.py:function`, each called as f(prompts=...,
    completions=..., **row columns) and returning one float or None per completion, or a reward model's directory
    (a sequence-classification model scoring prompt + completion, as TRL takes a model id; tasks/reward_model.py).
    Empty: the verifier alone. Evaluation always scores with the verifier alone."""
    reward_weights: Optional[list[float]] = None
    """Weight of each of task.reward_funcs in the sum (one per function; null: 1.0 each)."""
    reward_timeout_s: float = 60.0
    """Longest one call of a task.reward_funcs function may take, in seconds; a longer one has the functions' worker
    process killed and fails the run. Must be positive (0 and null are refused): the functions always run in that
    process, so there is no unlimited mode, only a large limit."""


@dataclass
class PretrainConfig:
    steps: int = 800
    """Pretraining steps of the tiny base model (0: keep the random initialisation, e.g. to benchmark a larger
    width without pretraining it)."""
    batch_size: int = 128
    """Problems per pretraining step."""
    lr: float = 1.0e-3
    """Peak learning rate (one-cycle cosine schedule)."""
    trace_fraction: float = 0.3
    """Share of pretraining examples written as step-by-step traces (the rest are direct answers)."""
    seed: int = 0
    """Seed of the weights' initialisation and of the pretraining data."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Model: tiny (built in) or hf (any causal LM by Hub id or local directory: model.name_or_path)."""
    name_or_path: Optional[str] = None
    """(model=hf) Hub id or local directory of a transformers causal LM and its tokenizer."""
    init_from: Optional[str] = None
    """Start from these weights instead of the model's own: a bridgectl run directory (its checkpoints/final, any
    adapters merged), a model directory or a peft adapter directory (merged into its base). The architecture and
    tokenizer are theirs; LoRA then trains a new adapter over them and the KL reference is them. SFT in one run and
    RL in the next: `bridgectl run recipe=rl model.init_from=runs/<sft run>`."""
    trust_remote_code: bool = False
    """(model=hf) run the model repository's own code; off unless you set it."""
    dtype: str = "auto"
    """Weights' dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    finetune: str = "full"
    """What trains: `full` (every weight; the tiny model learns best so) or `lora` (a peft adapter, base frozen)."""
    hidden_size: int = 128
    """Width of the tiny Llama."""
    num_layers: int = 4
    """Transformer blocks of the tiny Llama."""
    num_heads: int = 4
    """Attention heads of the tiny Llama."""
    max_positions: int = 96
    """Longest sequence the tiny Llama handles (prompt + completion)."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: sdpa or eager (eager is needed for double backward on CPU)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """How the tiny base weights are built."""


@dataclass
class LoraConfig:
    rank: int = 8
    """LoRA rank r, the same in every recipe (BRIDGE's theta and theta_hat included; its extra adapter w has
    bridge.w_rank), so that recipes compared at their defaults train adapters of equal capacity."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names that get adapters; [all-linear] is every linear layer except the output head, found by peft
    for any architecture (on Llama-style models: q, k, v, o, gate, up and down projections)."""
    forward: str = "auto"
    """How LoRA layers compute in training passes: merged (x @ (W + s B A)^T, one linear: faster on small models),
    unmerged (peft's W x + s B A x: cheaper with a frozen base on large models) or auto (merged below 20M base
    parameters). Same function either way; core/lora_forward.py has the measurements."""
    sampling: str = "auto"
    """How sampling (rollouts, evaluation) computes adapted layers: merged (each adapted weight is swapped for
    W + sum s B A while sampling, so decoding costs what the base model's does, for one copy of the adapted
    weights), unmerged (peft's forward: no copy, five more small operations per layer and adapter every token) or
    auto (merged, unless on an accelerator the copy would take more than half its free memory). SmolLM2-135M,
    16 rows, 2 CPU threads: 90 -> 135 tokens/s with one adapter, 81 -> 132 with BRIDGE's two (benchmarks)."""


@dataclass
class OptimConfig:
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    max_grad_norm: float = 1.0
    """Gradient norm clip per update (0 disables)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in updates of each optimizer."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant or cosine (to 10% of the peak)."""


@dataclass
class SFTConfig:
    lr: float = 5.0e-4
    """Learning rate of SFT updates."""
    batch_size: int = 64
    """Examples per SFT update."""


@dataclass
class RLConfig:
    lr: float = 1.0e-4
    """Learning rate of RL updates (the tiny base collapses above ~1e-4 with RL on a direct-answer base)."""
    prompts_per_step: int = 16
    """Distinct prompts per RL update."""
    num_generations: int = 8
    """Completions sampled per prompt (the GRPO group size; TRL's name). At least 2."""
    beta: float = 0.0
    """KL coefficient to the frozen reference (TRL's default is 0.0: no reference model is kept)."""
    use_bias_correction_kl: bool = True
    """With rl.beta > 0: weight each token's k3 KL by the importance ratio pi/pi_old, as TRL 1.16's GRPO does by
    default (its `use_bias_correction_kl`); false: the plain k3 term. Every recipe whose RL loss is
    core/policy_losses.grpo_loss follows it; luffy and srft keep the plain k3 term of verl's KL loss, which their papers'
    code (verl) uses."""
    epsilon: float = 0.2
    """PPO clip range of the importance ratio: clip(r, 1 - epsilon, 1 + epsilon_high)."""
    epsilon_high: Optional[float] = None
    """Upper clip range (TRL's name; DAPO's "Clip-Higher", arXiv 2503.14476, recommends 0.28); null: rl.epsilon."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probs are computed at the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling of rollouts (TRL's name): draw from the fewest most likely tokens holding top_p of the
    probability (1.0: off). The ratio's log-probs stay the untruncated distribution's (as TRL's)."""
    top_k: int = 0
    """Draw rollout tokens from the k most likely only (TRL's name; 0: off)."""
    min_p: float = 0.0
    """Draw rollout tokens from those at least min_p x as likely as the most likely one (TRL's name; 0.0: off)."""
    max_completion_length: int = 48
    """Most tokens generated per completion."""
    mask_truncated_completions: bool = False
    """Leave completions that reach max_completion_length without EOS out of the loss, numerator and token count
    (TRL's name; DAPO's overlong filtering)."""
    scale_rewards: str = "group"
    """Advantage scaling (TRL's name): group (divide by the group's std, GRPO), batch (by the std of all the step's
    rewards, over every process) or none (Dr. GRPO)."""
    loss_type: str = "dapo"
    """The policy loss (TRL's name and default): the clipped surrogate reduced as dapo (sum / the step's completion
    tokens), grpo (mean per completion, then over completions), dr_grpo (sum / (completions x
    max_completion_length)), bnpo (sum / this process's completion tokens: TRL's "local batch"; equal to dapo in one
    process) or luspo (arXiv 2602.05261: the mean over completions of their token sums, so a completion counts by
    its length; meant with rl.importance_sampling_level=sequence); or cispo (MiniMax-M1, arXiv 2506.13585: the
    importance weight capped at epsilon_high and detached, times A log pi; reduced as dapo), sapo (a soft sigmoid
    gate in place of the clip, temperatures rl.sapo_temperature_pos/neg; reduced as grpo) or vespo (arXiv
    2602.10693: a smooth Gamma-shaped weight of the completion's importance ratio, rl.vespo_*, times A log pi;
    reduced as dapo; token-level ratios only)."""
    importance_sampling_level: str = "token"
    """token (GRPO: one ratio per token) or sequence (GSPO, arXiv 2507.18071: exp of the completion's mean
    log-ratio, for all its tokens; TRL's name and default)."""
    delta: Optional[float] = None
    """Two-sided clipping (TRL's name; arXiv 2505.22617): the unclipped ratio is also capped at delta, so a
    negative-advantage token's ratio cannot grow the loss without bound; null: off. Must exceed 1 + epsilon_high."""
    top_entropy_quantile: float = 1.0
    """Keep only this share of the step's loss tokens, those of highest entropy, in the policy term (TRL's name;
    arXiv 2506.01939: 0.2, the "forking tokens"); 1.0: all. The quantile is over the whole step (over every
    process), so micro-batches change nothing."""
    entropy_coef: float = 0.0
    """Entropy bonus (TRL's name): the loss minus entropy_coef x the mean token entropy of the tokens trained on
    (0: none; train/entropy is logged either way)."""
    sapo_temperature_pos: float = 1.0
    """(loss_type sapo) the gate's temperature for positive advantages (TRL's name and default)."""
    sapo_temperature_neg: float = 1.05
    """(loss_type sapo) the gate's temperature for negative advantages (TRL's name and default)."""
    vespo_k_pos: float = 2.0
    """(loss_type vespo) the power k of the weight w^k exp(lambda (1 - w)) for A >= 0: how fast completions the
    current policy finds less likely than the sampler did are down-weighted (TRL's name and default)."""
    vespo_lambda_pos: float = 3.0
    """(loss_type vespo) the decay lambda for A >= 0: how fast completions it finds more likely are down-weighted."""
    vespo_k_neg: float = 3.0
    """(loss_type vespo) the power k for A < 0 (TRL's name and default)."""
    vespo_lambda_neg: float = 2.0
    """(loss_type vespo) the decay lambda for A < 0 (TRL's name and default)."""
    off_policy_mask_threshold: Optional[float] = None
    """DeepSeek-V3.2's off-policy sequence masking (arXiv 2512.02556, Eq. 9; TRL's name): a completion with a negative
    advantage whose mean per-token log-prob drop from the policy that sampled it (the engine's log-probs with
    rollout.backend=vllm) to the current one exceeds this is left out of the policy term; null: off (e.g. 0.5)."""
    vllm_importance_sampling_correction: bool = True
    """With rollout.backend=vllm: multiply each token's policy term by the trainer-over-engine importance ratio
    (truncated or masked importance sampling, TRL's name and default: on), since the engine samples from
    probabilities its kernels compute slightly differently; rollout/is_corrected logs the share it bounded. No
    effect with the built-in sampler, which samples from the trained model itself."""
    vllm_importance_sampling_mode: str = "sequence_mask"
    """(rollout correction) token_truncate, token_mask, sequence_truncate or sequence_mask (TRL's name and
    default): one ratio per token or per completion, clamped to the bounds or set to 0 outside them."""
    vllm_importance_sampling_clip_min: Optional[float] = None
    """(rollout correction) the lower bound of the ratio (null: none; TRL's name and default)."""
    vllm_importance_sampling_clip_max: Optional[float] = 3.0
    """(rollout correction) the upper bound of the ratio (null: none; TRL's name and default)."""
    multi_objective_aggregation: str = "sum_then_normalize"
    """With several task.reward_funcs (TRL's name and default): sum_then_normalize (the weighted sum is the reward,
    its advantage as rl.adv_estimator and rl.scale_rewards say) or normalize_then_sum (GDPO, as TRL: each function's
    rewards normalised within their group, the weighted sum then normalised over the step: it is the advantage, so
    rl.scale_rewards and rl.adv_estimator stay at their defaults)."""
    adv_estimator: str = "grpo"
    """The advantage (verl's name, algorithm.adv_estimator): grpo (reward minus the group's mean, scaled by
    rl.scale_rewards), rloo (REINFORCE leave-one-out, arXiv 2402.14740, TRL's RLOOTrainer: reward minus the mean
    of the group's other rewards; with rl.scale_rewards=none as TRL's default, or batch for its
    normalize_advantages), reinforce_plus_plus (arXiv 2501.03262, verl's: the rewards whitened over all the step's
    completion tokens, no group baseline) or reinforce_plus_plus_baseline (verl's: the group's mean subtracted,
    then whitened likewise); the two REINFORCE++ take rl.scale_rewards=batch (their whitening is the batch
    scaling)."""
    filter_groups: bool = False
    """Dynamic sampling (DAPO, arXiv 2503.14476, Sec. 3.2; verl's algorithm.filter_groups.enable; TRL has none):
    drop prompt groups whose rewards are all equal and sample more prompts until the batch holds
    rl.prompts_per_step groups with reward variance (train/sampling_rounds, train/dropped_groups,
    train/batch_filled are logged). The rl, interleaved, mix, chord and bridge stages."""
    max_num_gen_batches: int = 10
    """(rl.filter_groups) most sampling rounds of rl.prompts_per_step prompts per step (verl's name); when they run
    out the step trains on the groups it has."""
    overlong_buffer_len: int = 0
    """DAPO's soft overlong punishment (Eq. 13; verl's overlong_buffer.len, TRL's soft_punish_cache): completions
    longer than rl.max_completion_length - this many tokens get a reward penalty falling linearly to
    -rl.overlong_penalty_factor at rl.max_completion_length; 0: off. Evaluation is never shaped."""
    overlong_penalty_factor: float = 1.0
    """(rl.overlong_buffer_len) the penalty at rl.max_completion_length (verl's overlong_buffer.penalty_factor)."""
    num_iterations: int = 1
    """Optimizer updates per batch of rollouts (TRL's name, mu of GRPO): from the second on the ratio to the
    sampling policy moves and clipping acts. The rl and interleaved stages only."""


@dataclass
class RolloutConfig:
    backend: str = "hf"
    """Who samples RL rollouts (and decodes evaluations): hf (the trained model itself, KV-cached, any device) or
    vllm (a vLLM engine in this process on the same device, TRL's colocate mode, one engine per process under
    --nproc N; `pip install 'bridgectl[vllm]'`; vLLM's CPU build runs on the CPU). With vllm the trained weights,
    adapters merged in, are loaded into the engine before every sampling call, and the log-probs the GRPO ratio
    needs are recomputed by the trained model, so the update is the same as with hf."""
    gpu_memory_utilization: float = 0.3
    """(vllm) Share of the GPU's memory the engine may take for its weight copy and KV cache (TRL's default; the
    rest is for training)."""
    max_model_len: Optional[int] = None
    """(vllm) Longest prompt + completion the engine plans its KV cache for; the model's own limit when null."""
    enforce_eager: bool = False
    """(vllm) Skip CUDA-graph capture: slower decoding, faster start and less memory."""
    batch_size: int = 0
    """(hf) Most rows the built-in sampler decodes at once (whole prompt groups; 0: every row of the step at
    once). Bounds the KV cache: rows x (prompt + completion) tokens x layers."""
    cpu_packed_weights: bool = True
    """(hf, on the CPU) Decode rollouts and evaluations with the linear layers' float32 weights packed for oneDNN
    once per sampling call (core/packed_linear.py), for models of 4M linear-layer parameters and up: 1.27-1.51x
    the tokens/s of PyTorch's plain matmuls on SmolLM2-135M (benchmarks/results.md, "decode"), for a packed copy
    of the weights held while sampling. The same tokens up to float rounding; false: the plain matmuls."""


@dataclass
class EvalConfig:
    n: int = 300
    """Problems per evaluation split (the same problems for every run)."""
    max_new_tokens: int = 48
    """Most tokens generated per greedy answer."""
    batch_size: int = 300
    """Problems per generation batch."""
    k: int = 0
    """Sampled evaluation beside greedy pass@1, in `bridgectl eval` and in every evaluation during training: pass@j
    (unbiased estimator from `samples` answers per problem) and maj@j (majority vote of the first j) for j = 1, 2,
    4, ... up to k, and mean@samples (0: greedy pass@1 only). Costs `samples` generations per problem."""
    samples: int = 0
    """Sampled answers per problem for eval.k (0: k; more than k lowers the variance of pass@k's estimate)."""
    temperature: float = 1.0
    """Sampling temperature of the sampled evaluation."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Total updates over all stages (recipes split it with `recipe.fractions`); with a compute budget, the most
    steps and the horizon of step-based schedules."""
    budget_flops: Optional[float] = None
    """End the run at this many FLOPs of sampling and training (core/flops.py's estimate, over every process),
    split between the stages as their steps are: every recipe stops within one step of equal compute
    (bridgectl/training/budget.py); null: train.max_steps alone ends it."""
    budget_tokens: Optional[float] = None
    """The same budget counted in tokens: generated + trained (once per forward+backward pass)."""
    eval_every_compute: Optional[float] = None
    """Evaluate each time the run's total compute passes another multiple of this (in the budget's unit: FLOPs,
    or tokens with train.budget_tokens), instead of every train.eval_every steps: curves at equal compute."""
    eval_every: int = 50
    """Greedy evaluation of every split each this many steps (0: only before and after)."""
    log_completions_every: int = 25
    """Write a sample of rollouts to completions.jsonl each this many RL steps."""
    no_signal_warn_after: int = 3
    """Warn once when this many RL steps in a row had no learning signal (rollout/no_signal; 0: never)."""
    threads: int = 2
    """torch CPU threads (0: torch's default)."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint (weights, optimizers, RNG, data position) each this many steps (0: never; a
    Ctrl-C or SIGTERM still writes one)."""
    keep_checkpoints: int = 2
    """How many of the newest resumable checkpoints to keep (checkpoints/final is always kept)."""
    micro_batch_size: int = 0
    """Rows (rollouts or SFT examples) per forward/backward pass; a step's passes accumulate their gradients, and
    every loss keeps the step's whole token count as its denominator, so the update equals the one-pass update to
    float rounding (0: the whole batch in one pass). Rows of similar length share a micro-batch."""
    fsdp: bool = False
    """With `--nproc N`: shard weights, gradients and optimizer states over the N processes (PyTorch FSDP2, one
    unit per decoder layer) instead of a whole copy on each, for models that do not fit one device. Results equal
    the unsharded run; every forward pass (sampling included) gathers each layer's weights as it goes. No effect
    in one process."""


@dataclass
class WandbConfig:
    mode: str = "disabled"
    """W&B logging of each run: online, offline (a local run directory to `wandb sync` later) or disabled. The run
    directory stays the source of truth for `compare`; W&B is a view of it."""
    project: str = "bridgectl"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user); your default when null."""
    group: Optional[str] = None
    """W&B group; default: the sweep's study name, else the recipe."""


@dataclass
class TrackerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases."""
    tensorboard: bool = False
    """Also write every row of metrics.jsonl as TensorBoard scalars (x = step) to `<run>/tensorboard/`, so
    `tensorboard --logdir runs/` shows runs (and a sweep's trial runs) side by side; needs the `tensorboard` package
    (`pip install 'bridgectl[tensorboard]'`)."""


@dataclass
class SharedConfig:
    """The sections every recipe shares; `Config` adds each registered stage's own section (stages/__init__.py)."""

    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    """Which stages run, in which order, with which budgets (`recipe=NAME` picks a shipped one)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task: data for SFT and RL, eval splits and the verifier."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model and what of it trains."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter settings (model.finetune=lora: every stage's trained adapter, BRIDGE's theta included)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer settings shared by every update rule."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """SFT updates (stages sft, interleaved, and the SFT batches of mix and bridge)."""
    rl: RLConfig = field(default_factory=RLConfig)
    """GRPO settings, used by every stage that samples rollouts."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """How RL rollouts are sampled (the hf or vllm backend)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Greedy evaluation settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Budget, evaluation cadence, threads and device."""
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    """Where runs are logged besides their run directory."""
    seed: int = 0
    """Seed of data order, sampling and any fresh weights."""


def _with_stage_sections() -> type:
    """The whole schema: the shared sections with each registered stage's own section (named as the stage, e.g.
    `bridge.*`, its dataclass in stages/<stage>_config.py) between `rollout` and `eval`, in registry order."""
    hints = get_type_hints(SharedConfig)

    def copied(item):  # a shared field, as make_dataclass takes it
        default = (
            field(default_factory=item.default_factory)
            if item.default_factory is not dataclasses.MISSING
            else field(default=item.default)
        )
        return item.name, hints[item.name], default

    shared = [copied(item) for item in fields(SharedConfig)]
    cut = next(index for index, (name, _, _) in enumerate(shared) if name == "eval")
    own = [(kind, info.config, field(default_factory=info.config)) for kind, info in STAGES.items() if info.config]
    schema = dataclasses.make_dataclass("Config", shared[:cut] + own + shared[cut:])
    schema.__module__, schema.__doc__ = __name__, "The schema of a run's config: config.yaml holds one of these."
    return schema


Config = _with_stage_sections()
ConfigStore.instance().store(name="bridgectl_schema", node=Config)


user_recipes: set[str] = set()
"""Recipe names registered from user files in this process (config.register_recipe_file)."""


def group_options(group: str) -> list[str]:
    """The choices of config group `group` (recipe, task, model, experiment): the YAML files in conf/<group>/, and
    for recipe the user's recipe files registered in this process."""
    options = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    return sorted(options | user_recipes) if group == "recipe" else sorted(options)


@functools.cache
def schema_types() -> dict[str, Any]:
    """{dotted key: annotated type} of every leaf key of the schema (a dataclass-typed field is a section)."""

    def walk(cls: type, prefix: str):
        hints = get_type_hints(cls)
        for item in fields(cls):
            if is_dataclass(hints[item.name]):
                yield from walk(hints[item.name], f"{prefix}{item.name}.")
            else:
                yield f"{prefix}{item.name}", hints[item.name]

    return dict(walk(Config, ""))


@functools.cache
def schema_defaults() -> DictConfig:
    # built once: OmegaConf.structured(Config) takes ~40 ms, and validate() runs on every compose
    return OmegaConf.structured(Config)


def example(key: str) -> Any:
    """The schema's default of `key` (the value error hints show)."""
    return OmegaConf.select(schema_defaults(), key)
