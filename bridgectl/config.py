"""Typed configuration: dataclasses registered with Hydra are the single source of truth.

`compose(overrides)` builds the config exactly as `bridgectl run` does (Hydra's compose API over the YAML files in
`bridgectl/conf/`, checked against these dataclasses), then `validate` rejects values no run could use. Every problem
is raised as `UserError`, which the CLI prints as `Error:` + `Hint:` and exit code 2.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union, get_args, get_origin, get_type_hints

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from bridgectl.errors import UserError
from bridgectl.stages import STAGES
from bridgectl.trl_names import trl_hint

CONF_DIR = Path(__file__).resolve().parent / "conf"
DICT_FIELDS = ("task.eval_sets",)  # config keys whose value is a {name: value} mapping


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
    completions=..., **row columns) and returning one float or None per completion. Empty: the verifier alone.
    Evaluation always scores with the verifier alone."""
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
    """LoRA rank r."""
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
    core/losses.grpo_loss follows it; luffy and srft keep the plain k3 term of verl's KL loss, which their papers'
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
    """How token losses are reduced (TRL's name and default): dapo (sum / the step's completion tokens), grpo (mean
    per completion, then over completions) or dr_grpo (sum / (completions x max_completion_length))."""
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


@dataclass
class InterleaveConfig:
    rl_steps: int = 1
    """RL updates per cycle of the interleaved stage."""
    sft_steps: int = 1
    """SFT updates per cycle of the interleaved stage."""


@dataclass
class BridgeConfig:
    lower: str = "full"
    """What theta and theta_hat are: full (the model's weights; the paper) or lora (an adapter of rank lora.rank)."""
    lam: float = 0.5
    """lambda in [0, 1]: weight of RL (and of the cooperative gain) against SFT, Eq. 7 (paper: 0.5)."""
    lam_start: Optional[float] = None
    """With lam_end: ramp lambda linearly from lam_start to lam_end over the stage instead of constant lam."""
    lam_end: Optional[float] = None
    """End of the lambda ramp (see lam_start)."""
    alpha: float = 1.0e-4
    """Learning rate of the lower level theta and of the shadow theta_hat (paper's alpha)."""
    beta: float = 1.0e-3
    """Learning rate of the upper-level LoRA adapter w (paper's beta; not reported there)."""
    sft_scale: float = 1.0
    """Multiplies the SFT term at both levels (1 = paper; a deviation for scales where SFT and RL want
    different step sizes)."""
    w_rank: int = 8
    """Rank of the upper-level adapter w."""
    w_alpha: int = 16
    """LoRA alpha of w."""
    shadow: str = "persistent"
    """persistent (Algorithm 2: an RL-only copy trained alongside) or lookahead (Eq. 10: theta + one RL step)."""
    shadow_rollouts: bool = False
    """Also sample the shadow's own rollouts each step and log bridge/reward_gap (costs one more generation)."""
    optimizer: str = "adamw"
    """adamw, or sgd (plain theta -= lr * grad, for exact-update checks)."""
    upper: str = "cooperative"
    """The upper level: cooperative (w on the cooperative gain, Eqs. 11-12, the paper's method), joint (the
    paper's "w/o J_meta" ablation: w on the joint loss (1-lam) L_sft + lam L_rl only, no shadow) or none (no
    adapter w: theta alone on the fused loss)."""


@dataclass
class MixConfig:
    mu: float = 0.5
    """Weight of the SFT loss in L_rl + mu * L_sft (start value when mu_end is set)."""
    mu_end: Optional[float] = None
    """When set, mu decays linearly from mu to mu_end over the stage."""
    lr: float = 2.0e-4
    """Learning rate of the mixed update."""


@dataclass
class ChordConfig:
    mu_peak: float = 0.5
    """Highest mu, the SFT weight in (1 - mu) L_grpo + mu L_sft (Trinity-RFT's mix_chord.yaml: 0.5)."""
    mu_valley: float = 0.02
    """mu after the decay, kept to the end of the stage (mix_chord.yaml: 0.02)."""
    mu_warmup_steps: int = 50
    """Updates over which mu rises linearly from 0 to mu_peak (mix_chord.yaml: 200; scaled by 1/4 to the
    150-update chord recipe)."""
    mu_decay_steps: int = 100
    """Updates over which mu then falls from mu_peak to mu_valley along a half cosine (mix_chord.yaml: 400; scaled
    by 1/4 likewise)."""
    phi: bool = False
    """CHORD-phi: weight each expert token's NLL by p (1 - p), p the model's probability of that token (detached)."""
    lr: float = 1.0e-4
    """Learning rate of the CHORD update (one optimizer for both terms; the RL rate, since mu starts at 0 and ends
    at the valley, where the update is nearly all GRPO)."""


@dataclass
class HPTConfig:
    gate: int = 0
    """A prompt with at most this many correct rollouts (of rl.num_generations) trains on its own demonstration
    (SFT) instead of GRPO (the reference's SWITCH_GATE=0); -1: never, which is the rl stage."""
    sft_coef: float = 1.0
    """Weight of the SFT term in L_grpo(other prompts) + sft_coef * L_sft(demonstrations) (SFT_LOSS_COEF=1.0)."""
    lr: float = 1.0e-4
    """Learning rate of the HPT update (one optimizer for both terms)."""


