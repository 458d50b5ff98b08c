#!/bin/sh
# Build SparseProp (the comparison in benchmarks/kernels.py) into its own virtual environment,
# never into the project's: its setup.py runs whichever `pip` and `python3` come first on PATH and
# compiles with -march=native. Usage: benchmarks/sparseprop_env.sh [VENV] (default
# .venv/bench-sparseprop, inside the git-ignored .venv so `make clean` removes it too).
# Exit status 0 when `backend` (its extension) was built; the benchmark then reports it, else it
# reports SparseProp as unavailable.
set -e
VENV=${1:-.venv/bench-sparseprop}
PYTHON=${PYTHON:-python3}
if [ -f "$VENV/.sparseprop-ok" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip setuptools wheel
"$VENV/bin/pip" install --quiet pybind11 numpy scipy
PATH="$(cd "$VENV/bin" && pwd):$PATH" "$VENV/bin/pip" install --quiet --no-build-isolation \
    --no-deps sparseprop==0.1.14
touch "$VENV/.sparseprop-ok"
