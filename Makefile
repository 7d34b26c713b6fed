# deepseek-ext developer commands (README.md). `make test` is exactly what CI runs (.ci/run).
#
#   make demo    set up .venv (torch 2.13.0 CPU + tools), build the extension, run the tour (examples/tour.py:
#                every example in quick mode, the benchmark report, demo-output/)
#   make test    set up the same way, then every test: ruff, pytest, GoogleTest (CTest), nvcc compile check of
#                kernels/, and a real `pip install --no-build-isolation .` into a scratch directory
#
# Other targets: build, pytest, cpp-test, cuda-check, install-check, bench, lint, clean.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV)/bin)
DEPS := $(VENV)/.deps-installed
export PATH := $(BIN):$(PATH)

.PHONY: demo test build pytest cpp-test cuda-check install-check bench lint clean

demo: build
	$(PY) examples/tour.py

test: build
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest
	$(MAKE) --no-print-directory cpp-test
	$(MAKE) --no-print-directory cuda-check
	$(MAKE) --no-print-directory install-check

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Incremental in-place build (ninja), plus a .pth so the checkout is importable from anywhere in .venv.
build: $(DEPS)
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c "import os, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'deepseek_ext_dev.pth'), 'w').write(os.getcwd() + '\n')"

pytest: build
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest

cpp-test: $(DEPS)
	scripts/ensure_gtest.sh
	cmake -S . -B build/cpp -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cpp
	ctest --test-dir build/cpp --output-on-failure

cuda-check: $(DEPS)
	scripts/check_cuda_compile.sh $(PY)

install-check: $(DEPS)
	scripts/install_check.sh $(PY)

bench: build
	$(PY) -m benchmarks

lint: $(DEPS)
	$(PY) -m ruff check deepseek_ext tests benchmarks examples setup.py

clean:
	rm -rf build deepseek_ext/_C*.so demo-output