@dataclass
class LuffyConfig:
    off_policy: int = 1
    """Off-policy members per group: each prompt's group is rl.num_generations - off_policy rollouts plus this many
    copies of the prompt's demonstration (the reference's n_prefix=1); 0 is the rl stage."""
    gamma: float = 0.1
    """gamma of the policy shaping f(p) = p / (p + gamma) applied to the demonstration tokens' probabilities
    (paper: 0.1)."""
    std_normalize: bool = True
    """Divide the mixed group's centred rewards by their std (the paper's advantage; the released script turns it
    off: algorithm.grpo_use_std=False)."""
    lr: float = 1.0e-4
    """Learning rate of the LUFFY update."""


@dataclass
class SRFTConfig:
    sft_coef: float = 0.5
    """c in the demonstrations' SFT weight c * exp(-H), H the policy's mean token entropy on that demonstration,
    detached (paper: 0.5)."""
    rl_coef: float = 0.1
    """c in the weight c * exp(H) of a correct rollout's log-likelihood term, H its mean token entropy, detached
    (paper: 0.1)."""
    lr: float = 1.0e-4
    """Learning rate of the SRFT update."""


@dataclass
class ReliftConfig:
    buffer_size: int = 8
    """Hardest prompts (none of their rl.num_generations rollouts rewarded), kept with their demonstrations, that
    start an SFT round: each time the buffer holds this many, the oldest this many are trained on and leave (the
    reference's sft_data_size, 64 for 128 prompts per step; scaled to 8 for rl.prompts_per_step=16)."""
    sft_lr: float = 5.0e-4
    """Learning rate of the SFT updates, which have their own AdamW (the reference's optim.sft.lr, 1e-6 like its RL
    rate; the tiny task's SFT wants ~5e-4). The RL updates use rl.lr."""
    sft_epochs: int = 1
    """Passes over the buffered examples in one SFT round (the reference's sft_epochs=1)."""
    sft_mini_batch_size: int = 0
    """Examples per SFT update within a round (0: all buffer_size of them, one update per epoch, as the reference's
    sft_mini_batch_size = sft_data_size)."""


@dataclass
class UFTConfig:
    hint_start: float = 0.95
    """p at the first update: the expected share of each demonstration given as a hint (the reference's
    upper_prob=0.95)."""
    hint_end: float = 0.05
    """p at the end of the hint phase, reached along a half cosine (lower_prob=0.05); no hint after the phase."""
    hint_fraction_of_steps: float = 0.6
    """Share of the stage's updates that give hints (the reference's T_hint / T = 300 / 500); 0: never."""
    hint_chunks: int = 5
    """Equal token spans a demonstration is cut into (fewer when it is shorter); each is revealed with probability p,
    so a hint is a Binomial(hint_chunks, p) number of spans (the reference's min(5, len(hint)))."""
    sft_coef: float = 0.001
    """Weight of the hint tokens' NLL, -log pi(hint | question), added to the GRPO loss (the reference's
    sft_loss_coef=0.001)."""
    lr: float = 1.0e-4
    """Learning rate of the UFT update (the reference's 1e-6 on 0.5-3B models; the tiny task's RL rate)."""


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
    """Total updates over all stages (recipes split it with `recipe.fractions`)."""
    eval_every: int = 50
    """Greedy evaluation of every split each this many steps (0: only before and after)."""
    log_completions_every: int = 25
    """Write a sample of rollouts to completions.jsonl each this many RL steps."""
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
class Config:
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    """Which stages run, in which order, with which budgets (`recipe=NAME` picks a shipped one)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The task: data for SFT and RL, eval splits and the verifier."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model and what of it trains."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapter settings (model.finetune=lora, or BRIDGE's lower level with bridge.lower=lora)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer settings shared by every update rule."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """SFT updates (stages sft, interleaved, and the SFT batches of mix and bridge)."""
    rl: RLConfig = field(default_factory=RLConfig)
    """GRPO settings, used by every stage that samples rollouts."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """How RL rollouts are sampled (the hf or vllm backend)."""
    interleave: InterleaveConfig = field(default_factory=InterleaveConfig)
    """The alternation pattern of the interleaved stage."""
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    """BRIDGE (bilevel SFT + RL) settings."""
    mix: MixConfig = field(default_factory=MixConfig)
    """Mixed-loss stage settings."""
    relift: ReliftConfig = field(default_factory=ReliftConfig)
    """ReLIFT stage settings: the buffer of hardest prompts and its SFT rounds."""
    uft: UFTConfig = field(default_factory=UFTConfig)
    """UFT stage settings: the hint schedule and the hint's log-likelihood term."""
    luffy: LuffyConfig = field(default_factory=LuffyConfig)
    """LUFFY stage settings: demonstrations as off-policy group members, policy shaping."""
    srft: SRFTConfig = field(default_factory=SRFTConfig)
    """SRFT stage settings: the entropy weights of its SFT and RL terms."""
    chord: ChordConfig = field(default_factory=ChordConfig)
    """CHORD stage settings: the mu schedule and the optional phi weighting."""
    hpt: HPTConfig = field(default_factory=HPTConfig)
    """HPT stage settings: the per-prompt switch between GRPO and SFT."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Greedy evaluation settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Budget, evaluation cadence, threads and device."""
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    """Where runs are logged besides their run directory."""
    seed: int = 0
    """Seed of data order, sampling and any fresh weights."""


ConfigStore.instance().store(name="bridgectl_schema", node=Config)


_user_recipes: set[str] = set()


def group_options(group: str) -> list[str]:
    options = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    return sorted(options | _user_recipes) if group == "recipe" else sorted(options)


