"""Loading the policy: base model + tokenizer, then either LoRA adapters (peft) or full fine-tuning.

`Policy` is the one object stages train. Its `reference()` context gives the frozen starting point for the KL
term: the base with the adapter disabled under LoRA (no copy), or a frozen copy of the base under full
fine-tuning (made only when a KL coefficient asks for it).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from bridgectl.core.end_tokens import EndTokens, end_tokens_of, eos_only
from bridgectl.core.lora_forward import set_lora_forward, wants_merged_forward
from bridgectl.errors import UserError

# peft calls a transformers method that transformers 5 deprecates; the warning is for peft's authors, not users.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class Policy:
    model: torch.nn.Module
    """The trained model (a peft model under LoRA)."""
    tokenizer: object
    """Its tokenizer; left padding for generation."""
    frozen_reference: torch.nn.Module | None = field(default=None, repr=False)
    """Frozen copy of the base under full fine-tuning with a KL term; None otherwise."""
    sampling: str = "auto"
    """How sampling computes adapted layers (`lora.sampling`: merged, unmerged or auto; merged_for_generation);
    a sharded model samples unmerged (its weights are shards)."""
    end_tokens: EndTokens | None = None
    """The ids that end a completion and the one SFT targets end with (core/end_tokens); load_policy finds them,
    and a policy built without them gets the tokenizer's EOS alone."""

    def __post_init__(self) -> None:
        if self.end_tokens is None:
            self.end_tokens = eos_only(self.tokenizer)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def has_adapters(self) -> bool:
        return isinstance(self.model, PeftModel)

    @contextlib.contextmanager
    def reference(self):
        """Yields the frozen reference model pi_ref (the base before any training)."""
        if self.frozen_reference is None and self.has_adapters:
            with self.model.disable_adapter():
                yield self.model
        else:
            if self.frozen_reference is None:
                raise RuntimeError("no reference kept: build the policy with keep_reference=True")
            yield self.frozen_reference

    @contextlib.contextmanager
    def merged_for_generation(self):
        """The model to sample from. With adapters merged for sampling (`sampling`, merges_for_sampling), each
        adapted layer's weight is swapped for W + sum s B A while sampling, with the adapters disabled, and the
        very same W tensor is put back afterwards: unmerged adapters slowed decoding ~1.5x on SmolLM2-135M and
        ~40% on the tiny model, and merging in place (peft's merge/unmerge, W += dW then W -= dW) would change
        the frozen base by rounding at every step (in bf16 by up to an ulp per step). Unmerged: peft's forward,
        no weight-sized copies; full fine-tuning has nothing to merge."""
        if not self.has_adapters:
            yield self.model
            return
        adapted = [
            (layer, [name for name in layer.active_adapters if name in layer.lora_A])
            for layer in self.model.modules()
            if isinstance(layer, LoraLinear) and not layer.merged and isinstance(layer.base_layer, torch.nn.Linear)
        ]
        adapted = [(layer, active) for layer, active in adapted if active]
        copy_bytes = sum(
            layer.base_layer.weight.numel() * layer.base_layer.weight.element_size() for layer, _ in adapted
        )
        if not adapted or not merges_for_sampling(self.sampling, copy_bytes, next(self.model.parameters()).device):
            yield self.model
            return
        saved = {}
        with torch.no_grad():
            for layer, active in adapted:
                weight = layer.base_layer.weight
                saved[layer] = weight.data
                weight.data = weight.data + sum(layer.get_delta_weight(name) for name in active)
                # the flag peft's forward reads; enable_adapters() would also reset requires_grad
                layer._disable_adapters = True
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for layer, original in saved.items():
                    layer.base_layer.weight.data = original
                    layer._disable_adapters = False


