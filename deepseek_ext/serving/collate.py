"""How a :class:`~deepseek_ext.serving.DynamicBatcher` turns requests into one batch and the batch's output back
into one result per request, and which requests may share a batch.

``collate(requests) -> batch`` and ``split(output, requests) -> list of results`` come in pairs: the defaults stack
tensors (also inside dicts, lists and tuples) on a new dim 0 and index the output along dim 0; ``pad_collate`` and
``unpad_split`` handle variable-length sequences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def stack_key(x: Any) -> Any:
    """The default grouping key: requests with equal keys can be stacked together by :func:`stack_collate`.

    A tensor's key is its shape, dtype and device; dicts, lists and tuples combine their items' keys; numbers and
    other objects are keyed by type. A batch never mixes keys, so differently shaped requests are batched apart
    instead of failing each other.

    Args:
        x: one request.

    Returns:
        A hashable key.

    Example:
        >>> import torch
        >>> from deepseek_ext.serving import stack_key
        >>> stack_key(torch.zeros(3)) == stack_key(torch.ones(3)) != stack_key(torch.zeros(4))
        True
    """
    if isinstance(x, torch.Tensor):
        return (x.shape, x.dtype, x.device)
    if isinstance(x, Mapping):
        return (dict, tuple((k, stack_key(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x), tuple(stack_key(v) for v in x))
    return type(x)


def stack_collate(requests: Sequence[Any]) -> Any:
    """The default collate: stacks the requests' tensors on a new dim 0.

    Tensors of shape ``s`` become one tensor of shape ``(len(requests), *s)``; dicts, lists and tuples are collated
    item by item (same keys / lengths); Python numbers become a 1-D tensor.

    Args:
        requests: the requests of one batch (all with the same :func:`stack_key`).

    Returns:
        The batch ``fn`` is called with.

    Example:
        >>> import torch
        >>> from deepseek_ext.serving import stack_collate
        >>> stack_collate([{"x": torch.zeros(2)}, {"x": torch.ones(2)}])["x"].shape
        torch.Size([2, 2])
    """
    first = requests[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(requests))
    if isinstance(first, Mapping):
        return {k: stack_collate([r[k] for r in requests]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(stack_collate(items) for items in zip(*requests))
    if isinstance(first, (bool, int, float, complex)):
        return torch.tensor(list(requests))
    raise TypeError(
        f"stack_collate: cannot batch requests of type {type(first).__name__}; pass collate= (and split=) to "
        "DynamicBatcher"
    )


def index_split(output: Any, requests: Sequence[Any]) -> list[Any]:
    """The default split: one result per request, ``output[i]`` along dim 0.

    A tensor is indexed on dim 0; a dict or a tuple (several outputs) is split item by item; a list is taken as
    already holding one result per request.

    Args:
        output: what ``fn`` returned for the batch.
        requests: the batch's requests (only their number is used).

    Returns:
        ``len(requests)`` results, in request order.

    Raises:
        ValueError: when the output's dim 0 is not the number of requests.

    Example:
        >>> import torch
        >>> from deepseek_ext.serving import index_split
        >>> [r.tolist() for r in index_split(torch.tensor([[1, 2], [3, 4]]), [None, None])]
        [[1, 2], [3, 4]]
    """
    n = len(requests)
    if isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != n:
            raise ValueError(
                f"index_split: fn returned a tensor of shape {tuple(output.shape)} for a batch of {n} requests; "
                f"expected dim 0 of size {n} (or pass split=)"
            )
        return list(output.unbind(0))
    if isinstance(output, Mapping):
        parts = {k: index_split(v, requests) for k, v in output.items()}
        return [{k: parts[k][i] for k in parts} for i in range(n)]
    if isinstance(output, list):
        if len(output) != n:
            raise ValueError(f"index_split: fn returned a list of {len(output)} results for {n} requests")
        return output
    if isinstance(output, tuple):
        parts = [index_split(v, requests) for v in output]
        return [tuple(p[i] for p in parts) for i in range(n)]
    raise TypeError(
        f"index_split: cannot split an output of type {type(output).__name__} into per-request results; "
        "pass split= to DynamicBatcher"
    )


def pad_collate(requests: Sequence[torch.Tensor], padding_value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for variable-length sequences: pads to the longest and passes the lengths along.

    Args:
        requests: tensors of shape ``(length_i, *feature)`` with the same feature shape and dtype.
        padding_value: the value of padded positions.

    Returns:
        ``(padded, lengths)``: ``padded`` of shape ``(batch, max_length, *feature)``; ``lengths`` int64 ``(batch,)``.

    Example:
        >>> import torch
        >>> from deepseek_ext.serving import pad_collate
        >>> padded, lengths = pad_collate([torch.tensor([1, 2, 3]), torch.tensor([4])])
        >>> padded.tolist(), lengths.tolist()
        ([[1, 2, 3], [4, 0, 0]], [3, 1])
    """
    lengths = torch.tensor([r.shape[0] for r in requests], dtype=torch.int64)
    padded = torch.nn.utils.rnn.pad_sequence(list(requests), batch_first=True, padding_value=padding_value)
    return padded, lengths


def unpad_split(output: torch.Tensor, requests: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split for per-position outputs of a padded batch: row ``i`` trimmed to request ``i``'s length on dim 1.

    Args:
        output: ``(batch, max_length, ...)``.
        requests: the batch's requests (sequences of shape ``(length_i, ...)``).

    Returns:
        ``output[i, :length_i]`` for each request.

    Example:
        >>> import torch
        >>> from deepseek_ext.serving import pad_collate, unpad_split
        >>> reqs = [torch.tensor([1, 2, 3]), torch.tensor([4])]
        >>> [r.tolist() for r in unpad_split(pad_collate(reqs)[0] * 10, reqs)]
        [[10, 20, 30], [40]]
    """
    if output.dim() < 2 or output.shape[0] != len(requests):
        raise ValueError(
            f"unpad_split: expected an output of shape (batch={len(requests)}, max_length, ...), "
            f"got {tuple(output.shape)}"
        )
    return [output[i, : r.shape[0]] for i, r in enumerate(requests)]