def register_recipe_file(path: Path) -> str:
    """Makes a user's recipe YAML selectable as `recipe=<its stem>`. The file holds `recipe:` (and optionally
    `train:` or any other section), like the shipped recipes; command-line overrides still win over it."""
    if not path.is_file():
        raise UserError(f"recipe file {path} does not exist", "give a path to a YAML file like bridgectl/conf/recipe/two_stage.yaml")
    try:
        content = OmegaConf.load(path)
    except Exception as error:  # yaml's own errors: any unreadable file is bad input
        raise UserError(f"recipe file {path} is not valid YAML: {_first_line(error)}", "check its indentation") from None
    if not isinstance(content, DictConfig) or "recipe" not in content:
        raise UserError(f"recipe file {path} has no `recipe:` section",
                        "write `recipe: {name: mine, stages: [sft, rl]}` at the top level")
    try:  # check every key and type against the schema before the file becomes selectable
        OmegaConf.merge(OmegaConf.structured(Config), content)
    except OmegaConfBaseException as error:
        translated = _translate(error)
        raise UserError(f"in recipe file {path}: {translated.message}", translated.hint) from None
    name = f"file:{path.stem}"
    ConfigStore.instance().store(group="recipe", name=name, node=content, package="_global_")
    _user_recipes.add(name)
    return name


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The resolved, typed, validated config for these Hydra overrides."""
    # Hydra refuses new keys in a dict-valued field (`task.eval_sets={test: a.jsonl}`) unless forced with ++
    overrides = [f"++{item}" if item.split("=", 1)[0] in DICT_FIELDS else item for item in overrides]
    for group in ("recipe", "task", "model", "experiment"):
        for item in overrides:
            if item.startswith(f"{group}=") and item.split("=", 1)[1] not in group_options(group):
                raise UserError(f"unknown {group} '{item.split('=', 1)[1]}'",
                                f"choose one of: {', '.join(group_options(group))}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise _translate(error) from None
    validate(cfg)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """Applies Hydra-syntax `key=value` overrides to an already resolved config (a run's config.yaml) in place and
    returns the keys whose value changed. Unknown keys and unparsable values are UserErrors."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    changed = []
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as error:
        raise UserError(f"bad override: {_first_line(error)}", "overrides look like key=value, e.g. eval.n=500") from None
    for override in parsed:
        key = override.key_or_group
        if key in ("recipe", "task", "model") and isinstance(override.value(), str):  # a config group choice
            chosen, current = override.value(), cfg[key].name
            if chosen != current and Path(chosen).stem != current:
                raise UserError(f"{key}={chosen} does not match the saved config ({key} {current})",
                                f"a run keeps its {key}; start a new run for {chosen}")
            continue
        missing = object()
        before = OmegaConf.select(cfg, key, default=missing)
        if before is missing:
            raise _unknown_key(key)
        try:
            OmegaConf.update(cfg, key, override.value(), merge=False)
        except OmegaConfBaseException as error:
            raise _translate(error) from None
        after = OmegaConf.select(cfg, key)
        plain = (lambda v: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v)
        if plain(before) != plain(after):
            changed.append(key)
    return changed


def load_saved(path: Path) -> DictConfig:
    """A run's config.yaml, typed by the schema, once it is known whole (run_config.check_whole: a file cut short or
    missing keys is refused, naming them, not filled with defaults). Only keys added to the schema since an older
    bridgectl wrote the file take their defaults."""
    from bridgectl.run_config import check_whole, read_config

    saved = read_config(path)
    check_whole(path, path.read_text(), saved, schema_types())
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), saved)
    except OmegaConfBaseException as error:
        raise UserError(f"{path} does not match this version's config: {_translate(error).message}",
                        "it was written by another bridgectl version or edited by hand") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _translate(error: Exception) -> UserError:
    """Hydra/OmegaConf errors as one readable line and a hint naming the valid choices."""
    cause = error.__cause__ or error
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and full_key:
        return _unknown_key(full_key)
    if isinstance(cause, ValidationError) and full_key:
        return UserError(f"bad value for '{full_key}': {_first_line(cause)}", _type_hint(full_key))
    return UserError(_first_line(error),
                     "overrides look like key=value, e.g. `bridgectl run recipe=rl train.max_steps=40 seed=1`")


def _unknown_key(full_key: str) -> UserError:
    """An unknown key, with bridgectl's name for a TRL name (trl_names.py), else the closest key of its section."""
    parent, _, leaf = full_key.rpartition(".")
    if trl_hint(leaf):
        return UserError(f"unknown key '{full_key}'", trl_hint(leaf))
    node = OmegaConf.select(_schema_defaults(), parent) if parent else _schema_defaults()
    valid = list(node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"did you mean '{parent + '.' if parent else ''}{close[0]}'? " if close else ""
    return UserError(f"unknown key '{full_key}'", hint + f"keys under '{parent or 'the root'}': {', '.join(valid)}")


@functools.lru_cache(maxsize=None)
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


_SINGULAR = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "whole numbers", float: "numbers", bool: "true/false values", str: "strings"}


def _type_words(kind: Any) -> str:
    if get_origin(kind) is Union:  # Optional[X]
        return _type_words(next(arg for arg in get_args(kind) if arg is not type(None))) + " or null"
    if get_origin(kind) is list:
        return f"a list of {_PLURAL[get_args(kind)[0]]}"
    if get_origin(kind) is dict:
        return f"a mapping of names to {_PLURAL[get_args(kind)[1]]}"
    return _SINGULAR.get(kind, str(kind))


