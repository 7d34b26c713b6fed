"""Model factories for the server tests (``--model tests.serving.models:double``): small, deterministic, offline."""

from __future__ import annotations

import torch

from deepseek_ext.serving import ServedModel, pad_collate


def double():
    """A callable: 2 * x, for any shape."""
    return lambda x: 2 * x


def affine():
    """A ServedModel with a fixed input shape: y = x @ W + b, W = [[1, 2], [3, 4], [5, 6]], b = [0.5, -0.5]."""
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 3.0, 5.0], [2.0, 4.0, 6.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    return ServedModel(lin, input_shape=(3,), description="a 3 -> 2 linear layer")


def seq_sum():
    """Variable-length int64 sequences, padded together: the sum of each sequence (``{"inputs": [1, 2, 3]}``)."""

    def fn(batch):
        padded, lengths = batch
        mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
        return (padded * mask).sum(1)

    return ServedModel(fn, input_dtype=torch.int64, input_shape=(None,), batcher={"collate": pad_collate})


def fails_on_negative():
    """Raises when a request holds a negative number (the model's own failure: a 500 for that request only)."""

    def fn(x):
        if (x < 0).any():
            raise ValueError("negative input")
        return x + 1

    return fn
