#!/usr/bin/env bash
# Runs a Python command on a device-tool GPU host whose image has jax + torch + transformers but not
# the rest: installs the wheels carried in .whl/ (flax, optax, peft, grain, ...) into /tmp/site, e.g.
#   bench/on_device.sh bench/bench.py run --suite train --batches 4,8 --out $OUT/results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
exec python3 "$@"
