#!/usr/bin/env bash
# pyreg on a GPU machine in one command of at most 9 minutes (an H100 or H200
# with 16 cores; the stage budgets below add up to 530 s; the stages took 6
# minutes on an H100), writing at most 4 files to $OUT:
#
#   OUT=/some/dir bash bench/gpu_session.sh            # the session
#   bash bench/gpu_session.sh --dry-run                # the plan, each stage's logic on the CPU
#
# Stages, in order, each under `timeout` (a stage that fails or runs out of
# time is recorded and the next one runs):
#   env        nvidia-smi, driver, torch and CUDA versions, nvcc
#   build      pyreg with the CUDA kernels for sm_90 only (PYREG_CUDA=ON,
#              PYREG_CUDA_ARCHS=90-real; CPU kernels for this CPU only)
#   test       the CUDA tests: the op matrix, structured ops, fused optimizer,
#              test_cuda and the CUDA-graph, error and strength tests on the
#              cuda backend (not the whole suite, not the CUDA copy of torch's
#              optimizer suite); all failures reported, in tests.xml too;
#              then, in a process of its own, every fused optimizer
#              captured at GPT-2 shapes against its eager steps
#   memcheck / racecheck / initcheck
#              compute-sanitizer on bench/sanitize_ops.py: every kernel and
#              optimizer once per dtype, on lists that cross the chunk and
#              launch-batch boundaries; memcheck without torch's caching
#              allocator
#   profile    Nsight Compute (ncu, clocks left alone) on the group ops'
#              kernels at GPT-2 shapes (bench/profile_ops.py)
#   bench      element ops, group ops and the optimizer step at GPT-2 and
#              GPT-1.3B shapes, eager and as CUDA-graph replays (on a GPU
#              too small for every step peer side by side, the bench leaves
#              some out and says so)
#   optim      every fused optimizer's step against torch's, as CUDA-graph
#              replays, each algorithm in a process of its own; one whose
#              process fails is run again peer by peer, to name the one
#              that fails (bench/optim_kernels.py)
# Files in $OUT: summary.txt (the GPU, driver, torch; each stage's exit status
# and seconds), session.log (every stage's output), tests.xml (the CUDA tests,
# JUnit; not in a dry run), bench-results.tar.gz.
#
# The dry run (--dry-run or DRY_RUN=1) prints the plan, then runs each stage's
# logic here on the CPU with the emulated build (cuda-emu) and tiny sizes: the
# environment report, the installed module instead of a build, the test
# selection collected (it must select tests) and run on cuda-emu, the
# sanitizers' workload on cuda-emu (fp32) without a sanitizer, a tiny CPU bench.
#
# Everything that imports pyreg runs outside the checkout (the source tree's
# pyreg/ has no compiled module).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=${DRY_RUN:-0}
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    *) echo "usage: bash bench/gpu_session.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/pyreg-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# pytest's script, not `python -m pytest` (which puts the checkout first on sys.path)
PYTEST="$(dirname "$(command -v "$PY")")/pytest"
[ -x "$PYTEST" ] || PYTEST=$(command -v pytest)
WORK=$(mktemp -d)  # bench results and scratch; only the three files go to $OUT
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT/summary.txt"
LOG="$OUT/session.log"
: > "$SUMMARY"
: > "$LOG"
status=0
T_START=$SECONDS

# Stage budgets in seconds (sum 530: under 9 minutes with the tarball). On an
# H100 (2026-12) the stages took: env 7, build 66, test 41, memcheck 23,
# racecheck 43 for two of the four dtypes (35 ran out for all four),
# initcheck 10, profile 11.
B_ENV=15 B_BUILD=90 B_TEST=95 B_MEMCHECK=35 B_RACECHECK=100 B_INITCHECK=25 B_PROFILE=30 B_BENCH=90 B_OPTIM=50

