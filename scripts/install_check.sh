#!/usr/bin/env bash
# The user's install path, checked for real: `pip install --no-build-isolation .` into a scratch target against
# the torch of the given environment, then import it from outside the checkout and call an op.
# Usage: scripts/install_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
PY=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")  # absolute, but not through the venv's symlink
target=$(mktemp -d /tmp/deepseek-ext-install.XXXXXX)
trap 'rm -rf "$target"' EXIT
echo "install-check: pip install --no-build-isolation --no-deps --target $target ."
"$PY" -m pip install -q --no-build-isolation --no-deps --target "$target" .
cd /tmp
PYTHONPATH="$target" "$PY" -c "
import torch, deepseek_ext
assert deepseek_ext.__file__.startswith('$target'), deepseek_ext.__file__
print(torch.ops.deepseek_ext.quantize_fp8)
q, s = deepseek_ext.ops.quantize_fp8(torch.tensor([1.0, -448.0]))
assert q.float().tolist() == [1.0, -448.0] and s.item() == 1.0
print('install-check: ok,', deepseek_ext.capabilities()['ops'])
"
