#!/usr/bin/env bash
# Set up (if needed) and run the default test suite: CPU only, Triton kernels in the interpreter.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k nf4 -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest -p no:cacheprovider "$@"
