#!/usr/bin/env bash
# The GPU check of issue 15, as one short script for a machine with a CUDA GPU: the test suite,
# then one recipe on device cuda (mixed precision bf16), and what both printed, into $OUT
# (default: gpu-check/). Run it from the repository root after `make .venv/.installed` or with
# PYTHON pointing at a Python that has this package installed.
set -uo pipefail
OUT=${OUT:-gpu-check}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
{
    echo "# $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
} > "$OUT/env.txt" 2>&1
timeout 420 "$PYTHON" -m pytest -q -x > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest.txt"
timeout 150 "$PYTHON" -m prunescope run recipes/gmp.yaml --device cuda --no-progress \
    --set train.epochs=2 --set train.precision=bf16 --out "$OUT/gmp-cuda" > "$OUT/recipe.txt" 2>&1
echo "recipe exit $?" >> "$OUT/recipe.txt"
tail -3 "$OUT/pytest.txt" "$OUT/recipe.txt"
