#!/usr/bin/env bash
# One command for a lent GPU machine (torch preinstalled, no network), sized for one device call:
# with no arguments it builds, tests and measures in 480 s, a deadline it enforces, and packs what finished.
#
#   bash scripts/gpu_check.sh                 # the plan below, in that order (= make gpu-check)
#   bash scripts/gpu_check.sh STAGE...        # env + build, then the named stages in the order given
#   bash scripts/gpu_check.sh --plan          # print the plan table and exit
#
# The 480 s plan (budgets in seconds; sizes from the H100 run of 2026-11-26, benchmarks/results/gpu-2026-11-26/;
# benchmarks/PERF_NOTES.md "The 480 s plan" has the arithmetic; tests/test_gpu_check.py keeps the copies equal):
# | stage | budget (s) | what | H100 basis |
# |---|---|---|---|
# | env | 5 | env.txt: device, driver, torch/triton/CUDA versions, commit, date | python + CUDA init, a few s |
# | build | 55 | build_ext --inplace (nvcc, sm_90), the extension's error path | 35 s |
# | tests-new | 75 | CUDA tests of the work since the H100 run (scripts/gpu_check_tests.py), xdist | whole suite 82 s at -n 16 |
# | tests-cuda | 40 | every other CUDA test, if it fits | part of the same 82 s |
# | bench-sampling | 225 | cifar35m sample(): bf16 then fp32; DDIM-50 b1, b64, DDPM-1000 b1; 4 providers | ~150 s of calls + 4 compiles |
# | profile | 40 | profile_unet.py: cifar35m b1/b64, bf16/fp32: kernels and time by kind per forward | 16 profiles, ~25 s |
# | bench-ops | 32 | op benchmarks, groupnorm_swish and reverse_step first, while time remains | default grid > 6 min |
# | pack | 8 | summary.txt, the results archive | - |
#
# Deadline rules: the clock starts with the script. A stage may use its own budget plus whatever earlier
# stages left unused, never a later stage's budget; the last stage of a run takes all that is left. Each
# stage runs under `timeout` and is killed at its limit (its pytest first gets SIGINT, so it still
# reports, and a cut benchmark keeps its finished rows, written as JSON lines as they finish); a stage
# with less than GPU_CHECK_MIN_STAGE_S (3 s) left is skipped with a line saying so; when build fails or
# is skipped, every later stage is skipped (they import the extension). Budgets scale with the deadline.
#
# Results: benchmarks/results/<gpu>-<date>/ (e.g. h200-2026-12-02; a suffix -2, -3 when taken), holding
# env.txt, summary.txt, gpu_check.log and each stage's logs, JSON and reports. Under the device tool
# ($OUT set; it returns at most 8 files) the folder is also packed into $OUT/gpu_check_results.tar.gz,
# beside copies of summary.txt, env.txt and gpu_check.log. The output ends with the summary table.
#
# Knobs: GPU_CHECK_DEADLINE_S (480), GPU_CHECK_MIN_STAGE_S (3), GPU_CHECK_XDIST (workers; default the
# CPU count up to 16, 0 = off; used only if pytest-xdist is installed), GPU_CHECK_TEST_TIMEOUT (per test,
# with pytest-timeout), GPU_CHECK_PYTEST_ARGS (extra args for the test stages, e.g. --lf or -k conv2d),
# GPU_CHECK_OPS (op benchmark files, in order), GPU_CHECK_PROFILE_PRESETS, RESULTS_DIR,
# DDPM_FAST_COMPILE_MODE (the torch.compile baseline's mode, default reduce-overhead: inductor + CUDA
# graphs; max-autotune compiles for minutes per UNet shape, so give it a call of its own, e.g.
# `DDPM_FAST_COMPILE_MODE=max-autotune DDPM_FAST_BENCH_PROVIDERS=compiled,fast DDPM_FAST_BENCH_DTYPES=bf16
# DDPM_FAST_BENCH_BATCHES=1 DDPM_FAST_BENCH_SAMPLERS=ddim50 bash scripts/gpu_check.sh bench-sampling`),
# and the DDPM_FAST_BENCH_* grid knobs (benchmarks/README.md), passed through.
# CPU dry run of the plumbing: GPU_CHECK_REQUIRE_CUDA=0 (the test stages collect their selection only,
# the benchmarks run their CPU grids, the profile runs on CPU ops). GPU_CHECK_STUB="build=2 tests-new=fail"
# (a test knob) replaces every stage by a sleep of that many seconds (0 when not named) or a failure.
# Nothing here installs anything (the GPU machine has no network): the extension is built in place and
# imported through PYTHONPATH, and pip is pointed at no index in case anything calls it.
set -uo pipefail
cd "$(dirname "$0")/.."

