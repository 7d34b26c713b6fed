"""FP8 linear layers and fused attention in a small GPT: loss curves and step time against the plain model.

A character-level GPT (2 blocks, width 128, 4 heads, context 64) learns from a corpus that ships with PyTorch (the
source text of ``torch.nn.modules.module``). It is trained twice from the same weights on the same batches: as
written, and with ``convert_to_fp8(model, skip=['head'])`` plus ``deepseek_ext.nn.use_fused_attention()`` around
the training step, so every ``F.scaled_dot_product_attention`` call runs the fused kernels and every linear layer
computes in FP8 (e4m3 activations and weights, e5m2 gradients) with fp32 master weights.

    python examples/gpt_fp8_attention.py [--quick] [--out demo-output]
"""

from __future__ import annotations

import copy
import inspect
import time

import torch
import torch.nn.functional as F
from _common import parser, plot, progress, save_results
from torch import nn

import deepseek_ext.nn as dnn

VOCAB, CONTEXT, WIDTH, HEADS, BATCH = 128, 64, 128, 4, 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # looked up at call time: swappable
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.Sequential(Block(), Block())
        self.ln, self.head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.size(1)))
        return self.head(self.ln(self.blocks(x)))


def corpus() -> torch.Tensor:
    text = inspect.getsource(torch.nn.modules.module)
    return torch.tensor([min(ord(c), VOCAB - 1) for c in text], dtype=torch.long)


def batches(data: torch.Tensor, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=g)
        window = torch.stack([data[s : s + CONTEXT + 1] for s in start.tolist()])
        yield window[:, :-1], window[:, 1:]


def run(model, data, steps: int, seed: int, ours: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, times = [], []
    for x, y in progress(batches(data, steps, seed), desc="FP8 + fused attention" if ours else "plain", total=steps):
        start = time.perf_counter()
        opt.zero_grad()
        with dnn.use_fused_attention() if ours else _nothing():
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, sorted(times)[len(times) // 2]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
    steps = 60 if args.quick else 600
    data = corpus()
    torch.manual_seed(args.seed)
    base = GPT()
    results = {}
    for name, ours in (("plain", False), ("fp8_fused", True)):
        model = copy.deepcopy(base)
        if ours:
            dnn.convert_to_fp8(model, skip=["head"])
        losses, step_s = run(model, data, steps, args.seed, ours)
        tail = sum(losses[-10:]) / 10
        results[name] = {"losses": losses, "step_s": step_s, "final_loss": tail}
        print(
            f"{name:>10}: loss {losses[0]:.3f} -> {tail:.3f} (mean of the last 10), median step {step_s * 1e3:.1f} ms"
        )
    results["step_time_ratio"] = results["plain"]["step_s"] / results["fp8_fused"]["step_s"]
    print(
        f"step time: {results['step_time_ratio']:.2f}x the plain model's speed on this CPU (no FP8 units: FP8 "
        "here is emulated through decoding; the article's 1.8x is an H100 tensor-core figure)"
    )
    xs = list(range(1, steps + 1))
    plot(
        args.out,
        "gpt_fp8_attention_loss",
        "Character GPT: plain vs FP8 + fused attention",
        "step",
        "loss",
        {"plain": (xs, results["plain"]["losses"]), "FP8 + fused attention": (xs, results["fp8_fused"]["losses"])},
    )
    save_results(args.out, "gpt_fp8_attention", results)
    return results


if __name__ == "__main__":
    main()
