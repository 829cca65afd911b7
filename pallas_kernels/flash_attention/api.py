"""`attention` (prefill, training) and `attention_backward` (the backward from a saved output and
lse, for callers that merge partial results: ring attention), dispatched by `registry`.

Backends, in "auto"'s order:
  "mosaic_gpu"     the Hopper forward through Mosaic GPU (bf16/fp16; no segments, window or
                   softcap; GPU interpret mode on CPU): at or above cuDNN's forward on an H100
                   (experiments/attention/RESULTS.md).  Its gradient is cuDNN's backward where
                   that covers the call, else the Pallas-Triton one, or our Mosaic GPU backward
                   with `config=mosaic_gpu.Config(backward="mosaic_gpu")` (or
                   "mosaic_gpu_fused"); in `attention_backward` always ours, which "auto"
                   leaves to an explicit request;
  "cudnn"          `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16, no
                   softcap); with `return_lse` and in `attention_backward`, JAX's cuDNN
                   primitives directly (`cudnn_lse.py`; no segments or window, q_len == kv_len
                   when causal).  "auto" leaves packed segments (a dense mask there) and an lse
                   (not differentiable through cuDNN; ring attention, which owns its backward,
                   asks for cuDNN explicitly) to the Pallas kernels;
  "pallas_triton"  Pallas kernels through the Triton lowering (any GPU; interpret mode on CPU);
  "mosaic_tpu"     Pallas kernels through Mosaic TPU (TPU; TPU interpret mode on CPU);
  "xla"            the pure-jnp reference compiled by XLA (any platform).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import registry
from pallas_kernels.flash_attention.common import AttentionCall
from pallas_kernels.flash_attention.reference import (
    attention_backward_reference,
    attention_mask,
    attention_reference,
)

_HALF = (jnp.bfloat16, jnp.float16)


def _kernel(name: str, fn: str):
    return registry.kernel(f"pallas_kernels.flash_attention.{name}", fn)


# ---- what each backend takes -------------------------------------------------------------------


def _mosaic_gpu_refuses(call: AttentionCall) -> str | None:
    from pallas_kernels.flash_attention import mosaic_gpu  # heavy: imported when asked

    return mosaic_gpu.refuses(call)


def _cudnn_refuses(call: AttentionCall) -> str | None:
    q, k = call.q, call.k
    if q.dtype not in _HALF or k.dtype != q.dtype or call.v.dtype != q.dtype:
        return f"cuDNN takes bf16/fp16 inputs, got {q.dtype}/{k.dtype}/{call.v.dtype}"
    if call.softcap is not None:
        return "cuDNN has no softcap"
    return _cudnn_lse_refuses(call) if call.return_lse else None


def _cudnn_lse_refuses(call: AttentionCall) -> str | None:
    """What cuDNN's lse forward and saved-lse backward lack (`cudnn_lse.py`)."""
    q, k = call.q, call.k
    if q.dtype not in _HALF or k.dtype != q.dtype or call.v.dtype != q.dtype:
        return f"cuDNN takes bf16/fp16 inputs, got {q.dtype}/{k.dtype}/{call.v.dtype}"
    if call.segment_ids is not None or call.softcap is not None or call.sliding_window is not None:
        return "cuDNN's lse forward and saved-lse backward have no segment ids, softcap or window"
    if call.causal and q.shape[1] != k.shape[1]:
        return f"cuDNN's causal mask is top-left aligned: q_len {q.shape[1]} != kv_len {k.shape[1]}"
    return None


def _cudnn_auto_skips(call: AttentionCall) -> str | None:
    if call.segment_ids is not None:
        return "segment ids need a dense mask there"
    if call.return_lse:
        return "its lse has no gradient"
    return None


def cudnn_lse_supported(
    q: jax.Array, k: jax.Array, *, causal: bool, segment_ids=None, softcap=None, sliding_window=None
) -> bool:
    """Whether cuDNN's lse forward / saved-lse backward cover this case (platform aside)."""
    return (
        _cudnn_lse_refuses(
            AttentionCall(
                q,
                k,
                k,
                causal=causal,
                segment_ids=segment_ids,
                softcap=softcap,
                sliding_window=sliding_window,
                return_lse=True,
            )
        )
        is None
    )


# ---- how each backend runs ---------------------------------------------------------------------


def _xla(call: AttentionCall, *, config, interpret):
    return attention_reference(call.q, call.k, call.v, return_lse=call.return_lse, **call.options())