# The CUDA tests (test ids: B fixtures give "cuda" / "cuda-emu"; test_cuda's
# own parametrization likewise).
TESTS="tests/test_cuda.py tests/test_ops.py tests/test_structured.py tests/test_fused_optim.py \
tests/test_compile.py tests/test_errors.py tests/test_strength.py tests/test_compact.py"
# The sanitizers' workload: every kernel once per dtype on small lists that
# cross the launch planners' chunk and batch boundaries (bench/sanitize_ops.py;
# under a sanitizer, pytest's start-up and the suite's sizes take minutes).
SANITIZE="bench/sanitize_ops.py"
if [ "$DRY" = 1 ]; then
  SEL="emu"  # the same selections on the emulated backend
  TEST_K="$SEL"
  SANITIZE_ARGS="--device cpu --backend cuda-emu --dtypes fp32"
  JUNIT=""
  BENCH_ARGS=(--device cpu --quick --repeats 1 --no-compile --shapes mlp)
  BENCH_OPS=(weight_stats,step)
  OPTIM_ARGS="--device cpu --shapes mlp --repeats 1 --min-total-s 0.01"
  TEST_FILES="tests/test_emulator.py tests/test_cuda.py"
else
  TEST_K="cuda and not emu"
  SANITIZE_ARGS="--device cuda"
  JUNIT="--junitxml=$OUT/tests.xml"
  BENCH_ARGS=(--device cuda --shapes gpt2,gpt-1.3b --no-compile --repeats 10)
  BENCH_OPS=(weight_stats,add_penalty_grad_,prox_,group_prox_,max_norm_,step)
  OPTIM_ARGS="--device cuda --shapes gpt2 --graphs --repeats 5 --min-total-s 0.1"
  TEST_FILES="$TESTS"
fi

stage() {  # stage NAME BUDGET COMMAND...: run under timeout, log, record; keep going
  local name=$1 budget=$2; shift 2
  echo "=== $name (budget ${budget} s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" bash -c "$*" >> "$LOG" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  [ $rc -eq 124 ] && echo "=== $name: out of time" | tee -a "$LOG"
  echo "=== $name: exit $rc after $dt s" | tee -a "$LOG"
  printf '%-10s exit %3d  %4d s / %4d s\n' "$name" "$rc" "$dt" "$budget" >> "$SUMMARY"
  [ $rc -eq 0 ] || status=1
}

echo "pyreg GPU session$([ "$DRY" = 1 ] && echo ' (dry run: CPU, emulated CUDA, tiny sizes)') in $ROOT -> $OUT" | tee -a "$LOG"
echo "plan: env ${B_ENV}s, build ${B_BUILD}s, test ${B_TEST}s, memcheck ${B_MEMCHECK}s, racecheck ${B_RACECHECK}s, initcheck ${B_INITCHECK}s, profile ${B_PROFILE}s, bench ${B_BENCH}s, optim ${B_OPTIM}s" | tee -a "$LOG" "$SUMMARY"

# ---- env: names the GPU, driver, torch ------------------------------------------
stage env $B_ENV "cd '$WORK' && { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || echo 'no nvidia-smi'; } | tee gpu.txt; \
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' | tee torch.txt; \
  { command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo 'no nvcc'; } | tee nvcc.txt"
{ echo "gpu: $(cat "$WORK/gpu.txt" 2>/dev/null)"; echo "$(cat "$WORK/torch.txt" 2>/dev/null)"; echo "nvcc: $(tail -n 1 "$WORK/nvcc.txt" 2>/dev/null)"; } >> "$SUMMARY"

# ---- build: sm_90 only ------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  stage build $B_BUILD "echo 'would run: CMAKE_BUILD_PARALLEL_LEVEL=16 $PY -m pip install --no-build-isolation --no-deps $ROOT \
-Ccmake.define.PYREG_CUDA=ON -Ccmake.define.PYREG_CUDA_ARCHS=90-real -Ccmake.define.PYREG_CPU_ARCH=native'; \
  cd '$WORK' && $PY -m pyreg info && $PY -c 'from pyreg import backends; assert backends.cuda_emu.compiled()'"
else
  stage build $B_BUILD "cd '$WORK' && CMAKE_BUILD_PARALLEL_LEVEL=16 $PY -m pip install --no-build-isolation --no-deps '$ROOT' \
-Ccmake.define.PYREG_CUDA=ON -Ccmake.define.PYREG_CUDA_ARCHS=90-real -Ccmake.define.PYREG_CPU_ARCH=native \
  && $PY -m pyreg info && $PY -c 'from pyreg import backends; assert backends.cuda.available(), backends.cuda.unavailable_reason()'"
fi

