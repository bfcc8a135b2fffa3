#!/usr/bin/env bash
# Downloads into .whl/ the wheels bench/on_device.sh installs on a GPU image that already has
# jax (cuda), torch and transformers with their dependencies but not jlora's other ones:
#   bash bench/build_wheels.sh && bench/on_device.sh bench/bench.py run ...
# Wheels are for CPython 3.12 on x86_64 Linux (the image's), pinned to versions known to work with
# jax 0.11; --no-deps because the list below is the closure of what the image lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
  flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 peft==0.21.2 grain==0.2.18
  treescope==0.1.10 msgpack==1.2.4 tensorstore==0.1.86 etils==1.15.0 absl-py==2.5.1
  nest-asyncio==1.6.0 aiofiles==25.1.0 humanize==4.17.0 simplejson==4.3.0 uvloop==0.23.0
  prometheus-client==0.26.0 protobuf==7.36.2 array-record==0.8.6 cloudpickle==2.1.0
  portpicker==1.6.0 psutil==7.2.2 accelerate==1.15.0
  # attention="tokamax" (bench suite tokamax): tokamax and what the image lacks of its dependencies
  # (it has jaxtyping, absl-py, tqdm; tokamax pins typeguard 2.13.3 for jaxtyping's checks).
  tokamax==0.0.12 qwix==0.1.8 einshape==1.0 immutabledict==4.3.1 typeguard==2.13.3
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
)
mkdir -p .whl
for package in "${PACKAGES[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$package"
done
du -sh .whl
