"""The model runner: executes a `SchedulerOutput` as one padded, bucketed step on device.

A step's scheduled requests are packed into one flat ragged batch padded to a token bucket T
and a sequence bucket S (`EngineConfig.token_bucket` / `seq_bucket`).  Every input of the step
is laid out in ONE int32 buffer built with numpy on the host (float fields bit-cast), so a step
costs one host-to-device transfer, and every output in one int32 buffer, so reading a step's
tokens costs one device-to-host transfer:

    tokens [T]  positions [T]  slot_mapping [T]  token_src [T]  query_start_loc [S+1]
    seq_lens [S]  logits_indices [S]  top_k [S]  seeds [S]  sample_positions [S]
    temperature [S]  top_p [S]  min_p [S]  page_tables [S * max_pages]

One jitted step function per (T, S, sort) runs the model over the batch (K/V written to the
pages first, then ragged paged attention), the LM head only at `logits_indices` (each
sequence's last new token) and the per-row sampler; the pages are donated and updated in place.
`sort`: whether the top-k / top-p filters are compiled in (they sort the vocabulary; a step
whose sampled rows use neither runs the variant without them).  Every variant is compiled
ahead of time (`warmup`), so serving never compiles.

`token_src[t] >= 0` takes token t from the previous step's sampled tokens (row token_src[t]),
which stay on device: a decode can be launched before the host has read the token it consumes.

A multi-step decode (`StepShape.steps` = K > 1, T = S: one token per sequence) scans the
same model step K times on device: each iteration feeds the tokens the previous one sampled,
at positions one further (their K/V slots computed from the page tables), and the output holds
K rows of samples.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.config import EngineConfig, cdiv
from jaxturbo.inference.engine.params import GREEDY, MAX_TOP_LOGPROBS, RowSampling
from jaxturbo.inference.engine.request import PLACEHOLDER_TOKEN
from jaxturbo.inference.engine.scheduler import ScheduledRequest, SchedulerOutput
from jaxturbo.inference.sampling import sample_rows
from jaxturbo.models.dispatch import AnyConfig
from jaxturbo.models.mla import MLAConfig, PagedLatentCache, mla_forward
from jaxturbo.models.transformer import PagedCache, Params, forward, lm_head

log = logging.getLogger(__name__)

# Pages for this many tokens when the device reports no memory statistics (CPU) and the
# config gives no num_pages.
DEFAULT_POOL_TOKENS = 16384

_INT_FIELDS = ("tokens", "positions", "slot_mapping", "token_src")  # [T] each
_SEQ_FIELDS = (
    "seq_lens",
    "logits_indices",
    "top_k",
    "seeds",
    "sample_positions",
    "temperature",
    "top_p",
    "min_p",
)  # [S] each
_FLOAT_FIELDS = frozenset({"temperature", "top_p", "min_p"})


def default_compilation_cache_dir() -> Path:
    """XLA's persistent compilation cache under jaxturbo's cache root (`$JAXTURBO_CACHE`, else
    `~/.cache/jaxturbo`, the root the model registry uses too)."""
    env = os.environ.get("JAXTURBO_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "jaxturbo"
    return root / "xla"


def enable_compilation_cache(path: str | Path) -> None:
    """Point JAX's persistent compilation cache at `path` (a process-wide setting), unless the
    caller has set one already."""
    if jax.config.jax_compilation_cache_dir:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static shape of a compiled step: T token slots, S sequence rows, sort compiled in,
    and the decode steps one launch runs (> 1: a multi-step decode, T == S)."""

    tokens: int
    seqs: int
    sort: bool
    steps: int = 1


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Offsets of the fields in a step's int32 input buffer."""

    tokens: int
    seqs: int
    max_pages: int

    @property
    def fields(self) -> list[tuple[str, int]]:
        t, s = self.tokens, self.seqs
        return (
            [(n, t) for n in _INT_FIELDS]
            + [("query_start_loc", s + 1)]
            + [(n, s) for n in _SEQ_FIELDS]
            + [("page_tables", s * self.max_pages)]
        )

    @property
    def size(self) -> int:
        return sum(n for _, n in self.fields)

    def views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        """numpy views of the fields of a host buffer (float fields as float32, seeds uint32)."""
        out, at = {}, 0
        for name, n in self.fields:
            v = buf[at : at + n]
            if name in _FLOAT_FIELDS:
                v = v.view(np.float32)
            elif name == "seeds":
                v = v.view(np.uint32)
            out[name] = v
            at += n
        out["page_tables"] = out["page_tables"].reshape(self.seqs, self.max_pages)
        return out

    def unpack(self, buf: jax.Array) -> dict[str, jax.Array]:
        """The fields of the device buffer (static slices; bit-casts for non-int32 fields)."""
        out, at = {}, 0
        for name, n in self.fields:
            v = buf[at : at + n]
            if name in _FLOAT_FIELDS:
                v = jax.lax.bitcast_convert_type(v, jnp.float32)
            elif name == "seeds":
                v = jax.lax.bitcast_convert_type(v, jnp.uint32)
            out[name] = v
            at += n
        out["page_tables"] = out["page_tables"].reshape(self.seqs, self.max_pages)
        return out


