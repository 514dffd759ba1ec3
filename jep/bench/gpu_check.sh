#!/usr/bin/env bash
# One visit to a lent GPU machine: versions, the test suite on the GPUs (the `xla` and `ffi`
# transports are among the backends there), and the training example (then resumed from its checkpoint). Logs go to $OUT (or ./out).
# Usage, from the repository root: bash jep/bench/gpu_check.sh
# (SKIP_TESTS=1, SKIP_TRAIN=1, SKIP_BENCH=1 leave a part out.)
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several test workers share each GPU
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee "$out/versions.txt"

# -m "": the slow tests too (the interpret-mode cases run on the GPU itself there).
[ "${SKIP_TESTS:-0}" = 1 ] || python3 -m pytest -q -p no:cacheprovider -n 4 -rs -m "" tests 2>&1 | tee "$out/tests.txt"
tests_rc=${PIPESTATUS[0]}

n=$(python3 -c "import jax; print(len(jax.devices()))")
# Sized to fit: XLA's lax.ragged_dot backward materializes per-group dense products, and at twice
# these tokens and experts it asked for 64 GiB on one H200 (jax 0.11.2).
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  python3 examples/train_moe_lm.py --dp 1 --ep "$n" --steps 300 --batch 32 --seq-len 256 --d-model 512 \
    --heads 8 --layers 4 --experts 16 --top-k 4 --ffn 1024 --corpus-mb 16 --eval-every 100 \
    --ckpt-every 300 --out /tmp/train_moe_lm --no-progress 2>&1 | tee "$out/train.txt"
  python3 examples/train_moe_lm.py --dp 1 --ep "$n" --steps 320 --batch 32 --seq-len 256 --d-model 512 \
    --heads 8 --layers 4 --experts 16 --top-k 4 --ffn 1024 --corpus-mb 16 --eval-every 100 \
    --ckpt-every 300 --out /tmp/train_moe_lm --no-progress --resume 2>&1 | tee -a "$out/train.txt"
  cp /tmp/train_moe_lm/training.png /tmp/train_moe_lm/metrics.json "$out/" 2>/dev/null
  # Greedy decoding from that checkpoint, the MoE layers in low-latency mode and in flat mode.
  for mode in low_latency flat; do
    python3 examples/generate.py --run /tmp/train_moe_lm --mode "$mode" --new-tokens 64 2>&1 | tee -a "$out/generate.txt"
  done
fi
# Benchmarks: the transports over all GPUs of the machine (at EP=1 local costs only), the grouped
# GEMM, and the layer.
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m jep.bench transport --tokens 512,4096,16384 --hidden 7168 --experts 256 --topk 8 \
    --iters 10 --repeats 5 --out "$out/transport" 2>&1 | tee "$out/bench.txt"
  python3 -m jep.bench transport --routing zipf --tokens 4096 --hidden 7168 --experts 256 --topk 8 \
    --iters 10 --repeats 5 --out "$out/transport_zipf" 2>&1 | tee -a "$out/bench.txt"
  # Two-level dispatch (issue 9): the GPUs as 2 nodes, flat against hierarchical.
  if [ "$n" -ge 4 ] && [ $((n % 2)) -eq 0 ]; then
    python3 -m jep.bench transport --nodes 2 --tokens 4096 --hidden 7168 --experts 256 --topk 8 \
      --iters 10 --repeats 5 --out "$out/transport_nodes" 2>&1 | tee -a "$out/bench.txt"
  fi
  # Decoding (issue 10): the low-latency calls at 1, 32 and 128 tokens per rank, one token count
  # a run (each compiles its calls written out one after another).
  for t in 1 32 128; do
    XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1" \
      python3 -m jep.bench decode --tokens "$t" --iters 10 --repeats 5 --transports xla \
      --out "$out/decode_$t" 2>&1 | tee -a "$out/bench.txt"
  done
  # FP8 quantization at DeepSeek-V3's shape (issue 21), XLA and the kernels: the experts'
  # weights, and token rows as dispatch (4096) and the expert products (32768) quantize them.
  python3 -m jep.bench quantize --model deepseek-v3 --tokens 4096,32768 --iters 10 --repeats 5 \
    --out "$out/quantize" 2>&1 | tee -a "$out/bench.txt"
  # The grouped products against their rooflines (issue 19): many small groups, then few.
  python3 -m jep.bench gemm --gemm-shapes 32768x7168x2048x256,32768x2048x7168x256,32768x2048x768x128,32768x7168x2048x32,32768x7168x2048x8 \
    --iters 10 --repeats 5 --min-seconds 1 --out "$out/gemm" 2>&1 | tee -a "$out/bench.txt"
  python3 -m jep.bench gemm --routing zipf --gemm-shapes 32768x7168x2048x8 --iters 10 --repeats 5 --min-seconds 1 \
    --out "$out/gemm_zipf" 2>&1 | tee -a "$out/bench.txt"
  # The FP8 weight gradient's configurations beside the table's bf16 dw (issue 21): DeepSeek-V3's
  # expert shapes at 32 experts (a GPU's share under EP=8) and 256. Its table.json goes to $out.
  python3 -m jep.bench tune --gemm-shapes 32768x7168x2048x32,32768x2048x7168x32,32768x7168x2048x256 \
    --tune-ops dw_fp8 --iters 5 --repeats 3 --out "$out/tune_dw_fp8" 2>&1 | tee -a "$out/bench.txt"
  # The FP8 forward/dx configurations, 2-block clusters multicasting x among them.
  python3 -m jep.bench tune --gemm-shapes 32768x7168x2048x8,32768x7168x2048x32,32768x2048x7168x32 \
    --tune-ops fp8 --iters 5 --repeats 3 --out "$out/tune_fp8" 2>&1 | tee -a "$out/bench.txt"
  # The FP8 gate and up products and the activation in one kernel, against them apart.
  python3 -m jep.bench tune --gemm-shapes 32768x7168x2048x8,32768x7168x2048x32 \
    --tune-ops fp8_gated --iters 5 --repeats 3 --out "$out/tune_fp8_gated" 2>&1 | tee -a "$out/bench.txt"
  python3 -m jep.bench tune --gemm-shapes 32768x7168x2048x32 --tune-ops dw_fp8_pair --iters 5 \
    --repeats 3 --out "$out/tune_dw_fp8_pair" 2>&1 | tee -a "$out/bench.txt"
  python3 -m jep.bench layer --tokens 4096 --hidden 2048 --ffn 1024 --experts 64 --topk 4 --iters 5 \
    --repeats 5 --out "$out/layer_small" 2>&1 | tee -a "$out/bench.txt"
  # DeepSeek-V3's recipe against the bf16 layer at a GPU's share of its experts (issue 21).
  python3 -m jep.bench layer --hidden 7168 --ffn 2048 --experts 32 --topk 8 --tokens 4096 \
    --layer-variants jep,fp8 --iters 3 --repeats 3 --profile --out "$out/layer_fp8_e32" 2>&1 | tee -a "$out/bench.txt"
  # Real models' expert shapes, with the time of a step by kind of kernel (--profile).
  for model in deepseek-v3 qwen3-30b-a3b olmoe; do
    python3 -m jep.bench layer --model "$model" --tokens 4096 --iters 3 --repeats 3 \
      --layer-variants jep,chunks,capacity,floor --profile --out "$out/layer_$model" 2>&1 | tee -a "$out/bench.txt"
  done
fi
echo "tests exit code: $tests_rc"
exit "$tests_rc"
