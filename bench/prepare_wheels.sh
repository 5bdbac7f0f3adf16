#!/usr/bin/env bash
# The wheels bench/gpu_suite.py needs on the GPU machine, which has no package index.
#
#     PYTHON=/path/to/venv/bin/python bash bench/prepare_wheels.sh [DEST]   # default bench/wheels
#
# Run here, with PyPI reachable. PYTHON must have pip and torch (deepspeed's wheel is built from
# its sdist without build isolation; no ops are compiled: DeepSpeed JIT-builds what it needs).
# The GPU image (python 3.12, torch 2.11+cu130, transformers 5.17, accelerate, sentencepiece,
# safetensors, tokenizers, huggingface-hub, pyarrow, pandas, xxhash, fsspec, psutil, einops,
# msgpack, ninja, py-cpuinfo, nvidia-ml-py) lacks deepspeed, datasets, jsonargparse, hjson,
# pydantic, dill and multiprocess, and has another transformers; torch is never carried (GBs): the
# suite uses the image's. Binary wheels are for CPython 3.12 on manylinux x86-64. bench/wheels is
# git-ignored: name it in the device tool's carry (64 MiB together with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-bench/wheels}
PY=${PYTHON:-python3}
"$PY" -c "import torch, pip" || { echo "PYTHON=$PY needs torch and pip" >&2; exit 2; }
mkdir -p "$DEST"
# the versions the project is tested with (pyproject's dev environment) and what they need
PURE_AND_BINARY=(
  transformers==5.24.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 hjson==3.1.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 regex==2026.11.19
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${PURE_AND_BINARY[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
ls -l "$DEST"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $9}'
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "%8.2f MiB  in all\n", $1 / 1048576}'
