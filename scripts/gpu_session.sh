#!/usr/bin/env bash
# One GPU session on a lent host (Python 3.12 + torch 2.11 cu130 + transformers/peft/accelerate, no network):
# installs the pinned wheelhouse (.whl/, from ../shared/tools/gpu-wheelhouse.sh), then runs the named phases
# and prints a summary table last. Logs go to $OUT (or /tmp/gpu-out). The Qwen2-7B folder, when a phase needs it, is
# built while the wheelhouse installs; a follow-up call on the same warm machine skips both.
#
#   scripts/gpu_session.sh tests probe bench05 bench7 refuse
#
# Phases: env (versions, nvidia-smi) · tests (make test-gpu) · probe (memory at several micro-batches,
# 0.5B) · bench05, bench7-4bit, bench7-bf16, bench7-bf16-fixed (bench/run.py tables on the Qwen2-0.5B /
# Qwen2-7B shapes, split to fit 10-minute calls) · refuse (7B 16-bit with a far too large micro-batch on a
# partly filled card: exit 3 + a suggestion that fits) · bench7-4bit-parity (4-bit loss parity: the job, the
# baseline with and without PEFT's float32 upcast, the job's hf backend; 12 steps) · importtime, importprof ·
# e2e (bench/e2e.py: the code preset end to end, job vs plain TRL vs OpenWeights-style; needs .owjob/, the
# openweights 0.14.0 wheel's jobs/unsloth folder) · survey (job variants and the OpenWeights path, 10 steps) ·
# survey4 (the job on a 4-bit base, padding-free and padded, 10 steps: unpacked 4-bit peaks beside the estimate) ·
# survey05 (the same code run on the Qwen2-0.5B shape, 10 steps: unsloth padding-free and padded, 4-bit, hf padded
# and padding-free; the unpacked short-row peaks of the small model, none recorded yet) ·
# model7 (build the Qwen2-7B shape's folder only) · sweep7 (bench/sweep.py: the 24-line code grid through
# `python -m app sweep` on one GPU, then standalone runs of 3 of its lines while the 10-minute call lasts) ·
# sweep7-alone (the 3 standalone runs only, compared with the sweep7 of an earlier call on the same machine) ·
# sweep7-bg (the 24-line grid in a session of its own, waited for until DEADLINE; it runs on after the call) ·
# sweep7-wait (the next call, within 30 s of the last: waits for it, then its table) ·
# varlen (padding-free attention, app/attention.py: the kernel against per-row SDPA, padded vs padding-free loss
# under hf and unsloth, packed vs unpacked under unsloth; varlen-unsloth: unsloth's test alone) · sweep-gpu (a 2-line
# sweep on one GPU through its worker process against standalone twins: tests/test_gpu.py, about 2 min) · e2e-pf (the job padding-free, its default with the
# varlen kernel, then padded) · e2e-hf (e2e with the
# hf backend's row first, page cache warm: job-hf, job, ow, plain within E2E_S seconds) · e2e3 (job, plain, ow,
# page cache dropped unless E2E_DROP=0, within E2E_S seconds) · profile (bench/profile.py: the grid's first lines phase by phase,
# line 1 under cProfile and torch's profiler). DEADLINE=S ends the tests and sweep phases S seconds after the start.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"
started=$(date +%s)
note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - started)); }
MODELS=${MODELS:-/tmp/models}  # MODELS=/dev/shm/models: written at memory speed (not for rows that drop the page cache)
mkdir -p "$MODELS"

# The Qwen2-7B folder (about 35 s) needs only the host's torch and transformers: it is built while the wheelhouse
# installs, when a phase below will use it. model() waits for it.
BUILD7=
for phase in "$@"; do
  case "$phase" in survey05 | sweep7-wait) ;; sweep7* | e2e* | survey* | profile | model7 | bench7* | refuse) BUILD7=1 ;; esac
done
if [ -n "$BUILD7" ] && [ ! -f "$MODELS/qwen2-7b-chatml-bfloat16/devmodel.json" ]; then
  PYTHONPATH=$PWD python3 -m app.devmodel --out "$MODELS/qwen2-7b-chatml-bfloat16" --shape qwen2-7b --device cuda \
    --dtype bfloat16 >/dev/null 2>>"$OUT/devmodel.log" &
  BUILD7=$!
else
  BUILD7=
fi

