#!/bin/bash
# The device check, in one call of a few minutes: the GPU kernels and the sequence engine,
# on the packaged Gemma 3 270M's shapes with random weights. Prepare it here first:
#   .venv/bin/python -m experiments.device.prepare
# then, with the device tool:  run(command="bash experiments/device/run.sh", carry=[".device"],
# timeout_s=540). Results come back under $OUT: kernels.json, sequence.json, log.txt,
# nvidia-smi.txt. Record the figures in BUILD_NOTES.md and README's status.
set -o pipefail
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -m experiments.benchmark --sections=kernels --sections=sequence \
    --model=random:.device/gemma3-270m --out="$OUT" 2>&1 | tee "$OUT/log.txt"