def _cudnn(call: AttentionCall, *, config, interpret):
    q, k, v = call.q, call.k, call.v
    if call.return_lse:
        from pallas_kernels.flash_attention import cudnn_lse  # private JAX: imported when run

        return cudnn_lse.cudnn_attention_lse(q, k, v, causal=call.causal, scale=call.scale)
    t, s = q.shape[1], k.shape[1]
    causal, window, mask = call.causal, call.sliding_window, None
    if call.segment_ids is not None or (causal and t != s):
        # cuDNN's is_causal is top-left aligned; an explicit mask keeps the reference's
        # bottom-right alignment and expresses packed documents.
        mask = attention_mask(
            t,
            s,
            causal=causal,
            q_segment_ids=call.segment_ids,
            kv_segment_ids=call.kv_segment_ids,
            sliding_window=window,
        )
        mask = jnp.broadcast_to(mask[:, None], (q.shape[0], 1, t, s))
        causal, window = False, None
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=call.scale,
        is_causal=causal,
        local_window_size=None if window is None else (window, 0),
        implementation="cudnn",
    )


ATTENTION = registry.register(
    registry.Op(
        "attention",
        (
            registry.Backend(
                "mosaic_gpu",
                _kernel("mosaic_gpu", "flash_attention"),
                platform="gpu",
                hopper=True,
                pallas=True,
                refuses=_mosaic_gpu_refuses,
            ),
            registry.Backend(
                "cudnn",
                _cudnn,
                platform="gpu",
                interpretable=False,
                refuses=_cudnn_refuses,
                auto_skips=_cudnn_auto_skips,
            ),
            registry.Backend(
                "pallas_triton",
                _kernel("pallas_triton", "flash_attention"),
                platform="gpu",
                pallas=True,
            ),
            registry.Backend(
                "mosaic_tpu", _kernel("mosaic_tpu", "flash_attention"), platform="tpu", pallas=True
            ),
            registry.Backend("xla", _xla),
        ),
    )
)


def _xla_backward(call: AttentionCall, out, lse, dout, *, config, interpret):
    return attention_backward_reference(call.q, call.k, call.v, out, lse, dout, **call.options())


def _cudnn_backward(call: AttentionCall, out, lse, dout, *, config, interpret):
    from pallas_kernels.flash_attention import cudnn_lse

    return cudnn_lse.cudnn_attention_bwd(
        call.q, call.k, call.v, out, lse, dout, causal=call.causal, scale=call.scale
    )


def _opt_in(call: AttentionCall) -> str:
    return "our Hopper backward runs when asked for"


ATTENTION_BACKWARD = registry.register(
    registry.Op(
        "attention_backward",
        (
            registry.Backend(
                "cudnn",
                _cudnn_backward,
                platform="gpu",
                interpretable=False,
                refuses=_cudnn_lse_refuses,
            ),
            registry.Backend(
                "mosaic_gpu",
                _kernel("mosaic_gpu", "flash_attention_backward"),
                platform="gpu",
                hopper=True,
                pallas=True,
                refuses=_mosaic_gpu_refuses,
                auto_skips=_opt_in,
            ),
            registry.Backend(
                "pallas_triton",
                _kernel("pallas_triton", "flash_attention_backward"),
                platform="gpu",
                pallas=True,
            ),
            registry.Backend(
                "mosaic_tpu",
                _kernel("mosaic_tpu", "flash_attention_backward"),
                platform="tpu",
                pallas=True,
            ),
            registry.Backend("xla", _xla_backward),
        ),
    )
)


# ---- public entry points -----------------------------------------------------------------------


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
    implementation: str = "auto",
    interpret: bool | None = None,
    config=None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention, q [B, T, H, D], k/v [B, S, K, D] -> [B, T, H, D] (and lse [B, H, T]).

    See `reference.attention_reference` for the exact semantics every implementation must
    reproduce.  implementation: "auto", "pallas" or a backend (module docstring, `registry`);
    `interpret` (kernels only) defaults to True off their platform; `config` passes an
    implementation's tile-size Config.
    """
    call = AttentionCall(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window,
        scale=scale,
        softcap=softcap,
        return_lse=return_lse,
    )
    return ATTENTION(call, implementation=implementation, config=config, interpret=interpret)


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
    implementation: str = "auto",
    interpret: bool | None = None,
    config=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention backward from a saved output and lse (no lse cotangent).

    q, out, dout [B, T, H, D]; k, v [B, S, K, D]; lse [B, H, T] float32 (as `attention(...,
    return_lse=True)` returns) -> (dq [B, T, H, D], dk, dv [B, S, K, D]).  The gradients are
    float32 for "xla" and in the inputs' dtype for the kernels; accumulate them in float32.

    out/lse may belong to attention over a longer key sequence of which k/v is one block: the
    result is then this block's share of the gradient (ring attention sums the blocks).  See
    `reference.attention_backward_reference`.  "auto": cuDNN on a GPU where it covers the
    case (`cudnn_lse_supported`), else the Pallas kernel; Mosaic TPU on TPU; XLA on CPU.
    "mosaic_gpu" (and "pallas" on a Hopper GPU where it covers the call): our Hopper backward
    kernels, `mosaic_gpu.flash_attention_backward`.
    """
    call = AttentionCall(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        scale=scale,
        softcap=softcap,
    )
    return ATTENTION_BACKWARD(
        call, out, lse, dout, implementation=implementation, config=config, interpret=interpret
    )