def _type_hint(full_key: str) -> str:
    """What a key takes, and its default as an override, for a value of the wrong type."""
    key = full_key.split("[")[0]  # a list element: task.train_ops[0]
    while key and key not in schema_types():  # an entry of a mapping: task.eval_sets.test
        key = key.rpartition(".")[0]
    if not key:  # a whole section: model.pretrain=3
        first = next((name for name in schema_types() if name.startswith(f"{full_key}.")), None)
        return (f"{full_key} is a section: set its keys one by one, e.g. {first}={_example(first)}" if first
                else "`bridgectl run --dry-run` shows every key with a value of the right type")
    default = _example(key)
    if isinstance(default, (ListConfig, list)):
        example = "[" + ",".join(str(item) for item in default) + "]" if len(default) else ""
    else:
        example = str(default).lower() if isinstance(default, bool) else str(default)
    shown = f", e.g. {key}={example}" if example and example != "None" and not any(c in example for c in " \n{") else ""
    return f"{key} takes {_type_words(schema_types()[key])}{shown} (`bridgectl run --dry-run` shows every key)"


def _check_keys(cfg: DictConfig) -> None:
    """The schema's keys, each with a value, and no others: Hydra's `+key=value` adds a key and `~key` deletes one
    even under the typed schema, and its merge lets lists into a list or mapping of plain values."""
    types = schema_types()
    seen = set()

    def walk(node: dict, prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            if key not in types and not isinstance(value, dict):
                raise _unknown_key(key)
            if key not in types:
                walk(value, f"{key}.")
                continue
            seen.add(key)
            if value == "???":
                raise UserError(f"{key} has no value", f"give it {_type_words(types[key])}: {key}=...")
            items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
            if any(isinstance(item, (dict, list)) for item in items):
                raise UserError(f"bad value for '{key}': a list or mapping inside it", _type_hint(key))

    try:  # resolved: an interpolation (seed=${train.max_steps}) must name a key, and give a value of the right type
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as error:
        raise UserError(f"bad value for '{error.full_key}': {_first_line(error)}",
                        "an interpolation ${key} names an existing key whose value fits, e.g. "
                        "eval.temperature=${rl.temperature}") from None
    walk(plain, "")
    for key in [key for key in types if key not in seen]:  # schema order: ~rl names rl.lr
        raise UserError(f"'{key}' has no value (removed with ~?)",
                        f"every key keeps a value; set it instead, e.g. {key}={_example(key)}")


_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")  # transformers' kernels


def _require_cuda() -> None:
    import torch  # here only: validation otherwise needs no torch

    if not torch.cuda.is_available():
        raise UserError("train.device=cuda, but torch finds no CUDA device on this machine "
                        f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})",
                        "use train.device=auto (cuda when there is one) or train.device=cpu")


def _check_ranges(cfg: DictConfig, require) -> None:
    """Ranges of single keys (validate() checks the rest and the keys that depend on each other)."""
    for key in ("seed", "model.pretrain.seed"):  # numpy seeds its generator with 32-bit unsigned integers
        value = OmegaConf.select(cfg, key)
        require(0 <= value < 2 ** 32, f"{key} must be in [0, 2^32), got {value}", f"e.g. {key}=0")
    train = cfg.train
    require(train.threads >= 0, f"train.threads must be >= 0, got {train.threads}",
            "torch CPU threads: e.g. train.threads=2 (0: torch's default)")
    require(train.eval_every >= 0 and train.log_completions_every >= 0,
            "train.eval_every and train.log_completions_every must be >= 0 (0: never)",
            "e.g. train.eval_every=50 train.log_completions_every=25")
    if train.device == "cuda":
        _require_cuda()
    for group in ("task", "model"):
        require(cfg[group].name in group_options(group), f"unknown {group}.name '{cfg[group].name}'",
                f"choose one with {group}=NAME: {', '.join(group_options(group))}")
    model = cfg.model
    require(min(model.hidden_size, model.num_layers, model.num_heads, model.max_positions) > 0,
            "model.hidden_size, model.num_layers, model.num_heads and model.max_positions must be positive",
            "e.g. model.hidden_size=128 model.num_layers=4 model.num_heads=4 model.max_positions=96")
    require(model.hidden_size % (2 * model.num_heads) == 0,
            f"model.hidden_size={model.hidden_size} does not split into model.num_heads={model.num_heads} heads of "
            "an even width", "rotary position embeddings turn pairs of each head's dimensions: e.g. "
            "model.hidden_size=128 model.num_heads=4")
    require(model.attn_implementation in _ATTENTION or "/" in model.attn_implementation,  # or a Hub kernel repo
            f"unknown model.attn_implementation '{model.attn_implementation}'",
            f"choose {', '.join(_ATTENTION)}, or a kernel repository on the Hub (kernels-community/...)")
    pretrain = model.pretrain
    require(pretrain.batch_size > 0 and pretrain.lr > 0 and 0 <= pretrain.trace_fraction <= 1,
            "model.pretrain.batch_size and model.pretrain.lr must be positive, model.pretrain.trace_fraction in "
            "[0, 1]", "e.g. model.pretrain.batch_size=128 model.pretrain.lr=1e-3 model.pretrain.trace_fraction=0.3")
    lora = cfg.lora
    require(lora.alpha > 0 and 0 <= lora.dropout < 1 and len(lora.target_modules) > 0,
            "lora.alpha must be positive, lora.dropout in [0, 1) and lora.target_modules not empty",
            "e.g. lora.alpha=16 lora.dropout=0.05 lora.target_modules=[all-linear]")
    optim = cfg.optim
    require(optim.weight_decay >= 0 and optim.max_grad_norm >= 0 and optim.warmup_steps >= 0,
            "optim.weight_decay, optim.max_grad_norm and optim.warmup_steps must be >= 0",
            "e.g. optim.weight_decay=0.0 optim.max_grad_norm=1.0 (0: no clipping) optim.warmup_steps=10")
    require(0 <= optim.adam_beta1 < 1 and 0 <= optim.adam_beta2 < 1,
            f"optim.adam_beta1 and optim.adam_beta2 must be in [0, 1), got {optim.adam_beta1} and {optim.adam_beta2}",
            "they are AdamW's moment decay rates: e.g. optim.adam_beta1=0.9 optim.adam_beta2=0.999")
    require(cfg.rollout.max_model_len is None or cfg.rollout.max_model_len > 0,
            f"rollout.max_model_len must be positive, got {cfg.rollout.max_model_len}",
            "e.g. rollout.max_model_len=4096, or null for the model's own limit")
    require(cfg.bridge.w_alpha > 0, f"bridge.w_alpha must be positive, got {cfg.bridge.w_alpha}",
            "w's update is scaled by w_alpha / w_rank: e.g. bridge.w_alpha=16")
    require(cfg.eval.samples >= 0, f"eval.samples must be >= 0, got {cfg.eval.samples}",
            "e.g. eval.samples=16 (0: eval.k)")
    try:  # the template is filled with str.format: any other field, or a lone brace, fails on the first prompt
        cfg.task.prompt_template.format(question="")
    except (KeyError, IndexError, ValueError) as error:
        require(False, f"task.prompt_template cannot be filled in: {type(error).__name__}: {error}",
                "only {question} is filled in; write other braces doubled, {{ and }}")


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (validate() runs on every compose)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (how tests hide one), a broken parent
        return False


