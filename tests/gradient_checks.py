"""Pieces the gradient tests share: a model whose head is not separable, and the comparison of a stage's
gradients with independently computed ones."""

from __future__ import annotations

import torch


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
