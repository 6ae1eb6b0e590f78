#!/usr/bin/env bash
# The one command for the GPU machine (docs/gpu.md, issue 13):
#
#     bash scripts/gpu/run.sh [STAGE ...]
#
# from the repository root of the copied working tree, with the wheels folder carried
# (carry: [".gpu_wheels"], made here by scripts/gpu/fetch_wheels.sh). Everything goes to $OUT
# (the device tool's folder; a temporary folder when unset): 7 files, no sub-folders:
#
#   env.txt        machine, driver, CUDA, torch; installs; fast_jl build; one line per stage
#   tests_cuda.xml junit of the CUDA-marked tests (pytest -m cuda)
#   tests_all.xml  junit of the whole default suite (pytest -m "not slow")
#   tests.log      both pytest outputs
#   bench.jsonl    the JSON lines of scripts/gpu/agreement.py and benchmarks/gpu_*.py
#   bench.log      their stderr (markdown tables, warnings, tracebacks)
#   summary.md     scripts/gpu/summarize.py: all of the above as markdown (also printed last)
#
# Stages, in this order (default: all):
#   install env cuda_tests agree projection lm featurize scoring tests
# install and env run in this shell; every later stage runs under its own `timeout` (SIGINT
# first, so that pytest still writes its junit file; every JSON line is flushed as it is
# made), its cap trimmed so that the whole ends within GPU_BUDGET seconds (default 540, for a
# 600 s call with time to copy the files back). The whole suite runs last, on what is left.
# A second try names only the stages it needs; on a fresh machine `install` first, e.g.
#     bash scripts/gpu/run.sh install env featurize
#
# Knobs (environment): GPU_BUDGET (540), GPU_FEATURIZE_KEEP (200: seconds the featurize stage
# keeps for itself and later stages while it waits for the fast_jl build), GPU_WHEELS
# (.gpu_wheels), PYTHON (python3),
# GPU_TEST_WORKERS (8, with pytest-xdist), GPU_DEVICE (cuda) and GPU_QUICK=1 (adds --quick):
# the last two make a CPU dry run possible (tests/test_gpu_scripts.py, docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD
OUT=${OUT:-$(mktemp -d /tmp/gpu_out.XXXXXX)}
mkdir -p "$OUT"
WHEELS=${GPU_WHEELS:-.gpu_wheels}
PY=${PYTHON:-python3}
BUDGET=${GPU_BUDGET:-540}
DEVICE=${GPU_DEVICE:-cuda}
QUICK=
[ "${GPU_QUICK:-0}" = 1 ] && QUICK=--quick
# Sizes of the full runs, chosen to fit a 15-minute lease (a CPU dry run uses --quick's own):
# featurize 2,048 images, one timed run after a warm-up batch, plus a profile of two batches;
# projection 5 timed calls, dense built only up to 2**29 entries (2 GiB; the 256k layout at
# k = 2048); the LM 64 sequences of 512 tokens, one timed run.
SIZE_FEATURIZE="--n 2048 --repeat 1 --profile"
SIZE_PROJECTION="--reps 5 --dense-max 536870912"
SIZE_LM="--n 64 --repeat 1"
if [ -n "$QUICK" ]; then SIZE_FEATURIZE=--profile SIZE_PROJECTION= SIZE_LM=; fi
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ENV_TXT=$OUT/env.txt
BENCH=$OUT/bench.jsonl
BENCH_LOG=$OUT/bench.log
TESTS_LOG=$OUT/tests.log
FASTJL_LOG=/tmp/fast_jl_build.log
FASTJL_PID=
ALL_STAGES=(install env cuda_tests agree projection lm featurize scoring tests)
if [ "$#" -gt 0 ]; then STAGES=("$@"); else STAGES=("${ALL_STAGES[@]}"); fi

log() { echo "$*" | tee -a "$ENV_TXT"; }
left() { echo $((START + BUDGET - $(date +%s))); }
show() { [ -f "$1" ] && tail -n "$2" "$1"; } # the device tool returns the output's end

