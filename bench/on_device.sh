#!/usr/bin/env bash
# Runs a Python command on a device-tool GPU host whose image has jax + torch + transformers but not
# the rest: installs the wheels carried in .whl/ (bench/build_wheels.sh downloads them: flax, optax,
# orbax, peft, grain, ...) into /tmp/site, e.g.
#   bench/on_device.sh bench/bench.py run --suite train --batches 4,8 --out $OUT/results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "on_device.sh: no wheels in .whl/; run bash bench/build_wheels.sh first (and carry .whl)." >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
exec python3 "$@"
