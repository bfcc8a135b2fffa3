#!/usr/bin/env bash
# Installs jlora with its test extra (torch CPU + peft as oracles) and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
export JAX_PLATFORMS=cpu
python3 -m pytest -n 2 --dist loadfile "$@"
