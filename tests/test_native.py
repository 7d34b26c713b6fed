"""Loading of the native module and capabilities() (deepseek_ext/_native.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import deepseek_ext

ROOT = Path(__file__).resolve().parents[1]


def test_ops_are_registered_in_the_dispatcher():
    assert deepseek_ext.NATIVE_AVAILABLE
    for name in ("quantize_fp8", "dequantize_fp8"):
        assert isinstance(getattr(torch.ops.deepseek_ext, name), torch._ops.OpOverloadPacket)


def test_capabilities_describe_this_build():
    caps = deepseek_ext.capabilities()
    assert caps["native"] and caps["native_error"] is None
    assert caps["cpu"] is True
    assert caps["torch_built"] == torch.__version__
    assert caps["ops"]["quantize_fp8"]["cpu"] and caps["ops"]["dequantize_fp8"]["cpu"]
    assert caps["cuda"] == all(op["cuda"] for op in caps["ops"].values())
    if caps["cuda"]:
        assert caps["cuda_archs"] and caps["cuda_version"]
    else:
        assert caps["cuda_archs"] == [] and caps["cuda_version"] is None


def test_failed_native_load_warns_once_and_ops_explain_why():
    """A broken _C (built for another torch, say) must not break `import deepseek_ext`."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["deepseek_ext._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import deepseek_ext
        assert not deepseek_ext.NATIVE_AVAILABLE
        assert not deepseek_ext.capabilities()["native"]
        print("WARNINGS", len(caught), caught[0].category.__name__, caught[0].message)
        import torch
        try:
            deepseek_ext.ops.quantize_fp8(torch.ones(2))
        except RuntimeError as e:
            print("ERROR", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "WARNINGS 1 RuntimeWarning deepseek_ext: the native module failed to load" in out
    assert "rebuild against it with: pip install --no-build-isolation" in out
    assert "ERROR deepseek_ext.ops.quantize_fp8 needs the native module, which failed to load" in out


def test_cpu_isa_levels_cap_and_report():
    caps = deepseek_ext.capabilities()
    levels = ("scalar", "avx2", "avx512", "amx")
    assert caps["cpu_isa_detected"] in levels and caps["cpu_isa"] == deepseek_ext.cpu_isa()
    assert caps["cpu_model"] and isinstance(caps["cpu_features"], list)
    assert {"fused_attention", "quantized_linear", "fp8_matmul"} <= set(caps["cpu_paths"])
    best = levels.index(caps["cpu_isa_detected"])
    for i, level in enumerate(levels):
        with deepseek_ext.capped_cpu_isa(level) as now:
            assert now == levels[min(i, best)] == deepseek_ext.cpu_isa()
            paths = deepseek_ext.capabilities()["cpu_paths"]["fused_attention"]
            assert all(p.startswith(("scalar", "avx2", "avx512")) for p in paths.values())
        assert deepseek_ext.cpu_isa() == caps["cpu_isa"]  # restored
    with deepseek_ext.capped_cpu_isa("scalar"):
        assert "scalar" in deepseek_ext.capabilities()["cpu_paths"]["fused_attention"]["float64"]


def test_cpu_isa_bad_names_are_value_errors():
    import pytest

    with pytest.raises(ValueError, match="expected one of 'scalar', 'avx2', 'avx512' or 'amx', but got 'sse4'"):
        deepseek_ext.set_cpu_isa_cap("sse4")
    with pytest.raises(TypeError, match="expected a level name or None"):
        deepseek_ext.set_cpu_isa_cap(2)
    assert deepseek_ext.cpu_isa() == deepseek_ext.capabilities()["cpu_isa_detected"]


def test_cpu_isa_environment_variable():
    script = "import deepseek_ext; print(deepseek_ext.cpu_isa())"
    env = {**__import__("os").environ, "DEEPSEEK_EXT_CPU_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    env["DEEPSEEK_EXT_CPU_ISA"] = "neon"
    bad = subprocess.run(
        [sys.executable, "-c", "import torch, deepseek_ext; deepseek_ext.ops.quantize_fp8(torch.ones(4))"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "DEEPSEEK_EXT_CPU_ISA: expected one of 'scalar'" in bad.stderr