def validate(cfg: DictConfig) -> None:
    """Values that type-check but no run could use."""
    def require(condition: bool, message: str, hint: str) -> None:
        if not condition:
            raise UserError(message, hint)

    _check_keys(cfg)
    _check_ranges(cfg, require)
    recipe = cfg.recipe
    require(len(recipe.stages) > 0, "recipe.stages is empty", "give at least one stage, e.g. recipe.stages=[sft,rl]")
    if cfg.model.init_from:
        source = Path(str(cfg.model.init_from)).expanduser()
        require(any((source / name).is_file() for name in ("config.yaml", "config.json", "adapter_config.json")),
                f"model.init_from={cfg.model.init_from} is not a run, model or adapter directory",
                "give a bridgectl run directory, a model directory (config.json) or a peft adapter directory "
                "(adapter_config.json), on this machine")
    for stage in recipe.stages:
        require(stage in STAGES, f"unknown stage '{stage}' in recipe.stages",
                f"stages are: {', '.join(STAGES)}")
    for name, values in (("recipe.fractions", recipe.fractions), ("recipe.steps", recipe.steps)):
        if values is not None:
            require(len(values) == len(recipe.stages), f"{name} has {len(values)} entries for "
                    f"{len(recipe.stages)} stages", f"give one value per stage of {list(recipe.stages)}")
            require(all(v > 0 for v in values), f"{name} must be positive, got {list(values)}",
                    "every stage needs a positive budget")
    require(cfg.train.max_steps > 0, f"train.max_steps must be positive, got {cfg.train.max_steps}",
            "e.g. train.max_steps=200")
    require(recipe.steps is not None or cfg.train.max_steps >= len(recipe.stages),
            f"train.max_steps={cfg.train.max_steps} is fewer than the {len(recipe.stages)} stages",
            "every stage needs at least one step: raise train.max_steps or set recipe.steps")
    for key in ("sft.lr", "rl.lr", "sft.batch_size", "rl.prompts_per_step", "rl.max_completion_length",
                "eval.n", "eval.batch_size", "eval.max_new_tokens", "interleave.rl_steps", "interleave.sft_steps"):
        value = OmegaConf.select(cfg, key)
        require(value > 0, f"{key} must be positive, got {value}", f"e.g. {key}={_example(key)}")
    require(cfg.eval.k >= 0 and cfg.eval.temperature > 0, "eval.k must be >= 0 and eval.temperature positive",
            "e.g. eval.k=8 eval.temperature=1.0")
    require(cfg.eval.samples == 0 or cfg.eval.samples >= max(cfg.eval.k, 1),
            f"eval.samples={cfg.eval.samples} is fewer than eval.k={cfg.eval.k}",
            "pass@k needs at least k answers per problem: eval.samples=0 (= k) or a value >= eval.k")
    require(cfg.rl.num_generations >= 2, f"rl.num_generations must be at least 2, got {cfg.rl.num_generations}",
            "GRPO compares completions within a group: use rl.num_generations=8")
    require(cfg.rl.temperature > 0, f"rl.temperature must be positive, got {cfg.rl.temperature}",
            "sampling needs a positive temperature, e.g. rl.temperature=1.0")
    require(cfg.rl.beta >= 0 and cfg.rl.epsilon > 0, "rl.beta must be >= 0 and rl.epsilon > 0",
            "e.g. rl.beta=0.0 rl.epsilon=0.2")
    _validate_grpo_options(cfg, require)
    require(cfg.model.finetune in ("full", "lora"), f"unknown model.finetune '{cfg.model.finetune}'",
            "choose full or lora")
    require(cfg.optim.schedule in ("constant", "cosine"), f"unknown optim.schedule '{cfg.optim.schedule}'",
            "choose constant or cosine")
    require(cfg.train.device in ("auto", "cpu", "cuda"), f"unknown train.device '{cfg.train.device}'",
            "choose auto, cpu or cuda")
    require(cfg.model.pretrain.steps >= 0, f"model.pretrain.steps must be >= 0, got {cfg.model.pretrain.steps}",
            "e.g. model.pretrain.steps=800 (0 keeps the random initialisation)")
    require(cfg.lora.rank > 0, f"lora.rank must be positive, got {cfg.lora.rank}", "e.g. lora.rank=8")
    require(cfg.lora.forward in ("auto", "merged", "unmerged"), f"unknown lora.forward '{cfg.lora.forward}'",
            "choose auto, merged or unmerged")
    for key in ("train_ops", "test_ops", "ood_ops", "pretrain_ops"):
        low_high = list(cfg.task[key])
        require(len(low_high) == 2 and 1 <= low_high[0] <= low_high[1],
                f"task.{key} must be [min, max] with 1 <= min <= max, got {low_high}", f"e.g. task.{key}=[2,4]")
    bridge = cfg.bridge
    for key in ("lam", "lam_start", "lam_end"):
        value = bridge[key]
        require(value is None or 0.0 <= value <= 1.0, f"bridge.{key} must be in [0, 1], got {value}",
                "lambda weighs RL against SFT: e.g. bridge.lam=0.5")
    require((bridge.lam_start is None) == (bridge.lam_end is None), "bridge.lam_start and bridge.lam_end go together",
            "set both for a ramp, e.g. bridge.lam_start=0.2 bridge.lam_end=0.8, or neither")
    require(bridge.alpha > 0, f"bridge.alpha must be positive, got {bridge.alpha}", "e.g. bridge.alpha=1e-4")
    require(bridge.beta > 0, f"bridge.beta must be positive, got {bridge.beta}",
            "bridge.beta is the learning rate of the LoRA adapter w, e.g. bridge.beta=1e-3 (the KL coefficient is rl.beta)")
    require(bridge.lower in ("full", "lora"), f"unknown bridge.lower '{bridge.lower}'", "choose full or lora")
    require(bridge.shadow in ("persistent", "lookahead"), f"unknown bridge.shadow '{bridge.shadow}'",
            "choose persistent (Algorithm 2) or lookahead (Eq. 10)")
    require(bridge.upper in ("cooperative", "joint", "none"), f"unknown bridge.upper '{bridge.upper}'",
            "choose cooperative (BRIDGE), joint (w/o the cooperative gain) or none (no upper level)")
    require(bridge.upper == "cooperative" or (bridge.shadow == "persistent" and not bridge.shadow_rollouts),
            f"bridge.upper={bridge.upper} has no shadow, so bridge.shadow=lookahead and bridge.shadow_rollouts do "
            "not apply", "drop them, or use bridge.upper=cooperative")
    require(bridge.optimizer in ("adamw", "sgd"), f"unknown bridge.optimizer '{bridge.optimizer}'", "choose adamw or sgd")
    require(not (bridge.shadow_rollouts and bridge.shadow == "lookahead"),
            "bridge.shadow_rollouts needs the persistent shadow", "drop bridge.shadow_rollouts or use bridge.shadow=persistent")
    require(bridge.w_rank > 0 and bridge.sft_scale >= 0, "bridge.w_rank must be positive and bridge.sft_scale >= 0",
            "e.g. bridge.w_rank=8 bridge.sft_scale=1.0")
    require(cfg.mix.mu >= 0 and (cfg.mix.mu_end is None or cfg.mix.mu_end >= 0) and cfg.mix.lr > 0,
            "mix.mu and mix.mu_end must be >= 0 and mix.lr positive", "e.g. mix.mu=0.5 mix.mu_end=0.05 mix.lr=2e-4")
    relift = cfg.relift
    require(relift.buffer_size >= 1 and relift.sft_epochs >= 1 and relift.sft_mini_batch_size >= 0
            and relift.sft_lr > 0, "relift.buffer_size and relift.sft_epochs must be >= 1, "
            "relift.sft_mini_batch_size >= 0 and relift.sft_lr positive",
            "e.g. relift.buffer_size=8 relift.sft_epochs=1 relift.sft_mini_batch_size=0 relift.sft_lr=5e-4")
    uft = cfg.uft
    require(all(0 <= uft[key] <= 1 for key in ("hint_start", "hint_end", "hint_fraction_of_steps")),
            f"uft.hint_start, uft.hint_end and uft.hint_fraction_of_steps must be in [0, 1], got {uft.hint_start}, "
            f"{uft.hint_end} and {uft.hint_fraction_of_steps}",
            "they are shares of a demonstration and of the stage: e.g. uft.hint_start=0.95 uft.hint_end=0.05 "
            "uft.hint_fraction_of_steps=0.6")
    require(uft.hint_chunks >= 1 and uft.sft_coef >= 0 and uft.lr > 0,
            "uft.hint_chunks must be >= 1, uft.sft_coef >= 0 and uft.lr positive",
            "e.g. uft.hint_chunks=5 uft.sft_coef=0.001 uft.lr=1e-4")
    require(not (cfg.train.fsdp and "uft" in cfg.recipe.stages),
            "the uft stage does not run with train.fsdp (a process whose hints are all empty in a step has no hint "
            "term to differentiate, so the processes would run different numbers of sharded backward passes)",
            "run uft without train.fsdp (plain data parallelism: --nproc N)")
    require(0 <= cfg.luffy.off_policy < cfg.rl.num_generations,
            f"luffy.off_policy must be in [0, rl.num_generations), got {cfg.luffy.off_policy} with "
            f"rl.num_generations={cfg.rl.num_generations}",
            "each group keeps at least one on-policy rollout: e.g. luffy.off_policy=1 rl.num_generations=8")
    require(cfg.luffy.gamma > 0 and cfg.luffy.lr > 0, "luffy.gamma and luffy.lr must be positive",
            "e.g. luffy.gamma=0.1 luffy.lr=1e-4")
    require(cfg.srft.sft_coef >= 0 and cfg.srft.rl_coef >= 0 and cfg.srft.lr > 0,
            "srft.sft_coef and srft.rl_coef must be >= 0 and srft.lr positive",
            "e.g. srft.sft_coef=0.5 srft.rl_coef=0.1 srft.lr=1e-4")
    chord = cfg.chord
    require(0 <= chord.mu_peak <= 1 and 0 <= chord.mu_valley <= 1,
            f"chord.mu_peak and chord.mu_valley must be in [0, 1], got {chord.mu_peak} and {chord.mu_valley}",
            "mu weighs SFT against RL in (1 - mu) L_grpo + mu L_sft: e.g. chord.mu_peak=0.5 chord.mu_valley=0.02")
    require(chord.mu_warmup_steps >= 0 and chord.mu_decay_steps >= 0 and chord.lr > 0,
            "chord.mu_warmup_steps and chord.mu_decay_steps must be >= 0 and chord.lr positive",
            "e.g. chord.mu_warmup_steps=50 chord.mu_decay_steps=100 chord.lr=1e-4")
    require(cfg.hpt.gate >= -1 and cfg.hpt.sft_coef >= 0 and cfg.hpt.lr > 0,
            "hpt.gate must be >= -1, hpt.sft_coef >= 0 and hpt.lr positive",
            "e.g. hpt.gate=0 (SFT for prompts none of whose rollouts is correct) hpt.sft_coef=1.0 hpt.lr=1e-4")
    require(not (cfg.train.fsdp and "hpt" in cfg.recipe.stages),
            "the hpt stage does not run with train.fsdp (each process switches a different number of its prompts to "
            "SFT, so the processes would run different numbers of sharded forward passes)",
            "run hpt without train.fsdp (plain data parallelism: --nproc N)")
    require(cfg.task.modulus >= 2 and cfg.task.max_operand >= 1, "task.modulus must be >= 2, task.max_operand >= 1",
            "e.g. task.modulus=10 task.max_operand=9")
    if cfg.train.fsdp and "bridge" in cfg.recipe.stages:
        require(cfg.recipe.stages[0] == "bridge" and cfg.bridge.shadow == "persistent",
                "train.fsdp runs the bridge stage as the first stage and with bridge.shadow=persistent only (w is "
                "added before sharding; the look-ahead shadow takes an RL gradient that sharded layers do not reduce)",
                "use bridge.shadow=persistent, or run without train.fsdp (plain data parallelism: --nproc N)")
    require(cfg.rollout.backend in ("hf", "vllm"), f"unknown rollout.backend '{cfg.rollout.backend}'",
            "choose hf (default) or vllm")
    require(0 < cfg.rollout.gpu_memory_utilization < 1,
            f"rollout.gpu_memory_utilization must be in (0, 1), got {cfg.rollout.gpu_memory_utilization}",
            "it is the share of GPU memory vLLM may take, e.g. rollout.gpu_memory_utilization=0.3")
    require(cfg.rollout.backend != "vllm" or not cfg.train.fsdp,
            "rollout.backend=vllm does not run with train.fsdp (each process would need a whole copy for vLLM, "
            "which is what sharding avoids)", "use rollout.backend=hf with train.fsdp")
    require(cfg.train.micro_batch_size >= 0 and cfg.rollout.batch_size >= 0,
            "train.micro_batch_size and rollout.batch_size must be >= 0 (0: the whole batch at once)",
            "e.g. train.micro_batch_size=4 rollout.batch_size=64")
    require(cfg.train.checkpoint_every >= 0 and cfg.train.keep_checkpoints >= 1,
            "train.checkpoint_every must be >= 0 and train.keep_checkpoints >= 1",
            "e.g. train.checkpoint_every=50 train.keep_checkpoints=2")
    require(cfg.tracker.wandb.mode in ("online", "offline", "disabled"),
            f"unknown tracker.wandb.mode '{cfg.tracker.wandb.mode}'", "choose online, offline or disabled")
    require(not cfg.tracker.tensorboard or _installed("tensorboard"),
            "tracker.tensorboard=true needs the tensorboard package, which is not installed",
            "pip install 'bridgectl[tensorboard]' (or pip install 'tensorboard>=2.14'), or drop tracker.tensorboard")
    require(cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"), f"unknown model.dtype '{cfg.model.dtype}'",
            "choose auto, float32, bfloat16 or float16")
    require(cfg.model.name != "hf" or bool(cfg.model.name_or_path), "model=hf needs model.name_or_path",
            "e.g. model=hf model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct (or a local directory)")
    require("{question}" in cfg.task.prompt_template, "task.prompt_template has no {question} placeholder",
            "e.g. task.prompt_template='Question: {question}\\nAnswer:'")
    require(cfg.task.verify_timeout_s > 0, f"task.verify_timeout_s must be positive, got {cfg.task.verify_timeout_s}",
            "e.g. task.verify_timeout_s=5")
    funcs, weights = list(cfg.task.reward_funcs), cfg.task.reward_weights
    for spec in funcs:  # whether each one imports is checked before the run starts (tasks/rewards.py)
        module, _, name = spec.rpartition(":")
        require(spec == "verifier" or (module and name), f"task.reward_funcs: '{spec}' names no function",
                "give verifier, pkg.module:function or path/to/file.py:function")
    require(weights is None or len(weights) == len(funcs),
            f"task.reward_weights has {len(weights or [])} entries for {len(funcs)} task.reward_funcs",
            f"give one weight per function of {funcs or '[verifier]'}, or none (1.0 each)")
    require(cfg.task.reward_timeout_s > 0, f"task.reward_timeout_s must be positive, got {cfg.task.reward_timeout_s}",
            "e.g. task.reward_timeout_s=60")
    require(cfg.task.system_prompt is None or cfg.task.name != "arith",
            "task.system_prompt applies to dataset tasks (the built-in arith task has no chat template)",
            "drop task.system_prompt, or use task=gsm8k, math or jsonl with model=hf")


