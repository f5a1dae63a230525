"""`lora.sampling`: sampling with the adapters folded into a copy of the adapted weights (merged) decodes what
peft's own forward (unmerged) decodes, without running the adapters' layers, and puts the very same base weight
tensors back; auto merges unless an accelerator's free memory is short."""

from __future__ import annotations

import torch

from bridgectl.config.compose import compose
from bridgectl.core.model import add_upper_adapter, merges_for_sampling
from bridgectl.core.rollout import generate
from bridgectl.training.setup import build_context


def policy_with_two_adapters(sampling: str):
    cfg = compose(
        ["recipe=rl", "model.finetune=lora", "lora.forward=unmerged", f"lora.sampling={sampling}", "train.threads=1"]
    )  # peft's own forward: its adapter layers run unless merged
    policy = build_context(cfg).policy
    add_upper_adapter(policy, "w", 4, 8, cfg.lora, train_base=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; random B makes every adapter change the output
                param.normal_(std=0.05)
    return policy


def sample(policy) -> tuple[torch.Tensor, int]:
    """Greedy completions of a few prompts, and how many times an adapter's A layer ran while decoding them."""
    calls = []
    hooks = [
        module.register_forward_hook(lambda *_: calls.append(1))
        for name, module in policy.model.named_modules()
        if name.endswith("lora_A.w")
    ]
    policy.model.eval()
    try:
        with policy.merged_for_generation() as model:
            out = generate(
                model,
                policy.tokenizer,
                ["12+7=", "3*4=", "9-5=", "6+6="],
                12,
                greedy=True,
                end_ids=policy.end_tokens.ids,
            )
    finally:
        for hook in hooks:
            hook.remove()
    return out.completion_ids, len(calls)


def test_merged_sampling_decodes_what_the_adapters_decode_without_running_them():
    merged, unmerged = policy_with_two_adapters("merged"), policy_with_two_adapters("unmerged")
    assert all(
        torch.equal(a, b) for a, b in zip(merged.model.state_dict().values(), unmerged.model.state_dict().values())
    )
    weights = {name: param for name, param in merged.model.named_parameters()}
    before = {name: param.detach().clone() for name, param in weights.items()}
    merged_ids, merged_calls = sample(merged)
    unmerged_ids, unmerged_calls = sample(unmerged)
    assert torch.equal(merged_ids, unmerged_ids)
    assert merged_calls == 0 and unmerged_calls > 0
    after = dict(merged.model.named_parameters())
    assert all(after[name] is weights[name] and torch.equal(after[name], before[name]) for name in weights)
    # and the adapters act again in the training forward once sampling is over
    assert not any(getattr(module, "_disable_adapters", False) for module in merged.model.modules())


def test_auto_merges_unless_an_accelerator_is_short_of_memory(monkeypatch):
    assert merges_for_sampling("auto", 10**12, torch.device("cpu"))  # host memory: the copy is the model's size
    assert merges_for_sampling("merged", 10**12, torch.device("cpu"))
    assert not merges_for_sampling("unmerged", 1, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    assert merges_for_sampling("auto", 4 * 2**30, torch.device("cuda", 0))
    assert not merges_for_sampling("auto", 4 * 2**30 + 1, torch.device("cuda", 0))
    assert merges_for_sampling("merged", 64 * 2**30, torch.device("cuda", 0))
