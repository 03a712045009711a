#!/usr/bin/env bash
# The one GPU script: correctness tests, microbenchmarks at the goal shapes, the training step, the report.
#
#   LOWRANK_COMMIT=<git sha> bash bench/gpu/run.sh        # from the repository root; carry .whl/ (bitsandbytes)
#
# Writes to $OUT (flat, 6 files) or, when OUT is unset, to bench/results/<UTC date>-<device>/:
#   report.md (the performance table)  results.json (device, versions, commit, stages, tests, every result)
#   records.jsonl (raw per-benchmark records)  run.log  tests.log  bench.log
# Installs nothing from the internet and pip-installs nothing into the environment: carried wheels in .whl/
# are unpacked into a private --target folder, and lowrank is imported from this tree through a symlink
# package (lowrank -> src/lowrank/*, lowrank/kernels -> kernels). Every stage is time-boxed with `timeout`
# (SIGINT first, so pytest still writes its results; SIGKILL 15 s later); a failed or timed-out stage never
# stops the next one, and the report is always written. Whole run: LOWRANK_RUN_BUDGET_S (default 480 s).
# On a CUDA machine the C++ extension with its CUDA kernels is JIT-built into the symlink package in the
# background while the Triton tests run (bench/gpu/build_ext_cuda.py, at most EXT_S seconds); the stage
# tests_ext then waits for it and runs tests/csrc. LOWRANK_BUILD_CUDA_EXT=0 skips both.
# LOWRANK_BENCH_DRY=1 rehearses the same pipeline on CPU: tiny shapes, Triton interpreter, short stages.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
T0=$(date +%s)
PY="${PYTHON:-python3}"
DRY="${LOWRANK_BENCH_DRY:-0}"
BUDGET_S="${LOWRANK_RUN_BUDGET_S:-480}"
REPORT_RESERVE_S=20
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lowrank-run.XXXXXX")"

if [ "$DRY" = "1" ]; then
    export TRITON_INTERPRET=1 LOWRANK_BENCH_TINY=1 CUDA_VISIBLE_DEVICES=""
    TESTS_S=60; TESTS_EXT_S=60; NF4_S=150; LORA_S=150; TRAIN_S=90; EXT_S=150
else
    TESTS_S=100; TESTS_EXT_S=45; NF4_S=80; LORA_S=130; TRAIN_S=100; EXT_S=150
fi
export LOWRANK_BENCH_SUITE="${LOWRANK_BENCH_SUITE:-goal}"
export LOWRANK_BENCH_JSONL="$WORK/records.jsonl"
export LOWRANK_BENCH_LIMITS="$WORK/limits.json"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
: >"$LOWRANK_BENCH_JSONL"
: >"$WORK/stages.jsonl"

# --- where the results go ---------------------------------------------------------------------------------
DEVICE_LABEL="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo unknown)"
DEVICE_LABEL="$(printf '%s' "$DEVICE_LABEL" | tr -c 'A-Za-z0-9._-' '-' | tr -s '-' | sed 's/^-//; s/-$//')"
if [ -z "${OUT:-}" ]; then
    OUT="$ROOT/bench/results/$(date -u +%Y%m%d-%H%M%S)-${DEVICE_LABEL:-unknown}"
fi
mkdir -p "$OUT"
RUN_LOG="$OUT/run.log"
TESTS_LOG="$OUT/tests.log"
BENCH_LOG="$OUT/bench.log"
: >"$RUN_LOG"; : >"$TESTS_LOG"; : >"$BENCH_LOG"

log() { printf '[%s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$(($(date +%s) - T0))" "$*" | tee -a "$RUN_LOG"; }

# stage NAME BUDGET_S LOGFILE CMD...: run CMD under a time box that also respects the whole run's budget.
stage() {
    local name=$1 budget=$2 logfile=$3
    shift 3
    local left=$((BUDGET_S - ($(date +%s) - T0) - REPORT_RESERVE_S))
    local box=$((budget < left ? budget : left))
    if [ "$box" -lt 15 ]; then
        log "stage $name: skipped, only ${left}s of the run budget left"
        printf '{"stage": "%s", "rc": null, "seconds": 0, "timed_out": false, "note": "skipped: run budget spent"}\n' "$name" >>"$WORK/stages.jsonl"
        return 0
    fi
    log "stage $name: start (time box ${box}s)"
    printf '\n===== stage %s (time box %ss) =====\n' "$name" "$box" >>"$logfile"
    local start rc timed_out=false
    start=$(date +%s)
    timeout -s INT -k 15 "$box" "$@" >>"$logfile" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 130 ]; then timed_out=true; fi
    log "stage $name: exit $rc after $(($(date +%s) - start))s (timed out: $timed_out)"
    printf '{"stage": "%s", "rc": %s, "seconds": %s, "timed_out": %s}\n' "$name" "$rc" "$(($(date +%s) - start))" "$timed_out" >>"$WORK/stages.jsonl"
    return 0
}

