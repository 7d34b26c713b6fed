"""The reference server over real HTTP on 127.0.0.1 (uvicorn in a thread, httpx as the client; the CLI in a
subprocess): predictions equal the model's, several routes, Prometheus metrics, and every malformed request gets a
4xx with a message, never a 500."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import deepseek_ext

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from deepseek_ext.serving import ServedModel  # noqa: E402
from deepseek_ext.serving.server import ModelServer  # noqa: E402

from . import models  # noqa: E402

pytestmark = pytest.mark.skipif(not deepseek_ext.NATIVE_AVAILABLE, reason="native module not built")
ROOT = Path(__file__).resolve().parents[2]


class LiveServer:
    """uvicorn serving a ModelServer on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, routes, **batcher_defaults):
        self.model_server = ModelServer(routes, **batcher_defaults)
        config = uvicorn.Config(self.model_server.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.model_server.close()


@pytest.fixture(scope="module")
def live():
    routes = {
        "affine": models.affine(),
        "double": models.double(),
        "seq_sum": models.seq_sum(),
        "fails": models.fails_on_negative(),
    }
    with LiveServer(routes, max_delay_ms=2) as s:
        yield s


def test_predict_matches_the_model(live):
    r = live.client.post("/predict", json={"inputs": [1, 2, 3]})  # the first route is the default
    assert r.status_code == 200, r.text
    assert r.json() == {"model": "affine", "outputs": [22.5, 27.5]}
    r = live.client.post("/predict/double", json={"instances": [[1.5], [2.0, 3.0], 4]})
    assert r.json()["predictions"] == [[3.0], [4.0, 6.0], 8.0]  # different shapes: batched apart, all answered
    r = live.client.post("/predict/seq_sum", json={"instances": [[1, 2, 3], [10], [4, 5]]})
    assert r.json()["predictions"] == [6, 10, 9]  # variable lengths padded together


def test_concurrent_clients_get_their_own_answers(live):
    errors = []

    def client(k):
        with httpx.Client(base_url=live.client.base_url, timeout=30) as c:
            for i in range(20):
                v = float(k * 100 + i)
                r = c.post("/predict/double", json={"inputs": [v, -v]})
                if r.status_code != 200 or r.json()["outputs"] != [2 * v, -2 * v]:
                    errors.append(r.text)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),  # nested too deep for the parser
    (b'{"inputs": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}", 422, "invalid inputs"),  # too many dims
    (b"[1, 2, 3]", 400, 'either "inputs"'),
    (b'{"input": [1, 2, 3]}', 400, 'either "inputs"'),
    (b'{"inputs": [1, 2, 3], "instances": [[1, 2, 3]]}', 400, 'either "inputs"'),
    (b'{"instances": []}', 400, '"instances" must be a list'),
    (b'{"instances": {"a": 1}}', 400, '"instances" must be a list'),
    (b'{"inputs": [1, 2, 3], "timeout_ms": -5}', 400, '"timeout_ms" must be a positive number'),
    (b'{"inputs": [1, 2, 3], "timeout_ms": "soon"}', 400, '"timeout_ms" must be a positive number'),
    (b'{"inputs": [1, 2]}', 422, r"expected shape \(3\), got \(2,\)"),
    (b'{"inputs": [[1, 2, 3]]}', 422, "expected shape"),
    (b'{"inputs": "1, 2, 3"}', 422, "expected a number or a nested list"),
    (b'{"inputs": null}', 422, "expected a number or a nested list"),
    (b'{"inputs": {"x": 1}}', 422, "expected a number or a nested list"),
    (b'{"inputs": [1, "a", 3]}', 422, "cannot make a torch.float32 tensor"),
    (b'{"inputs": [[1], [2, 3], 4]}', 422, "cannot make a torch.float32 tensor"),
    (b'{"inputs": [1, 2, 1e999]}', 200, ""),  # inf is a float: accepted
    (b'{"instances": [[1, 2, 3], [1, 2]]}', 422, "expected shape"),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message(live, body, status, message):
    r = live.client.post("/predict/affine", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if status != 200:
        assert re.search(message, r.json()["error"]), r.json()


def test_other_client_errors(live, monkeypatch):
    import deepseek_ext.serving.server as server_module

    monkeypatch.setattr(server_module, "MAX_BODY_BYTES", 100)
    r = live.client.post("/predict/affine", json={"inputs": [1.0] * 100})
    assert r.status_code == 413 and "exceeds 100" in r.json()["error"]
    monkeypatch.undo()
    r = live.client.post("/predict/nope", json={"inputs": 1})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    assert live.client.get("/predict").status_code == 405
    r = live.client.post("/predict/seq_sum", json={"inputs": [[1, 2]]})
    assert r.status_code == 422 and "expected shape (any)" in r.json()["error"]


def test_a_failing_request_fails_alone(live):
    r = live.client.post("/predict/fails", json={"instances": [[1.0], [-1.0], [2.0]]})
    assert r.status_code == 500
    assert "model 'fails' failed on this request: ValueError: negative input" in r.json()["error"]
    r = live.client.post("/predict/fails", json={"instances": [[1.0], [2.0]]})
    assert r.status_code == 200 and r.json()["predictions"] == [[2.0], [3.0]]


def test_metrics_health_models_stats(live):
    live.client.post("/predict/double", json={"inputs": [1.0]})
    text = live.client.get("/metrics").text
    line = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? [-+0-9.e]+$|^# (HELP|TYPE) ')
    assert all(line.match(s) for s in text.splitlines()), [s for s in text.splitlines() if not line.match(s)]
    requests = re.search(r'deepseek_serving_requests_total\{model="double"\} (\d+)', text)
    assert requests and int(requests.group(1)) >= 1
    assert 'deepseek_serving_batch_size_bucket{model="double",le="+Inf"}' in text
    assert 'deepseek_serving_latency_seconds{model="double",quantile="0.99"}' in text
    assert 'deepseek_serving_http_responses_total{model="affine",code="422"}' in text
    assert live.client.get("/healthz").json() == {"status": "ok", "models": ["affine", "double", "seq_sum", "fails"]}
    info = live.client.get("/models").json()
    assert info["default"] == "affine" and info["models"]["affine"]["input_shape"] == [3]
    stats = live.client.get("/stats").json()
    assert stats["double"]["requests"] >= 1


def test_queue_full_is_a_503_and_timeouts_a_504():
    gate = threading.Event()

    def slow(x):
        gate.wait(10)
        return x

    with LiveServer({"slow": ServedModel(slow, batcher={"max_queue": 1, "max_batch_size": 1})}) as s:
        results = {}

        def call(name, body):
            with httpx.Client(base_url=s.client.base_url, timeout=30) as c:
                results[name] = c.post("/predict", json=body)

        first = threading.Thread(target=call, args=("running", {"inputs": [1.0]}))
        first.start()
        while s.model_server.batchers["slow"].stats()["in_flight"] == 0:
            time.sleep(0.005)
        second = threading.Thread(target=call, args=("timeout", {"inputs": [2.0], "timeout_ms": 50}))
        second.start()
        while s.model_server.batchers["slow"].stats()["queued"] == 0:
            time.sleep(0.005)
        r = s.client.post("/predict", json={"inputs": [3.0]})
        assert r.status_code == 503 and "queue full" in r.json()["error"] and r.headers["retry-after"] == "1"
        second.join(10)
        assert results["timeout"].status_code == 504
        assert "timed out after 50 ms" in results["timeout"].json()["error"]
        gate.set()
        first.join(10)
        assert results["running"].status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_command_line_server():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deepseek_ext.serving",
            "--model",
            "tests.serving.models:affine",
            "--model",
            "twice=tests.serving.models:double",
            "--port",
            str(port),
            "--max-delay-ms",
            "2",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            deadline = time.time() + 60
            while True:
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stderr.read()
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.1)
            assert c.post("/predict", json={"inputs": [1, 2, 3]}).json()["outputs"] == [22.5, 27.5]
            assert c.post("/predict/twice", json={"inputs": 4}).json()["outputs"] == 8
    finally:
        proc.terminate()
        proc.wait(30)


def test_command_line_errors():
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_ext.serving", "--model", "tests.serving.models:nothing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "has no attribute 'nothing'" in out.stderr