@dataclasses.dataclass(frozen=True)
class SampledTokens:
    """A step's sampled tokens on the host, for the rows whose step samples (K tokens per row:
    the step's decode steps)."""

    request_ids: tuple[str, ...]
    tokens: np.ndarray  # [n, K] int32
    logprobs: np.ndarray  # [n, K] float32
    top_ids: np.ndarray  # [n, K, N] int32
    top_logprobs: np.ndarray  # [n, K, N] float32

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.request_ids, map(tuple, self.tokens.tolist())))


@dataclasses.dataclass
class StepHandle:
    """A launched step: its packed output on device, read by `fetch` (which blocks)."""

    scheduled: tuple[ScheduledRequest, ...]
    shape: StepShape
    num_top: int
    packed: jax.Array | concurrent.futures.Future  # a Future while the dispatch thread has it
    _fetched: SampledTokens | None = None

    def fetch(self) -> SampledTokens:
        if self._fetched is None:
            s, n, k = self.shape.seqs, self.num_top, self.shape.steps
            packed = self.packed
            if isinstance(packed, concurrent.futures.Future):
                packed = packed.result()  # re-raises the dispatch's error
            out = np.asarray(packed).reshape(k, -1)  # one row of samples per decode step
            rows = [i for i, sr in enumerate(self.scheduled) if sr.samples]
            at = np.cumsum([0, s, s, s * n, s * n])
            tok, logp = out[:, at[0] : at[1]], out[:, at[1] : at[2]].view(np.float32)
            top_ids = out[:, at[2] : at[3]].reshape(k, s, n)
            top_logp = out[:, at[3] : at[4]].view(np.float32).reshape(k, s, n)
            self._fetched = SampledTokens(
                tuple(self.scheduled[i].request_id for i in rows),
                tok.T[rows],
                logp.T[rows],
                top_ids.transpose(1, 0, 2)[rows],
                top_logp.transpose(1, 0, 2)[rows],
            )
        return self._fetched


def pool_pages(config: EngineConfig, page_bytes: int, devices: list[Any]) -> tuple[int, str]:
    """Pages in the pool (the null page included) and a line saying how the count was chosen.

    config.num_pages wins; else `kv_memory_fraction` of the smallest free memory (bytes_limit -
    bytes_in_use, after the weights are placed) over `devices`, in pages of `page_bytes` per
    device; devices without memory statistics (CPU) get DEFAULT_POOL_TOKENS tokens of pages.
    """
    if config.num_pages is not None:
        n = config.num_pages
        return n, f"{n} pages ({(n - 1) * config.page_size} tokens): EngineConfig.num_pages"
    stats = [d.memory_stats() or {} for d in devices]
    if not all("bytes_limit" in s and "bytes_in_use" in s for s in stats):
        n = cdiv(DEFAULT_POOL_TOKENS, config.page_size) + 1
        return n, (
            f"{n} pages ({(n - 1) * config.page_size} tokens): the device reports no "
            "memory statistics; set EngineConfig.num_pages to choose"
        )
    free = min(s["bytes_limit"] - s["bytes_in_use"] for s in stats)
    n = int(config.kv_memory_fraction * free) // page_bytes
    if n < 2:
        raise UserError(
            f"kv_memory_fraction={config.kv_memory_fraction} of the {free / 2**30:.2f} "
            f"GiB free after the weights holds {n} KV pages of {page_bytes} bytes; "
            "raise kv_memory_fraction, lower page_size, or free device memory"
        )
    return n, (
        f"{n} pages ({(n - 1) * config.page_size} tokens): {config.kv_memory_fraction} "
        f"of {free / 2**30:.2f} GiB free per device at {page_bytes / 2**20:.3f} MiB a page"
    )


