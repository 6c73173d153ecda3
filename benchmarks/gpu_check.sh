#!/usr/bin/env bash
# GPU checks for a session with a CUDA machine: the test suite with a GPU present (TESTS=... to pick files), then the
# benchmarks on CUDA (BENCHES=..., each written to its own `*_cuda` section of docs/benchmarks.md). Logs and the updated docs/benchmarks.md go to $OUT.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   TESTS="tests/test_gpu.py tests/test_cache_training.py" BENCHES="cache_step on_policy_step" bash benchmarks/gpu_check.sh
#
# Packages the machine lacks can travel as wheels in .whl/ (installed with --no-deps into /tmp/site).
set -uo pipefail
OUT=${OUT:-/tmp/hf_distill_gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L
python3 -c "import torch, transformers, trl, peft, accelerate, datasets, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" 2>&1 | tee "$OUT/versions.log"

# The suite with a GPU present (trainers then place models on CUDA). Docs and notebook builds need CPU-side tools.
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider $XDIST -rfEs \
  --ignore tests/test_docs_build.py --ignore tests/test_notebooks.py ${TESTS:-tests} 2>&1 | tail -60 | tee "$OUT/tests.log"

# BENCHES picks the benchmarks (default: all); each writes its own `*_cuda` section
for bench in ${BENCHES:-train_step loss_memory cache_step on_policy_step}; do
  case $bench in
    train_step) flags="--teacher-hidden 1024 --teacher-layers 8 --student-hidden 512 --student-layers 4 --seq-len 256
      --batch-size 16" ;;
    loss_memory) flags="--reps 3" ;;
    *) flags="" ;;
  esac
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/$bench.py --device cuda --doc-section ${bench}_cuda $flags \
    2>&1 | tail -30 | tee "$OUT/$bench.log"
done
cp docs/benchmarks.md "$OUT/benchmarks.md"
