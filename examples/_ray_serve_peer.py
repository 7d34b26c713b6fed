"""Ray Serve as a peer for examples/serving_bert.py (``--ray``): the same BERT classifier behind Ray Serve's HTTP
proxy, batched by ``@serve.batch`` with the same max batch size and wait (a fixed window). Optional: Ray is not a
dependency of deepseek-ext; this runs only where ``ray[serve]`` is installed.

    python examples/_ray_serve_peer.py PORT MAX_BATCH MAX_DELAY_MS     # serves /predict/ray until terminated
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(port: int, max_batch: int, max_delay_ms: float) -> None:
    import ray
    from ray import serve

    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 1})
    class Bert:
        def __init__(self):
            import torch

            sys.path.insert(0, str(HERE))
            import serving_bert

            torch.set_num_threads(1)  # as the deepseek-ext server runs it (--threads 1)
            self.torch, self.sb = torch, serving_bert
            serving_bert.bert_model()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=max_delay_ms / 1e3)
        async def classify(self, requests: list) -> list:
            from deepseek_ext.serving import pad_collate

            with self.torch.no_grad():
                out = self.sb.classify(pad_collate(requests))
            return [row.tolist() for row in out]

        async def __call__(self, request):
            body = await request.json()
            x = self.torch.tensor(body["inputs"], dtype=self.torch.int64)
            return {"model": "ray", "outputs": await self.classify(x)}

    serve.run(Bert.bind(), route_prefix="/predict/ray")
    print("ready", flush=True)

    def stop(*_):
        serve.shutdown()
        ray.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
