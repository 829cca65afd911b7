"""Configuration of a Llama with Ladder-Residual on its last `ladder_layers` layers.

Written by jaxturbo (`jaxturbo ladderize` / `jaxturbo.bridge.ladder_hf.save_ladder_hf`); loaded
by transformers with `trust_remote_code=True`.  Every other field is Llama's.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class LadderLlamaConfig(LlamaConfig):
    """LlamaConfig + `ladder_layers`: how many trailing layers use Ladder-Residual
    (0 = the standard Llama; num_hidden_layers = every layer)."""

    model_type = "ladder_llama"

    ladder_layers: int = 0

    def validate_architecture(self):
        super().validate_architecture()
        if not 0 <= self.ladder_layers <= self.num_hidden_layers:
            raise ValueError(
                f"ladder_layers={self.ladder_layers} must be in "
                f"[0, {self.num_hidden_layers}] (num_hidden_layers)"
            )


__all__ = ["LadderLlamaConfig"]
