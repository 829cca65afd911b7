"""Public entry points: `attention` (prefill/training), `attention_backward` (the backward from
a saved output and lse, for callers that merge partial results: ring attention),
`decode_attention`, `decode_attention_append` (a whole decode step's attention: cache write
included) and `mla_decode_attention` (generation).

`implementation` picks the backend:
  "xla"            the pure-jnp reference, compiled by XLA (any platform);
  "cudnn"          `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16);
                   with `return_lse` and in `attention_backward`, JAX's cuDNN primitives
                   directly (`flash_attention/cudnn_lse.py`; no segments/softcap/window);
  "pallas_triton"  Pallas kernels through the Triton lowering (GPU; interpret mode on CPU);
  "mosaic_tpu"     Pallas kernels through Mosaic TPU (TPU; TPU interpret mode on CPU);
  "mosaic_gpu"     the Hopper forward through Mosaic GPU (bf16/fp16; no segments, window or
                   softcap; GPU interpret mode on CPU); its gradient is cuDNN's backward
                   where that covers the call, else the Pallas-Triton one, or our Mosaic
                   GPU backward with `config=mosaic_gpu.Config(backward="mosaic_gpu")`
                   (or "mosaic_gpu_fused"); in `attention_backward`, always ours;
  "pallas"         the Pallas kernel for the platform (TPU: mosaic_tpu; Hopper GPUs:
                   mosaic_gpu where it covers the call, else pallas_triton; other GPUs and
                   CPU: pallas_triton, on CPU in interpret mode: slow, for tests);
  "auto"           the fastest correct choice for the platform and case (see `_auto_attention`).

What "auto" picks, and any fallback from the fused or kernel path, is logged once per distinct
(op, implementation, reason) on the "pallas_kernels" logger (`log_choice`); `CHOICES` holds each
op's latest choice, for benchmarks to report the path that ran.
"""

from __future__ import annotations

import logging
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention.reference import (append_to_cache,
                                                       decode_attention_reference,
                                                       mla_decode_reference, rms_scale_rows,
                                                       rope_rotate)
from pallas_kernels.flash_attention.reference import (attention_backward_reference,
                                                      attention_mask, attention_reference)

Implementation = Literal["auto", "pallas", "pallas_triton", "mosaic_tpu", "mosaic_gpu", "cudnn",
                         "xla"]
_ATTENTION_IMPLS = ("auto", "pallas", "pallas_triton", "mosaic_tpu", "mosaic_gpu", "cudnn", "xla")


logger = logging.getLogger("pallas_kernels")
_LOGGED: set[tuple[str, str, str]] = set()
# op -> (implementation, reason) of its latest dispatch (at trace time, as the logging is)
CHOICES: dict[str, tuple[str, str]] = {}


def log_choice(op: str, impl: str, reason: str, level: int = logging.INFO) -> str:
    """Record that `op` runs `impl` because of `reason` and log it, once per distinct
    (op, impl, reason) in the process ("mla_decode_attention: xla (no GPU or TPU: cpu)").
    level: WARNING for a fallback from a faster path the platform has.  Returns impl."""
    CHOICES[op] = (impl, reason)
    if (op, impl, reason) not in _LOGGED:
        _LOGGED.add((op, impl, reason))
        logger.log(level, "%s: %s (%s)", op, impl, reason)
    return impl


def _platform() -> str:
    return jax.devices()[0].platform


