"""`make test` on a fresh machine: scripts/ensure_gtest.sh finds GoogleTest or installs Debian's libgtest-dev, and
CMake builds GoogleTest from its sources or stops with a clear error, never skipping the C++ tests silently. apt-get,
sudo and id are replaced by stubs on PATH, so nothing is installed here."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ensure_gtest.sh"


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)


def run_script(tmp_path: Path, *, uid: int = 0, apt: str | None = "install", sudo: bool = False):
    """Runs ensure_gtest.sh on a simulated bare machine (no headers, no sources); returns (code, output, apt log)."""
    bin_dir, sources, log = tmp_path / "bin", tmp_path / "googletest", tmp_path / "apt.log"
    bin_dir.mkdir()
    stub(bin_dir, "id", f'[ "$1" = "-u" ] && echo {uid} || /usr/bin/id "$@"')
    if apt is not None:
        creates = f'mkdir -p {sources} && touch {sources}/CMakeLists.txt' if apt == "install" else "true"
        stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}\n[ "$1" = install ] && {{ {creates}; }}\nexit 0')
    if sudo:
        stub(bin_dir, "sudo", f'echo "sudo $*" >> {log}\n[ "$1" = -n ] && shift\nexec "$@"')
    else:
        stub(bin_dir, "sudo", "exit 1")  # there, but not usable without a password
    env = dict(os.environ, DSX_GTEST_INCLUDE_DIRS=str(tmp_path / "no-headers"), DSX_GTEST_SOURCE_DIR=str(sources))
    env["PATH"] = f"{bin_dir}:/bin:/usr/bin" if apt is not None else str(bin_dir)
    bash = shutil.which("bash")
    proc = subprocess.run([bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr, log.read_text() if log.exists() else ""


def test_found_googletest_needs_nothing(tmp_path):
    (tmp_path / "googletest").mkdir()
    (tmp_path / "googletest" / "CMakeLists.txt").touch()
    code, out, apt = run_script(tmp_path)
    assert code == 0 and apt == "", out


def test_a_bare_machine_installs_libgtest_dev_as_root(tmp_path):
    code, out, apt = run_script(tmp_path)
    assert code == 0, out
    assert "installing libgtest-dev" in out
    assert apt.splitlines() == ["apt-get update -qq", "apt-get install -y -qq libgtest-dev"]


def test_without_root_it_uses_sudo_when_it_can(tmp_path):
    code, out, apt = run_script(tmp_path, uid=1000, sudo=True)
    assert code == 0, out
    assert "sudo -n apt-get install -y -qq libgtest-dev" in apt


def test_without_root_or_sudo_it_stops_with_what_to_run(tmp_path):
    code, out, apt = run_script(tmp_path, uid=1000)
    assert code == 1 and "sudo apt-get install libgtest-dev" in out and apt == ""


def test_an_install_that_brings_nothing_is_an_error(tmp_path):
    code, out, _ = run_script(tmp_path, apt="noop")
    assert code == 1 and "still not found" in out


def test_not_debian_is_an_error_that_says_what_to_install(tmp_path):
    code, out, _ = run_script(tmp_path, apt=None)
    assert code == 1 and "not a Debian-based machine" in out


def test_cmake_stops_loudly_without_googletest(tmp_path):
    """No installed GoogleTest (ignored on purpose) and no sources: configuring fails and says what to do."""
    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed (requirements-dev.txt brings it)")
    proc = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython3_EXECUTABLE={sys.executable}",
         "-DDSX_GTEST_FROM_SOURCE=ON", f"-DDSX_GTEST_SOURCE_DIR={tmp_path / 'none'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "GoogleTest not found" in proc.stderr and "ensure_gtest.sh" in proc.stderr