class ModelRunner:
    """Owns the device state of an engine: parameters, KV pages and the compiled steps.

    params: the model's parameters (any device; placed here, tensor-parallel over `mesh`'s
    `tensor` axis when a mesh is given).  cfg: a ModelConfig (GQA) or an MLAConfig.
    kv_dtype: the pages' dtype (default: the parameters').  attn_impl: the ragged paged
    attention implementation ("auto" picks the platform's kernel).  max_top_logprobs: N
    alternatives every step computes per sampled row (static).  sort_variants: compile the
    top-k / top-p variants (False: requests may not use them).  dispatch_thread: launch the
    compiled steps from one background thread, in order, so that the host's bookkeeping of
    the next step overlaps the launch of this one (enqueuing a step's few hundred GPU kernels
    costs the calling thread milliseconds, mostly outside the GIL: 1.53x for a small model,
    experiments/engine/RESULTS.md).
    """

    def __init__(
        self,
        params: Params,
        cfg: AnyConfig,
        config: EngineConfig,
        *,
        mesh: Mesh | None = None,
        kv_dtype: Any = None,
        attn_impl: str = "auto",
        max_top_logprobs: int = 0,
        sort_variants: bool = True,
        dispatch_thread: bool = False,
    ) -> None:
        if not 0 <= max_top_logprobs <= MAX_TOP_LOGPROBS:
            raise UserError(
                f"max_top_logprobs={max_top_logprobs} must be in [0, {MAX_TOP_LOGPROBS}]"
            )
        self.cfg, self.config = cfg, config
        self.mla = isinstance(cfg, MLAConfig)
        self.attn_impl = attn_impl
        self.num_top = max_top_logprobs
        self.sort_variants = sort_variants
        self.mesh = mesh
        self._place(params)
        base = cfg.base if self.mla else cfg
        L = base.num_hidden_layers
        self.kv_dtype = jnp.dtype(kv_dtype or self.params["model.embed_tokens.weight"].dtype)
        ps, item = config.page_size, self.kv_dtype.itemsize
        if self.mla:
            widths = (cfg.cache_rank, cfg.qk_rope_head_dim)
            page_bytes = L * ps * sum(widths) * item
        else:
            kv_heads = self._kv_heads()
            tp = 1 if mesh is None else dict(mesh.shape).get("tensor", 1)
            page_bytes = 2 * L * ps * (kv_heads // tp) * base.head_dim * item
        self.page_bytes = page_bytes
        devices = list(mesh.devices.flat) if mesh is not None else [self._device]
        self.num_pages, self.pool_note = pool_pages(config, page_bytes, devices)
        log.info("KV pool: %s", self.pool_note)
        n = self.num_pages
        if self.mla:
            shapes = [(L, n, ps, w) for w in widths]
        else:
            shapes = [(L, n, ps, kv_heads, base.head_dim)] * 2
        self.pages = tuple(
            jax.jit(lambda s=s: jnp.zeros(s, self.kv_dtype), out_shardings=self._page_sharding)()
            for s in shapes
        )
        # the pages' specs, read by lowering: the arrays themselves belong to the dispatcher
        self._page_specs = tuple(
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in self.pages
        )
        self._dispatcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._last_dispatch: concurrent.futures.Future | None = None
        self.dispatch_thread = dispatch_thread
        self.max_seqs = config.seq_buckets[-1]
        self._prev = jax.device_put(np.zeros(self.max_seqs, np.int32), self._rep)
        self._prev_rows: dict[str, int] = {}
        self._compiled: dict[StepShape, Any] = {}
        self.num_compiles = 0
        self.num_launches = 0  # steps executed (a multi-step decode counts once)

    # -- placement ----------------------------------------------------------------------------
    def _kv_heads(self) -> int:
        if self.mesh is None:
            return self.cfg.num_key_value_heads
        from jaxturbo.parallel import tensor

        return tensor.cache_kv_heads(self.cfg, tensor.tensor_size(self.mesh))

    def _place(self, params: Params) -> None:
        """Put the parameters on the device(s) and pick the step's forward and shardings."""
        if self.mesh is None:
            self._device = jax.devices()[0]
            self._rep = SingleDeviceSharding(self._device)
            self._page_sharding = self._rep
            self._fwd = mla_forward if self.mla else forward
            self.params = jax.device_put(params, self._device)
            return
        from jaxturbo.parallel import tensor

        if self.mla:
            raise UserError(
                "tensor-parallel MLA models are not implemented; run the engine on "
                "one device (mesh=None)"
            )
        sizes = dict(self.mesh.shape)
        if any(v != 1 for k, v in sizes.items() if k != "tensor"):
            raise UserError(
                f"the engine splits the model over the mesh axis 'tensor' only; got "
                f"{sizes} (every other axis must be 1)"
            )
        tensor.check_mesh(self.cfg, self.mesh, 1)
        self._rep = NamedSharding(self.mesh, P())
        page_spec = tensor.cache_specs(self.mesh, PagedCache(*([None] * 6))).k_pages
        self._page_sharding = NamedSharding(self.mesh, page_spec)
        self._fwd = tensor.TensorParallel(self.mesh)
        self.params = tensor.shard_params(params, self.cfg, self.mesh)

    def update_params(self, params: Params) -> None:
        """Swap in new weights of the same shapes and dtypes (placed like the current ones): the
        compiled steps keep running, nothing recompiles."""
        self.sync()
        old = self.params
        if self.mesh is not None:
            from jaxturbo.parallel import tensor

            params = tensor.replicate_kv_heads(params, self.cfg, tensor.tensor_size(self.mesh))
        if jax.tree.structure(params) != jax.tree.structure(old):
            raise UserError(
                "update_weights: the new parameters' tree differs from the engine's "
                f"(names {sorted(_names(params))} vs {sorted(_names(old))})"
            )
        leaves = jax.tree_util.tree_leaves_with_path(params)
        for (path, new), o in zip(leaves, jax.tree.leaves(old)):
            if tuple(new.shape) != o.shape or jnp.dtype(new.dtype) != o.dtype:
                raise UserError(
                    f"update_weights: {jax.tree_util.keystr(path)} is "
                    f"{tuple(new.shape)} {jnp.dtype(new.dtype).name}; the engine's is "
                    f"{o.shape} {o.dtype.name} (same shapes and dtypes are required)"
                )
        self.params = jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), params, old)

    # -- compiled steps -----------------------------------------------------------------------
    def _layout(self, shape: StepShape) -> _Layout:
        return _Layout(shape.tokens, shape.seqs, self.config.max_pages_per_seq)

    def step_shapes(self) -> list[StepShape]:
        """Every (T, S, sort, steps) a schedule can produce: S buckets whose smallest count (one
        more than the bucket below) fits in T tokens, and the multi-step decodes (T = S)."""
        cfg, out = self.config, []
        sorts = (False, True) if self.sort_variants else (False,)
        for t in cfg.token_buckets:
            lo = 1
            for s in cfg.seq_buckets:
                if lo <= t:
                    out += [StepShape(t, s, sort) for sort in sorts]
                lo = s + 1
        if cfg.decode_steps > 1:
            out += [
                StepShape(s, s, sort, cfg.decode_steps) for s in cfg.seq_buckets for sort in sorts
            ]
        return out

    def _step_fn(self, shape: StepShape):
        lay, cfg, fwd, mla = self._layout(shape), self.cfg, self._fwd, self.mla
        window, impl = self.config.sliding_window, self.attn_impl
        num_top, max_seqs, ps = self.num_top, self.max_seqs, self.config.page_size

        def model_step(params, pages, f, tokens):
            """One forward over the flat batch and the per-row sampler: (packed samples,
            sampled tokens [S], updated pages)."""
            meta = (f["slot_mapping"], f["page_tables"], f["seq_lens"], f["query_start_loc"])
            if mla:
                cache, base = PagedLatentCache(*pages, *meta), cfg.base
            else:
                cache, base = PagedCache(*pages, *meta, sliding_window=window), cfg
            hidden, cache = fwd(
                params,
                cfg,
                tokens[None],
                positions=f["positions"][None],
                cache=cache,
                attn_impl=impl,
                return_hidden=True,
            )
            logits = lm_head(params, base, hidden[:, f["logits_indices"]])[0]  # [S, V]
            kw = dict(top_k=f["top_k"], top_p=f["top_p"]) if shape.sort else {}
            tok, logp, top_ids, top_logp = sample_rows(
                logits,
                f["temperature"],
                f["seeds"],
                f["sample_positions"],
                min_p=f["min_p"],
                num_top_logprobs=num_top,
                **kw,
            )
            bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.int32).reshape(-1)
            packed = jnp.concatenate([tok, bits(logp), top_ids.reshape(-1), bits(top_logp)])
            new_pages = (
                (cache.latent_pages, cache.rope_pages) if mla else (cache.k_pages, cache.v_pages)
            )
            return packed, tok, new_pages

        def decode_steps(params, pages, f, tokens):
            """shape.steps decode steps: token t is row t's; padding rows compute at position 0
            of the null page, as a single step's padding does."""
            live = jnp.arange(shape.tokens) < f["query_start_loc"][-1]
            table = f["page_tables"]

            def body(carry, k):
                pages, tokens = carry
                pos = jnp.where(live, f["positions"] + k, 0)
                slot = table[jnp.arange(shape.tokens), pos // ps] * ps + pos % ps
                g = dict(
                    f,
                    positions=pos,
                    slot_mapping=jnp.where(live, slot, 0),
                    seq_lens=jnp.where(live, f["seq_lens"] + k, 0),
                    sample_positions=f["sample_positions"] + k,
                )
                packed, tok, pages = model_step(params, pages, g, tokens)
                return (pages, jnp.where(live, tok, 0)), packed

            (pages, tok), packed = jax.lax.scan(body, (pages, tokens), jnp.arange(shape.steps))
            return packed.reshape(-1), tok, pages

        def step(params, pages, buf, prev):
            f = lay.unpack(buf)
            src = f["token_src"]
            # decode inputs the host has not read yet come from the previous step's samples
            tokens = jnp.where(src >= 0, prev[jnp.maximum(src, 0)], f["tokens"])
            run = model_step if shape.steps == 1 else decode_steps
            packed, tok, new_pages = run(params, pages, f, tokens)
            prev = jnp.zeros((max_seqs,), jnp.int32).at[: shape.seqs].set(tok)
            return packed, prev, new_pages

        return step, lay

    def _lower(self, shape: StepShape):
        step, lay = self._step_fn(shape)
        rep, page_sh = self._rep, self._page_sharding
        param_sh = jax.tree.map(lambda a: a.sharding, self.params)
        pages_sh = tuple(page_sh for _ in self._page_specs)
        jitted = jax.jit(
            step,
            donate_argnums=(1,),
            in_shardings=(param_sh, pages_sh, rep, rep),
            out_shardings=(rep, rep, pages_sh),
        )
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
        return jitted.lower(
            jax.tree.map(spec, self.params),
            self._page_specs,
            jax.ShapeDtypeStruct((lay.size,), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((self.max_seqs,), jnp.int32, sharding=rep),
        )

    def _compile(self, shape: StepShape) -> Any:
        if shape not in self._compiled:
            self._compiled[shape] = self._lower(shape).compile()
            self.num_compiles += 1
        return self._compiled[shape]

    def warmup(self, progress: bool = True, workers: int | None = None) -> int:
        """Compile every step shape not compiled yet (lowered here, compiled by `workers`
        threads: XLA releases the GIL); returns how many were compiled."""
        from tqdm.auto import tqdm

        todo = [s for s in self.step_shapes() if s not in self._compiled]
        workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
        with tqdm(
            total=len(todo),
            desc="compiling engine steps",
            unit="step",
            disable=not progress or not todo,
        ) as bar:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                futures = {pool.submit(self._lower(s).compile): s for s in todo}
                for fut in concurrent.futures.as_completed(futures):
                    self._compiled[futures[fut]] = fut.result()
                    self.num_compiles += 1
                    bar.update(1)
        return len(todo)

    # -- steps --------------------------------------------------------------------------------
    def _build(self, out: SchedulerOutput, shape: StepShape) -> np.ndarray:
        """The step's int32 input buffer (see the module docstring)."""
        lay, ps = self._layout(shape), self.config.page_size
        buf = np.zeros(lay.size, np.int32)
        v = lay.views(buf)
        sched = out.scheduled
        n = len(sched)
        counts = np.fromiter((sr.num_tokens for sr in sched), np.int64, n)
        starts = np.fromiter((sr.start_position for sr in sched), np.int64, n)
        qsl = v["query_start_loc"]
        qsl[1 : n + 1] = np.cumsum(counts)
        qsl[n + 1 :] = qsl[n]
        total = int(qsl[n])
        pt = v["page_tables"]
        widths = np.fromiter((len(sr.page_table) for sr in sched), np.int64, n)
        # row i's first widths[i] entries, filled in row-major order in one assignment
        pt[:n][np.arange(pt.shape[1]) < widths[:, None]] = np.fromiter(
            itertools.chain.from_iterable(sr.page_table for sr in sched), np.int32, widths.sum()
        )
        seq = np.repeat(np.arange(n), counts)
        pos = np.arange(total) - qsl[seq] + starts[seq]
        toks = np.fromiter(
            itertools.chain.from_iterable(sr.token_ids for sr in sched), np.int64, total
        )
        v["positions"][:total] = pos
        v["slot_mapping"][:total] = pt[seq, pos // ps] * ps + pos % ps  # padding: null page
        src = v["token_src"]
        src[:] = -1
        ph = np.flatnonzero(toks == PLACEHOLDER_TOKEN)
        if ph.size:
            rows = self._prev_rows
            src[ph] = [rows[sched[i].request_id] for i in seq[ph]]
            toks[ph] = 0
        v["tokens"][:total] = toks
        v["seq_lens"][:n] = starts + counts
        v["logits_indices"][:n] = qsl[1 : n + 1] - 1
        v["sample_positions"][:n] = starts + counts
        rs = [sr.sampling if sr.samples and sr.sampling is not None else GREEDY for sr in sched]
        for name in ("temperature", "top_k", "top_p", "min_p", "seeds"):
            attr = "seed" if name == "seeds" else name
            v[name][:n] = [getattr(r, attr) for r in rs]
        v["top_p"][n:] = 1.0
        return buf

    def shape_of(self, out: SchedulerOutput) -> StepShape:
        sort = self.sort_variants and any(
            sr.samples and isinstance(sr.sampling, RowSampling) and sr.sampling.needs_sort
            for sr in out.scheduled
        )
        seqs = self.config.seq_bucket(len(out.scheduled))
        if out.num_steps > 1:
            if out.num_steps != self.config.decode_steps:
                raise ValueError(
                    f"a {out.num_steps}-step decode; the runner compiles "
                    f"decode_steps={self.config.decode_steps}"
                )
            return StepShape(seqs, seqs, sort, out.num_steps)
        return StepShape(self.config.token_bucket(out.num_scheduled_tokens), seqs, sort)

    def execute(self, out: SchedulerOutput) -> StepHandle:
        """Launch the step (asynchronously: nothing here waits for the device).

        A token id PLACEHOLDER_TOKEN in a scheduled request's token_ids is the token the
        previous step sampled for that request, taken on device."""
        shape = self.shape_of(out)
        if not self.sort_variants and any(
            sr.samples and isinstance(sr.sampling, RowSampling) and sr.sampling.needs_sort
            for sr in out.scheduled
        ):
            raise UserError(
                "top_k / top_p need the engine's sort variants (Engine(..., sort_variants=True))"
            )
        buf, fn = self._build(out, shape), self._compile(shape)
        self.num_launches += 1

        def dispatch() -> jax.Array:
            # pages and the previous samples chain from step to step: one thread, in order
            packed, self._prev, self.pages = fn(
                self.params, self.pages, jax.device_put(buf, self._rep), self._prev
            )
            packed.copy_to_host_async()
            return packed

        if self._dispatcher is None:
            packed: Any = dispatch()
        else:
            packed = self._last_dispatch = self._dispatcher.submit(dispatch)
        self._prev_rows = {sr.request_id: i for i, sr in enumerate(out.scheduled) if sr.samples}
        return StepHandle(out.scheduled, shape, self.num_top, packed)

    @property
    def dispatch_thread(self) -> bool:
        return self._dispatcher is not None

    @dispatch_thread.setter
    def dispatch_thread(self, enabled: bool) -> None:
        if enabled == self.dispatch_thread:
            return
        self.sync()
        if enabled:
            self._dispatcher = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="engine-dispatch"
            )
        else:
            self._dispatcher.shutdown()
            self._dispatcher = self._last_dispatch = None

    def sync(self) -> None:
        """Wait until every launched step has been handed to the device (its outputs, pages
        included, are then this runner's arrays)."""
        if self._last_dispatch is not None:
            self._last_dispatch.result()

    def run(self, out: SchedulerOutput) -> SampledTokens:
        """Launch the step and wait for its tokens."""
        return self.execute(out).fetch()


def _names(params: Mapping) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
