"""Throughput accounting: model FLOPs per token, device peak FLOP/s, MFU; metrics JSONL and
TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from jaxturbo.models.config import ModelConfig

# Dense bf16 peak (no sparsity) per device, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v6 lite": 918e12,
}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token, forward + backward (PaLM appendix B accounting).

    6 per matmul weight (2 forward, 4 backward) over all matmul weights a token meets (the LM
    head included, the embedding lookup not; of a mixture-of-experts layer the router and the
    k routed experts, not the idle ones); plus attention scores and values, 6 * 2 * L * H * hd
    * T per token, halved because causal attention needs only the lower triangle.
    """
    matmul = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (
        0 if cfg.tie_word_embeddings else 1
    )
    matmul -= cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)  # norm scales are no matmul
    if cfg.moe is not None:  # a token meets only its k routed experts' gate/up/down weights
        m = cfg.moe
        matmul -= (
            cfg.num_hidden_layers
            * 3
            * cfg.hidden_size
            * m.moe_intermediate_size
            * (m.num_experts - m.num_experts_per_tok)
        )
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len / 2
    return 6.0 * matmul + attn


def peak_flops(device: Any = None) -> float | None:
    """Peak dense bf16 FLOP/s of a device, or None when unknown (CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, f in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return f
    return None


class JsonlWriter:
    """Append one JSON object per line; on resume, drop lines past the restored step."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


class TensorBoardWriter:
    """A run's numbers as TensorBoard event files (tensorboardX): each record's numeric values
    as scalars tagged "<kind>/<name>" at its step.  Without tensorboardX installed it says so
    once on stderr and writes nothing.  purge_step: a resumed run's first step (events the
    interrupted run wrote from there on are dropped)."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            import sys

            print("TensorBoard: not written (tensorboardX is not installed)", file=sys.stderr)
            self._writer = None
            return
        import time

        # event files are read in name order and named by the second they were opened: a
        # resumed run within the same second would reuse (truncate) the interrupted run's file
        self._writer = SummaryWriter(
            logdir=str(logdir), purge_step=purge_step, filename_suffix=f".{time.time_ns():020d}"
        )

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        kind, step = record.get("kind", "train"), int(record["step"])
        for k, v in record.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if numeric and k not in ("kind", "step"):
                self._writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
