"""Per-group mixed precision on a BERT: the article's AutoMixedPrecision snippet, against plain fp32 training.

A BERT classifier built from a small ``transformers`` config (random weights, nothing downloaded) learns a synthetic
sequence task (is the share of 'low' tokens above one half?). It is trained twice from the same initial weights
on the same batches: in fp32, and with the article's snippet -- the first two encoder layers in fp16, the
classifier in bf16, everything else fp32 -- where the only change is the import and the ``model=`` argument the
snippet leaves out (an optimizer alone does not know module names). Prints ``amp.plan()``, both loss curves' ends
and the step times; plots the loss curves.

    python examples/amp_bert.py [--quick] [--out demo-output]
"""

from __future__ import annotations

import copy
import time

import torch
from _common import parser, plot, progress, save_results
from torch.optim import AdamW

from deepseek_ext.amp import AutoMixedPrecision

VOCAB, SEQ, BATCH = 512, 64, 16


def make_model(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg)


def batches(steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = ((ids < VOCAB // 2).float().mean(1) > 0.5).long()
        out.append({"input_ids": ids, "labels": labels})
    return out


def run(model, data, mixed: bool):
    optimizer = AdamW(model.parameters(), lr=3e-4)
    amp = None
    if mixed:
        amp = AutoMixedPrecision(
            optimizer, fp16_groups=[["layer.0", "layer.1"]], bf16_groups=["classifier"], model=model
        )
        amp.plan(print_table=True)
    losses, times = [], []
    for batch in progress(data, desc="AutoMixedPrecision" if mixed else "fp32"):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = model(**batch).loss
        if amp is None:
            loss.backward()
            optimizer.step()
        else:
            amp.backward(loss)
            amp.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
    steps = 30 if args.quick else 300
    data = batches(steps, args.seed)
    base = make_model(args.seed)
    results = {}
    for name, mixed in (("fp32", False), ("amp", True)):
        losses, step_s = run(copy.deepcopy(base), data, mixed)
        tail = sum(losses[-5:]) / 5
        results[name] = {"losses": losses, "step_s": step_s, "final_loss": tail}
        print(f"{name:>5}: loss {losses[0]:.3f} -> {tail:.3f} (mean of the last 5), median step {step_s * 1e3:.1f} ms")
    results["speedup_vs_fp32"] = results["fp32"]["step_s"] / results["amp"]["step_s"]
    print(
        f"AutoMixedPrecision step time: {results['speedup_vs_fp32']:.2f}x fp32 on this machine "
        "(a CPU without fp16/bf16 matrix units; the article's 1.6x is an A100 figure)"
    )
    xs = list(range(1, steps + 1))
    plot(
        args.out,
        "amp_bert_loss",
        "BERT training loss: fp32 vs AutoMixedPrecision",
        "step",
        "loss",
        {"fp32": (xs, results["fp32"]["losses"]), "AutoMixedPrecision": (xs, results["amp"]["losses"])},
    )
    save_results(args.out, "amp_bert", results)
    return results


if __name__ == "__main__":
    main()
