#!/usr/bin/env bash
# Interleaved burn / PyTorch runs of the same training step, with the machine load noted before
# each, so both see the same conditions. usage: bench/run_all.sh [ROUNDS] [PYTHON]
set -u
rounds=${1:-2}
python=${2:-python3}
cd "$(dirname "$0")/.."
bench=target/release/bench
summary() { grep -E "timed|CPU|RSS|GFLOP/s \(|peak f32"; }
echo "== peak matmul"; uptime
$bench --peak --steps 0 --warmup 0 | grep peak
$python bench/pytorch_train.py --peak --steps 0 --warmup 0 2>/dev/null | grep peak
for r in $(seq "$rounds"); do
  for threads in 2 1; do
    echo "== round $r burn flex, $threads thread(s) | $(uptime)"
    RAYON_NUM_THREADS=$threads $bench --steps 10 --warmup 3 | summary
    echo "== round $r pytorch eager manual, $threads thread(s) | $(uptime)"
    $python bench/pytorch_train.py --impl manual --threads "$threads" --steps 10 --warmup 3 2>/dev/null | summary
  done
  echo "== round $r pytorch transformers LlamaForCausalLM, 2 threads | $(uptime)"
  $python bench/pytorch_train.py --impl hf --threads 2 --steps 10 --warmup 3 2>/dev/null | summary
done
