#!/usr/bin/env bash
# The checks a session with a lent GPU runs, in one call (see docs/development.md, "GPU checks"):
#   bash scripts/gpu_check.sh OUT_DIR
# 1. the modules' tests and the engine's CUDA-vs-CPU test on the GPU (tests named [cuda...]; LGAM
#    runs its equations as plain tensor ops there: its C++ kernels are CPU-only);
# 2. the app's engine latency on the GPU (benchmarks/app_latency.py --engine-only);
# 3. the throughput-ratio table on the GPU, eager (fp32, bf16 + channels_last), then under
#    torch.compile (forward, then training step), then replayed as CUDA graphs, each step under its
#    own time limit so a slow one leaves the others' results. Outputs: OUT_DIR/*.txt, *.md.
set -u
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
step() {  # step NAME SECONDS COMMAND...: its output in OUT_DIR/NAME, its time and status appended
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$out/$name" 2>&1
    echo "# exit $? after $((SECONDS - t0)) s (limit $limit s): $*" >> "$out/$name"
}
{ nvidia-smi -L; $py -c "import torch; print('torch', torch.__version__)"; nproc; } > "$out/machine.txt" 2>&1
step tests.txt ${TESTS_S:-300} $py -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_lgam_module.py tests/test_attention.py tests/test_cam.py tests/test_benchmarks.py
step app_latency.md 80 $py benchmarks/app_latency.py --devices cuda --engine-only --reps 30 --naive-reps 10
ratio="benchmarks/attention_cost.py --device cuda --ratio-batch 128 --skip-latency --skip-growth --steps 10"
step cost_eager.md 120 $py $ratio --ratio-sizes 128 224 --rounds 2
step cost_compile_fwd.md ${COMPILE_FWD_S:-110} $py $ratio --ratio-sizes 224 --rounds 1 --compile --modes fwd
step cost_compile_train.md ${COMPILE_TRAIN_S:-130} $py $ratio --ratio-sizes 224 --rounds 1 --compile --modes train
step cost_graphs.md 130 $py $ratio --ratio-sizes 128 224 --rounds 1 --cuda-graphs
