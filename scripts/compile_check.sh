#!/usr/bin/env bash
# The ahead-of-time compile check (CI runs it after the tests): every Triton kernel of kernels/ at every
# launch configuration its launchers can choose, compiled for sm_90 and sm_80 without a GPU, under the
# installed triton (.venv) and under the GPU machine's triton 3.6 (.venv-triton36, made by scripts/setup.sh
# where it installs); then the CUDA extension's nvcc compile for sm_80/sm_90 (tests/csrc/test_cuda_compile.py,
# slow-marked, so the default test run leaves it out). Exit 1 on any compile error. See docs/compile.md.
#
#   LOWRANK_COMPILE_ARCHES="90 80"   architectures (default both)
#   LOWRANK_COMPILE_OUT=<folder>     also write results.json + table.md per triton version into <folder>/triton-<v>/
#   LOWRANK_TRITON36=1               a missing triton 3.6 environment is an error (default: a loud warning)
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a ARCHES <<<"${LOWRANK_COMPILE_ARCHES:-90 80}"

sweep() {
    local py=$1 out=()
    if [ -n "${LOWRANK_COMPILE_OUT:-}" ]; then
        out=(--out "$LOWRANK_COMPILE_OUT/triton-$("$py" -c 'import triton; print(triton.__version__)')")
    fi
    echo "== compile check: $("$py" -c 'import triton; print("triton", triton.__version__)') for sm_${ARCHES[*]} =="
    env -u TRITON_INTERPRET "$py" -P bench/compile_kernels.py --arch "${ARCHES[@]}" "${out[@]}"
}

status=0
sweep .venv/bin/python || status=1
if [ -x .venv-triton36/bin/python ]; then
    sweep .venv-triton36/bin/python || status=1
else
    echo "################################################################################" >&2
    echo "# WARNING: no .venv-triton36 (triton 3.6 could not be installed, see scripts/setup_triton36.sh):" >&2
    echo "# the kernels were NOT compiled under the GPU machine's triton 3.6." >&2
    echo "################################################################################" >&2
    if [ "${LOWRANK_TRITON36:-auto}" = "1" ]; then status=1; fi
fi
echo "== nvcc compile of csrc/cuda/ for sm_80 and sm_90 (skipped where there is no nvcc) =="
.venv/bin/pytest -p no:cacheprovider -q -rs -m slow tests/csrc/test_cuda_compile.py || status=1
exit "$status"
