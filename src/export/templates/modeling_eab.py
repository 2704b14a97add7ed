"""A __Family__ model with Explicit Attention Bias (EAB), as eabfit trains and runs it.

Written by `eabfit export --format hf` from one template (`src/export/templates/` in eabfit).
Only the attention differs from transformers' __Family__: per layer and KV head one extra
key/value slot (k', v') that every query attends to,

    softmax([Q K^T, Q k'] / sqrt(d) + [mask, 0]) [V; v'],

where k' is position-free (never rotated), the slot is never masked and never enters the KV
cache, and `mask` is the causal (and sliding-window) mask plus, with `eab.mask_first_token`,
position 0 hidden from every query: the slot stands in for the first token.

Load it with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.__family__.modeling___family__ import (
    __Family__Attention,
    __Family__ForCausalLM,
    apply_rotary_pos_emb,
    repeat_kv,
)

from .configuration_eab import Eab__Family__Config, eab_settings


class Eab__Family__Attention(__Family__Attention):
    def __init__(self, config, layer_idx, has_slot, mask_first_token):
        super().__init__(config, layer_idx)
        self.has_slot = has_slot
        self.mask_first_token = mask_first_token
        if has_slot:
            # (KV, hd), the export's `model.layers.{i}.self_attn.eab_k` / `eab_v`.
            self.eab_k = nn.Parameter(torch.zeros(config.num_key_value_heads, self.head_dim))
            self.eab_v = nn.Parameter(torch.zeros(config.num_key_value_heads, self.head_dim))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        # Qwen3's attention norms each query and key head before RoPE; the others have no norm.
        q_norm = getattr(self, "q_norm", nn.Identity())
        k_norm = getattr(self, "k_norm", nn.Identity())
        query = q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)  # (B, H, Tq, hd)
        key = k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)  # (B, KV, Tq, hd)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # (B, KV, Tk, hd)
        if attention_mask is None or attention_mask.dim() != 4 or not attention_mask.is_floating_point():
            raise ValueError(
                "EAB attention needs eager attention's additive float mask (B, 1, Tq, Tk); "
                "load the model without attn_implementation, or with attn_implementation='eager'"
            )
        batch, t_k = query.shape[0], key.shape[-2]
        mask = attention_mask[:, :, :, :t_k].to(torch.float32)  # (B|1, 1, Tq, Tk)
        if self.mask_first_token:
            # The cache hands back the keys of consecutive positions ending at the last query's
            # (a sliding-window cache drops the oldest ones), so key j sits at position
            # last - (Tk - 1) + j; per row, which also finds the first real token after left padding.
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                last = torch.full((batch,), t_k - 1, device=key.device)
            else:
                last = position_ids[:, -1].to(key.device).expand(batch)
            key_pos = torch.arange(t_k, device=key.device)[None, :] + (last[:, None] - (t_k - 1))  # (B, Tk)
            hidden = (key_pos == 0)[:, None, None, :]  # (B, 1, 1, Tk)
            mask = mask.masked_fill(hidden, torch.finfo(torch.float32).min)
        key = repeat_kv(key, self.num_key_value_groups)  # (B, H, Tk, hd)
        value = repeat_kv(value, self.num_key_value_groups)
        if self.has_slot:
            slot_shape = (batch, self.eab_k.shape[0], 1, self.head_dim)
            k_slot = repeat_kv(self.eab_k.to(key.dtype)[None, :, None, :].expand(slot_shape), self.num_key_value_groups)
            v_slot = repeat_kv(self.eab_v.to(value.dtype)[None, :, None, :].expand(slot_shape), self.num_key_value_groups)
            key = torch.cat([key, k_slot], dim=2)  # (B, H, Tk+1, hd)
            value = torch.cat([value, v_slot], dim=2)
            mask = nn.functional.pad(mask, (0, 1), value=0.0)  # the slot is never masked
        scores = (torch.matmul(query, key.transpose(2, 3)) * self.scaling).to(torch.float32) + mask
        probs = nn.functional.softmax(scores, dim=-1).to(query.dtype)  # (B, H, Tq, Tk[+1])
        probs = nn.functional.dropout(probs, p=self.attention_dropout if self.training else 0.0, training=self.training)
        out = torch.matmul(probs, value).transpose(1, 2).reshape(*input_shape, -1).contiguous()  # (B, Tq, H*hd)
        return self.o_proj(out), probs


class Eab__Family__ForCausalLM(__Family__ForCausalLM):
    config_class = Eab__Family__Config
    # The slot is computed here in eager form; fused kernels (sdpa, flash, flex) have no slot.
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    def __init__(self, config):
        super().__init__(config)
        layers, mask_first_token = eab_settings(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = Eab__Family__Attention(config, i, i in layers, mask_first_token)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        # Only reached for slots the checkpoint lacks (transformers warns about them): zeros.
        if isinstance(module, Eab__Family__Attention) and module.has_slot:
            init.zeros_(module.eab_k)
            init.zeros_(module.eab_v)


__all__ = ["Eab__Family__ForCausalLM"]