def _is_hopper() -> bool:
    """A compute-capability 9.x GPU: wgmma and TMA, what the Mosaic GPU kernel is written to."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def mosaic_gpu_covers(q: jax.Array, k: jax.Array, *, segment_ids=None, softcap=None,
                      sliding_window=None) -> bool:
    """Whether the Mosaic GPU forward takes this call (platform aside)."""
    from pallas_kernels.flash_attention import mosaic_gpu
    d = q.shape[-1]
    return (segment_ids is None and softcap is None and sliding_window is None
            and q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
            and d % 16 == 0 and mosaic_gpu.smem_bytes(d, mosaic_gpu.Config()) <=
            mosaic_gpu.SMEM_BYTES)


def _resolve_pallas(implementation: str, mosaic_gpu_ok: bool = False) -> str:
    if implementation != "pallas":
        return implementation
    if _platform() == "tpu":
        return "mosaic_tpu"
    return "mosaic_gpu" if mosaic_gpu_ok and _is_hopper() else "pallas_triton"


def _interpret(implementation: str, interpret: bool | None) -> bool:
    """Kernels run in interpret mode when asked, or when their platform is absent."""
    if interpret is not None:
        return interpret
    want = "tpu" if implementation == "mosaic_tpu" else "gpu"
    return _platform() != want


def _auto_attention(q: jax.Array, *, segment_ids, softcap, return_lse,
                    mosaic_gpu_ok: bool) -> str:
    """On Hopper, the Mosaic GPU kernel where it covers the case (measured at or above cuDNN's
    forward, see experiments/attention/NOTES.md); elsewhere on GPU cuDNN where it covers the
    case; our Pallas-Triton kernel for what cuDNN lacks or handles slowly (lse output, soft-cap,
    packed segments); Mosaic TPU on TPU; XLA on CPU.  With `return_lse` "auto" keeps a Pallas
    kernel: it differentiates through the lse, cuDNN's lse forward does not (ring attention,
    which owns its backward, picks cuDNN explicitly)."""
    platform = _platform()
    if platform == "tpu":
        return log_choice("attention", "mosaic_tpu", "TPU")
    if platform == "gpu":
        hopper = _is_hopper()
        if mosaic_gpu_ok and hopper:
            return log_choice("attention", "mosaic_gpu", "Hopper GPU; the Mosaic GPU kernel "
                                                         "covers the call")
        why = "Hopper GPU; the Mosaic GPU kernel does not cover the call; " if hopper else "GPU; "
        lacks = [what for what, hit in (("segment ids", segment_ids is not None),
                                        ("softcap", softcap is not None), ("an lse", return_lse),
                                        (f"{q.dtype} inputs",
                                         q.dtype not in (jnp.bfloat16, jnp.float16))) if hit]
        if not lacks:
            return log_choice("attention", "cudnn", why + "cuDNN covers the call")
        return log_choice("attention", "pallas_triton",
                          why + f"cuDNN's path lacks {', '.join(lacks)}")
    return log_choice("attention", "xla", f"no GPU or TPU: {platform}")


def _cudnn_attention(q, k, v, *, causal, segment_ids, kv_segment_ids, sliding_window, scale):
    t, s = q.shape[1], k.shape[1]
    mask = None
    if segment_ids is not None or (causal and t != s):
        # cuDNN's is_causal is top-left aligned; an explicit mask keeps the reference's
        # bottom-right alignment and expresses packed documents.
        mask = attention_mask(t, s, causal=causal, q_segment_ids=segment_ids,
                              kv_segment_ids=kv_segment_ids, sliding_window=sliding_window)
        mask = jnp.broadcast_to(mask[:, None], (q.shape[0], 1, t, s))
        causal, sliding_window = False, None
    window = None if sliding_window is None else (sliding_window, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                        local_window_size=window, implementation="cudnn")


def cudnn_lse_supported(q: jax.Array, k: jax.Array, *, causal: bool, segment_ids=None,
                        softcap=None, sliding_window=None) -> bool:
    """Whether the cuDNN lse forward / saved-lse backward cover this case (platform aside)."""
    return (segment_ids is None and softcap is None and sliding_window is None
            and q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
            and not (causal and q.shape[1] != k.shape[1]))


def _check_cudnn_lse(q, k, **kw) -> None:
    if not cudnn_lse_supported(q, k, **kw):
        raise ValueError("implementation='cudnn' with an lse (return_lse / attention_backward) "
                         "needs bf16/fp16 inputs, no segment ids, softcap or sliding window, and "
                         "q_len == kv_len when causal; use 'pallas' or 'xla'")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    implementation: Implementation = "auto",
    interpret: bool | None = None,
    config=None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention, q [B, T, H, D], k/v [B, S, K, D] -> [B, T, H, D] (and lse [B, H, T]).

    See `flash_attention.reference.attention_reference` for the exact semantics every
    implementation must reproduce.  `interpret` (kernels only) defaults to True off their
    platform; `config` passes an implementation's tile-size Config.
    """
    if implementation not in _ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} is unknown; choose one "
                         f"of {_ATTENTION_IMPLS}")
    mosaic_ok = mosaic_gpu_covers(q, k, segment_ids=segment_ids, softcap=softcap,
                                  sliding_window=sliding_window)
    if implementation == "auto":
        implementation = _auto_attention(q, segment_ids=segment_ids, softcap=softcap,
                                         return_lse=return_lse, mosaic_gpu_ok=mosaic_ok)
    implementation = _resolve_pallas(implementation, mosaic_ok)
    kwargs = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                  sliding_window=sliding_window, scale=scale, softcap=softcap,
                  return_lse=return_lse)
    if implementation == "xla":
        return attention_reference(q, k, v, **kwargs)
    if implementation == "cudnn":
        if softcap is not None:
            raise ValueError("implementation='cudnn' does not support softcap; use 'pallas' or "
                             "'xla'")
        if return_lse:
            _check_cudnn_lse(q, k, causal=causal, segment_ids=segment_ids, softcap=softcap,
                             sliding_window=sliding_window)
            from pallas_kernels.flash_attention import cudnn_lse
            return cudnn_lse.cudnn_attention_lse(q, k, v, causal=causal, scale=scale)
        return _cudnn_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
                                scale=scale)
    interp = _interpret(implementation, interpret)
    if implementation == "pallas_triton":
        from pallas_kernels.flash_attention import pallas_triton
        return pallas_triton.flash_attention(q, k, v, config=config, interpret=interp, **kwargs)
    if implementation == "mosaic_gpu":
        from pallas_kernels.flash_attention import mosaic_gpu
        return mosaic_gpu.flash_attention(q, k, v, config=config, interpret=interp, **kwargs)
    from pallas_kernels.flash_attention import mosaic_tpu
    return mosaic_tpu.flash_attention(q, k, v, config=config, interpret=interp, **kwargs)