if [ -d .whl ]; then
  # A follow-up call on the same warm machine finds the same wheels installed and skips this (about 25 s).
  wheels=$(ls .whl/*.whl | md5sum | cut -d' ' -f1)
  if [ "$(cat /tmp/site/.wheels 2>/dev/null)" != "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
    # Bytecode once, as the image's pip install writes it: no run below pays for compiling unsloth/TRL on import.
    python3 -m compileall -q -j 0 /tmp/site >/dev/null 2>&1
    echo "$wheels" >/tmp/site/.wheels
  fi
fi
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache TRITON_CACHE_DIR=/tmp/triton_cache \
  TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor_cache
TEST_ARGS=()
[ -n "${TESTS_K:-}" ] && TEST_ARGS=(-k "$TESTS_K")

model() {  # model SHAPE -> path (built once, on the GPU, saved in bf16; the folder bench/run.py uses too)
  if [ "$1" = qwen2-7b ] && [ -n "$BUILD7" ]; then
    wait "$BUILD7"
    BUILD7=
  fi
  python3 -m app.devmodel --out "$MODELS/$1-chatml-bfloat16" --shape "$1" --device cuda --dtype bfloat16 \
    2>>"$OUT/devmodel.log" | tail -1
}

phase_env() {
  { date -u; nvidia-smi; python3 - <<'EOF'
import importlib.metadata as m
for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "unsloth_zoo", "bitsandbytes",
          "torchao", "cut_cross_entropy", "pydantic", "pydantic-settings", "nvidia-ml-py", "matplotlib",
          "tensorboard", "tokenizers", "huggingface_hub", "safetensors", "triton", "numpy"):
    try:
        print(f"{p}=={m.version(p)}")
    except m.PackageNotFoundError:
        print(f"{p}: not installed")
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0))
import pathlib, transformers
root = pathlib.Path(transformers.__file__).parent
print("transformers bytecode:", len(list(root.rglob("*.pyc"))), "pyc for", len(list(root.rglob("*.py"))), "py")
EOF
  } >"$OUT/env.txt" 2>&1
  note "env: $(grep -E '^(torch|unsloth|trl)==' "$OUT/env.txt" | tr '\n' ' ') ($(elapsed) s)"
}

phase_tests() {  # phase_tests [PYTEST-ARGS...]: all GPU tests, or a selection (-k ...)
  local limit=${TESTS_TIMEOUT:-420}
  # DEADLINE: seconds from the session's start by which the tests must end (what the call has left)
  [ -n "${DEADLINE:-}" ] && limit=$((DEADLINE - $(elapsed)))
  if [ "$limit" -lt 40 ]; then note "tests: skipped, ${limit} s left"; return; fi
  timeout "$limit" python3 -m pytest -q -m gpu -rs -s --durations=20 tests/test_gpu.py \
    --junitxml="$OUT/gpu-tests.xml" \
    "${TEST_ARGS[@]}" >"$OUT/gpu-tests.log" 2>&1
  note "tests: exit $? :: $(tail -1 "$OUT/gpu-tests.log") ($(elapsed) s)"
  grep -E "estimate|unsloth loss|startup|PASSED|FAILED|ERROR|^[0-9.]+s (call|setup)" "$OUT/gpu-tests.log" | head -40 >>"$SUMMARY"
}

phase_probe() {
  local m
  m=$(model qwen2-0.5b)
  for mode in bf16 4bit; do
    timeout 150 python3 scripts/gpu_memory_probe.py --model "$m" --mode "$mode" --checkpointing off \
      --batches 1,2,4 >>"$OUT/probe.log" 2>&1
  done
  timeout 150 python3 scripts/gpu_memory_probe.py --model "$m" --mode bf16 --checkpointing on --batches 1,2,4 \
    >>"$OUT/probe.log" 2>&1
  probe_table probe
}

probe_table() {  # probe_table NAME: NAME.log's PROBE lines -> NAME.jsonl, and a markdown table in the summary
  grep '^PROBE' "$OUT/$1.log" | sed 's/^PROBE //' >"$OUT/$1.jsonl"
  note "$1: $(wc -l <"$OUT/$1.jsonl") measurements ($(elapsed) s)"
  python3 - "$OUT/$1.jsonl" <<'EOF' | tee -a "$SUMMARY"
import json, sys
print("| model | backend | mode | ckpt | micro-batch | after load GiB | measured GiB | estimate GiB | error |")
print("|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    err = (r["estimate_gb"] - r["measured_peak_gb"]) / r["measured_peak_gb"]
    print(f"| {r['model']} | {r['backend']} | {r['mode']} | {r['checkpointing']} | {r['micro_batch']} | "
          f"{r['after_load_gb']:.2f} | {r['measured_peak_gb']:.2f} | {r['estimate_gb']:.2f} | {err:+.0%} |")
EOF
}

phase_bench() {  # phase_bench NAME SHAPE SECONDS BENCH-ARGS...: one bench/run.py table
  local name=$1 shape=$2 limit=$3 t0=$SECONDS
  shift 3
  [ "$shape" = qwen2-7b ] && model "$shape" >/dev/null  # the folder built in the background: waited for
  limit=$((limit - (SECONDS - t0)))
  timeout $((limit + 30)) python3 -m bench.run --out "$OUT/$name" --shapes "$shape" --models-dir "$MODELS" \
    --budget "$limit" "$@" >"$OUT/$name.log" 2>&1
  note "bench $name: exit $? ($(elapsed) s)"
  [ -f "$OUT/$name/table.md" ] && cat "$OUT/$name/table.md" >>"$SUMMARY"
  # Only 8 files come back from $OUT: keep the table, pack the rest.
  tar -czf "$OUT/$name.tgz" -C "$OUT" "$name" "$name.log" 2>/dev/null && rm -rf "${OUT:?}/$name" "$OUT/$name.log"
}

phase_refuse() {
  local m
  m=$(model qwen2-7b)
  # Fill 60 GiB of the card from another process, then ask for a 16-bit 7B run with a far too large
  # micro-batch (64 x 4096 tokens): the job must refuse before loading weights and name a setting that fits.
  python3 -c "import torch, time; x = torch.empty(60 * 2**30, dtype=torch.uint8, device='cuda'); time.sleep(900)" &
  local filler=$!
  sleep 10
  local env=(FT_MODEL="$m" FT_TRAINING_FILE=data/sample/train.jsonl FT_OUTPUT_DIR=/tmp/refuse FT_PACKING=true
    FT_MAX_SEQ_LENGTH=4096 FT_PER_DEVICE_TRAIN_BATCH_SIZE=64 FT_GRADIENT_ACCUMULATION_STEPS=1 FT_MAX_STEPS=1)
  local t0=$SECONDS
  env "${env[@]}" timeout 120 python3 -m app train >"$OUT/refuse.log" 2>&1
  local code=$?
  local message
  message=$(python3 -c "import json; print(json.load(open('/tmp/refuse/result.json'))['error']['message'])" 2>&1)
  note "refuse: exit $code after $((SECONDS - t0)) s; loaded weights: $(grep -c 'Loading weights\|Unsloth: Fast' "$OUT/refuse.log") :: $message"
  local batch
  batch=$(echo "$message" | grep -oE 'FT_PER_DEVICE_TRAIN_BATCH_SIZE=[0-9]+' | head -1 | cut -d= -f2)
  if [ -n "$batch" ]; then
    env "${env[@]}" FT_PER_DEVICE_TRAIN_BATCH_SIZE="$batch" FT_OUTPUT_DIR=/tmp/refuse-ok timeout 200 \
      python3 -m app train >"$OUT/refuse-ok.log" 2>&1
    note "refuse: the suggested FT_PER_DEVICE_TRAIN_BATCH_SIZE=$batch with 60 GiB taken: exit $? :: $(python3 -c "import json; r = json.load(open('/tmp/refuse-ok/result.json')); o = r['outputs']; print(r['status'], 'free', r['gpu']['memory_free_gb'], 'estimate', r['gpu']['estimated_peak_gb'], 'measured', o.get('peak_gpu_memory_gb'), 'ckpt', o.get('gradient_checkpointing'))" 2>&1)"
  fi
  kill "$filler" 2>/dev/null
  wait "$filler" 2>/dev/null
}

phase_probe_hf() {  # the hf backend's peaks (its Profile), 0.5B at 1/2/4 and 7B at 1/2, bf16 and 4-bit
  local m05 m7 mode ckpt
  m05=$(model qwen2-0.5b)
  for mode in bf16 4bit; do
    for ckpt in off on; do
      timeout 120 python3 scripts/gpu_memory_probe.py --backend hf --model "$m05" --mode "$mode" \
        --checkpointing "$ckpt" --batches 1,2,4 >>"$OUT/probe-hf.log" 2>&1
    done
  done
  m7=$(model qwen2-7b)
  timeout 120 python3 scripts/gpu_memory_probe.py --backend hf --model "$m7" --mode 4bit --checkpointing off \
    --batches 1,2 >>"$OUT/probe-hf.log" 2>&1
  timeout 120 python3 scripts/gpu_memory_probe.py --backend hf --model "$m7" --mode 4bit --checkpointing on \
    --batches 2,4 >>"$OUT/probe-hf.log" 2>&1
  timeout 120 python3 scripts/gpu_memory_probe.py --backend hf --model "$m7" --mode bf16 --checkpointing off \
    --batches 1,2 >>"$OUT/probe-hf.log" 2>&1
  probe_table probe-hf
}

phase_sweep() {  # phase_sweep NAME SHAPE SECONDS BENCH-ARGS...: the sweep row (bench/sweep.py) within SECONDS
  local name=$1 shape=$2 limit=$3 t0=$SECONDS
  shift 3
  model "$shape" >/dev/null  # built once (bench/run.py's folder); its time comes off the budget
  local budget=$((limit - (SECONDS - t0)))
  # DEADLINE: seconds from the session's start by which the sweep must have ended, its 30 s of grace included
  [ -n "${DEADLINE:-}" ] && [ $((DEADLINE - $(elapsed) - 30)) -lt "$budget" ] && budget=$((DEADLINE - $(elapsed) - 30))
  note "sweep $name: compile caches at its start: Triton $(du -sh "$TRITON_CACHE_DIR" 2>/dev/null | cut -f1) \
$(find "$TRITON_CACHE_DIR" -name '*.json' 2>/dev/null | wc -l) files, Inductor $(du -sh "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null | cut -f1)"
  # /tmp/$name stays on the machine: sweep7-alone compares its standalone runs with this sweep's adapters.
  timeout $((budget + 30)) python3 -m bench.sweep --out "/tmp/$name" --shape "$shape" --models-dir "$MODELS" \
    --budget "$budget" "$@" >"$OUT/$name.log" 2>&1
  note "sweep $name: exit $? ($(elapsed) s)"
  [ -f "/tmp/$name/table.md" ] && cat "/tmp/$name/table.md" >>"$SUMMARY"
  cp "/tmp/$name/sweep-bench.json" "$OUT/$name.json" 2>/dev/null
  # Only 8 files come back from $OUT: the sweep's summary, plot and logs in one archive.
  tar -czf "$OUT/$name.tgz" -C /tmp "$name/grid.jsonl" "$name/logs" $(cd /tmp && ls -d "$name"/sweep/sweep.* \
    "$name"/*/ftjob-*/result.json "$name"/*/ftjob-*/metrics.jsonl 2>/dev/null) 2>/dev/null
}

