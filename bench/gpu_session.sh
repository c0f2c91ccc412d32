#!/usr/bin/env bash
# One prepared GPU session (device tool: one call of at most 10 minutes, 15 minutes of device time
# per task): the GPU correctness checks first, then the benchmark rows of docs/performance.md, most
# important first, each under its own time limit so that one slow row cannot eat the rest (the
# limits add up to under 10 minutes). Profiled rows print their top kernels and the GPU's busy share.
#
#   bash bench/gpu_session.sh   # writes $OUT (or ./bench-out): log.txt, results.jsonl, report.md
#
# On the device machine (torch and Triton installed, no Ray/DeepSpeed/MLflow), from the repository
# root. Rows through DeepSpeed and Ray Train need those packages carried as wheels; see
# docs/performance.md#the-gpu-machine.
set -uo pipefail
out="${OUT:-bench-out}"
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

row() {  # row LIMIT_SECONDS COMMAND...: run one step, keep its output, never stop the session
    local limit=$1
    shift
    echo "=== [$(($(date +%s) - start)) s] $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

row 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
row 30 python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
row 90 python3 -m pytest -q -p no:cacheprovider tests/models/test_cuda.py
T="python3 -m bench.train --configs fractalmar_in64 --micro-batch 64 --ckpt --warmup 2 --steps 5"
row 60 $T --profile 2
row 45 $T --attention fused
row 45 $T --mask-buckets 8
row 100 python3 -m bench.sample --configs fractalmar_in64 --batches 128 --warmup 1 --profile 1
row 60 python3 -m bench.train --configs fractalmar_large_in256 --micro-batch 32 --ckpt --warmup 2 --steps 4
row 60 python3 -m bench.train --configs fractalmar_huge_in256 --micro-batch 32 --ckpt --warmup 1 --steps 3
row 60 $T --mask-buckets 8 --compile
grep -h '^JSON ' "$log" | sed 's/^JSON //' >"$out/results.jsonl"
python3 -m bench.report "$out/results.jsonl" | tee "$out/report.md" | tee -a "$log"
echo "=== done in $(($(date +%s) - start)) s; $(wc -l <"$out/results.jsonl") result rows in $out/results.jsonl" | tee -a "$log"