def attention_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    softcap: float | None = None,
    implementation: Implementation = "auto",
    interpret: bool | None = None,
    config=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention backward from a saved output and lse (no lse cotangent).

    q, out, dout [B, T, H, D]; k, v [B, S, K, D]; lse [B, H, T] float32 (as `attention(...,
    return_lse=True)` returns) -> (dq [B, T, H, D], dk, dv [B, S, K, D]).  The gradients are
    float32 for "xla" and in the inputs' dtype for the kernels; accumulate them in float32.

    out/lse may belong to attention over a longer key sequence of which k/v is one block: the
    result is then this block's share of the gradient (ring attention sums the blocks).  See
    `flash_attention.reference.attention_backward_reference`.  "auto": cuDNN on GPU where it
    covers the case (`cudnn_lse_supported`), else the Pallas kernel; Mosaic on TPU; XLA on CPU.
    "mosaic_gpu" (and "pallas" on a Hopper GPU where it covers the call): our Hopper backward
    kernels, `mosaic_gpu.flash_attention_backward`.
    """
    if implementation not in _ATTENTION_IMPLS:
        raise ValueError(f"attention_backward implementation {implementation!r} is unknown; "
                         f"choose one of {_ATTENTION_IMPLS}")
    cudnn_ok = cudnn_lse_supported(q, k, causal=causal, segment_ids=segment_ids,
                                   softcap=softcap)
    if implementation == "auto":
        platform = _platform()
        if platform == "gpu":
            implementation = log_choice(
                "attention_backward",
                *(("cudnn", "GPU; cuDNN's saved-lse backward covers the call") if cudnn_ok else
                  ("pallas_triton", "GPU; cuDNN's saved-lse backward needs bf16/fp16, no "
                   "segment ids or softcap, q_len == kv_len when causal")))
        elif platform == "tpu":
            implementation = log_choice("attention_backward", "mosaic_tpu", "TPU")
        else:
            implementation = log_choice("attention_backward", "xla", f"no GPU or TPU: {platform}")
    mosaic_ok = kv_segment_ids is None and mosaic_gpu_covers(q, k, segment_ids=segment_ids,
                                                             softcap=softcap)
    if implementation == "mosaic_gpu" and not mosaic_ok:
        raise ValueError("attention_backward implementation='mosaic_gpu' takes bf16/fp16 q/k/v "
                         "without segment ids or softcap, head_dim a multiple of 16 (got "
                         f"{q.dtype}, head_dim {q.shape[-1]}, segment_ids "
                         f"{'set' if segment_ids is not None else 'none'}, softcap {softcap}); "
                         "use 'pallas_triton', 'cudnn' or 'xla'")
    implementation = _resolve_pallas(implementation, mosaic_ok)
    kwargs = dict(causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                  scale=scale, softcap=softcap)
    if implementation == "xla":
        return attention_backward_reference(q, k, v, out, lse, dout, **kwargs)
    if implementation == "cudnn":
        _check_cudnn_lse(q, k, causal=causal, segment_ids=segment_ids, softcap=softcap)
        from pallas_kernels.flash_attention import cudnn_lse
        return cudnn_lse.cudnn_attention_bwd(q, k, v, out, lse, dout, causal=causal,
                                             scale=scale)
    interp = _interpret(implementation, interpret)
    if implementation == "mosaic_gpu":
        from pallas_kernels.flash_attention import mosaic_gpu
        return mosaic_gpu.flash_attention_backward(q, k, v, out, lse, dout, causal=causal,
                                                   scale=scale, config=config, interpret=interp)
    if implementation == "pallas_triton":
        from pallas_kernels.flash_attention import pallas_triton
        return pallas_triton.flash_attention_backward(q, k, v, out, lse, dout, config=config,
                                                      interpret=interp, **kwargs)
    from pallas_kernels.flash_attention import mosaic_tpu
    return mosaic_tpu.flash_attention_backward(q, k, v, out, lse, dout, config=config,
                                               interpret=interp, **kwargs)


def _decode_implementation(implementation: str, op: str) -> str:
    """The decode kernels' backend for `implementation` (they have no cuDNN or Mosaic GPU one),
    recorded in CHOICES under `op` (an explicit one logged at DEBUG only)."""
    if implementation not in _ATTENTION_IMPLS or implementation in ("cudnn", "mosaic_gpu"):
        raise ValueError(f"{op} implementation {implementation!r} is unknown; "
                         "choose one of 'auto', 'pallas', 'pallas_triton', 'mosaic_tpu', 'xla'")
    if implementation == "auto":
        return _auto_decode(op)
    resolved = _resolve_pallas(implementation)
    return log_choice(op, resolved, f"asked for {implementation!r}", level=logging.DEBUG)


def _auto_decode(op: str) -> str:
    """The decode kernels' "auto": the platform's Pallas kernel, XLA without GPU or TPU."""
    platform = _platform()
    impl = {"gpu": "pallas_triton", "tpu": "mosaic_tpu"}.get(platform)
    if impl is None:
        return log_choice(op, "xla", f"no GPU or TPU: {platform}")
    return log_choice(op, impl, platform.upper())


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    implementation: Implementation = "auto",
    interpret: bool | None = None,
    config=None,
) -> jax.Array:
    """One query per sequence over its cache: q [B, H, D], caches [B, S, K, D], lengths [B].

    layer: the caches hold every layer, [L, B, S, K, D], and this layer's is attended to.  The
    kernels read it in place; `cache[layer]` as a kernel argument would cost a copy of the
    layer's cache per call."""
    implementation = _decode_implementation(implementation, "decode_attention")
    kwargs = dict(scale=scale, softcap=softcap, sliding_window=sliding_window)
    interp = _interpret(implementation, interpret)
    if implementation == "xla":
        if layer is not None:  # XLA fuses the slice into its consumer: no copy
            k_cache, v_cache = k_cache[layer], v_cache[layer]
        return decode_attention_reference(q, k_cache, v_cache, lengths, **kwargs)
    if implementation == "pallas_triton":
        from pallas_kernels.decode_attention import pallas_triton as impl
    else:
        from pallas_kernels.decode_attention import mosaic_tpu as impl
    return impl.decode_attention(q, k_cache, v_cache, lengths, layer=layer, config=config,
                                 interpret=interp, **kwargs)


