#!/usr/bin/env bash
# Issue 21's FP8 work on one lent H200, in parts that each fit a 10-minute device call:
#   1: the FP8 tests on the GPU, the quantize suite (the kernels' variants side by side), FP8
#      dispatch's pack pass against the bf16 dispatch in device time (pack_profile), and the
#      FP8 products' clocks against the bf16 ones (gemm_power);
#   2: tune the FP8 forward/dx (clusters among the candidates), the gated FP8 kernel, the FP8
#      weight gradient and its gate/up pair in one kernel; the picks go to
#      $OUT/tune_*/table.json;
#   3: the layer at DeepSeek-V3's expert shape, 32 experts, bf16 against FP8, profiled, the
#      gemm suite's FP8 products against the bf16 ones at 8 and 256 groups, and the experts
#      over a buffer the groups fill an eighth of, as a dropless one under EP=8 (buffer_fill);
#   4: the training example (float32) at gpu_check's sizes, without and with --fp8, seeds 0-2
#      (a GPU's runs are not bit-reproducible: one seed's pair says little): held-out loss and
#      tokens/s;
#   5: where the FP8 forward's time goes: its registers and spills (ptxas, the PTX kept and
#      compiled again to SASS, each spill's SASS lines in spills.txt), then Nsight Compute's
#      stall reasons.
# Usage, from the repository root: bash jep/bench/fp8_check.sh PART   (logs go to $OUT, or ./out)
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false

case "${1:-}" in
  1)
    python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" \
      2>&1 | tee "$out/versions.txt"
    python3 -m pytest -q -p no:cacheprovider -n 4 -rs -m "" tests/test_fp8.py \
      tests/test_grouped_matmul_kernel.py tests/test_experts.py -k "fp8 or columns or weight or quantize" \
      2>&1 | tee "$out/tests_fp8.txt"
    python3 -m jep.bench quantize --model deepseek-v3 --tokens 4096,32768 --iters 10 --repeats 5 \
      --out "$out/quantize" 2>&1 | tee "$out/quantize.txt"
    python3 benchmarks/scripts/pack_profile.py --tokens 4096 --out "$out/pack_profile.json" \
      2>&1 | tee "$out/pack_profile.txt"
    python3 benchmarks/scripts/gemm_power.py "jep grouped forward" "jep FP8 forward" \
      "jep FP8 forward, cluster 2" 2>&1 | tee "$out/gemm_power_fp8.txt"
    ;;
  2)
    python3 -m jep.bench tune --gemm-shapes 32768x7168x2048x8,32768x7168x2048x32,32768x2048x7168x32 \
      --tune-ops fp8 --iters 5 --repeats 3 --out "$out/tune_fp8" 2>&1 | tee "$out/tune.txt"
    python3 -m jep.bench tune --gemm-shapes 32768x7168x2048x32 --tune-ops fp8_gated --iters 5 \
      --repeats 3 --out "$out/tune_fp8_gated" 2>&1 | tee -a "$out/tune.txt"
    python3 -m jep.bench tune --gemm-shapes 32768x7168x2048x32,32768x2048x7168x32 \
      --tune-ops dw_fp8 --iters 5 --repeats 3 --out "$out/tune_dw_fp8" 2>&1 | tee -a "$out/tune.txt"
    python3 -m jep.bench tune --gemm-shapes 32768x7168x2048x32 --tune-ops dw_fp8_pair --iters 5 \
      --repeats 3 --out "$out/tune_dw_fp8_pair" 2>&1 | tee -a "$out/tune.txt"
    ;;
  3)
    python3 -m jep.bench layer --hidden 7168 --ffn 2048 --experts 32 --topk 8 --tokens 4096 \
      --layer-variants jep,fp8 --iters 3 --repeats 3 --profile --out "$out/layer_fp8_e32" \
      2>&1 | tee "$out/layer.txt"
    python3 -m jep.bench gemm --gemm-shapes 32768x7168x2048x8,32768x7168x2048x256 --iters 10 \
      --repeats 3 --min-seconds 0.5 --out "$out/gemm_fp8" 2>&1 | tee "$out/gemm.txt"
    python3 benchmarks/scripts/buffer_fill.py 2>&1 | grep -v "^[WI]1" | tee "$out/buffer_fill.txt"
    ;;
  4)
    for seed in 0 1 2; do
      for flag in "" --fp8; do
        echo "seed $seed ${flag:-float32}" | tee -a "$out/train_fp8.txt"
        python3 examples/train_moe_lm.py --dp 1 --ep 1 --steps 300 --batch 32 --seq-len 256 \
          --d-model 512 --heads 8 --layers 4 --experts 16 --top-k 4 --ffn 1024 --corpus-mb 16 \
          --eval-every 100 --seed "$seed" --no-progress --out "/tmp/train${flag}_$seed" $flag \
          2>&1 | tee -a "$out/train_fp8.txt"
      done
    done
    ;;
  5)
    # Dumped to a scratch folder (it holds many files); the FP8 kernel's PTX is kept, and
    # compiled again by ptxas to SASS (Mosaic GPU dumps no SASS): each spill's SASS lines go to
    # spills.txt.
    dump="$(mktemp -d)"
    MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_TO="$dump" \
      python3 benchmarks/scripts/gemm_profile.py "jep FP8 forward" > "$dump/stdout.txt" 2>&1
    grep -rhE "^ptxas|bytes stack frame" "$dump" | sort | uniq -c | tee "$out/ptxas.txt"
    ptx=$(ls "$dump"/jep_grouped_fp8*.ptx | head -1)
    cp "$ptx" "$out/fp8_forward.ptx"
    cuda_bin=$(dirname "${NCU:-/usr/local/cuda/bin/ncu}")
    "$cuda_bin/ptxas" -arch=sm_90a -O3 -v "$ptx" -o "$dump/fp8.cubin" 2>&1 | tee -a "$out/ptxas.txt"
    "$cuda_bin/cuobjdump" -sass "$dump/fp8.cubin" > "$out/fp8_forward.sass"
    # Where the spills are: each local-memory store and load with the lines before it.
    grep -E -B8 "\b(STL|LDL)(\.[0-9A-Z]+)*\b" "$out/fp8_forward.sass" > "$out/spills.txt"
    echo "local-memory instructions in the SASS: $(grep -cE "\b(STL|LDL)" "$out/fp8_forward.sass")"
    rm -rf "$dump"
    (cd benchmarks/scripts && timeout 300 "${NCU:-/usr/local/cuda/bin/ncu}" -k regex:jep_grouped_fp8 \
      --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SourceCounters \
      --print-details all python3 gemm_profile.py "jep FP8 forward") > "$out/ncu_source.txt" 2>&1
    grep -vE "^\s*-+\s*$|^\s*$" "$out/ncu_source.txt" | sed -n '/Source Counters/,$p' | sed -n 1,80p
    ;;
  *)
    echo "usage: bash jep/bench/fp8_check.sh 1|2|3|4|5" >&2
    exit 2
    ;;
esac
