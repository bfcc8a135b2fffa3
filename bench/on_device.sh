#!/usr/bin/env bash
# Runs bench.py on a device-tool GPU host whose image has jax + torch + transformers but not the rest:
# installs the wheels carried in .whl/ (flax, optax, peft, grain, ...) into /tmp/site, then runs
#   bench/on_device.sh --suite train --batches 4,8
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 bench/bench.py run --out "${OUT:-.}/results.jsonl" "$@"
