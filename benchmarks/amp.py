"""AutoMixedPrecision: the fused unscale/check/norm op against PyTorch's two-step equivalent, and training-step
time against fp32 and torch.autocast on a BERT-style encoder built from a config (seq 128)."""

from __future__ import annotations

import contextlib

import torch

from benchmarks.runner import Case
from deepseek_ext.amp import AutoMixedPrecision
from deepseek_ext.ops import unscale_check_norm_

# Gradient shapes of BERT-base (110M parameters): 12 layers of 4 square + 2 rectangular matrices, plus the rest.
BERT_BASE_GRADS = (
    [(768, 768)] * 48 + [(3072, 768)] * 12 + [(768, 3072)] * 12 + [(30522, 768), (768, 768)] + [(768,)] * 100
)
QUICK_GRADS = [(256, 256)] * 16 + [(256,)] * 20
# The encoder timed for training steps: at BERT-base's size a bf16 step takes about 45 s on CPUs without bf16
# matmul units (20x fp32), so the step benchmark uses a narrower, shallower encoder of the same structure.
ENCODER = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    vocab_size=8000,
    max_position_embeddings=128,
    num_labels=2,
)
QUICK_ENCODER = dict(ENCODER, hidden_size=64, intermediate_size=128, num_hidden_layers=2)


def _torch_unscale_and_norm(grads, found, inv):
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _alternate(fn, grads, found, half, two):
    fn(grads, found, half)  # x 0.5 then x 2: the gradients do not drift toward denormals over many calls
    fn(grads, found, two)


class _Trainer:
    def __init__(self, config: dict, batch: int, mode: str, device: str):
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        self.model = BertForSequenceClassification(BertConfig(**config)).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.ids = torch.randint(0, config["vocab_size"], (batch, 128), device=device)
        self.labels = torch.randint(0, 2, (batch,), device=device)
        self.ctx = contextlib.nullcontext()
        self.amp = None
        if mode == "autocast-bf16":
            self.ctx = torch.autocast(device, dtype=torch.bfloat16)
        elif mode == "amp-bf16":
            self.amp = AutoMixedPrecision(self.opt, model=self.model, bf16_groups=[["bert", "classifier"]])
        elif mode == "amp-article":
            self.amp = AutoMixedPrecision(
                self.opt, model=self.model, fp16_groups=[["layer.0", "layer.1"]], bf16_groups=["classifier"]
            )

    def step(self):
        self.opt.zero_grad()
        with self.ctx:
            loss = self.model(input_ids=self.ids, labels=self.labels).loss
        if self.amp is None:
            loss.backward()
            self.opt.step()
        else:
            self.amp.backward(loss)
            self.amp.step()


def cases(device: str, quick: bool = False, compiled_baselines: bool = True) -> list[Case]:
    out = []
    grads = [torch.randn(s, device=device) for s in (QUICK_GRADS if quick else BERT_BASE_GRADS)]
    found = torch.zeros(1, device=device)
    half, two = torch.tensor([0.5], device=device), torch.tensor([2.0], device=device)
    millions = sum(g.numel() for g in grads) / 1e6
    out.append(
        Case(
            family="amp",
            op="unscale_check_norm_",
            config=f"{len(grads)} grads, {millions:.0f}M fp32",
            ours=lambda: _alternate(unscale_check_norm_, grads, found, half, two),
            baseline=lambda: _alternate(_torch_unscale_and_norm, grads, found, half, two),
            baseline_name="_amp_foreach_non_finite_check_and_unscale_ + _foreach_norm",
        )
    )
    try:
        import transformers  # noqa: F401
    except ImportError:
        return out
    config = QUICK_ENCODER if quick else ENCODER
    shape = f"BERT {config['num_hidden_layers']}x{config['hidden_size']} seq128 b8"
    fp32 = _Trainer(config, 8, "fp32", device)
    autocast = _Trainer(config, 8, "autocast-bf16", device)
    amp_bf16 = _Trainer(config, 8, "amp-bf16", device)
    article = _Trainer(config, 8, "amp-article", device)
    steady = None if quick else 10.0  # several steps per side: single steps are noisy on a shared machine
    out.append(
        Case(
            family="amp",
            op="train step",
            config=f"{shape}, all bf16",
            ours=amp_bf16.step,
            baseline=autocast.step,
            baseline_name="torch.autocast(bf16) (overhead check)",
            min_run_time=steady,
        )
    )
    out.append(
        Case(
            family="amp",
            op="train step",
            config=f"{shape}, article groups",
            ours=article.step,
            baseline=fp32.step,
            baseline_name="fp32",
            min_run_time=steady,
        )
    )
    return out
