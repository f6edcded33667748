#!/usr/bin/env bash
# One command for a lent GPU machine (torch preinstalled, no network): build the C++/CUDA extension,
# run the whole test suite including the GPU-only tests (see Tests below), run the benchmarks, write the results.
#
#   bash scripts/gpu_check.sh [all | build | test | bench-ops | bench-e2e | bench-sampling | profile ...]
#   (default: all = test profile bench-e2e bench-ops; stages run in the order given, after one build)
#
# Results go to $RESULTS_DIR (default: benchmarks/results/gpu-<date>). When $OUT is set (the device
# tool, which returns at most 8 files from $OUT), the whole folder is also packed into ONE file,
# $OUT/gpu_check_results.tar.gz, next to $OUT/summary.txt; unpack it with `tar xzf`. Contents:
#   env.txt (device, driver, versions, commit, date), build.log, tests.log, bench.json, report .md/.png.
# Stages print one summary line each at the end, so the tail of the output is a short table.
# Budget: a device call is at most 10 minutes and a session has 30 in all. Under the device tool the
# script stops every stage by GPU_CHECK_DEADLINE_S (default 540 s) and packs what finished, so `all`
# always returns inside one call; measured on an H100 (2026-11-26): build 35 s, tests 90 s with
# pytest-xdist, bench-e2e's default grid 335 s, bench-ops' default grid > 6 min. For complete benchmark
# runs, give `bench-e2e` / `bench-ops` / `bench-sampling` calls of their own, narrowed with
# DDPM_FAST_BENCH_PROVIDERS / _PRESETS / _BATCHES / _DTYPES / _SAMPLERS (benchmarks/README.md).
# Tests: the whole suite runs with the GPU visible. Tests marked `interpreter` launch Triton kernels
# on CPU tensors, which needs TRITON_INTERPRET=1 (set by tests/conftest.py only when no GPU is
# visible): there their CPU variants skip and their CUDA variants run. GPU_CHECK_CPU_TESTS=1 adds a
# second pass with the GPU hidden (CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1), as CI runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
DATE=$(date -u +%Y-%m-%d)
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results/gpu-$DATE}
mkdir -p "$RESULTS_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 DDPM_FAST_REQUIRE_EXT=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Under the device tool ($OUT set) every stage must end inside one 10-minute call, packing included:
# later stages get what is left of 540 s and a cut-off benchmark keeps its finished rows (JSONL).
if [ -n "${OUT:-}" ]; then export GPU_CHECK_DEADLINE_S=${GPU_CHECK_DEADLINE_S:-540}; fi
# No pip install on the GPU machine (no network, and never touch its torch): build in place, import from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY=()

env_info() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+uncommitted changes)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    "$PY" - <<'PYEOF'
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda)
try:
    import triton; print("triton:", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, cc {p.major}.{p.minor}")
PYEOF
    nvcc --version 2>/dev/null | tail -1
  } > "$RESULTS_DIR/env.txt" 2>&1
  cat "$RESULTS_DIR/env.txt"
}

# The extension must load AND raise a clean Python error on bad input: on the H100 machine's toolchain
# the error path itself once segfaulted while every correct call worked (see csrc/bindings.cpp, str_of).
ERROR_PATH_CHECK='import torch, ddpm_fast.ops.reverse_step
try:
    torch.ops.ddpm_fast.reverse_step(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 9), torch.tensor(0),
                                     torch.zeros(10, 6), None, 0, 0.0, 0.0, False)
except ValueError as e:
    print("error path ok:", str(e).splitlines()[0][:80])
else:
    raise SystemExit("bad input was not refused")'

build_once() {
  "$PY" setup.py build_ext --inplace >> "$RESULTS_DIR/build.log" 2>&1 && "$PY" -c "$ERROR_PATH_CHECK" >> "$RESULTS_DIR/build.log" 2>&1
}

build() {
  local t0=$SECONDS
  : > "$RESULTS_DIR/build.log"
  build_once
  local rc=$?
  # GPU_CHECK_REQUIRE_CUDA=0 lets the script's plumbing be dry-run on a CPU machine.
  "$PY" -c "from ddpm_fast.ops.reverse_step import HAS_EXTENSION, EXTENSION_HAS_CUDA as C; import os; \
assert HAS_EXTENSION and (C or os.environ.get('GPU_CHECK_REQUIRE_CUDA') == '0'), 'extension (with CUDA) did not load'; \
print('extension loaded', 'with CUDA kernels' if C else 'WITHOUT CUDA kernels')" >> "$RESULTS_DIR/build.log" 2>&1 || rc=1
  tail -5 "$RESULTS_DIR/build.log"
  SUMMARY+=("build        rc=$rc  $((SECONDS - t0)) s")
  return $rc
}

# pytest-xdist spreads the suite over processes (Triton JIT and nvcc-free builds dominate a cold run);
# pytest-timeout turns a hung test into a failure instead of eating the lease. Both are optional.
XDIST_ARGS=()
if [ "${GPU_CHECK_XDIST:-8}" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST_ARGS=(-n "${GPU_CHECK_XDIST:-8}")
fi
TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  TIMEOUT_ARGS=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-300}")
fi

