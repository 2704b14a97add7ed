"""A __Family__ model with Explicit Attention Bias (EAB), as eabfit trains and runs it.

Written by `eabfit export --format hf` from one template (`src/export/templates/` in eabfit).
Only the attention differs from transformers' __Family__: per layer and KV head one extra
key/value slot (k', v') that every query attends to,

    softmax([Q k', Q K^T] / sqrt(d) + [0, mask]) [v'; V],

where k' is position-free (never rotated), the slot is never masked and never enters the KV
cache, and `mask` is the causal (and sliding-window, and padding) mask plus, with
`eab.mask_first_token`, position 0 hidden from every query: the slot stands in for the first token.

Attention implementations (`attn_implementation=` at load, or `model.set_attn_implementation`):

- `sdpa` (the default, as for transformers' __Family__) and `eager`: the slot is key 0 of every
  head, after the cache update, and transformers' boolean (sdpa) or additive (eager) mask gains a
  first column every query sees; GQA, padding and Mistral's sliding window are transformers' own.
  Where transformers leaves sdpa's mask out for its causal kernel (no padding, no cache yet), the
  mask stays out: the slot takes position 0's place under `mask_first_token`, else a leading
  throwaway query makes sdpa's top-left causal square fit the extra key.
- `flash_attention_2` / `flash_attention_3` (with the `flash-attn` package, on a GPU): the slot is
  key 0 and flash's causal mask, aligned bottom-right, lets query i see keys 0..i+1; the padding
  mask gains the same first column. With `mask_first_token` the slot takes position 0's place
  instead (every query sees position 0, which the slot replaces). A sliding window shorter than
  the keys would hide the slot from distant queries: that case raises and names sdpa.
- `flex_attention` and other registered kernels are refused at load.

The cache is transformers' DynamicCache (with its sliding-window layers for Mistral); a static
or paged cache is not supported (their keys do not end at the last query's position).

Load it with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.__family__.modeling___family__ import (
    __Family__Attention,
    __Family__ForCausalLM,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_eab import Eab__Family__Config, eab_settings

FLASH = ("flash_attention_2", "flash_attention_3")


class Eab__Family__Attention(__Family__Attention):
    def __init__(self, config, layer_idx, has_slot, mask_first_token):
        super().__init__(config, layer_idx)
        self.has_slot = has_slot
        self.mask_first_token = mask_first_token
        if has_slot:
            # (KV, hd), the export's `model.layers.{i}.self_attn.eab_k` / `eab_v`.
            self.eab_k = nn.Parameter(torch.zeros(config.num_key_value_heads, self.head_dim))
            self.eab_v = nn.Parameter(torch.zeros(config.num_key_value_heads, self.head_dim))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        # transformers before 5.25 names the cache `past_key_values`.
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
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
        if cache is not None:
            # The cache holds the tokens' keys only; the slot joins the copy handed back.
            key, value = cache.update(key, value, self.layer_idx)  # (B, KV, Tk, hd)
        impl = self.config._attn_implementation
        window = getattr(self.config, "sliding_window", None)
        t_q, t_k = query.shape[-2], key.shape[-2]
        extra_query = False
        if impl == "sdpa" and attention_mask is None and t_q == t_k and t_q > 1:
            # transformers skipped the mask for sdpa's `is_causal` (no padding, no window in the
            # way, the keys are the queries' own positions 0..T-1): keep that fast kernel.
            key, value, extra_query = self._slot_causal(key, value)
            if extra_query:
                query = torch.cat([torch.zeros_like(query[:, :, :1]), query], dim=2)  # (B, H, 1+Tq, hd)
        elif impl in FLASH:
            key, value, attention_mask = self._slot_flash(query, key, value, attention_mask, window, kwargs)
        elif impl in ("eager", "sdpa"):
            key, value, attention_mask = self._slot_masked(query, key, value, attention_mask, kwargs)
        else:
            raise ValueError(f"EAB attention runs under eager, sdpa or flash_attention_2/3, not {impl!r}")
        interface = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        out, weights = interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=window,
            **kwargs,
        )
        if extra_query:
            out = out[:, 1:]  # (B, Tq, H, hd): the leading query only made the causal mask fit
        out = out.reshape(*input_shape, -1).contiguous()  # (B, Tq, H*hd)
        return self.o_proj(out), weights

    def _slot(self, key):
        """The slot key and value in the keys' batch and dtype: (B, KV, 1, hd) each."""
        shape = (key.shape[0], self.eab_k.shape[0], 1, self.head_dim)
        k = self.eab_k.to(key.dtype)[None, :, None, :].expand(shape)
        v = self.eab_v.to(key.dtype)[None, :, None, :].expand(shape)
        return k, v

    def _first_position(self, key, kwargs):
        """(B, Tk) bool: which key sits at position 0. A DynamicCache hands back the keys of
        consecutive positions ending at the last query's (its sliding-window layers drop the
        oldest), so key j sits at last - (Tk - 1) + j; per row, which also finds the first real
        token after left padding (generate() numbers each row from its first real token)."""
        batch, t_k = key.shape[0], key.shape[-2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            last = torch.full((batch,), t_k - 1, device=key.device)
        else:
            last = position_ids[:, -1].to(key.device).expand(batch)
        key_pos = torch.arange(t_k, device=key.device)[None, :] + (last[:, None] - (t_k - 1))
        return key_pos == 0

    def _slot_causal(self, key, value):
        """sdpa without a mask, keys at positions 0..T-1 and queries the same: (key, value, whether
        the queries need a leading row). With `mask_first_token` the slot takes position 0's
        place (every query sees position 0, which is hidden): the causal square stays as it is.
        Otherwise the slot becomes key 0 and a leading throwaway query makes the square 1+T, so
        that sdpa's top-left causal mask lets query i see the slot and positions 0..i."""
        if not self.has_slot:
            return key, value, False
        k_slot, v_slot = self._slot(key)
        if self.mask_first_token:
            return torch.cat([k_slot, key[:, :, 1:]], dim=2), torch.cat([v_slot, value[:, :, 1:]], dim=2), False
        return torch.cat([k_slot, key], dim=2), torch.cat([v_slot, value], dim=2), True  # (B, KV, 1+T, hd)

    def _slot_masked(self, query, key, value, mask, kwargs):
        """eager / sdpa: prepend the slot and give the mask (bool: True attends; float: additive)
        a first column every query sees."""
        batch, t_q, t_k = query.shape[0], query.shape[-2], key.shape[-2]
        if mask is None and (t_q > 1 or self.mask_first_token):
            # sdpa's mask was skipped for `is_causal` with keys that are not the queries' own
            # (a single query, which sees every key, or a static cache's prefill): spell it out.
            q_idx = torch.arange(t_q, device=key.device)[:, None] + (t_k - t_q)
            mask = (torch.arange(t_k, device=key.device)[None, :] <= q_idx)[None, None]  # (1, 1, Tq, Tk)
        if mask is not None:
            mask = mask[..., :t_k]  # (B|1, 1, Tq, Tk)
            if self.mask_first_token:
                hidden = self._first_position(key, kwargs)[:, None, None, :]  # (B, 1, 1, Tk)
                if mask.dtype == torch.bool:
                    mask = mask & ~hidden
                else:
                    mask = mask.masked_fill(hidden, torch.finfo(mask.dtype).min)
            if self.has_slot:
                first = torch.zeros if mask.dtype != torch.bool else torch.ones
                column = first((*mask.shape[:-1], 1), dtype=mask.dtype, device=mask.device)
                mask = torch.cat([column.expand(mask.shape[0], -1, -1, -1), mask], dim=-1)  # (B|1, 1, Tq, 1+Tk)
        if self.has_slot:
            k_slot, v_slot = self._slot(key)
            key = torch.cat([k_slot, key], dim=2)  # (B, KV, 1+Tk, hd)
            value = torch.cat([v_slot, value], dim=2)
        return key, value, mask

    def _slot_flash(self, query, key, value, mask, window, kwargs):
        """flash: the slot as key 0 under bottom-right causal alignment, or in position 0's place."""
        if not self.has_slot:
            return key, value, mask
        t_k = key.shape[-2]
        k_slot, v_slot = self._slot(key)
        if window is not None:
            # Positions so far (the cache may have dropped the oldest keys), plus the slot.
            position_ids = kwargs.get("position_ids")
            seen = t_k if position_ids is None else int(position_ids.max()) + 1
            if seen + 1 > window:
                raise ValueError(
                    f"EAB attention under flash attention cannot keep the slot visible beyond the sliding "
                    f"window ({window} keys, {seen} tokens here); load the model with attn_implementation='sdpa'"
                )
        if self.mask_first_token:
            # Every query sees position 0 (no window in the way, checked above), hidden and replaced by the slot.
            first = self._first_position(key, kwargs)[:, None, :, None]  # (B, 1, Tk, 1)
            return torch.where(first, k_slot, key), torch.where(first, v_slot, value), mask
        from transformers.modeling_flash_attention_utils import flash_attn_supports_top_left_mask

        if flash_attn_supports_top_left_mask():
            raise ValueError("EAB attention needs flash-attn >= 2.1 (bottom-right causal alignment); use attn_implementation='sdpa'")
        key = torch.cat([k_slot, key], dim=2)  # (B, KV, 1+Tk, hd)
        value = torch.cat([v_slot, value], dim=2)
        if mask is not None:  # (B, Tk) padding mask
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, -t_k:]], dim=1)  # (B, 1+Tk)
        return key, value, mask


class Eab__Family__ForCausalLM(__Family__ForCausalLM):
    config_class = Eab__Family__Config
    _supports_sdpa = True
    _supports_flash_attn = True
    # flex attention's block masks and third-party kernels have no column for the slot.
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
