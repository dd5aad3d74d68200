#!/usr/bin/env bash
# TTT-E2E's GPU figures (benchmarks/ttt.py) in device calls back to back. The machine stays warm
# 30 s after a call and keeps /tmp (installed wheels, the compiler's cache) while warm; jobs
# started with setsid outlive a call while it is held.
#   call 1, carry [".whl"]:  bash benchmarks/gpu_ttt.sh start     # install; the quality miniature in the
#                                                                  # background while the fast path is checked
#                                                                  # against the plain one; then every timing
#   calls 2, 3 ...:          bash benchmarks/gpu_ttt.sh collect   # waits, returns what has finished
# Each call returns after WAIT seconds (default 540, counted from its start) or when every job is
# done, with $OUT/ttt-gpu.tar.gz (every JSON,
# table, figure and log so far) and $OUT/ttt-gpu.log (each job's state and the end of its log).
# The wheels: ../shared/device/wheels.sh transformers==5.24.0 (see benchmarks/gpu_session.sh).
set -uo pipefail
part=${1:?usage: gpu_ttt.sh start|collect}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TESTTIME_CACHE=/tmp/testtime-cache \
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/inductor/triton
res=/tmp/ttt-results
jobs=/tmp/ttt-jobs
wait_s=${WAIT:-540}
bench=${BENCH:-python3 benchmarks/ttt.py --device cuda}  # BENCH: a CPU dry run of this script

job() {  # job NAME LIMIT_SECONDS ARGS...: one measurement in its own process, its own time limit
  local name=$1 limit=$2; shift 2
  echo "running" > "$jobs/$name.state"
  timeout --kill-after=10 "$limit" $bench "$@" --out "$res/$name" > "$res/$name.log" 2>&1
  echo "rc=$? after $SECONDS s" > "$jobs/$name.state"
  # a killed job's compiler workers would slow the next job's timings (not while two jobs share the machine)
  [ -n "${KEEP_WORKERS:-}" ] || pkill -f compile_worker 2>/dev/null
  true
}

report() {
  for f in "$jobs"/*.state; do
    [ -e "$f" ] || continue
    echo "== $(basename "$f" .state): $(cat "$f")"
    tail -n 25 "$res/$(basename "$f" .state).log" 2>/dev/null
  done > "$OUT/ttt-gpu.log"
  tar -czf "$OUT/ttt-gpu.tar.gz" -C /tmp ttt-results
  cat "$OUT/ttt-gpu.log"
}

wait_jobs() {  # until every job is done or this call has run WAIT seconds
  while [ ! -e "$jobs/all.done" ] && [ "$SECONDS" -lt "$wait_s" ]; do sleep 10; done
}

case $part in
  start)
    [ -n "${BENCH:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
    rm -rf "$res" "$jobs"
    mkdir -p "$res" "$jobs"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
    # the quality miniature trains beside the check (neither is a timing); every timing runs after both
    setsid nohup bash -c "source benchmarks/gpu_ttt.sh jobs-only; KEEP_WORKERS=1 job quality ${QUALITY_S:-500} --part quality;
      touch $jobs/quality.done" > /tmp/ttt-quality.out 2>&1 < /dev/null &
    KEEP_WORKERS=1 job check 360 --part speed --sections check  # exit 1 if a fast path failed or differs: the rest runs anyway
    setsid nohup bash -c "
      source benchmarks/gpu_ttt.sh jobs-only
      while [ ! -e $jobs/quality.done ]; do sleep 5; done
      job prefill 360 --part speed --sections prefill,profile
      job train 200 --part speed --sections train
      job decode 200 --part speed --sections decode --repeats 2
      touch $jobs/all.done" > /tmp/ttt-jobs.out 2>&1 < /dev/null &
    wait_jobs
    report ;;
  collect)
    wait_jobs
    report ;;
  jobs-only) ;;  # sourced by the background shell for `job`
  *) echo "unknown part $part"; exit 2 ;;
esac