# ---- test: the CUDA tests -----------------------------------------------------------
# The selection must select tests (a renamed test must not empty it silently).
# The captures at GPT-2 shapes run last, in a process of their own: a kernel
# fault there would end the CUDA context of every test after it.
stage test $B_TEST "cd '$ROOT' && n=\$($PYTEST -q --co -p no:cacheprovider $TESTS -k '$TEST_K' | grep -c '::') \
  && echo \"selected: \$n tests\" && [ \"\$n\" -gt 0 ] \
  && { $PYTEST -q -rs --maxfail=30 -p no:cacheprovider $JUNIT $TEST_FILES -k '$TEST_K and not gpt2_shapes'; a=\$?; \
       $PYTEST -q -rs -p no:cacheprovider tests/test_cuda.py -k '$TEST_K and gpt2_shapes'; b=\$?; \
       echo \"main tests: exit \$a; captures at GPT-2 shapes: exit \$b\"; \
       [ \$a -eq 0 ] && { [ \$b -eq 0 ] || [ \$b -eq 5 ]; }; }"

# ---- compute-sanitizer ----------------------------------------------------------------
for tool in memcheck racecheck initcheck; do
  case $tool in memcheck) b=$B_MEMCHECK ;; racecheck) b=$B_RACECHECK ;; initcheck) b=$B_INITCHECK ;; esac
  if [ "$DRY" = 1 ]; then
    wrap=""  # the selection, run without the sanitizer
  else
    wrap="compute-sanitizer --tool $tool --error-exitcode 1"
  fi
  env=""
  [ $tool = memcheck ] && env="PYTORCH_NO_CUDA_MEMORY_CACHING=1"
  stage $tool $b "cd '$ROOT' && $env $wrap $PY $SANITIZE $SANITIZE_ARGS"
done

# ---- profile: Nsight Compute's view of the group ops' kernels (GPT-2 shapes) -------------------
# The clocks are left as they are (--clock-control none); one run of each op.
if [ "$DRY" = 1 ]; then
  stage profile $B_PROFILE "cd '$ROOT' && $PY bench/profile_ops.py --device cpu --shapes mlp --ops group_prox_,max_norm_"
else
  stage profile $B_PROFILE "cd '$ROOT' && ncu --clock-control none -k regex:'group_|finish_kernel' --section SpeedOfLight --section Occupancy \
--section LaunchStats --section MemoryWorkloadAnalysis $PY bench/profile_ops.py --shapes gpt2 --ops group_prox_,max_norm_"
fi

# ---- bench: eager and CUDA-graph replays ----------------------------------------------------
# The results' files name the driver and torch (the GPU is in the bench's own file names).
DRIVER=$(grep , "$WORK/gpu.txt" 2>/dev/null | head -n 1 | cut -d, -f2 | tr -d ' ')
TORCH=$($PY -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)
TAG="driver-${DRIVER:-none}-torch-${TORCH:-none}"
TAG=$(echo "$TAG" | tr -c 'A-Za-z0-9\n' '-')
graphs="--cuda-graphs"
[ "$DRY" = 1 ] && graphs=""  # CUDA only
mkdir -p "$WORK/results"
cp "$WORK"/gpu.txt "$WORK"/torch.txt "$WORK"/nvcc.txt "$WORK/results/" 2>/dev/null
stage bench $B_BENCH "cd '$WORK' \
  && $PY -m pyreg bench ${BENCH_ARGS[*]} --ops ${BENCH_OPS[*]} --out '$WORK/results' --tag $TAG \
  && { [ -z '$graphs' ] || $PY -m pyreg bench ${BENCH_ARGS[*]} --ops ${BENCH_OPS[*]} $graphs --out '$WORK/results' --tag $TAG; }"
stage optim $B_OPTIM "cd '$WORK' && $PY '$ROOT/bench/optim_kernels.py' $OPTIM_ARGS --out '$WORK/results/optim-kernels-$TAG.json'"
tar -czf "$OUT/bench-results.tar.gz" -C "$WORK" results 2>/dev/null || tar -czf "$OUT/bench-results.tar.gz" -T /dev/null

echo "total      $((SECONDS - T_START)) s; status $status" | tee -a "$SUMMARY" "$LOG"
echo "=== done: status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
