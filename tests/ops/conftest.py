"""Every op test runs once per CPU instruction-set level this machine supports (``deepseek_ext.capped_cpu_isa``), so
a machine with AVX-512 also tests the AVX2 and portable (scalar) kernels. Tests that do not depend on the level
(argument errors, opcheck, torch.compile, CUDA cases) run once, at the machine's own level; mark such a test
``@pytest.mark.any_isa`` or give it a ``device`` parameter of ``"cuda"``.

The machine's own level runs every case. Below it, every test function runs too, but a parametrised test keeps a
fixed quarter of its cases (chosen by a hash of the case id, so the same ones every run) unless ``--slow`` is given:
the grids are about the shapes, which do not depend on the level, and the full cross product would double
``make test``."""

from __future__ import annotations

import zlib

import pytest

import deepseek_ext

ORDER = ("scalar", "avx2", "avx512", "amx")


def supported_levels() -> list[str]:
    """The levels from the CPU's best down to the portable code, best first."""
    if not deepseek_ext.NATIVE_AVAILABLE:
        return ["scalar"]
    best = deepseek_ext.capabilities()["cpu_isa_detected"]
    return list(reversed(ORDER[: ORDER.index(best) + 1]))


LEVELS = supported_levels()


@pytest.fixture(params=LEVELS, autouse=True, ids=lambda level: f"isa={level}")
def cpu_isa_level(request):
    level = request.param
    params = getattr(request.node, "callspec", None)
    on_cuda = params is not None and params.params.get("device") == "cuda"
    if level != LEVELS[0] and (on_cuda or request.node.get_closest_marker("any_isa") is not None):
        pytest.skip("independent of the CPU instruction-set level: runs at the machine's own level only")
    if level != LEVELS[0] and params is not None and not request.config.getoption("--slow"):
        case = request.node.nodeid.replace(f"isa={level}", "")
        if len(params.params) > 1 and zlib.crc32(case.encode()) % 4:
            pytest.skip("a lower level runs a fixed quarter of a grid's cases (all of them with --slow)")
    with deepseek_ext.capped_cpu_isa(level):
        yield level