PLAN_S=480
DEFAULT_STAGES=(build tests-new tests-cuda bench-sampling profile bench-ops)
OPTIONAL_STAGES=(tests-all bench-unet)
declare -A BUDGET=([env]=5 [build]=55 [tests-new]=75 [tests-cuda]=40 [bench-sampling]=225 [profile]=40
                   [bench-ops]=32 [pack]=8 [tests-all]=150 [bench-unet]=150)
declare -A WHAT=(
  [env]="env.txt: device, driver, torch/triton/CUDA versions, commit, date"
  [build]="build_ext --inplace (nvcc, sm_90), the extension's error path"
  [tests-new]="CUDA tests of the work since the H100 run (scripts/gpu_check_tests.py), xdist"
  [tests-cuda]="every other CUDA test, if it fits"
  [bench-sampling]="cifar35m sample(): bf16 then fp32; DDIM-50 b1, b64, DDPM-1000 b1; 4 providers"
  [profile]="profile_unet.py: cifar35m b1/b64, bf16/fp32: kernels and time by kind per forward"
  [bench-ops]="op benchmarks, groupnorm_swish and reverse_step first, while time remains"
  [pack]="summary.txt, the results archive"
  [tests-all]="(when named) the whole suite with the GPU visible"
  [bench-unet]="(when named) bench_unet.py: UNet forwards, eager, compiled and graphed")
declare -A BASIS=(
  [env]="python + CUDA init, a few s" [build]="35 s" [tests-new]="whole suite 82 s at -n 16"
  [tests-cuda]="part of the same 82 s" [bench-sampling]="~150 s of calls + 4 compiles"
  [profile]="16 profiles, ~25 s" [bench-ops]="default grid > 6 min" [pack]="-"
  [tests-all]="82 s at -n 16" [bench-unet]="bench-e2e 335 s with sampling")

print_plan() {
  echo "| stage | budget (s) | what | H100 basis |"
  echo "|---|---|---|---|"
  local st
  for st in env "${DEFAULT_STAGES[@]}" pack; do
    echo "| $st | ${BUDGET[$st]} | ${WHAT[$st]} | ${BASIS[$st]} |"
  done
}

