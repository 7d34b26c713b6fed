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