# A grid longer than one call (the 24-line code grid needs about 600 s on an H100, a call at most 600): started in a
# session of its own (setsid), which the lent machine lets run on after the call returns while it stays warm (a
# next call within its 30 s of idle keeps it), then waited for by the next call. The sweep's own wall time is
# sweep.json's, whichever call it ends in.
phase_sweep_bg() {  # phase_sweep_bg NAME SHAPE BENCH-ARGS...: start the sweep row in the background, then wait
  local name=$1 shape=$2
  shift 2
  model "$shape" >/dev/null
  rm -rf "/tmp/$name" "/tmp/$name.done"
  note "sweep $name (background): compile caches at its start: Triton $(du -sh "$TRITON_CACHE_DIR" 2>/dev/null | cut -f1) \
$(find "$TRITON_CACHE_DIR" -name '*.json' 2>/dev/null | wc -l) files, Inductor $(du -sh "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null | cut -f1)"
  setsid bash -c 'timeout 1700 python3 -m bench.sweep --out "$0" --shape "$1" --models-dir "$2" --budget 1600 \
    "${@:4}" >"$3" 2>&1; echo $? >"$0.done"' "/tmp/$name" "$shape" "$MODELS" "/tmp/$name.log" "$@" </dev/null \
    >/dev/null 2>&1 &  # not the call's stdout: a pipe held open by it kept the first call (2026-12-08) to its limit
  note "sweep $name: started in the background at $(elapsed) s"
  phase_sweep_wait "$name"
}