# --- time, in milliseconds -----------------------------------------------------------------------
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
to_ms() {  # "12" or "2.5" (seconds) -> milliseconds
  local s=$1 int frac
  [[ $s =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "gpu_check: not a number of seconds: '$s'" >&2; exit 2; }
  int=${s%%.*}; frac=${s#"$int"}; frac=${frac#.}000; frac=${frac:0:3}
  echo $((10#$int * 1000 + 10#$frac))
}
fmt_s() { local ms=$1 sign=""; ((ms < 0)) && { sign=-; ms=$((-ms)); }; printf '%s%d.%d' "$sign" $((ms / 1000)) $((ms % 1000 / 100)); }

# --- inside a stage (run as `bash gpu_check.sh --run-stage NAME` under timeout) -------------------
# STAGE_END_MS: when the stage's limit runs out; left_s R: whole seconds left before it, less R.
left_s() { local l=$(( (STAGE_END_MS - $(now_ms)) / 1000 - ${1:-0} )); ((l < 1)) && l=1; echo "$l"; }
note() { echo "$*" > "$NOTE_FILE"; }

stage_env() {
  "$PY" - > "$RESULTS_DIR/env.txt" 2>&1 <<'PYEOF'
import datetime, os, platform, re, subprocess
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
print("date:", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
commit = os.environ.get("GPU_CHECK_COMMIT") or sh("git", "rev-parse", "--short=12", "HEAD") or "unknown"
dirty = sh("git", "status", "--porcelain", "--untracked-files=no")
print("commit:", commit + (" (+uncommitted changes)" if dirty else ""))
for line in sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
               "--format=csv,noheader").splitlines():
    print("gpu:", line)
print("python:", platform.python_version(), "host cpus:", os.cpu_count())
import torch
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
for mod in ("triton", "pytest", "xdist", "pytest_benchmark", "pytest_timeout"):
    try:
        m = __import__(mod)
        print(f"{mod}:", getattr(m, "__version__", "present"))
    except Exception as e:  # noqa: BLE001 - absent or broken: say which, carry on
        print(f"{mod}: not importable ({type(e).__name__})")
print("nvcc:", (sh("nvcc", "--version").splitlines() or ["not found"])[-1])
print("compile mode:", os.environ.get("DDPM_FAST_COMPILE_MODE"))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}")
    m = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", p.name)
    print("slug:", m.group(1).lower() if m else "gpu")
else:
    print("device: none (no CUDA device visible)")
    print("slug: cpu-dryrun")
PYEOF
  local rc=$?
  note "$(grep -E '^(device|torch):' "$RESULTS_DIR/env.txt" | cut -c1-70 | tr '\n' ';' | sed 's/;$//')"
  return $rc
}

stage_build() {
  local log="$RESULTS_DIR/build.log"
  timeout --foreground -k 3 "$(left_s 6)" "$PY" setup.py build_ext --inplace > "$log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    tail -20 "$log"
    note "build_ext $([ $rc -eq 124 ] && echo "ran out of time" || echo "failed (rc $rc)") (build.log)"
    return $rc
  fi
  # The extension must load AND refuse bad input with a clean ValueError: on the H100 machine's toolchain
  # the error path itself once segfaulted while every correct call worked (see csrc/bindings.cpp, str_of).
  timeout --foreground -k 2 "$(left_s 1)" "$PY" - >> "$log" 2>&1 <<'PYEOF'
import os, torch
from ddpm_fast.ops.reverse_step import EXTENSION_HAS_CUDA, HAS_EXTENSION
assert HAS_EXTENSION, "the extension did not load"
if not EXTENSION_HAS_CUDA and os.environ.get("GPU_CHECK_REQUIRE_CUDA", "1") != "0":
    raise SystemExit("the extension has no CUDA kernels")
dev = "cuda" if EXTENSION_HAS_CUDA and torch.cuda.is_available() else "cpu"
try:
    torch.ops.ddpm_fast.reverse_step(torch.randn(2, 3, 8, 8, device=dev), torch.randn(2, 3, 8, 9, device=dev),
                                     torch.tensor(0, device=dev), torch.zeros(10, 6, device=dev), None, 0,
                                     0.0, 0.0, False)
except ValueError as e:
    print(f"error path ok on {dev}:", str(e).splitlines()[0][:80])
else:
    raise SystemExit("bad input was not refused")
print("extension loaded", "with CUDA kernels" if EXTENSION_HAS_CUDA else "WITHOUT CUDA kernels")
PYEOF
  rc=$?
  tail -3 "$log"
  note "$(grep -E '^(error path ok|extension loaded)' "$log" | cut -c1-48 | tr '\n' ';' | sed 's/;$//')"
  return $rc
}

# The test stages: scripts/gpu_check_tests.py selects the CUDA tests (new work first, then the rest).
run_tests() {  # $1: selection (new|rest|all or "suite"), $2: stage name
  local which=$1 name=$2 log="$RESULTS_DIR/$2.log"
  local sel=(-p gpu_check_tests --cuda-tests="$which")
  [ "$which" = suite ] && sel=()
  if [ "$HAVE_CUDA" != 1 ]; then  # dry run: show what would run
    timeout --foreground -k 5 "$(left_s 2)" "$PY" -m pytest --collect-only -q "${sel[@]}" tests > "$log" 2>&1
    local rc=$?
    local got
    got=$(tail -1 "$log")
    note "no CUDA device: selection collected only, none run: ${got:-the collection ran out of time}"
    [ $rc -eq 5 ] && rc=0  # nothing selected (no gpu-marked test in the selection) is fine here
    return $rc
  fi
  local extra=()
  "$PY" -c "import xdist" 2>/dev/null && [ "${GPU_CHECK_XDIST:-$XDIST_DEFAULT}" != 0 ] \
    && extra+=(-n "${GPU_CHECK_XDIST:-$XDIST_DEFAULT}")
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-120}")
  # shellcheck disable=SC2086 - GPU_CHECK_PYTEST_ARGS is a list of words on purpose
  timeout --foreground -s INT -k 6 "$(left_s 8)" "$PY" -m pytest -q -rfEs "${sel[@]}" "${extra[@]}" \
    --junitxml="$RESULTS_DIR/$name.xml" ${GPU_CHECK_PYTEST_ARGS:-} tests > "$log" 2>&1
  local rc=$?
  tail -25 "$log"
  note "${extra[*]:+(${extra[*]}) }$(grep -E '(passed|failed|error|no tests ran|Interrupted)' "$log" | tail -1)"
  [ $rc -eq 5 ] && rc=0
  return $rc
}
stage_tests_new() { run_tests new tests-new; }
stage_tests_cuda() { run_tests rest tests-cuda; }
stage_tests_all() { run_tests suite tests-all; }

run_bench() {  # $1: stage name, $2: default seconds of timed rounds per benchmark, rest: files
  local name=$1 rounds_s=$2 log="$RESULTS_DIR/$1.log"; shift 2
  rm -f "$RESULTS_DIR/$name.jsonl"
  DDPM_FAST_BENCH_JSONL="$RESULTS_DIR/$name.jsonl" DDPM_FAST_BENCH_ROUND_BUDGET_S=${DDPM_FAST_BENCH_ROUND_BUDGET_S:-$rounds_s} \
    timeout --foreground -s INT -k 3 "$(left_s 12)" "$PY" -m pytest -q -rfEs "$@" --benchmark-only \
      --benchmark-json="$RESULTS_DIR/$name.json" --benchmark-columns=median,iqr,rounds > "$log" 2>&1
  local rc=$?
  tail -15 "$log"
  # Cut off: pytest-benchmark may have written no JSON (or none worth having): report the JSON lines.
  local src="$RESULTS_DIR/$name.json" rows
  rows=$(wc -l < "$RESULTS_DIR/$name.jsonl" 2>/dev/null || echo 0)
  if [ $rc -ne 0 ] || ! "$PY" -c "import json, sys; assert json.load(open(sys.argv[1]))['benchmarks']" "$src" 2>/dev/null; then
    src="$RESULTS_DIR/$name.jsonl"
  fi
  local what
  what="$rows results$([ $rc -eq 124 ] && echo ", cut at the limit"); $(grep -E '(passed|failed|error|skipped|Interrupted)' "$log" | tail -1)"
  note "$what; no report yet"  # in case the report itself runs out of time
  if [ "$rows" -gt 0 ]; then
    if timeout --foreground -k 1 "$(left_s 1)" "$PY" -m ddpm_fast bench-report "$src" --out-dir "$RESULTS_DIR" >> "$log" 2>&1; then
      note "$what; report $(basename "${src%.*}").md"
    else
      note "$what; bench-report failed or ran out of time (see $name.log)"
    fi
  else
    note "$what"
  fi
  return $rc
}
stage_bench_sampling() { run_bench bench-sampling 1.0 benchmarks/bench_sampling.py; }
stage_bench_unet() { run_bench bench-unet 1.0 benchmarks/bench_unet.py; }
stage_bench_ops() {
  local ops=${GPU_CHECK_OPS:-groupnorm_swish,reverse_step,conv2d,conv_transpose2d,residual_add,time_embedding,attention}
  local files=() op
  for op in ${ops//,/ }; do files+=("benchmarks/bench_$op.py"); done
  # do_bench gives a short call's median; the rounds only feed min and IQR: keep them short.
  run_bench bench-ops 0.25 "${files[@]}"
}

stage_profile() {
  local args=(--preset ${GPU_CHECK_PROFILE_PRESETS:-cifar35m} --batch 1 64 --dtype bf16 fp32 --channels-last)
  [ "$HAVE_CUDA" = 1 ] || args=(--device cpu --preset tiny --batch 1 --dtype fp32 --iters 2 --channels-last)
  timeout --foreground -s INT -k 3 "$(left_s 4)" "$PY" scripts/profile_unet.py "${args[@]}" \
    --json "$RESULTS_DIR/profile_unet.json" > "$RESULTS_DIR/profile_unet.txt" 2>&1
  local rc=$?
  grep -E '^(==|   by kind)' "$RESULTS_DIR/profile_unet.txt" | cut -c1-160
  note "$(grep -c '^==' "$RESULTS_DIR/profile_unet.txt") profiles$([ "$HAVE_CUDA" = 1 ] || echo ' (CPU ops, not kernels)')"
  return $rc
}

stub_or_run() {  # GPU_CHECK_STUB="build=2 tests-new=fail": a sleep or a failure instead of the stage
  local name=$1 spec
  if [ -z "${GPU_CHECK_STUB:-}" ]; then "stage_${name//-/_}"; return; fi
  spec=$(tr ', ' '\n\n' <<< "$GPU_CHECK_STUB" | sed -n "s/^$name=//p" | tail -1)
  if [ "$name" = env ]; then  # no torch import: the plumbing test stays fast
    printf 'date: %s\ndevice: none (GPU_CHECK_STUB)\nslug: stub\n' "$(date -u +%FT%TZ)" > "$RESULTS_DIR/env.txt"
  fi
  if [ "$spec" = fail ]; then note "stub: failed on purpose"; return 1; fi
  sleep "${spec:-0}"
  note "stub: slept ${spec:-0} s"
}

if [ "${1:-}" = "--run-stage" ]; then
  stub_or_run "$2"
  rc=$?
  # What the stage started and left behind (an xdist worker whose controller was killed) ends with it:
  # the other members of this stage's process group (timeout's), not timeout itself or this shell.
  if command -v pgrep > /dev/null; then
    pg=$(ps -o pgid= -p $$ | tr -d ' ')
    for p in $(pgrep -g "$pg"); do [ "$p" != $$ ] && [ "$p" != "$PPID" ] && kill -TERM "$p" 2> /dev/null; done
  fi
  exit $rc
fi

# --- the driver ----------------------------------------------------------------------------------
if [ "${1:-}" = "--plan" ]; then print_plan; exit 0; fi
STAGES=("$@")
if [ ${#STAGES[@]} -eq 0 ] || [ "${STAGES[*]}" = all ]; then STAGES=("${DEFAULT_STAGES[@]}"); fi
for st in "${STAGES[@]}"; do
  if [ "$st" = build ] || [ -z "${BUDGET[$st]:-}" ] || [ "$st" = env ] || [ "$st" = pack ]; then
    [ "$st" = build ] && continue
    echo "usage: $0 [--plan | all | STAGE...]; stages: ${DEFAULT_STAGES[*]:1} ${OPTIONAL_STAGES[*]} (build always runs first)" >&2
    exit 2
  fi
done
[ "${STAGES[0]}" = build ] || STAGES=(build "${STAGES[@]}")
mapfile -t STAGES < <(printf '%s\n' "${STAGES[@]}" | awk '!seen[$0]++')  # build named twice: once

T0_MS=$(now_ms)
DEADLINE_MS=$(to_ms "${GPU_CHECK_DEADLINE_S:-$PLAN_S}")
MIN_STAGE_MS=$(to_ms "${GPU_CHECK_MIN_STAGE_S:-3}")
budget_ms() { echo $(( BUDGET[$1] * DEADLINE_MS / PLAN_S )); }  # the plan, scaled to the deadline
PACK_MS=$(budget_ms pack)

export PY=${PYTHON:-python3}
# No pip install on the GPU machine (no network, and never touch its torch): build in place, import from
# here; and should anything call pip, it finds no index instead of waiting on the network.
export PYTHONPATH="$PWD:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONUNBUFFERED=1 DDPM_FAST_REQUIRE_EXT=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} DDPM_FAST_COMPILE_MODE=${DDPM_FAST_COMPILE_MODE:-reduce-overhead}
export GPU_CHECK_REQUIRE_CUDA=${GPU_CHECK_REQUIRE_CUDA:-1}
XDIST_DEFAULT=$(nproc); ((XDIST_DEFAULT > 16)) && XDIST_DEFAULT=16
export XDIST_DEFAULT

DEST=${RESULTS_DIR:-}  # where the results go: RESULTS_DIR, else benchmarks/results/<gpu>-<date> (below)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$WORK/gpu_check.log"
exec 3>&1 4>&2 > >(tee -a "$LOG") 2>&1
TEE_PID=$!
export RESULTS_DIR="$WORK" HAVE_CUDA=0  # env.txt lands here until env has named the folder
mkdir -p "$WORK/notes"
SUMMARY=()
FAILED=0
STATUS=ok

# Runs stage $1 with a limit of $2 ms under timeout; records its line in SUMMARY.
run_stage() {
  local name=$1 limit_ms=$2 planned_ms t0 rc line
  planned_ms=$(budget_ms "$name")
  export NOTE_FILE="$WORK/notes/$name" STAGE_END_MS=$(( $(now_ms) + limit_ms ))
  rm -f "$NOTE_FILE"
  echo "== [$(fmt_s $(( $(now_ms) - T0_MS ))) s] $name: limit $(fmt_s "$limit_ms") s (budget $(fmt_s "$planned_ms") s)"
  t0=$(now_ms)
  # TERM 2 s (at most a tenth of the limit) before the limit, KILL at it. The stages' own timeouts
  # run with --foreground, so their commands, and those commands' children, stay in this group.
  local lead_ms=$(( limit_ms / 10 < 2000 ? limit_ms / 10 : 2000 )) term_ms
  term_ms=$(( limit_ms - lead_ms ))
  timeout -k "$(fmt_s $(( limit_ms - term_ms )))" "$(fmt_s "$term_ms")" bash "$0" --run-stage "$name"
  rc=$?
  local took=$(( $(now_ms) - t0 )) what
  case $rc in
    0) STATUS=ok ;;
    124|137) STATUS=cut ;;
    *) STATUS=failed ;;
  esac
  # A stage whose inner timeout fired (rc 124 from its own `timeout`) reads as cut too.
  what=$(cat "$NOTE_FILE" 2>/dev/null)
  [ -z "$what" ] && [ "$STATUS" = cut ] && what="stopped at its limit"
  line=$(printf '%-15s %-8s %7s s of %7s s  %s' "$name" "$STATUS" "$(fmt_s "$took")" "$(fmt_s "$limit_ms")" "$what")
  SUMMARY+=("$line")
  echo "   $line"
  case "$STATUS:$name" in
    failed:*|cut:build|cut:tests-new|cut:env) FAILED=1 ;;
  esac
}

skip_stage() {
  SUMMARY+=("$(printf '%-15s %-8s %s' "$1" skipped "$2")"); echo "== $1 skipped: $2"; STATUS=skipped
  case $1 in build|tests-new) FAILED=1 ;; esac
}