def merge_saved_adapters(base: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """`base` with every adapter saved at `adapter_dir` merged in: the adapter there and any in subdirectories
    (BRIDGE's upper-level w sits in one), as the run trained them, all active together. Safetensors only, as every
    other load: peft would otherwise fall back to a pickled adapter_model.bin, which can run code when loaded."""
    subdirectories = sorted(p for p in adapter_dir.iterdir() if (p / "adapter_config.json").is_file())
    for directory in [adapter_dir, *subdirectories]:
        if not (directory / "adapter_model.safetensors").is_file():
            found = "adapter_model.bin" if (directory / "adapter_model.bin").is_file() else "no adapter weights"
            raise UserError(
                f"adapter directory {directory} holds {found}, not adapter_model.safetensors",
                "only safetensors weights are loaded (a pickled .bin can run code): convert it with "
                "peft (model.save_pretrained(dir, safe_serialization=True))",
            )
    model = PeftModel.from_pretrained(base, adapter_dir)
    names = ["default"]
    for sub in subdirectories:
        model.load_adapter(sub, adapter_name=sub.name)
        names.append(sub.name)
    model.base_model.set_adapter(names)
    return model.merge_and_unload(adapter_names=names)


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA (what real models train in), float32 elsewhere (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def tokenizer_from(path: Path | str, model_cfg):
    """The tokenizer saved at `path`, with left padding (generation) and a pad token (its EOS when it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(model_cfg.trust_remote_code))
    except (OSError, ValueError) as error:
        raise UserError(
            f"could not load the tokenizer of {path}: {error}",
            "check model.name_or_path; without network access only local directories and models "
            "already in the Hugging Face cache load",
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def causal_lm_from(path: Path | str, model_cfg, device: torch.device) -> PreTrainedModel:
    """The causal LM saved at `path` (safetensors only), in the dtype and attention kernel of `model_cfg`."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=weights_dtype(model_cfg.dtype, device),
            attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=bool(model_cfg.trust_remote_code),
            use_safetensors=True,
        ).to(device)
    except (OSError, ValueError) as error:
        raise UserError(
            f"could not load the model {path}: {error}",
            "check model.name_or_path (safetensors weights are required); without network access only "
            "local directories and cached models load",
        ) from None


def load_policy(
    model_cfg,
    lora_cfg,
    path: Path | str,
    device: torch.device,
    keep_reference: bool,
    finetune: str | None = None,
    chat_template: bool = False,
) -> Policy:
    """The model saved at `path` (models/sources.base_model_path: where a config's base weights are) with LoRA
    (`finetune=lora`) or every weight trainable (`full`); `finetune` defaults to model.finetune. `chat_template`:
    whether prompts are put in the tokenizer's chat template (tasks.prompts_use_chat_template), so that its turn
    end is among the policy's end tokens and ends SFT targets."""
    finetune = finetune or model_cfg.finetune
    hf_logging.disable_progress_bar()  # our own progress bars are the only ones
    tokenizer = tokenizer_from(path, model_cfg)
    # training mode for the training passes (from_pretrained returns eval mode): dropout where the model has it,
    # and activation checkpointing, which transformers applies in training mode only; sampling and evaluation
    # switch to eval mode for their duration
    model = causal_lm_from(path, model_cfg, device).train()
    end_tokens = end_tokens_of(tokenizer, getattr(model, "generation_config", None), chat_template)
    if model_cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    reference = None
    if finetune == "lora":
        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=lora_cfg.rank,
                lora_alpha=lora_cfg.alpha,
                lora_dropout=lora_cfg.dropout,
                target_modules=peft_targets(lora_cfg),
                task_type="CAUSAL_LM",
            ),
        )
        _choose_lora_forward(model, lora_cfg)
    elif keep_reference:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    return Policy(
        model=model,
        tokenizer=tokenizer,
        frozen_reference=reference,
        end_tokens=end_tokens,
        sampling=getattr(lora_cfg, "sampling", "auto"),
    )  # a run recorded before the key: auto


def merges_for_sampling(mode: str, copy_bytes: int, device: torch.device) -> bool:
    """Whether sampling folds the adapters into a copy of the adapted weights (`lora.sampling`): merged, unmerged,
    or auto: merged, unless on an accelerator the copy (`copy_bytes`) would take more than half its free memory
    (host memory is not counted: the copy is at most the model's size)."""
    if mode != "auto":
        return mode == "merged"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return copy_bytes <= free / 2
    return True


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Every decoder layer recomputes its activations in the backward pass instead of keeping them (TRL's default
    for real models): activation memory falls from every layer's to one layer's, for one more forward pass.
    Non-reentrant checkpointing, which needs no input that requires grad, so it works with a frozen base under LoRA
    and with BRIDGE's shadow pass (theta_hat's values stay swapped in until its backward has run)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24; gradient_... is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # generation passes use_cache explicitly


def peft_targets(lora_cfg) -> list[str] | str:
    """`lora.target_modules` as peft takes it: [all-linear] becomes peft's "all-linear" detection."""
    targets = list(lora_cfg.target_modules)
    return "all-linear" if targets == ["all-linear"] else targets


