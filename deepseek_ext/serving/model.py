"""ServedModel: what a model factory hands the reference server (``python -m deepseek_ext.serving --model
module:factory``): the batch function, how JSON becomes a request and a result becomes JSON, and batcher options.
Plain Python: no HTTP stack needed."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def _to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


@dataclass
class ServedModel:
    """A model route of the reference server: ``fn`` behind a :class:`~deepseek_ext.serving.DynamicBatcher`.

    A request's JSON ``inputs`` become a tensor of ``input_dtype`` (or whatever ``decode`` returns), checked
    against ``input_shape``; each result goes back through ``encode`` (default: tensors as nested lists).
    Input errors are the client's (HTTP 422 with the message), never the server's.

    Args:
        fn: the batch function (e.g. an ``nn.Module``; put in eval mode by :func:`load_factory`).
        input_dtype: dtype of the request tensor built from the JSON value.
        input_shape: the expected shape of one request, ``None`` entries for any size (e.g. ``(None,)`` for
            variable-length token ids); ``None`` to accept any shape.
        decode: ``decode(json_value) -> request``, replacing the tensor conversion (raise ``ValueError`` or
            ``TypeError`` for bad input).
        encode: ``encode(result) -> JSON-able value``.
        batcher: keyword arguments for this route's ``DynamicBatcher`` (``collate``, ``split``, ``max_batch_size``,
            ...); they override the server's command-line defaults.
        description: shown by ``GET /models``.

    Example:
        >>> import torch
        >>> from deepseek_ext.serving import ServedModel
        >>> m = ServedModel(torch.nn.Linear(4, 2), input_shape=(4,), batcher={"max_batch_size": 16})
        >>> m.decode_request([1, 2, 3, 4]).dtype
        torch.float32
    """

    fn: Callable[[Any], Any]
    input_dtype: torch.dtype = torch.float32
    input_shape: Sequence[int | None] | None = None
    decode: Callable[[Any], Any] | None = None
    encode: Callable[[Any], Any] | None = None
    batcher: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def decode_request(self, value: Any) -> Any:
        """One request from its JSON value.

        Args:
            value: the parsed JSON of one input.

        Returns:
            The request to submit.

        Raises:
            ValueError: the value does not make a valid input (a message for the client).

        Example:
            >>> from deepseek_ext.serving import ServedModel
            >>> ServedModel(lambda x: x, input_shape=(None, 2)).decode_request([[1, 2], [3, 4], [5, 6]]).shape
            torch.Size([3, 2])
        """
        if self.decode is not None:
            try:
                return self.decode(value)
            except (TypeError, ValueError, KeyError, IndexError) as e:
                raise ValueError(f"invalid inputs: {e}") from e
        if isinstance(value, (str, bytes, dict)) or value is None:
            kind = type(value).__name__
            raise ValueError(f"invalid inputs: expected a number or a nested list of numbers, got {kind}")
        try:
            x = torch.tensor(value, dtype=self.input_dtype)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ValueError(f"invalid inputs: cannot make a {self.input_dtype} tensor: {e}") from e
        if self.input_shape is not None:
            want = tuple(self.input_shape)
            if x.dim() != len(want) or any(w is not None and w != s for w, s in zip(want, x.shape)):
                shown = "(" + ", ".join("any" if w is None else str(w) for w in want) + ")"
                raise ValueError(f"invalid inputs: expected shape {shown}, got {tuple(x.shape)}")
            if x.numel() == 0:
                raise ValueError(f"invalid inputs: empty input of shape {tuple(x.shape)}")
        return x

    def encode_result(self, result: Any) -> Any:
        """One result as a JSON-able value (``encode``, or tensors as nested lists).

        Args:
            result: what the batcher returned for one request.

        Returns:
            A value ``json.dumps`` accepts.

        Example:
            >>> import torch
            >>> from deepseek_ext.serving import ServedModel
            >>> ServedModel(lambda x: x).encode_result({"p": torch.tensor([0.5, 0.5])})
            {'p': [0.5, 0.5]}
        """
        return self.encode(result) if self.encode is not None else _to_json(result)


def load_factory(spec: str) -> ServedModel:
    """Imports ``module:factory``, calls the factory with no arguments and wraps a bare callable in a ServedModel
    (an ``nn.Module`` is put in eval mode)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model: expected module:factory (e.g. mypkg.models:make_model), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r}: {e}") from e
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"--model {spec!r}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {attr!r} is not callable")
    made = factory()
    served = made if isinstance(made, ServedModel) else ServedModel(made)
    if not callable(served.fn):
        raise ValueError(f"--model {spec!r}: the factory returned {type(made).__name__}, not a callable model")
    if isinstance(served.fn, torch.nn.Module):
        served.fn.eval()
    return served