log "lowrank GPU run: root $ROOT, out $OUT, work $WORK, dry=$DRY, suite=$LOWRANK_BENCH_SUITE, budget ${BUDGET_S}s"

# --- (a) environment: carried wheels, lowrank importable from this tree --------------------------------------
SITE="$WORK/site"
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >>"$RUN_LOG" 2>&1; then
        log "installed carried wheels into $SITE: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    else
        log "WARNING: installing the carried wheels failed (see above); continuing without them"
    fi
else
    log "no .whl/ folder: bitsandbytes only if the machine already has it"
fi
LRPATH="$WORK/lrpath"
mkdir -p "$LRPATH/lowrank"
for entry in "$ROOT"/src/lowrank/*; do
    name="$(basename "$entry")"
    case "$name" in __pycache__|kernels) continue ;; esac
    ln -s "$entry" "$LRPATH/lowrank/$name"
done
ln -s "$ROOT/kernels" "$LRPATH/lowrank/kernels"
export PYTHONPATH="$LRPATH:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# --- (a2) the C++ extension with its CUDA kernels, JIT-built into $LRPATH/lowrank (nvcc + ninja, no pip) --------
# In the background, overlapping the Triton tests (the machine has 16 cores); tests_ext waits for it.
# build_ext_cuda.py installs the library atomically, so a test process sees the whole extension or none.
EXT_BUILD_RC="$WORK/ext_build.rc"
EXT_BUILD_T0=""
if [ "${LOWRANK_BUILD_CUDA_EXT:-1}" = "0" ]; then
    log "build_ext_cuda: skipped (LOWRANK_BUILD_CUDA_EXT=0)"
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    log "build_ext_cuda: skipped (torch has no CUDA or no device is visible)"
else
    log "build_ext_cuda: started in the background (time box ${EXT_S}s, log in run.log)"
    EXT_BUILD_T0=$(date +%s)
    (
        start=$(date +%s)
        timeout -s INT -k 10 "$EXT_S" "$PY" -P bench/gpu/build_ext_cuda.py --build-dir "$WORK/ext_build" \
            --package-dir "$LRPATH/lowrank" >"$WORK/ext_build.log" 2>&1
        rc=$?
        printf '{"stage": "build_ext_cuda", "rc": %s, "seconds": %s, "timed_out": %s}\n' "$rc" \
            "$(($(date +%s) - start))" "$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo true || echo false)" >>"$WORK/stages.jsonl"
        echo "$rc" >"$EXT_BUILD_RC"
    ) &
fi

{
    echo "===== environment ====="
    date -u
    uname -a
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -P - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "transformers", "peft", "bitsandbytes", "pytest", "pytest_benchmark", "safetensors"):
    try:
        module = importlib.import_module(name)
        print(f"{name:18s} {getattr(module, '__version__', '?'):12s} {getattr(module, '__file__', '')}")
    except Exception as err:
        print(f"{name:18s} NOT AVAILABLE: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import lowrank, lowrank.kernels.nf4 as nf4
print("lowrank from", lowrank.__file__, "| kernels from", nf4.__file__)
from lowrank.ops import dispatch
print("dequantize_4bit backends usable on", "cuda" if torch.cuda.is_available() else "cpu", dispatch.usable_backends("dequantize_4bit", "cuda" if torch.cuda.is_available() else "cpu"))
EOF
} >>"$RUN_LOG" 2>&1 || log "WARNING: environment probe failed (see run.log); continuing"

PYTEST=("$PY" -P -m pytest -p no:cacheprovider)
# Triton compiles every kernel variant the tests touch, one at a time per process: spread them over workers.
PARALLEL=()
if [ "$DRY" != "1" ] && "$PY" -c "import xdist" >/dev/null 2>&1; then PARALLEL=(-n 6); fi
BENCH=("${PYTEST[@]}" --benchmark-only -q -rsfE --benchmark-columns=min,median,max,rounds --benchmark-sort=name)

# --- (b) correctness tests on the device -----------------------------------------------------------------------
# The ahead-of-time compile check (tests/kernels/test_compile.py) is left out: it compiles for a GPU the
# machine does not have, which the GPU tests do for real, and on CPU it would spend the rehearsal's time box.
NO_AOT=(--ignore=tests/kernels/test_compile.py)
if [ "$DRY" = "1" ]; then
    stage tests "$TESTS_S" "$TESTS_LOG" "${PYTEST[@]}" tests/kernels tests/lowrank/ops tests/csrc "${NO_AOT[@]}" -m "not slow" -q -rfE --maxfail=25 --junitxml="$WORK/tests.xml"
else
    stage tests "$TESTS_S" "$TESTS_LOG" env LOWRANK_TEST_GPU=1 "${PYTEST[@]}" "${PARALLEL[@]}" tests/kernels tests/lowrank/ops "${NO_AOT[@]}" -m "not slow" -q -rfE --maxfail=25 --junitxml="$WORK/tests.xml"
fi
# The extension's CUDA kernels, once the background build is done (its output goes to run.log first).
if [ -n "$EXT_BUILD_T0" ]; then
    # its time box: what the build may still take, plus the tests' own time
    build_left=$((EXT_S + 15 - ($(date +%s) - EXT_BUILD_T0)))
    [ "$build_left" -gt 0 ] || build_left=0
    # shellcheck disable=SC2016
    stage tests_ext "$((TESTS_EXT_S + build_left))" "$TESTS_LOG" env LOWRANK_TEST_GPU=1 EXT_BUILD_RC="$EXT_BUILD_RC" EXT_BUILD_LOG="$WORK/ext_build.log" bash -c '
        while [ ! -s "$EXT_BUILD_RC" ]; do sleep 1; done
        echo "build_ext_cuda exited $(cat "$EXT_BUILD_RC"):"; cat "$EXT_BUILD_LOG"
        [ "$(cat "$EXT_BUILD_RC")" = "0" ] || exit 3
        exec "$@"' _ "${PYTEST[@]}" "${PARALLEL[@]}" tests/csrc -m "not slow" -q -rfE --maxfail=25 --junitxml="$WORK/tests_ext.xml"
fi
[ -s "$WORK/ext_build.log" ] && { echo "===== build_ext_cuda ====="; cat "$WORK/ext_build.log"; } >>"$RUN_LOG"

# --- (c) microbenchmarks at the goal shapes, then the training step -----------------------------------------
# The training step before the LoRA microbenchmarks: when the CUDA build ran long, the last stage is the one
# cut short, and bench_lora_matmul records its goal cases first.
stage bench_nf4 "$NF4_S" "$BENCH_LOG" "${BENCH[@]}" bench/bench_nf4.py --benchmark-json="$WORK/bench_nf4.json"
stage bench_train_step "$TRAIN_S" "$BENCH_LOG" "${BENCH[@]}" bench/bench_train_step.py --benchmark-json="$WORK/bench_train.json"
stage bench_lora_matmul "$LORA_S" "$BENCH_LOG" "${BENCH[@]}" bench/bench_lora_matmul.py --benchmark-json="$WORK/bench_lora.json"

# --- (d) results: raw records first (they survive a broken report), then the report --------------------------
cp "$LOWRANK_BENCH_JSONL" "$OUT/records.jsonl"
log "report: $(grep -c '"type": "benchmark"' "$OUT/records.jsonl") benchmark records, $(grep -c '"type": "skip"' "$OUT/records.jsonl") skipped, $(grep -c '"type": "error"' "$OUT/records.jsonl") failed"
if timeout -k 5 30 "$PY" -P bench/report.py "$OUT/records.jsonl" "$WORK"/bench_*.json --stages "$WORK/stages.jsonl" \
    --tests-xml "$WORK/tests.xml" --tests-xml "$WORK/tests_ext.xml" --out "$OUT/report.md" --json-out "$OUT/results.json" >>"$RUN_LOG" 2>&1; then
    log "wrote $OUT/report.md and $OUT/results.json"
else
    log "ERROR: bench/report.py failed (see run.log); the raw records are in records.jsonl"
fi
if [ -s "$OUT/report.md" ]; then  # the headline sections, for whoever reads only this command's output
    echo
    awk '/^## /{show = ($0 ~ /^## (Goals|Forward path|QLoRA training step|Failed benchmarks|Run stages|Correctness tests)/)} show' \
        "$OUT/report.md" | head -150
fi
log "done in $(($(date +%s) - T0))s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$WORK"
exit 0
