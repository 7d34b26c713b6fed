#!/usr/bin/env bash
# Makes GoogleTest available to `make cpp-test` (CMakeLists.txt) on a fresh machine, never skipping silently:
#   1. an installed GoogleTest (headers in /usr/include or /usr/local/include), or
#   2. its sources (Debian's googletest package: /usr/src/googletest, or $DSX_GTEST_SOURCE_DIR), which CMake builds;
#   3. otherwise Debian's libgtest-dev (it brings both) is installed with apt-get: as root, or through sudo.
# Anything else ends with an error that says what to install. The variables DSX_GTEST_INCLUDE_DIRS and
# DSX_GTEST_SOURCE_DIR override where it looks (tests/test_fresh_machine.py uses them to simulate a bare machine).
set -euo pipefail

include_dirs=${DSX_GTEST_INCLUDE_DIRS:-/usr/include /usr/local/include}
source_dir=${DSX_GTEST_SOURCE_DIR:-/usr/src/googletest}

found() {
  for d in $include_dirs; do
    [ -f "$d/gtest/gtest.h" ] && return 0
  done
  [ -f "$source_dir/CMakeLists.txt" ]
}

found && exit 0

if ! command -v apt-get >/dev/null; then
  echo "ensure_gtest: GoogleTest is missing and this is not a Debian-based machine; install GoogleTest (headers and" \
    "libraries, e.g. gtest-devel / googletest) or set DSX_GTEST_SOURCE_DIR to its sources" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "ensure_gtest: GoogleTest is missing; installing it needs root: run 'sudo apt-get install libgtest-dev'" \
      "(or set DSX_GTEST_SOURCE_DIR to GoogleTest sources)" >&2
    exit 1
  fi
fi
echo "ensure_gtest: installing libgtest-dev with apt-get"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq libgtest-dev >/dev/null
if ! found; then
  echo "ensure_gtest: apt-get installed libgtest-dev but GoogleTest is still not found in $include_dirs or" \
    "$source_dir" >&2
  exit 1
fi
