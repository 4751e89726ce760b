"""A model's shape as the planner and the cost model see it, read from any framework's config.

`ModelShape.from_megatron_config` and `ModelShape.from_hf_config` read attributes only (no
framework is imported); `TokenCost.from_shape` is the one formula for relative compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_query_groups: int
    ffn_hidden: int
    gated: bool
    vocab: int = 0
    kv_channels: Optional[int] = None  # per-head width; default hidden // num_heads
    # attention and MLP read the same input (GPT-NeoX, GPT-J, Falcon, Phi): ISO reduces their
    # partial sums once per layer chunk (schedule.schedule_for)
    parallel_residual: bool = False

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden // self.num_heads

    @property
    def q_hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_hidden(self) -> int:
        return self.num_query_groups * self.head_dim

    def layer_params(self) -> int:
        h, f = self.hidden, self.ffn_hidden
        return (h * (self.q_hidden + 2 * self.kv_hidden) + self.q_hidden * h
                + h * f * (2 if self.gated else 1) + f * h)

    def params(self) -> int:
        """Weights of all layers plus untied embedding and output layer (norms, biases left out)."""
        return self.num_layers * self.layer_params() + 2 * self.vocab * self.hidden

    def widened(self, factor: int) -> "ModelShape":
        """The model `factor` times wider in heads, K/V groups and FFN (hidden and head width
        kept): one TP-`factor` rank of it computes what one process of this model does. A
        process standing in for a TP group (`comm.stand_in_tp`) runs the whole model while ISO
        plans as one rank of `factor`: the planner sees this shape."""
        if factor == 1:
            return self
        from dataclasses import replace

        return replace(self, name=f"{self.name} (x{factor} wide)", num_heads=self.num_heads * factor,
                       num_query_groups=self.num_query_groups * factor, ffn_hidden=self.ffn_hidden * factor,
                       kv_channels=self.head_dim)

    @classmethod
    def from_megatron_config(cls, config, name: str = "megatron", vocab: int = 0) -> "ModelShape":
        """From a megatron-core TransformerConfig."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        return cls(name=name, num_layers=config.num_layers, hidden=hidden, num_heads=heads,
                   num_query_groups=getattr(config, "num_query_groups", None) or heads,
                   ffn_hidden=getattr(config, "ffn_hidden_size", None) or 4 * hidden,
                   gated=bool(getattr(config, "gated_linear_unit", False)), vocab=vocab,
                   kv_channels=getattr(config, "kv_channels", None))

    @classmethod
    def from_hf_config(cls, config, gated: bool, name: str = "hf") -> "ModelShape":
        """From a Hugging Face PretrainedConfig (Llama-style or OPT-style field names)."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
        return cls(name=name, num_layers=config.num_hidden_layers, hidden=hidden, num_heads=heads,
                   num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
                   ffn_hidden=ffn, gated=gated, vocab=getattr(config, "vocab_size", 0) or 0,
                   kv_channels=getattr(config, "head_dim", None))


class TokenCost(NamedTuple):
    """Relative compute of one token through a layer's linears, and of one attention pair."""

    linear: float
    attn_pair: float

    @classmethod
    def from_shape(cls, shape: ModelShape) -> "TokenCost":
        # FLOPs per token of one layer: qkv, proj, fc1 (x2 when gated), fc2; per (q, k) pair:
        # QK^T and PV over the query width. TP divides both alike, so it cancels.
        return cls(float(2 * shape.layer_params()), float(4 * shape.q_hidden))
