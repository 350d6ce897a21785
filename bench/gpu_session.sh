#!/usr/bin/env bash
# pyreg on a GPU machine, in stages that each take under 10 minutes; run from
# the repository root, one command per line or several stages at once:
#
#   bash bench/gpu_session.sh build test sanitize  # build with CUDA, GPU tests, compute-sanitizer
#   bash bench/gpu_session.sh bench-small     # mlp, lstm, vit-tiny, resnet50 (with torch.compile)
#   bash bench/gpu_session.sh bench-graphs    # mlp, lstm, vit-tiny ops as CUDA-graph replays (device time)
#   bash bench/gpu_session.sh bench-gpt2      # gpt2 (with torch.compile)
#   bash bench/gpu_session.sh bench-1.3b      # gpt-1.3b (no torch.compile: its compile is too slow)
#
# The install stays between commands on one machine; a fresh machine needs
# `build` again. Logs and results go to $OUT; commit the results to
# bench/results/, naming the device, driver and torch version.
#
# Everything that imports pyreg runs outside the checkout: `python -m` puts the
# cwd first on sys.path, and the source tree's pyreg/ has no compiled module.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-/tmp/pyreg-gpu-out}
mkdir -p "$OUT/results"
PY=${PYTHON:-python3}
status=0

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  ( "$@" ) > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s (log: $name.log)"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}

for stage in "$@"; do
  case $stage in
    build)
      step env bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; nvcc --version | tail -n 2"
      step build env CMAKE_ARGS="-DPYREG_CUDA=ON" CMAKE_BUILD_PARALLEL_LEVEL=16 \
        "$PY" -m pip install --no-build-isolation --no-deps -v "$ROOT"
      step info bash -c "cd '$OUT' && $PY -m pyreg info"
      ;;
    test)
      # The GPU tests first (their own log), then the whole suite.
      step test-cuda bash -c "cd '$ROOT' && pytest -q -rs tests/test_cuda.py tests/test_compile.py \
        tests/test_ops.py tests/test_structured.py tests/test_fused_optim.py -k 'cuda or graph' -p no:cacheprovider"
      step test-all bash -c "cd '$ROOT' && pytest -q -rs -p no:cacheprovider"
      ;;
    sanitize)
      # A small subset (the sanitizers slow kernels down 10-100x): every kernel,
      # every dtype, several launch batches.
      subset="cuda and not emu and (test_weight_stats or test_prox or test_add_penalty_grad or batch_boundaries \
        or test_group_prox or test_max_norm or test_group_penalty or cross_launch \
        or test_kernel_matches_spec or test_kernel_many_tensors or test_kernel_grad_scale)"
      for tool in memcheck racecheck synccheck; do
        step "sanitize-$tool" bash -c "cd '$ROOT' && compute-sanitizer --tool $tool --error-exitcode 1 \
          \"\$(command -v pytest)\" -q -p no:cacheprovider tests/test_ops.py tests/test_structured.py \
          tests/test_fused_optim.py -k '$subset'"
      done
      ;;
    bench-small)
      step bench-small bash -c "cd '$OUT' && $PY -m pyreg bench --device cuda --shapes mlp,lstm,vit-tiny,resnet50 \
        --out '$OUT/results' --tag small"
      ;;
    bench-graphs)
      step bench-graphs bash -c "cd '$OUT' && $PY -m pyreg bench --device cuda --shapes mlp,lstm,vit-tiny \
        --ops weight_stats,add_penalty_grad_,prox_ --cuda-graphs --out '$OUT/results' --tag small"
      ;;
    bench-gpt2)
      step bench-gpt2 bash -c "cd '$OUT' && $PY -m pyreg bench --device cuda --shapes gpt2 \
        --out '$OUT/results' --tag gpt2"
      ;;
    bench-1.3b)
      step bench-1.3b bash -c "cd '$OUT' && $PY -m pyreg bench --device cuda --shapes gpt-1.3b --no-compile \
        --out '$OUT/results' --tag gpt-1.3b"
      ;;
    *)
      echo "unknown stage $stage (build, test, sanitize, bench-small, bench-graphs, bench-gpt2, bench-1.3b)" >&2
      exit 2
      ;;
  esac
done
echo "=== done: status $status; files in $OUT"
exit $status