# stages whose RL half is not core/grpo.rl_backward, or calls it in a way an option changes, and what they honour
_ITERATING_STAGES = ("rl", "interleaved", "mix", "chord")  # the stages that loop rl.num_iterations updates over one batch
_OWN_LOSS_NORMALISER = ("luffy", "srft")  # token means of their own, over rollouts and demonstrations
_OWN_REWARD_SCALING = ("luffy", "srft")  # mixed groups of rollouts and demonstrations (luffy.std_normalize)


def _validate_grpo_options(cfg: DictConfig, require) -> None:
    """The TRL-named GRPO options (rl.loss_type, epsilon_high, mask_truncated_completions, scale_rewards, top_p,
    top_k, min_p, num_iterations): their values, and the stages that cannot honour one."""
    rl = cfg.rl
    require(rl.scale_rewards in ("group", "batch", "none"), f"unknown rl.scale_rewards '{rl.scale_rewards}'",
            "choose group, batch or none")
    require(rl.loss_type in ("dapo", "grpo", "dr_grpo"), f"unknown rl.loss_type '{rl.loss_type}'",
            "choose dapo (token mean over the step, the default), grpo (mean per completion) or dr_grpo "
            "(sum / (completions x rl.max_completion_length))")
    require(rl.epsilon_high is None or rl.epsilon_high > 0, f"rl.epsilon_high must be positive, got {rl.epsilon_high}",
            "e.g. rl.epsilon_high=0.28 (DAPO), or null for rl.epsilon")
    require(0 < rl.top_p <= 1 and rl.top_k >= 0 and 0 <= rl.min_p < 1,
            f"rl.top_p must be in (0, 1], rl.top_k >= 0 and rl.min_p in [0, 1), got {rl.top_p}, {rl.top_k} and "
            f"{rl.min_p}", "e.g. rl.top_p=0.95 rl.top_k=50 rl.min_p=0.05 (1.0, 0 and 0.0 turn each off)")
    require(rl.num_iterations >= 1, f"rl.num_iterations must be >= 1, got {rl.num_iterations}",
            "e.g. rl.num_iterations=1 (one update per batch of rollouts)")
    for stage in cfg.recipe.stages:
        if not STAGES[stage].samples_rollouts:
            continue
        require(rl.num_iterations == 1 or stage in _ITERATING_STAGES,
                f"rl.num_iterations={rl.num_iterations} is not implemented for the {stage} stage",
                f"use rl.num_iterations=1 with {stage}; the {' and '.join(_ITERATING_STAGES)} stages take several "
                "updates per batch of rollouts")
        require(rl.loss_type == "dapo" or stage not in _OWN_LOSS_NORMALISER,
                f"rl.loss_type={rl.loss_type} does not apply to the {stage} stage (its loss is a token mean over its "
                "own rows)", f"use rl.loss_type=dapo with {stage}")
        require(rl.scale_rewards != "batch" or stage not in _OWN_REWARD_SCALING,
                f"rl.scale_rewards=batch does not apply to the {stage} stage (it normalises its mixed groups of "
                "rollouts and demonstrations itself)",
                "use rl.scale_rewards=group or none (luffy: luffy.std_normalize=true or false)")