# The Pallas-Triton decode step writes the new key and value in its attention kernel; False
# writes them with XLA first (four more small kernels per layer: the benchmarks' baseline).
FUSED_APPEND = True
# With a raw q (`q_heads`), the Pallas-Triton kernel also scales and rotates the queries as it
# reads them (one XLA kernel fewer per layer).  Off: at TP 4 on 4x H100 it made the ladder
# decode step slower, not faster (experiments/ladder/NOTES.md, session 9).
ROTATE_Q_IN_KERNEL = False


def decode_attention_append(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: jax.Array | int | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    implementation: Implementation = "auto",
    interpret: bool | None = None,
    config=None,
    k_head_offset: int = 0,
    v_head_offset: int = 0,
    rms: tuple[jax.Array, int, float] | None = None,
    q_heads: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention: the new token's key k_new [B, K, D] (rotated by
    rope = (cos, sin), each [B, D], when given) and value v_new are written at slot lengths[b]
    of the caches ([B, S, K, D], or layer `layer` of [L, B, S, K, D]), then q [B, H, D]
    (already rotated) attends to slots [0, lengths[b]].  Returns (out [B, H, D], k_cache,
    v_cache).  See `decode_append_reference`.

    k_head_offset, v_head_offset: the new keys (values) are heads [off, off + K) of k_new
    (v_new), K the caches' head count: both may be one fused q/k/v projection's output.
    rms (sum_sq [B], n, eps): k_new and v_new are first multiplied by
    rsqrt(sum_sq[b] / n + eps) (float32, rounded back to their dtype): an RMSNorm's factor
    applied after the projection (jaxturbo.inference.fused.fold_norms).
    q_heads: q is raw, the projection's output: its first q_heads heads are the queries, to be
    scaled (rms) and rotated (rope) like the key; q may then be the array k_new and v_new are
    read from.  Pallas-Triton does it in the kernel when ROTATE_Q_IN_KERNEL is on.

    Pallas-Triton does all of it in one kernel, the caches updated in place (head_dim twice a
    power of two); the other implementations write the caches with XLA, then attend."""
    kh = k_cache.shape[-2]
    for name, arr, off in (("k_new", k_new, k_head_offset), ("v_new", v_new, v_head_offset)):
        if off == 0 and arr.shape[1] != kh:  # without an offset the heads must match exactly
            raise ValueError(f"{name} has {arr.shape[1]} heads but the cache {kh}")
        if not 0 <= off <= arr.shape[1] - kh:
            raise ValueError(f"{name} has {arr.shape[1]} heads: no {kh} heads at offset {off}")
    if q_heads is not None and not 0 < q_heads <= q.shape[1]:
        raise ValueError(f"q_heads={q_heads}: q has {q.shape[1]} heads")
    implementation = _decode_implementation(implementation, "decode_attention_append")
    d = q.shape[-1]
    fused = implementation == "pallas_triton" and FUSED_APPEND and d % 2 == 0 and d & (d - 1) == 0
    if implementation == "pallas_triton" and not fused:
        log_choice("decode_attention_append", "pallas_triton, cache written by XLA",
                   f"head_dim {d} is not a power of two" if FUSED_APPEND else "FUSED_APPEND off",
                   level=logging.WARNING if FUSED_APPEND else logging.INFO)
    if fused:
        from pallas_kernels.decode_attention import pallas_triton
        if q_heads is not None and not ROTATE_Q_IN_KERNEL:
            q, q_heads = _prepare_query(q, q_heads, rope, rms), None
        return pallas_triton.decode_attention_append(
            q, k_new, v_new, k_cache, v_cache, lengths, layer=layer, rope=rope, scale=scale,
            softcap=softcap, sliding_window=sliding_window, config=config,
            interpret=_interpret(implementation, interpret), k_head_offset=k_head_offset,
            v_head_offset=v_head_offset, rms=rms, q_heads=q_heads)
    if q_heads is not None:
        q = _prepare_query(q, q_heads, rope, rms)
    k_new = k_new[:, k_head_offset:k_head_offset + kh]
    v_new = v_new[:, v_head_offset:v_head_offset + kh]
    k_cache, v_cache = append_to_cache(k_new, v_new, k_cache, v_cache, lengths, layer=layer,
                                       rope=rope, rms=rms)
    out = decode_attention(q, k_cache, v_cache, lengths + 1, layer=layer, scale=scale,
                           softcap=softcap, sliding_window=sliding_window,
                           implementation=implementation, interpret=interpret, config=config)
    return out, k_cache, v_cache


def _prepare_query(q: jax.Array, q_heads: int, rope, rms) -> jax.Array:
    """A raw q's queries as XLA makes them: the first q_heads heads, scaled, rotated."""
    q = q[:, :q_heads]
    if rms is not None:
        q = rms_scale_rows(q, rms)
    if rope is not None:
        q = rope_rotate(q, rope[0][:, None, :], rope[1][:, None, :])
    return q