phase_sweep_wait() {  # phase_sweep_wait NAME: wait for a background sweep until DEADLINE; its table, or how far it is
  local name=$1 until=$((${DEADLINE:-590} - 10))
  while [ ! -f "/tmp/$name.done" ] && [ "$(elapsed)" -lt "$until" ]; do sleep 2; done
  cp "/tmp/$name.log" "$OUT/$name.log" 2>/dev/null
  if [ ! -f "/tmp/$name.done" ]; then
    note "sweep $name: still running at $(elapsed) s: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
print(d['counts'], 'wall_s', d['wall_s'])" "/tmp/$name/sweep/sweep.json" 2>/dev/null). Next call, at once: \
scripts/gpu_session.sh $name-wait"
    return
  fi
  note "sweep $name: exit $(cat "/tmp/$name.done") ($(elapsed) s)"
  [ -f "/tmp/$name/table.md" ] && cat "/tmp/$name/table.md" >>"$SUMMARY"
  cp "/tmp/$name/sweep-bench.json" "$OUT/$name.json" 2>/dev/null
  tar -czf "$OUT/$name.tgz" -C /tmp "$name/grid.jsonl" "$name/logs" $(cd /tmp && ls -d "$name"/sweep/sweep.* \
    "$name"/*/ftjob-*/result.json "$name"/*/ftjob-*/metrics.jsonl 2>/dev/null) 2>/dev/null
}

