"""Smoke tests of the example scripts: each runs in quick mode, as a user would (its own process), and its
results must be sane. Not timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_example(name: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / f"{name}.json").read_text())


def test_imbalanced_sampler(tmp_path):
    r = run_example("imbalanced_sampler", tmp_path)
    assert r["dynamic"]["recall"]["abnormal"] >= r["plain"]["recall"]["abnormal"]
    assert r["train_abnormal"] / r["train_items"] < 0.05  # the rare class really is rare
    assert max(r["dynamic"]["abnormal_share"]) > 3 * max(r["plain"]["abnormal_share"])  # the sampler steered
    assert (tmp_path / "imbalanced_sampler_mix.png").exists()


def test_amp_bert(tmp_path):
    pytest.importorskip("transformers")
    r = run_example("amp_bert", tmp_path)
    assert abs(r["amp"]["final_loss"] - r["fp32"]["final_loss"]) < 0.1
    assert all(0 < x < 5 for x in r["amp"]["losses"])
    assert (tmp_path / "amp_bert_loss.png").exists()


def test_quantize_deploy(tmp_path):
    r = run_example("quantize_deploy", tmp_path)
    cnn = r["digits_cnn"]
    assert cnn["float"]["accuracy"] > 0.85
    assert cnn["W8A8"]["accuracy_drop"] <= 0.03  # stated bounds: 3 points for W8A8, 5 for W4A8
    assert cnn["W4A8"]["accuracy_drop"] <= 0.05
    assert cnn["W8A8 static"]["accuracy_drop"] <= 0.01  # static int8: within 1 point of float
    assert cnn["W4A8 static"]["accuracy_drop"] <= 0.05
    assert cnn["W4A8"]["bytes"] < cnn["W8A8"]["bytes"] < cnn["float"]["bytes"]
    assert r["resnet18"]["W4A8"]["bytes"] < r["resnet18"]["float"]["bytes"] / 4


def test_private_training(tmp_path):
    r = run_example("private_training", tmp_path)
    assert abs(r["dp"]["attack_auc"] - 0.5) < abs(r["plain"]["attack_auc"] - 0.5)
    assert r["dp"]["epsilon_spent"] <= 1.0 + 1e-6
    # Utility at epsilon = 1 on 200 examples depends on the noise drawn: over seeds 0-8 the DP test AUC spans
    # 0.60-0.82 (with torch.normal's noise and with the fused Philox noise alike, means 0.73 and 0.72), so the bound
    # is one that every seed meets, well above chance (0.5).
    assert r["dp"]["test_auc"] > 0.6 and r["plain"]["test_auc"] > 0.95
    assert (tmp_path / "private_training_epsilon.png").exists()


def test_gpt_fp8_attention(tmp_path):
    r = run_example("gpt_fp8_attention", tmp_path)
    for name in ("plain", "fp8_fused"):
        assert r[name]["final_loss"] < 0.8 * r[name]["losses"][0]
    assert abs(r["fp8_fused"]["final_loss"] - r["plain"]["final_loss"]) < 0.15 * r["plain"]["final_loss"]


def test_zero3_train(tmp_path):
    r = run_example("zero3_train", tmp_path)
    assert r["crash_exit_code"] != 0
    assert r["resumed_from"] > 0
    assert r["identical_to_uninterrupted"]
    assert r["per_rank_bytes"] < 0.6 * r["unsharded_bytes"]


def test_serving_bert(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    r = run_example("serving_bert", tmp_path)
    low, high = (str(x) for x in r["rates"])
    assert r["rates"][1] == 5 * r["rates"][0]
    adaptive, fixed = r["runs"]["adaptive"], r["runs"]["fixed"]
    for route in r["runs"].values():
        assert route[low]["ok"] > 0.9 * route[low]["sent"]  # the low rate is sustainable for every route
    assert adaptive[high]["ok"] > 0.9 * adaptive[high]["sent"]
    assert adaptive[high]["mean_batch_size"] > adaptive[low]["mean_batch_size"]  # batches grow with the load
    assert adaptive[low]["latency_ms"]["p50"] < fixed[low]["latency_ms"]["p50"]  # no window wait at light load
    assert (tmp_path / "serving_bert.png").exists()