def mla_decode_attention(
    q_latent: jax.Array,
    q_rope: jax.Array,
    latent_cache: jax.Array,
    rope_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    layer: jax.Array | int | None = None,
    implementation: Implementation = "auto",
    interpret: bool | None = None,
    config=None,
) -> jax.Array:
    """MLA decode with absorbed queries: q_latent [B, H, R], q_rope [B, H, Dr],
    latent_cache [B, S, R], rope_cache [B, S, Dr], lengths [B] -> latent output [B, H, R].

    layer: the caches hold every layer ([L, B, S, R], [L, B, S, Dr]); read in place as in
    `decode_attention`.  See `decode_attention.reference.mla_decode_reference`.  Every kernel
    takes any R and Dr (CARE conversions give ranks like 160 or 187): "auto" is the platform's
    kernel, XLA only without a GPU or TPU.
    """
    implementation = _decode_implementation(implementation, "mla_decode_attention")
    if implementation == "xla":
        if layer is not None:
            latent_cache, rope_cache = latent_cache[layer], rope_cache[layer]
        return mla_decode_reference(q_latent, q_rope, latent_cache, rope_cache, lengths,
                                    scale=scale)
    interp = _interpret(implementation, interpret)
    if implementation == "pallas_triton":
        from pallas_kernels.decode_attention import pallas_triton as impl
    else:
        from pallas_kernels.decode_attention import mosaic_tpu as impl
    return impl.mla_decode_attention(q_latent, q_rope, latent_cache, rope_cache, lengths,
                                     scale=scale, layer=layer, config=config, interpret=interp)