phase_profile() {  # bench/profile.py: the first PROFILE_LINES lines of the code grid, phase by phase; line 1 profiled
  local m
  m=$(model qwen2-7b)
  timeout "${PROFILE_S:-300}" python3 -m bench.profile --out /tmp/profile --model "$m" --lines "${PROFILE_LINES:-3}" \
    >"$OUT/profile.log" 2>&1
  note "profile: exit $? ($(elapsed) s)"
  sed -n '1,12p' /tmp/profile/profile.md >>"$SUMMARY" 2>/dev/null
  cp /tmp/profile/profile.md "$OUT/" 2>/dev/null
  tar -czf "$OUT/profile.tgz" -C /tmp profile/profile.json profile/grid.jsonl -C "$OUT" profile.log 2>/dev/null \
    && rm -f "$OUT/profile.log"
}

phase_importprof() {  # where `import unsloth` spends its time, by function (cumulative)
  python3 -c "import cProfile, pstats; cProfile.run('import unsloth', '/tmp/import.prof'); \
pstats.Stats('/tmp/import.prof').sort_stats('cumulative').print_stats(80)" >"$OUT/importprof.txt" 2>&1
  note "import unsloth profile: $(grep -m1 'function calls' "$OUT/importprof.txt")"
}

phase_ttfs() {  # time to first step across a sweep: the same 0.5B job 3 times, kernel caches kept as in the image
  local m i dir
  m=$(model qwen2-0.5b)
  rm -rf /tmp/ttfs
  for i in 1 2 3; do
    dir=/tmp/ttfs/out$i
    # Runs 1-2: Triton/Inductor caches persist (the image's /cache volume), unsloth's generated modules do not
    # (per-container /tmp). Run 3 also keeps unsloth's modules from run 2.
    env TRITON_CACHE_DIR=/tmp/ttfs/triton TORCHINDUCTOR_CACHE_DIR=/tmp/ttfs/inductor \
      UNSLOTH_COMPILE_LOCATION=/tmp/ttfs/unsloth$([ "$i" = 3 ] && echo 2 || echo "$i") \
      FT_MODEL="$m" FT_TRAINING_FILE=data/sample/train.jsonl FT_OUTPUT_DIR="$dir" FT_PACKING=true \
      FT_MAX_SEQ_LENGTH=2048 FT_MAX_STEPS=3 timeout 240 python3 -m app train >"$OUT/ttfs-$i.log" 2>&1
    note "ttfs run $i: exit $? :: $(python3 -c "import json, glob; o = json.load(open(glob.glob('$dir/result.json')[0]))['outputs']; print('startup', o.get('startup_s'), 'first step', o.get('time_to_first_step_s'))" 2>&1)"
  done
}

