"""Pieces the gradient tests share: a model whose head is not separable, the comparison of a stage's gradients
with independently computed ones, completion log-probs computed without the project's chunked code, and spies that
record what a stage sampled and every update it made."""

from __future__ import annotations

import torch

from bridgectl.core import optim as optim_module
from bridgectl.core.rollout import positions


class ScaledLogits(torch.nn.Module):
    """A model whose logits are 0.5 * head(decoder(x)) (as Cohere's logit_scale): the head is not separable, so the
    log-prob and entropy code must run the model's own forward."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs):
        output = self.inner(**kwargs)
        output.logits = output.logits * 0.5
        return output

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def assert_same_gradients(got, expected):
    """Each gradient of `got` (None = zero) equals its `expected` one, and at least one is not zero (so the check
    cannot pass vacuously)."""
    assert len(got) == len(expected)
    nonzero = 0
    for got_grad, expected_grad in zip(got, expected):
        got_grad = torch.zeros_like(expected_grad) if got_grad is None else got_grad
        torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=1e-4)
        nonzero += int(expected_grad.abs().max() > 0)
    assert nonzero > 0


def full_completion_logprobs(model, rollouts, temperature):
    """log pi(completion tokens) [N, C] from a float32 log-softmax over the whole vocabulary at every position (not
    core/logprobs' chunked pass): the independent side of a gradient check."""
    ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], dim=1)
    mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float()
    start = rollouts.prompt_ids.size(1)
    logprobs = torch.log_softmax(logits[:, start - 1 : -1] / temperature, dim=-1)
    return logprobs.gather(2, rollouts.completion_ids.unsqueeze(2)).squeeze(2)


def record_returns(monkeypatch, module, name: str) -> list:
    """Wraps `module.name` so that every value it returns is appended, in order, to the list returned here."""
    returned, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        returned.append(real(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(module, name, wrapper)
    return returned


def record_updates(monkeypatch) -> list:
    """Every update a stage makes, as core/optim.clip_gradients sees it: (the weights before the update, the
    gradients it is made of; None for a parameter without one), cloned before the optimizer uses them."""
    updates, real = [], optim_module.clip_gradients

    def clip(params, *args, **kwargs):
        updates.append(
            (
                [p.detach().clone() for p in params],
                [None if p.grad is None else p.grad.detach().clone() for p in params],
            )
        )
        return real(params, *args, **kwargs)

    monkeypatch.setattr(optim_module, "clip_gradients", clip)
    return updates
