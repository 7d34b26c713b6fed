"""The reference HTTP server: JSON over HTTP on Starlette + uvicorn, one DynamicBatcher per model route.

Routes:
    ``POST /predict`` and ``POST /predict/{model}``: body ``{"inputs": x}`` (one input; answer ``{"model", "outputs"}``)
    or ``{"instances": [x, ...]}`` (several; answer ``{"model", "predictions"}``), optional ``"timeout_ms"``.
    ``GET /metrics``: Prometheus text. ``GET /healthz``: 200 while every batcher runs. ``GET /models``: the routes.
    ``GET /stats``: every batcher's ``stats()`` as JSON.

Status codes: 400 (not JSON, wrong structure), 404 (unknown model), 413 (body too large), 422 (inputs that do not
make a valid request, with the reason), 503 (queue full, with ``Retry-After``; or closed), 504 (timed out in the
queue), 500 only when the model itself raised on that request. Client mistakes are never a 500.

Starlette and uvicorn are the optional ``serving`` extra (``pip install 'deepseek-ext[serving]'``); importing this
module without them raises an ImportError that says so.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Any

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as _e:  # pragma: no cover - exercised by tests/serving/test_server.py in a subprocess
    raise ImportError(
        "deepseek_ext.serving.server needs the optional HTTP stack (starlette and uvicorn): "
        "pip install 'deepseek-ext[serving]'. DynamicBatcher itself (deepseek_ext.serving) works without it."
    ) from _e

from .batcher import DynamicBatcher
from .errors import BatcherClosed, QueueFull, RequestTimeout
from .metrics import render_prometheus
from .model import ServedModel

MAX_BODY_BYTES = 16 * 2**20
MAX_INSTANCES = 1024


def _dumps(payload: Any) -> bytes:
    # NaN / inf in model outputs are written as JSON extensions (NaN, Infinity) rather than failing the response.
    return json.dumps(payload, separators=(",", ":"), allow_nan=True).encode()


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(_dumps(payload), status_code=status, headers=dict(headers or {}), media_type="application/json")


class ModelServer:
    """The server's state: one :class:`DynamicBatcher` per route, HTTP counters, and the Starlette app.

    Args:
        models: ``{route name: ServedModel or callable}``; the first is also served at ``POST /predict``.
        **batcher_defaults: ``DynamicBatcher`` keyword arguments for every route (a route's
            ``ServedModel.batcher`` overrides them).

    Example:
        >>> import torch
        >>> from deepseek_ext.serving.server import ModelServer
        >>> server = ModelServer({"double": lambda x: 2 * x}, max_delay_ms=2)
        >>> app = server.app           # an ASGI app: uvicorn.run(app, port=8000)
        >>> server.close()
    """

    def __init__(self, models: Mapping[str, ServedModel | Any], **batcher_defaults: Any):
        if not models:
            raise ValueError("ModelServer: at least one model route is needed")
        self.models: dict[str, ServedModel] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        for name, model in models.items():
            served = model if isinstance(model, ServedModel) else ServedModel(model)
            options = {**batcher_defaults, **served.batcher}
            self.models[name] = served
            self.batchers[name] = DynamicBatcher(served.fn, name=name, **options)
        self.default = next(iter(self.models))
        self.http_counts: Counter[tuple[str, int]] = Counter()
        self.app = Starlette(
            routes=[
                Route("/predict", self.predict, methods=["POST"]),
                Route("/predict/{model}", self.predict, methods=["POST"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/models", self.list_models, methods=["GET"]),
                Route("/stats", self.stats, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    @asynccontextmanager
    async def _lifespan(self, app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self, drain: bool = True) -> None:
        """Closes every batcher (``drain``: finish what is queued)."""
        for b in self.batchers.values():
            b.close(drain=drain)

    def _answer(self, model: str, payload: Any, status: int = 200, headers=None) -> Response:
        self.http_counts[(model, status)] += 1
        return _json(payload, status, headers)

    def _error(self, model: str, status: int, message: str, headers=None) -> Response:
        return self._answer(model, {"error": message}, status, headers)

    async def predict(self, request: Request) -> Response:
        name = request.path_params.get("model", self.default)
        if name not in self.models:
            return self._error(name, 404, f"unknown model {name!r}; available: {sorted(self.models)}")
        model, batcher = self.models[name], self.batchers[name]
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # before reading it
            return self._error(name, 413, f"request body of {declared} bytes exceeds {MAX_BODY_BYTES}")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return self._error(name, 413, f"request body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return self._error(name, 400, f"request body is not valid JSON: {type(e).__name__}: {e}")
        if not isinstance(payload, dict) or ("inputs" in payload) == ("instances" in payload):
            return self._error(
                name, 400, 'expected a JSON object with either "inputs" (one input) or "instances" (a list of inputs)'
            )
        timeout_ms = payload.get("timeout_ms")
        if timeout_ms is not None and (
            isinstance(timeout_ms, bool)
            or not isinstance(timeout_ms, (int, float))
            or not math.isfinite(timeout_ms)
            or timeout_ms <= 0
        ):
            return self._error(name, 400, f'"timeout_ms" must be a positive number, got {timeout_ms!r}')
        single = "inputs" in payload
        values = [payload["inputs"]] if single else payload["instances"]
        if not single and (not isinstance(values, list) or not 0 < len(values) <= MAX_INSTANCES):
            return self._error(name, 400, f'"instances" must be a list of 1 to {MAX_INSTANCES} inputs')
        try:
            requests = [model.decode_request(v) for v in values]
        except ValueError as e:
            return self._error(name, 422, str(e))

        futures = []
        try:
            for r in requests:
                futures.append(batcher.submit(r, timeout_ms))
        except QueueFull as e:
            for f in futures:
                f.cancel()
            return self._error(name, 503, str(e), {"Retry-After": "1"})
        except BatcherClosed as e:
            for f in futures:
                f.cancel()
            return self._error(name, 503, str(e))
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        for r in results:
            if isinstance(r, RequestTimeout):
                return self._error(name, 504, str(r))
            if isinstance(r, BatcherClosed):
                return self._error(name, 503, str(r))
            if isinstance(r, BaseException):
                return self._error(name, 500, f"model {name!r} failed on this request: {type(r).__name__}: {r}")
        try:
            encoded = [model.encode_result(r) for r in results]
        except Exception as e:  # the route's encode is server code: its failure is the server's
            return self._error(name, 500, f"model {name!r}: cannot encode the result: {type(e).__name__}: {e}")
        if single:
            return self._answer(name, {"model": name, "outputs": encoded[0]})
        return self._answer(name, {"model": name, "predictions": encoded})

    def _stats(self) -> dict[str, dict[str, Any]]:
        return {name: b.stats() for name, b in self.batchers.items()}

    async def metrics(self, request: Request) -> Response:
        text = render_prometheus(self._stats(), dict(self.http_counts))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        down = [name for name, b in self.batchers.items() if b.closed]
        if down:
            return _json({"status": "closed", "closed": down}, 503)
        return _json({"status": "ok", "models": list(self.models)})

    async def list_models(self, request: Request) -> Response:
        info = {}
        for name, m in self.models.items():
            b = self.batchers[name]
            info[name] = {
                "description": m.description,
                "input_dtype": str(m.input_dtype),
                "input_shape": None if m.input_shape is None else list(m.input_shape),
                "max_batch_size": b.max_batch_size,
                "max_delay_ms": b.max_delay_ms,
                "latency_slo_ms": b.latency_slo_ms,
                "policy": b.policy,
                "preferred_batch_sizes": b.preferred_batch_sizes,
            }
        return _json({"default": self.default, "models": info})

    async def stats(self, request: Request) -> Response:
        return _json(self._stats())


def build_app(models: Mapping[str, ServedModel | Any], **batcher_defaults: Any) -> Starlette:
    """The ASGI app of a :class:`ModelServer` (its batchers close, draining, when the app shuts down).

    Args:
        models: ``{route name: ServedModel or callable}``.
        **batcher_defaults: ``DynamicBatcher`` keyword arguments for every route.

    Returns:
        A Starlette app; ``app.state.server`` is the ModelServer.

    Example:
        >>> from deepseek_ext.serving.server import build_app
        >>> app = build_app({"double": lambda x: 2 * x})
        >>> app.state.server.close()
    """
    server = ModelServer(models, **batcher_defaults)
    server.app.state.server = server
    return server.app


def serve(
    models: Mapping[str, ServedModel | Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    **batcher_defaults: Any,
) -> None:
    """Runs the server with uvicorn until interrupted (one process, one event loop; run several processes behind
    a load balancer to scale out).

    Args:
        models: ``{route name: ServedModel or callable}``.
        host: address to bind (default loopback only).
        port: TCP port.
        log_level: uvicorn's log level.
        **batcher_defaults: ``DynamicBatcher`` keyword arguments for every route.

    Example:
        >>> from deepseek_ext.serving.server import serve
        >>> # serve({"double": lambda x: 2 * x}, port=8000)   # blocks; Ctrl-C stops it
    """
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("serve() needs uvicorn: pip install 'deepseek-ext[serving]'") from e
    app = build_app(models, **batcher_defaults)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