def add_upper_adapter(policy: Policy, name: str, rank: int, alpha: int, lora_cfg, train_base: bool) -> None:
    """Adds a LoRA adapter `name` on top of whatever the policy trains and makes every adapter active and
    trainable; the base weights stay trainable only when `train_base` (BRIDGE with full lower-level weights)."""
    config = PeftLoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=peft_targets(lora_cfg),
        task_type="CAUSAL_LM",
    )
    if policy.has_adapters:
        policy.model.add_adapter(name, config)
        names = list(policy.model.peft_config)
    else:
        policy.model = get_peft_model(policy.model, config, adapter_name=name)  # freezes the base weights
        names = [name]
    policy.model.base_model.set_adapter(names)  # several active adapters: their updates add up
    for param_name, param in policy.model.named_parameters():
        if adapter_of(param_name) is None:
            param.requires_grad_(train_base)
    _choose_lora_forward(policy.model, lora_cfg)


def _choose_lora_forward(model: torch.nn.Module, lora_cfg) -> bool:
    """Merged-weight or peft's own forward in training passes (`lora.forward`; core/lora_forward.py); returns
    whether merging is chosen (sampling chooses on its own: lora.sampling)."""
    base_parameters = sum(p.numel() for n, p in model.named_parameters() if adapter_of(n) is None)
    merged = wants_merged_forward(lora_cfg.forward, base_parameters)
    set_lora_forward(model, merged)
    return merged


def adapter_of(param_name: str) -> str | None:
    """The adapter a parameter belongs to (`...lora_A.<adapter>.weight`), or None for base weights."""
    parts = param_name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[index + 1]
    return None


def save_policy(policy: Policy, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """safetensors weights a user can load: adapters alone when the base is frozen (it did not change), the
    merged full model when base weights were trained as well, the plain model otherwise. `state_dict`: the
    model's whole tensors when it is sharded (train.fsdp; distributed.full_state_dict)."""
    given = {"state_dict": state_dict} if state_dict is not None else {}
    if policy.has_adapters:
        base_trained = any(p.requires_grad for n, p in policy.model.named_parameters() if adapter_of(n) is None)
        policy.model.save_pretrained(path / "adapters" if base_trained else path, safe_serialization=True, **given)
        if base_trained and state_dict is not None:
            policy.model.get_base_model().save_pretrained(
                path, safe_serialization=True, state_dict=merged_state_dict(policy.model, state_dict)
            )
        elif base_trained:
            merged = copy.deepcopy(policy.model).merge_and_unload()
            merged.save_pretrained(path, safe_serialization=True)
    else:
        policy.model.save_pretrained(path, safe_serialization=True, **given)
    policy.tokenizer.save_pretrained(path)


def merged_state_dict(model: PeftModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """From the whole-tensor state dict of a peft model (a sharded one's, gathered): the base model's state dict
    with every active adapter folded in, W + s B A, what merge_and_unload would save."""
    return dict(merged_weights(model, state_dict))


def merged_weights(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under the names of its Hugging Face checkpoint (`model.layers.0.mlp.up_proj.weight`),
    one at a time, every active adapter folded into its layer's weight (W + s B A): what a copy of the base
    architecture needs to compute what `model` computes (an inference engine's weights, rollout.backend=vllm).
    Only one merged weight exists at a time. `state_dict`: `model`'s own whole tensors when it is sharded."""
    tensors = state_dict if state_dict is not None else model.state_dict()
    if not isinstance(model, PeftModel):
        yield from tensors.items()
        return
    prefix = "base_model.model."

    def base_name(name: str) -> str:
        return (name[len(prefix) :] if name.startswith(prefix) else name).replace(".base_layer.", ".")

    adapted = {name: layer for name, layer in model.named_modules() if isinstance(layer, LoraLinear)}
    replaced = {f"{name}.base_layer.weight" for name in adapted}
    for name, tensor in tensors.items():
        if adapter_of(name) is None and name not in replaced:
            yield base_name(name), tensor
    for name, layer in adapted.items():
        weight = tensors[f"{name}.base_layer.weight"].clone()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                lora_a = tensors[f"{name}.lora_A.{adapter}.weight"]
                lora_b = tensors[f"{name}.lora_B.{adapter}.weight"]
                weight += (lora_b @ lora_a).to(weight.dtype) * layer.scaling[adapter]
        yield base_name(f"{name}.weight"), weight
