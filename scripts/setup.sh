#!/usr/bin/env bash
# All set-up for a fresh machine, idempotent: a virtual environment in .venv with torch (the CPU
# build where there is no NVIDIA GPU), lowrank installed in editable mode with its test extras, and
# the optional C++ extension built where a compiler exists. Re-runs are quick (a stamp file records
# what was installed). Used by scripts/main.sh, scripts/test.sh and .ci/run. Also .venv-triton36, the GPU
# machine's triton 3.6 for the compile check, where it installs (scripts/setup_triton36.sh; LOWRANK_TRITON36).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${LOWRANK_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

stamp_want=$(cat pyproject.toml setup.py constraints/ci.txt $(find csrc -type f | sort) | sha256sum | cut -c1-16)
if [ -f "$VENV/.lowrank-stamp" ] && [ "$(cat "$VENV/.lowrank-stamp")" = "$stamp_want" ]; then
    bash scripts/setup_triton36.sh
    exit 0
fi

"${PIP[@]}" --upgrade "pip>=23" "setuptools>=77" wheel  # 77: pyproject.toml's SPDX license string

# torch first, so that the `torch>=2.4` requirement is already met and pip never pulls a multi-GB
# CUDA build onto a machine without a GPU.
if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${PIP[@]}" "torch>=2.4"
    else
        "${PIP[@]}" "torch==2.13.0" 2>/dev/null \
            || "${PIP[@]}" --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"
    fi
fi

# Pin what CI pins (constraints/ci.txt), except torch, which is whatever was installed above.
grep -v '^torch==' constraints/ci.txt > "$VENV/constraints.txt"
echo "lowrank set-up: installing lowrank (editable, with the test extras) and building its C++ extension (about a minute)..."
"${PIP[@]}" -c "$VENV/constraints.txt" --no-build-isolation -e ".[test]"
if ls src/lowrank/_C*.so >/dev/null 2>&1; then
    echo "lowrank set-up: done, C++ extension built ($(ls src/lowrank/_C*.so))"
else
    echo "lowrank set-up: done, without the C++ extension (lowrank runs on its torch/triton backends)"
fi

echo "$stamp_want" > "$VENV/.lowrank-stamp"
bash scripts/setup_triton36.sh