phase_e2e() {  # phase_e2e NAME SECONDS E2E-ARGS...: bench/e2e.py on the Qwen2-7B shape (E2E_SHAPE=...: another)
  local name=$1 limit=$2 t0=$SECONDS shape=${E2E_SHAPE:-qwen2-7b}
  shift 2
  [ "$shape" = qwen2-7b ] && model qwen2-7b >/dev/null  # built in the background: waited for (not built twice)
  limit=$((limit - (SECONDS - t0)))
  timeout $((limit + 30)) python3 -m bench.e2e --out "$OUT/$name" --shape "$shape" --models-dir "$MODELS" \
    --ow-dir .owjob --budget "$limit" "$@" >"$OUT/$name.log" 2>&1
  note "e2e $name: exit $? ($(elapsed) s)"
  [ -f "$OUT/$name/table.md" ] && cat "$OUT/$name/table.md" >>"$SUMMARY"
  python3 - "$OUT/$name/results.json" <<'EOF' >>"$SUMMARY" 2>&1
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(r["path"], "startup", r.get("startup_s"), "mb", r.get("micro_batch"), "adjust", r.get("adjustments"),
          "err", (r.get("error") or "")[-600:])
EOF
  # E2E_KEEP_CACHES=1: the `job` row's Triton/Inductor caches become the session's (as the image's /cache volume keeps
  # them from one run to the next), for the phases after this one; the sweeps note the state they start with.
  if [ "${E2E_KEEP_CACHES:-0}" = 1 ] && [ -d "$OUT/$name/caches/job/triton" ]; then
    mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
    cp -a "$OUT/$name/caches/job/triton/." "$TRITON_CACHE_DIR/"
    cp -a "$OUT/$name/caches/job/inductor/." "$TORCHINDUCTOR_CACHE_DIR/" 2>/dev/null
    note "e2e $name: the job row's compile caches kept for the next phases"
  fi
  # The runs' compile caches and adapters stay behind: with them the archive passed 16 MiB and did not come back.
  tar -czf "$OUT/$name.tgz" --exclude="$name/caches" --exclude="*.safetensors" -C "$OUT" "$name" "$name.log" \
    2>/dev/null && rm -rf "${OUT:?}/$name" "$OUT/$name.log"
}

phase_importtime() {
  python3 -X importtime -c "import unsloth" 2>"$OUT/importtime.txt" >/dev/null
  note "import unsloth, top cumulative (us):"
  grep 'import time:' "$OUT/importtime.txt" | awk -F'|' 'NR>1 {gsub(/ /,"",$2); print $2 "|" $3}' | sort -t'|' -k1 -nr \
    | head -25 | tee -a "$SUMMARY"
}