# env first, outside the plan's arithmetic: it names the results folder.
run_stage env 30000
[ -f "$RESULTS_DIR/env.txt" ] && cat "$RESULTS_DIR/env.txt"
grep -q '^device: NVIDIA\|^device: .*SMs' "$RESULTS_DIR/env.txt" 2>/dev/null && HAVE_CUDA=1
export HAVE_CUDA
if [ "$HAVE_CUDA" != 1 ] && [ "$GPU_CHECK_REQUIRE_CUDA" != 0 ] && [ -z "${GPU_CHECK_STUB:-}" ]; then
  echo "gpu_check: no CUDA device visible (env.txt above); GPU_CHECK_REQUIRE_CUDA=0 dry-runs the plumbing on CPU" >&2
  exit 1
fi
[ "$HAVE_CUDA" = 1 ] || export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
if [ -z "$DEST" ]; then
  SLUG=$(sed -n 's/^slug: //p' "$WORK/env.txt" 2>/dev/null | head -1)
  DEST=benchmarks/results/${SLUG:-gpu}-$(date -u +%Y-%m-%d); base=$DEST; k=2
  while [ -e "$DEST" ]; do DEST="$base-$k"; k=$((k + 1)); done  # never mix two runs' files
fi
mkdir -p "$DEST" && mv "$WORK/env.txt" "$DEST/" 2>/dev/null
export RESULTS_DIR=$DEST
echo "results -> $DEST"