# stage NAME CAP CMD...: CMD under timeout, at most CAP seconds and what the budget leaves.
stage() {
    local name=$1 cap=$2 rest t0 rc note=""
    shift 2
    rest=$(($(left) - 5))
    [ "$cap" -gt "$rest" ] && cap=$rest
    if [ "$cap" -lt 15 ]; then
        log "stage $name: SKIPPED (${rest}s of the budget left)"
        return 0
    fi
    echo "=== stage $name (at most ${cap}s) ===" | tee -a "$BENCH_LOG"
    t0=$(date +%s)
    timeout -s INT -k 15 "$cap" "$@"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note=" (TIMED OUT at ${cap}s)"; fi
    log "stage $name: rc=$rc, $(($(date +%s) - t0))s$note"
    return 0
}

install() {
    log "python $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        # --no-deps: what they need besides is in the image (scripts/gpu/fetch_wheels.sh)
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --root-user-action=ignore "$WHEELS"/*.whl >>"$ENV_TXT" 2>&1
        log "wheels installed: rc=$? ($(cd "$WHEELS" && ls ./*.whl | tr '\n' ' '))"
    else
        log "no wheels in $WHEELS: carry it (scripts/gpu/fetch_wheels.sh makes it)"
    fi
    # fasttrak from the copied tree without dependencies; a .pth file if pip cannot build it
    if ! timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
        --root-user-action=ignore -e . >>"$ENV_TXT" 2>&1; then
        local site
        site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "$ROOT" >"$site/fasttrak-gpu-run.pth"
        log "pip install -e . failed: $ROOT put on sys.path by $site/fasttrak-gpu-run.pth"
    fi
    (cd / && "$PY" -c 'import fasttrak, zarr; print("fasttrak", fasttrak.__file__, "zarr", zarr.__version__)') 2>&1 | tail -n 1 | tee -a "$ENV_TXT"
    (cd / && "$PY" -c 'import trak; print("traker imports")') 2>&1 | tail -n 1 | tee -a "$ENV_TXT"
    # traker's CUDA projector, compiled in the background while the tests run
    if ls "$WHEELS"/fast_jl-*.tar.gz >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
        timeout 300 bash scripts/gpu/build_fast_jl.sh "$WHEELS" >"$FASTJL_LOG" 2>&1 &
        FASTJL_PID=$!
        log "fast_jl: build started in the background (pid $FASTJL_PID)"
    fi
}

env_info() {
    {
        echo "gpu $(timeout 30 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>&1)"
        echo "driver $(timeout 30 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1)"
        timeout 60 "$PY" -c 'import torch; c = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "available", c, torch.cuda.get_device_name(0) if c else "")'
        echo "cuda (nvcc) $(nvcc --version 2>/dev/null | tail -n 1)"
        echo "cpus $(nproc),$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
        timeout 60 "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|numpy|scipy|transformers|zarr|numcodecs|traker|fast.jl|pytest|pytest-xdist|pytest-timeout|hypothesis|peft) '
        timeout 30 nvidia-smi 2>&1 | head -n 20
    } >>"$ENV_TXT" 2>&1
    grep -E '^(gpu|driver|torch|cuda) ' "$ENV_TXT"
}

wait_fast_jl() {
    # wait_fast_jl SECONDS: so long at most for the background build, then stop it (traker
    # then falls back to its BasicProjector)
    [ -n "$FASTJL_PID" ] || return 0
    local waited=0 rc
    while kill -0 "$FASTJL_PID" 2>/dev/null && [ "$waited" -lt "$1" ]; do
        sleep 2
        waited=$((waited + 2))
    done
    if kill -0 "$FASTJL_PID" 2>/dev/null; then
        kill "$FASTJL_PID" 2>/dev/null
        log "fast_jl: build still running after ${waited}s more: stopped; traker uses BasicProjector"
    else
        wait "$FASTJL_PID"
        rc=$?
        log "fast_jl: build exit status $rc (0: installed and runs)"
    fi
    {
        echo "--- fast_jl build log (last 40 lines) ---"
        tail -n 40 "$FASTJL_LOG"
    } >>"$ENV_TXT" 2>&1
    FASTJL_PID=
}

# Stage bodies run as `timeout ... bash -c NAME`: exported, and writing to files, not pipes
# (a pipe's reader would die of the SIGINT too, before pytest writes its junit file).
pytest_args() {
    # -o addopts="": the -m given replaces pyproject's; a per-test timeout when available
    local args=(-p no:cacheprovider -o addopts=)
    "$PY" -c 'import pytest_timeout' 2>/dev/null && args+=(--timeout=300)
    echo "${args[@]}"
}

cuda_tests() {
    # the CUDA agreement tests (marked cuda): they must run, not skip (-rs lists any skip)
    # shellcheck disable=SC2046
    "$PY" -m pytest $(pytest_args) -m cuda -rfEs -v --junitxml="$OUT/tests_cuda.xml" tests \
        >>"$TESTS_LOG" 2>&1
}

all_tests() {
    # the whole default suite (-m "not slow", as `make test`), CUDA visible; xdist when there
    local workers=()
    if "$PY" -c 'import xdist' 2>/dev/null; then
        workers=(-n "${GPU_TEST_WORKERS:-8}" --dist loadfile)
    fi
    # shellcheck disable=SC2046
    "$PY" -m pytest $(pytest_args) -m "not slow" -v -rfE "${workers[@]}" \
        --junitxml="$OUT/tests_all.xml" tests >>"$TESTS_LOG" 2>&1
}

bench() {
    # bench SCRIPT ARGS...: JSON lines to bench.jsonl, tables and errors to bench.log
    # shellcheck disable=SC2086
    "$PY" "$@" --device "$DEVICE" $QUICK >>"$BENCH" 2>>"$BENCH_LOG"
}

export PY OUT BENCH BENCH_LOG TESTS_LOG DEVICE QUICK SIZE_FEATURIZE SIZE_PROJECTION SIZE_LM
export -f pytest_args cuda_tests all_tests bench

: >"$ENV_TXT"
log "stage plan: ${STAGES[*]}; budget ${BUDGET}s; device $DEVICE ${QUICK}; OUT=$OUT"
for s in "${STAGES[@]}"; do
    case $s in
        install) install ;;
        env) env_info ;;
        cuda_tests) stage cuda_tests 120 bash -c cuda_tests && show "$TESTS_LOG" 12 ;;
        agree) stage agree 120 bash -c 'bench scripts/gpu/agreement.py' ;;
        projection) stage projection 90 bash -c 'bench benchmarks/gpu_projection.py $SIZE_PROJECTION' ;;
        lm) stage lm 120 bash -c 'bench benchmarks/gpu_lm.py $SIZE_LM' ;;
        featurize)
            # wait for the fast_jl build while more than GPU_FEATURIZE_KEEP seconds are left
            # (default 200: featurize takes ~60-100 s; less when only lm follows)
            wait=$(($(left) - ${GPU_FEATURIZE_KEEP:-200}))
            [ "$wait" -gt 120 ] && wait=120
            [ "$wait" -lt 0 ] && wait=0
            wait_fast_jl "$wait"
            stage featurize 150 bash -c 'bench benchmarks/gpu_featurize.py $SIZE_FEATURIZE'
            ;;
        scoring) stage scoring 120 bash -c 'bench benchmarks/gpu_scoring.py' ;;
        tests) stage tests 600 bash -c all_tests && show "$TESTS_LOG" 12 ;;
        *) log "unknown stage $s (known: ${ALL_STAGES[*]})" ;;
    esac
done
wait_fast_jl 0
"$PY" scripts/gpu/summarize.py "$OUT" || true
log "total $(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
