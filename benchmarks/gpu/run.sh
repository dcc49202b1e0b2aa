#!/usr/bin/env bash
# The GPU check kit: every GPU figure of melrecon from one command (benchmarks/gpu/README.md).
#
#   benchmarks/gpu/run.sh OUT_DIR [--device cuda|cpu] [--tiny] [--wheels DIR|none]
#
# Steps, in order, each under its own `timeout` so that a slow one cannot eat the others:
#   install   the wheels of prepare.sh into a private --target folder (PYTHONPATH), then depcheck
#   env       card, driver, CUDA, torch and package versions (env.json)
#   tests     pytest -m cuda over the test files that mark CUDA tests (tests.xml)
#   bench     one training step per family/kind/N/mode: CUDA peak, step time, gradient errors
#   train     a short train.py run of every experiment; train/peak_mem_gib must be the CUDA figure
#   bf16      the same with trainer.precision=bf16-mixed, one MoDL and one reversible experiment
#   plan      the memory model (model.memory=auto) against max_memory_allocated, paper-size cases
#   summary   results.csv and summary.md from the above
# Everything printed also goes to OUT_DIR/run.log. Exit status 0 when every step succeeded.
#
#   --device  cuda (default) or cpu
#   --tiny    tiny sizes (benchmarks/gpu/profiles.py), for the CPU test: about 2 minutes on 2 cores
#   --wheels  the wheel folder (default benchmarks/gpu/wheels if it holds wheels); none: use the
#             interpreter's own packages (PYTHON, default python3)
# Step limits (seconds) can be changed with KIT_T_TESTS, KIT_T_BENCH, KIT_T_TRAIN, KIT_T_BF16, KIT_T_PLAN, and the
# limit of one training run with KIT_PER_RUN_S; the time the train and bf16 steps may start runs in
# (default: their limit less 15 s) with KIT_B_TRAIN, KIT_B_BF16.
set -uo pipefail

KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$KIT/../.." && pwd)"

usage() {
    sed -n '4,5p' "${BASH_SOURCE[0]}" | sed 's/^# *//' >&2
    exit 2
}

OUT="" DEVICE="cuda" TINY=0 WHEELS="$KIT/wheels"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="${2:-}"; shift 2 ;;
        --device=*) DEVICE="${1#*=}"; shift ;;
        --tiny) TINY=1; shift ;;
        --wheels) WHEELS="${2:-}"; shift 2 ;;
        --wheels=*) WHEELS="${1#*=}"; shift ;;
        -h|--help) usage ;;
        -*) echo "run.sh: unknown option $1" >&2; usage ;;
        *) [[ -z "$OUT" ]] || { echo "run.sh: a second OUT_DIR '$1'" >&2; usage; }; OUT="$1"; shift ;;
    esac
done
[[ -n "$OUT" ]] || usage
[[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || { echo "run.sh: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2; }

PY="${PYTHON:-python3}"
if [[ $TINY == 1 ]]; then
    PROFILE=tiny   T_TESTS=${KIT_T_TESTS:-90}  T_BENCH=${KIT_T_BENCH:-90}  T_TRAIN=${KIT_T_TRAIN:-150} T_BF16=${KIT_T_BF16:-90}
    T_PLAN=${KIT_T_PLAN:-90}
    PER_RUN=${KIT_PER_RUN_S:-60} BENCH_STEPS=2
else  # the GPU budget: about 7.5 minutes in all, install and summary included
    PROFILE=paper  T_TESTS=${KIT_T_TESTS:-60}  T_BENCH=${KIT_T_BENCH:-210} T_TRAIN=${KIT_T_TRAIN:-110} T_BF16=${KIT_T_BF16:-50}
    T_PLAN=${KIT_T_PLAN:-45}
    PER_RUN=${KIT_PER_RUN_S:-45} BENCH_STEPS=5
fi
COMMAND="benchmarks/gpu/run.sh OUT_DIR --device $DEVICE$([[ $TINY == 1 ]] && echo ' --tiny')"

mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/melrecon-gpu-kit.XXXXXX")"
STEPS="$WORK/steps.csv"
echo "step,status,rc,wall_s,limit_s" >"$STEPS"

# step NAME LIMIT_S CMD...: run CMD under `timeout` and record its outcome in $STEPS
step() {
    local name=$1 limit=$2 t0 t1 rc status
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    t0=$(date +%s.%N)
    timeout --kill-after=15 "$limit" "$@"
    rc=$?
    t1=$(date +%s.%N)
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    local wall
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    echo "$name,$status,$rc,$wall,$limit" >>"$STEPS"
    echo "=== $name: $status (exit $rc, $wall s)"
    return 0
}

kit() {
    echo "melrecon GPU kit: $COMMAND (OUT_DIR=$OUT, work folder $WORK, $(date -u +%Y-%m-%dT%H:%M:%SZ))"
    cd "$ROOT" || return 1
    if [[ "$WHEELS" != none ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        step install 180 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/site" "$WHEELS"/*.whl
        export PYTHONPATH="$ROOT/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
        step depcheck 60 "$PY" "$KIT/depcheck.py" "$WHEELS" --installed
    else
        echo "=== install: no wheels in '$WHEELS': using $PY's own packages"
        export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export MELRECON_ROOT="$ROOT" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

    command -v nvidia-smi >/dev/null && nvidia-smi
    step env 60 "$PY" "$KIT/env_info.py" "$OUT/env.json" --command "$COMMAND"

    local tests
    mapfile -t tests < <(grep -l "mark\.cuda" "$ROOT"/tests/test_*.py)
    step tests "$T_TESTS" "$PY" -m pytest -m cuda -q -rA -p no:cacheprovider -o addopts= \
        --junitxml="$OUT/tests.xml" "${tests[@]}"

    step bench "$T_BENCH" "$PY" "$KIT/bench.py" --device "$DEVICE" --profile "$PROFILE" --csv "$OUT/bench.csv" \
        --steps "$BENCH_STEPS" --budget-s $((T_BENCH - 45))

    step train "$T_TRAIN" "$PY" "$KIT/train_runs.py" --device "$DEVICE" --profile "$PROFILE" --csv "$OUT/train.csv" \
        --work "$WORK" --per-run-s "$PER_RUN" --budget-s "${KIT_B_TRAIN:-$((T_TRAIN - 15))}"
    step bf16 "$T_BF16" "$PY" "$KIT/train_runs.py" --device "$DEVICE" --profile "$PROFILE" --csv "$OUT/train.csv" \
        --append --precision bf16-mixed --experiments bf16 --work "$WORK" --per-run-s "$PER_RUN" \
        --budget-s "${KIT_B_BF16:-$((T_BF16 - 15))}"

    step plan "$T_PLAN" "$PY" "$KIT/plan_step.py" --device "$DEVICE" --profile "$PROFILE" --csv "$OUT/plan.csv" \
        --budget-s $((T_PLAN - 20))

    step summary 60 "$PY" "$KIT/summary.py" "$OUT" --steps "$STEPS"
    cat "$OUT/summary.md" 2>/dev/null
    local bad
    bad=$(awk -F, 'NR > 1 && $2 != "ok"' "$STEPS" | cut -d, -f1 | tr '\n' ' ')
    echo "melrecon GPU kit: done; results in $OUT (results.csv, summary.md, run.log)${bad:+; steps not ok: $bad}"
    [[ -z "$bad" ]]
}

kit 2>&1 | tee "$OUT/run.log"
rc=${PIPESTATUS[0]}
[[ "${KIT_KEEP_WORK:-0}" == 1 ]] || rm -rf "$WORK"
exit "$rc"