n=${#STAGES[@]}
for ((i = 0; i < n; i++)); do
  name=${STAGES[$i]}
  if [ $i -gt 0 ] && [ "${BUILD_OK:-0}" != 1 ]; then skip_stage "$name" "the build did not finish"; continue; fi
  left=$(( T0_MS + DEADLINE_MS - PACK_MS - $(now_ms) ))
  reserved=0
  for ((j = i + 1; j < n; j++)); do reserved=$(( reserved + $(budget_ms "${STAGES[$j]}") )); done
  limit=$(( left - reserved ))
  if [ "$limit" -lt "$MIN_STAGE_MS" ]; then
    skip_stage "$name" "$(fmt_s "$limit") s left before the deadline, less later stages' budgets (minimum $(fmt_s "$MIN_STAGE_MS") s)"
  else
    run_stage "$name" "$limit"
  fi
  [ "$name" = build ] && [ "$STATUS" = ok ] && BUILD_OK=1
done

# --- pack ----------------------------------------------------------------------------------------
total=$(( $(now_ms) - T0_MS ))
{
  echo "gpu_check ${STAGES[*]}: $([ $FAILED = 0 ] && echo ok || echo FAILED) in $(fmt_s "$total") s of a $(fmt_s "$DEADLINE_MS") s deadline -> $DEST"
  printf '%-15s %-8s %s\n' stage status "time / limit, note"
  printf '%s\n' "${SUMMARY[@]}"
} > "$DEST/summary.txt"
cp "$LOG" "$DEST/gpu_check.log"
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/gpu_check_results.tar.gz" -C "$(dirname "$DEST")" "$(basename "$DEST")" \
    && cp "$DEST/summary.txt" "$DEST/gpu_check.log" "$OUT/" && { cp "$DEST/env.txt" "$OUT/" 2>/dev/null; true; } \
    && echo "packed -> \$OUT/gpu_check_results.tar.gz (unpack: tar xzf; folder $(basename "$DEST"))"
fi
echo "== gpu_check summary"
cat "$DEST/summary.txt"
exec 1>&3 2>&4 3>&- 4>&-
wait "$TEE_PID" 2> /dev/null  # the log's last lines are out before the command returns
rm -rf "$WORK"
exit $FAILED