for phase in "$@"; do
  case "$phase" in
    env) phase_env ;;
    tests) phase_tests ;;
    probe) phase_probe ;;
    bench05) phase_bench bench-0.5b qwen2-0.5b 240 --modes bf16,4bit --paths job,baseline,job-fixed \
      --warmup 2 --steps 4 --micro-batch 2 --accum 2 ;;
    bench7-4bit) phase_bench bench-7b-4bit qwen2-7b 320 --modes 4bit --paths job,baseline,job-fixed \
      --warmup 2 --steps 3 --micro-batch 2 --accum 2 ;;
    bench7-bf16) phase_bench bench-7b-bf16 qwen2-7b 225 --modes bf16 --paths job,baseline \
      --warmup 2 --steps 3 --micro-batch 2 --accum 2 --no-peak ;;
    bench7-bf16-fixed) phase_bench bench-7b-bf16-fixed qwen2-7b 150 --modes bf16 --paths job-fixed \
      --warmup 2 --steps 3 --micro-batch 2 --accum 2 --no-peak ;;
    bench7-bf16-long) phase_bench bench-7b-bf16-long qwen2-7b 270 --modes bf16 --paths job,baseline \
      --warmup 4 --steps 8 --micro-batch 2 --accum 4 ;;
    bench7-4bit-ckpt) phase_bench bench-7b-4bit-ckpt qwen2-7b 100 --modes 4bit --paths job-fixed \
      --warmup 2 --steps 3 --micro-batch 2 --accum 2 --no-peak --job-checkpointing true ;;
    bench7-4bit-seed1) phase_bench bench-7b-4bit-seed1 qwen2-7b 150 --modes 4bit --paths job,baseline \
      --warmup 2 --steps 3 --micro-batch 2 --accum 2 --no-peak --seed 1 ;;
    bench7-4bit-parity) phase_bench bench-7b-4bit-parity qwen2-7b 470 --modes 4bit \
      --paths job,baseline-noupcast,baseline,job-hf --warmup 4 --steps 8 --micro-batch 2 --accum 4 --no-peak ;;
    bench7-hf) phase_bench bench-7b-4bit-hf qwen2-7b 330 --modes 4bit --paths job-hf,baseline \
      --warmup 4 --steps 8 --micro-batch 2 --accum 4 --no-peak ;;
    bench7-bf16-mb2) phase_bench bench-7b-bf16-mb2 qwen2-7b 120 --modes bf16 --paths job-fixed \
      --warmup 2 --steps 3 --micro-batch 2 --accum 2 --no-peak ;;
    bench7-4bit-parity-seed1) phase_bench bench-7b-4bit-parity-seed1 qwen2-7b 420 --modes 4bit \
      --paths job,baseline-noupcast,baseline --warmup 4 --steps 8 --micro-batch 2 --accum 4 --no-peak --seed 1 ;;
    bench7-4bit-accept) phase_bench bench-7b-4bit-accept qwen2-7b 440 --modes 4bit \
      --paths job,job-ckpt,baseline,baseline-noupcast --warmup 4 --steps 8 --micro-batch 2 --accum 4 --no-peak ;;
    model7) model qwen2-7b >/dev/null; note "model qwen2-7b: built in $MODELS ($(elapsed) s)" ;;
    sweep7) phase_sweep sweep7 qwen2-7b "${SWEEP_S:-570}" --prompts 6 --seeds 4 --standalone "${SWEEP_ALONE:-3}" \
      ${SWEEP_SET:+--set "$SWEEP_SET"} ;;
    sweep7-alone) phase_sweep sweep7 qwen2-7b 570 --prompts 6 --seeds 4 --standalone 3 --skip-sweep ;;
    sweep7-bg) phase_sweep_bg sweep7 qwen2-7b --prompts 6 --seeds 4 --standalone 0 ${SWEEP_SET:+--set "$SWEEP_SET"} ;;
    sweep7-wait) phase_sweep_wait sweep7 ;;
    refuse) phase_refuse ;;
    survey) phase_e2e survey 300 --paths job,job-padfree,job-ckpt,ow --max-steps 10 ;;
    survey4) phase_e2e survey4 "${E2E_S:-240}" --paths job-4bit,job-4bit-padded --max-steps 10 ;;
    survey05) E2E_SHAPE=qwen2-0.5b phase_e2e survey05 "${E2E_S:-200}" \
      --paths job,job-padded,job-4bit,job-hf,job-hf-pf --max-steps 10 ;;
    e2e) phase_e2e e2e 540 --paths job,job-warm,plain,ow --drop-caches ;;
    varlen) TEST_ARGS=(-k "varlen or padding_free or packed_loss"); phase_tests ;;
    varlen-unsloth) TEST_ARGS=(-k "unsloth_padding_free"); phase_tests ;;
    sweep-gpu) TEST_ARGS=(-k "sweep_on_one_gpu"); phase_tests ;;
    profile) phase_profile ;;
    e2e3) phase_e2e e2e "${E2E_S:-$((${DEADLINE:-600} - $(elapsed) - 15))}" --paths "${E2E_PATHS:-job,plain,ow}" \
      $([ "${E2E_DROP:-1}" = 1 ] && echo --drop-caches) ;;
    e2e-pf) phase_e2e e2e-pf "${E2E_S:-330}" --paths job,job-padded --drop-caches ;;
    e2e-hf) phase_e2e e2e-hf "${E2E_S:-540}" --paths job-hf,job,ow,plain ;;
    importtime) phase_importtime ;;
    importprof) phase_importprof ;;
    ttfs) phase_ttfs ;;
    probe-hf) phase_probe_hf ;;
    bench05-bf16) phase_bench bench-0.5b-bf16 qwen2-0.5b 110 --modes bf16 --paths job,baseline \
      --warmup 2 --steps 6 --micro-batch 2 --accum 4 --no-peak ;;
    *) echo "unknown phase $phase" ;;
  esac
done
echo
echo "================ summary ($(elapsed) s) ================"
cat "$SUMMARY"