run_tests() {
  local t0=$SECONDS
  local left=$(( ${GPU_CHECK_DEADLINE_S:-100000} - SECONDS ))
  timeout "$left" "$PY" -m pytest -q -rs tests "${XDIST_ARGS[@]}" "${TIMEOUT_ARGS[@]}" --junitxml="$RESULTS_DIR/junit.xml" 2>&1 \
      | tee "$RESULTS_DIR/tests.log" | tail -40
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("tests-gpu    rc=$rc  $((SECONDS - t0)) s  $(tail -1 "$RESULTS_DIR/tests.log")")
  if [ "${GPU_CHECK_CPU_TESTS:-0}" = "1" ]; then
    local t1=$SECONDS
    CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 "$PY" -m pytest -q -rs tests --junitxml="$RESULTS_DIR/junit-cpu.xml" \
        2>&1 | tee "$RESULTS_DIR/tests-cpu.log" | tail -20
    local rc_cpu=${PIPESTATUS[0]}
    SUMMARY+=("tests-cpu    rc=$rc_cpu  $((SECONDS - t1)) s  $(tail -1 "$RESULTS_DIR/tests-cpu.log")")
    [ "$rc_cpu" -ne 0 ] && rc=$rc_cpu
  fi
  return $rc
}

bench() {  # $1: name, rest: pytest args
  local name=$1; shift
  local t0=$SECONDS
  # GPU_CHECK_DEADLINE_S: seconds since the script started by which every stage must be done, so
  # the results are packed before a device call's limit kills everything. A cut-off benchmark run
  # still leaves its finished results in $name.jsonl.
  local left=$(( ${GPU_CHECK_DEADLINE_S:-100000} - SECONDS ))
  if [ "$left" -lt 30 ]; then
    SUMMARY+=("$name  skipped: ${left} s left before GPU_CHECK_DEADLINE_S"); return 1
  fi
  DDPM_FAST_BENCH_JSONL="$RESULTS_DIR/$name.jsonl" timeout "$left" "$PY" -m pytest -q -rs "$@" "${TIMEOUT_ARGS[@]}" \
      --benchmark-only --benchmark-json="$RESULTS_DIR/$name.json" \
      --benchmark-columns=median,iqr,rounds 2>&1 | tee "$RESULTS_DIR/$name.log" | tail -25
  local rc=${PIPESTATUS[0]}
  # Cut off by the deadline: pytest-benchmark wrote no JSON, so report the rows measured so far.
  local src="$RESULTS_DIR/$name.json"
  if ! "$PY" -c "import json, sys; json.load(open(sys.argv[1]))" "$src" 2>/dev/null; then
    src="$RESULTS_DIR/$name.jsonl"; rm -f "$RESULTS_DIR/$name.json"
    echo "$name: cut off (rc=$rc); reporting the $(wc -l < "$src" 2>/dev/null || echo 0) results in $src"
  fi
  "$PY" -m ddpm_fast bench-report "$src" --out-dir "$RESULTS_DIR" >> "$RESULTS_DIR/$name.log" 2>&1 || rc=1
  SUMMARY+=("$name  rc=$rc  $((SECONDS - t0)) s")
  return $rc
}

# Per-kernel GPU time of one UNet forward (scripts/profile_unet.py): where the time goes, and the
# kernel counts that the fusion predictions in benchmarks/PERF_NOTES.md are checked against.
profile() {
  local t0=$SECONDS
  local left=$(( ${GPU_CHECK_DEADLINE_S:-100000} - SECONDS ))
  timeout "$left" "$PY" scripts/profile_unet.py --preset ${GPU_CHECK_PROFILE_PRESETS:-cifar35m} --batch 1 64 \
      --dtype fp32 bf16 --channels-last > "$RESULTS_DIR/profile_unet.txt" 2>&1
  local rc=$?
  grep '^==' "$RESULTS_DIR/profile_unet.txt"
  SUMMARY+=("profile      rc=$rc  $((SECONDS - t0)) s")
  return $rc
}

env_info
rc=0
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(all)
[ "${STAGES[*]}" = "all" ] && STAGES=(test profile bench-e2e bench-ops)
for st in "${STAGES[@]}"; do
  case "$st" in
    build|test|bench-ops|bench-e2e|bench-sampling|profile) ;;
    *) echo "usage: $0 [all | build | test | bench-ops | bench-e2e | bench-sampling | profile ...] (in the order given)" >&2
       exit 2 ;;
  esac
done
if build; then
  for st in "${STAGES[@]}"; do
    case "$st" in
      test) run_tests || rc=1 ;;
      bench-ops)  # GPU_CHECK_OPS=reverse_step,time_embedding picks op files (default: every op)
        OPS=${GPU_CHECK_OPS:-conv2d,conv_transpose2d,groupnorm_swish,attention,residual_add,time_embedding,reverse_step}
        bench bench-ops $(printf 'benchmarks/bench_%s.py ' ${OPS//,/ }) || rc=1 ;;
      bench-e2e) bench bench-e2e benchmarks/bench_unet.py benchmarks/bench_sampling.py || rc=1 ;;
      bench-sampling) bench bench-sampling benchmarks/bench_sampling.py || rc=1 ;;
      profile) profile || rc=1 ;;
    esac
  done
else
  rc=1
fi
STAGE="${STAGES[*]}"
echo "== gpu_check summary ($STAGE) -> $RESULTS_DIR"
printf '%s\n' "${SUMMARY[@]}"
if [ -n "${OUT:-}" ]; then
  { echo "gpu_check $STAGE rc=$rc"; printf '%s\n' "${SUMMARY[@]}"; } > "$OUT/summary.txt"
  tar -czf "$OUT/gpu_check_results.tar.gz" -C "$(dirname "$RESULTS_DIR")" "$(basename "$RESULTS_DIR")" \
    && echo "packed -> \$OUT/gpu_check_results.tar.gz"
fi
exit $rc
