"""Llama with Ladder-Residual on its last `config.ladder_layers` layers (PyTorch, transformers).

Ladder-Residual (Zhang et al., ICML 2025, "Ladder-Residual: Parallelism-Aware Architecture for
Accelerating Large Model Inference with Communication Overlapping"): each module reads the
residual stream *before* the previous module's output has been added, so under tensor
parallelism that output's all-reduce can overlap this module's compute.  Per ladder layer,
with `a`, `m` the previous attention and MLP outputs (zero before the first ladder layer):

    x = x + a;   a = attn(input_layernorm(x))            # attention misses the previous MLP
    x = x + m;   m = mlp(post_attention_layernorm(x))    # MLP misses this layer's attention

and after the last layer `x = x + a + m` before the final norm.  Layers before the ladder
ones are standard Llama layers.  Parameters and their names are exactly Llama's: only the
order of the additions differs.  Written by jaxturbo; matches `jaxturbo.models.transformer`
(residual_mode "hybrid"/"ladder").  Not supported: output_hidden_states / output_attentions.
"""

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from .configuration_ladder_llama import LadderLlamaConfig


class LadderLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama layer that can also run its two modules separately (for the ladder order)."""

    def __init__(self, config: LadderLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_ladder = layer_idx >= config.num_hidden_layers - config.ladder_layers

    def attention(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Attention output [batch, seq, hidden] of input_layernorm(x), not added to x."""
        out, _ = self.self_attn(hidden_states=self.input_layernorm(x), **kwargs)
        return out

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """MLP output [batch, seq, hidden] of post_attention_layernorm(x), not added to x."""
        return self.mlp(self.post_attention_layernorm(x))


class LadderLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = LadderLlamaConfig
    _no_split_modules = ["LadderLlamaDecoderLayer"]


class LadderLlamaModel(LadderLlamaPreTrainedModel, LlamaModel):
    """LlamaModel whose layer loop applies the ladder order to the ladder layers."""

    def __init__(self, config: LadderLlamaConfig):
        # LlamaModel.__init__ would build standard layers only to replace them; build ours once
        LadderLlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LadderLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        """input_ids [batch, seq] -> last_hidden_state [batch, seq, hidden] (and the cache)."""
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.pop(flag, None):
                raise NotImplementedError(f"{flag} is not supported by LadderLlamaModel")
        kwargs.pop("return_dict", None)  # LlamaForCausalLM builds the output object itself
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen
            ).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        layer_kw = dict(
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=self.rotary_emb(inputs_embeds, position_ids=position_ids),
            **kwargs,
        )

        x = inputs_embeds
        attn_out = mlp_out = None  # outputs computed but not yet added to the stream
        for layer in self.layers[: self.config.num_hidden_layers]:
            if not layer.is_ladder:
                x = layer(x, **layer_kw)
                continue
            if attn_out is not None:
                x = x + attn_out
            attn_out = layer.attention(x, **layer_kw)
            if mlp_out is not None:
                x = x + mlp_out
            mlp_out = layer.feed_forward(x)
        if attn_out is not None:  # the last ladder layer's outputs join before the final norm
            x = x + attn_out + mlp_out
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(x), past_key_values=past_key_values
        )


class LadderLlamaForCausalLM(LadderLlamaPreTrainedModel, LlamaForCausalLM):
    """LlamaForCausalLM (same head, loss and generation) over LadderLlamaModel."""

    def __init__(self, config: LadderLlamaConfig):
        LadderLlamaPreTrainedModel.__init__(self, config)
        self.model = LadderLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = [
    "LadderLlamaConfig",
    "LadderLlamaForCausalLM",
    "LadderLlamaModel",
    "LadderLlamaPreTrainedModel",
]