@functools.lru_cache(maxsize=None)
def _schema_defaults() -> DictConfig:
    # built once: OmegaConf.structured(Config) takes ~40 ms, and validate() runs on every compose
    return OmegaConf.structured(Config)


def _example(key: str) -> Any:
    return OmegaConf.select(_schema_defaults(), key)


def stage_budgets(cfg: DictConfig) -> list[int]:
    """Steps of each stage: explicit `recipe.steps`, else `train.max_steps` split by `recipe.fractions` (largest
    remainder, at least one step per stage), summing exactly to `train.max_steps`."""
    if cfg.recipe.steps is not None:
        return [int(s) for s in cfg.recipe.steps]
    fractions = list(cfg.recipe.fractions or [1.0] * len(cfg.recipe.stages))
    total = cfg.train.max_steps
    shares = [total * f / sum(fractions) for f in fractions]
    budgets = [int(share) for share in shares]
    # largest remainder first; ties go to the later stage
    by_remainder = sorted(range(len(shares)), key=lambda i: (shares[i] - budgets[i], i), reverse=True)
    for i in by_remainder[:total - sum(budgets)]:
        budgets[i] += 1
    for i, budget in enumerate(budgets):  # a stage rounded to zero takes a step from the largest one
        if budget == 0:
            budgets[budgets.index(max(budgets))] -= 1
            budgets[i] = 1
    return budgets
