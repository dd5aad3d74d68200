#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, in three calls of the device tool (each under its
# 10-minute limit; run them back to back, the machine stays warm for 30 s):
#   bash benchmarks/gpu_session.sh ttt         # TTT-E2E: quality in miniature, then speed
#   bash benchmarks/gpu_session.sh diffusion   # the small masked-diffusion LM: trained, then every sampler
#   bash benchmarks/gpu_session.sh costs       # AutoDeco's training step, TNOT's srgen and retries,
#                                              # TinyLoRA's step time, pruned-model throughput
#   bash benchmarks/gpu_session.sh costs2      # costs' last two rows with more time each (on 2026-12-01
#                                              # TinyLoRA's step time and the GQA throughput outran costs' limits)
#   bash benchmarks/gpu_session.sh ttt-full    # ttt's full-attention quality row alone (it outran ttt's limit)
#   bash benchmarks/gpu_session.sh autodeco-train  # AutoDeco's training step alone, with the compiled variants
#   bash benchmarks/gpu_session.sh strategies  # every tiny recipe under gpu.yaml, ddp.yaml, fsdp.yaml (issue 22)
# From the repository root on the GPU machine, with the wheels of ../shared/device/wheels.sh
# (plus transformers==5.24.0) carried in .whl. Each part's outputs come back as one tarball
# ($OUT/<part>.tar.gz) with its log ($OUT/<part>.log): the device returns at most 8 files.
set -uo pipefail
part=${1:?usage: gpu_session.sh ttt|diffusion|costs|costs2|ttt-full|autodeco-train|strategies}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TESTTIME_CACHE=/tmp/testtime-cache
res=/tmp/results/$part
mkdir -p "$res"
log=$OUT/$part.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
run() {  # run LIMIT_SECONDS COMMAND...: a measurement that cannot take the whole call with it
  local limit=$1; shift
  echo "== $* (limit ${limit}s)" | tee -a "$log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee -a "$log"
  echo "== rc=${PIPESTATUS[0]} in $((SECONDS - start)) s" | tee -a "$log"
}
case $part in
  ttt)
    run 330 python3 benchmarks/ttt.py --device cuda --part quality --out "$res/ttt"
    run 200 python3 benchmarks/ttt.py --device cuda --part speed --repeats 2 --out "$res/ttt" ;;
  diffusion)
    run 540 python3 benchmarks/diffusion.py --device cuda --out "$res/diffusion.json" ;;
  costs)
    run 100 python3 benchmarks/autodeco.py --device cuda --skip-decode --models smollm2-135m,tinyllama-1.1b \
      --out "$res/autodeco_train.json"
    run 170 python3 benchmarks/tnot.py --device cuda --models smollm2-135m --paths static --prompt-lens 4096 \
      --times 3 --srgen-times 3 --skip-memory --skip-prompt-stage --deadline-s 150 --out "$res/tnot_static.json"
    run 90 python3 benchmarks/tnot.py --device cuda --models smollm2-135m --retry-cost --paths dynamic \
      --retries 0,2,4 --skip-overhead --skip-memory --skip-prompt-stage --deadline-s 75 --out "$res/tnot_retry.json"
    run 70 python3 benchmarks/tinylora.py step-time --device cuda --models smollm2-135m,llama3.2-1b --repeats 5 \
      --out "$res/tinylora"
    run 110 python3 benchmarks/head_gates.py throughput --device cuda --models llama3.2-3b-mha,llama3.2-3b \
      --repeats 3 --out "$res/head_gates" ;;
  costs2)
    run 230 python3 benchmarks/tinylora.py step-time --device cuda --models smollm2-135m --repeats 3 \
      --out "$res/tinylora"
    run 170 python3 benchmarks/head_gates.py throughput --device cuda --models llama3.2-3b --repeats 3 \
      --out "$res/head_gates" ;;
  ttt-full)  # the full-attention row of ttt's quality part (on 2026-12-01 it outran that part's limit)
    run 150 python3 benchmarks/ttt.py --device cuda --part quality --models full --out "$res/ttt" ;;
  autodeco-train)  # costs' first row again, now with the torch.compile'd variants (their first steps compile)
    run 420 python3 benchmarks/autodeco.py --device cuda --skip-decode --models smollm2-135m,tinyllama-1.1b \
      --out "$res/autodeco_train.json" ;;
  strategies)  # world size 1 on the one GPU: wrapping, precision, clipping, checkpoints (no scaling)
    run 560 python3 benchmarks/strategies.py --out "$res/strategies" ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
tar -czf "$OUT/$part.tar.gz" -C /tmp/results "$part"
ls -la "$res" | tee -a "$log"
