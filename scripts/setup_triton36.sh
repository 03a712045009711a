#!/usr/bin/env bash
# The triton 3.6 environment for the ahead-of-time compile check (scripts/compile_check.sh): the GPU
# machine runs triton 3.6, CI installs a newer one, and the kernels must compile under both.
#
# .venv-triton36 holds triton==3.6.0 only (about 190 MB, ptxas included); everything else (the CPU torch,
# lowrank from this tree) comes from .venv through a site directory, so nothing is installed twice.
# LOWRANK_TRITON36=1: required (exit 1 when it cannot be installed) · 0: skipped · unset: tried, and a
# loud warning when the install is impossible (no index reachable, no wheel for this platform).
# Idempotent: an environment that already imports triton 3.6.0 and lowrank is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

WANT=${LOWRANK_TRITON36:-auto}
VERSION=3.6.0
PYTHON=${PYTHON:-python3}
MAIN=${LOWRANK_VENV:-.venv}
VENV36=${LOWRANK_VENV_TRITON36:-.venv-triton36}

if [ "$WANT" = "0" ]; then
    echo "setup: the triton $VERSION environment is skipped (LOWRANK_TRITON36=0)"
    exit 0
fi

usable() {
    "$VENV36/bin/python" -c "
import sys, triton, torch, lowrank.kernels.nf4
sys.exit(0 if triton.__version__ == '$VERSION' else 1)" >/dev/null 2>&1
}

fail() {
    echo "################################################################################" >&2
    echo "# WARNING: the triton $VERSION environment ($VENV36) could NOT be set up: $1" >&2
    echo "# The compile check under the GPU machine's triton $VERSION will be SKIPPED." >&2
    echo "################################################################################" >&2
    rm -rf "$VENV36"
    if [ "$WANT" = "1" ]; then exit 1; fi
    exit 0
}

if [ -x "$VENV36/bin/python" ] && usable; then
    exit 0
fi
rm -rf "$VENV36"
"$PYTHON" -m venv "$VENV36" || fail "python -m venv failed"
"$VENV36/bin/python" -m pip install --disable-pip-version-check -q --no-deps "triton==$VERSION" \
    || fail "pip install triton==$VERSION failed (no package index reachable, or no wheel for this platform)"
site36=$("$VENV36/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main_site=$("$MAIN/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# After this environment's own site-packages: triton 3.6 wins, torch and lowrank come from .venv.
echo "import site; site.addsitedir('$main_site')" >"$site36/zz_lowrank_main_venv.pth"
usable || fail "triton $VERSION, torch or lowrank does not import in $VENV36"
echo "setup: $VENV36 has triton $VERSION (torch and lowrank from $MAIN)"
