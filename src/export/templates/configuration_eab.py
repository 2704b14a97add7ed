"""Configuration of an eabfit export: a __Family__ model with Explicit Attention Bias slots.

Written by `eabfit export --format hf` from one template (`src/export/templates/` in eabfit);
`__Family__` and `__family__` name the family of the base model. The `eab` block of config.json
says which layers carry a slot and whether position 0 is hidden from every query.
"""

from transformers.models.__family__.configuration___family__ import __Family__Config


class Eab__Family__Config(__Family__Config):
    model_type = "eab___family__"
    # The `eab` block: {"layers": [...], "mask_first_token": bool, "n_kv_heads": int,
    # "head_dim": int, "slot_tensors": str, "format_version": 1}.
    eab: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # transformers builds a default instance (no `eab`) to diff against when saving; the
        # model refuses to run without one (see Eab__Family__ForCausalLM).
        if self.eab is not None:
            eab_settings(self)


def eab_settings(config):
    """(layers with a slot, mask_first_token) from the `eab` block, checked against the model."""
    eab = config.eab
    if not isinstance(eab, dict):
        raise ValueError("config.json: `eab` is missing; this folder was not written by `eabfit export --format hf`")
    if eab.get("format_version") != 1:
        raise ValueError(f"config.json: `eab.format_version` {eab.get('format_version')!r} is not supported (1 is)")
    for key in ("layers", "mask_first_token", "n_kv_heads", "head_dim"):
        if key not in eab:
            raise ValueError(f"config.json: `eab.{key}` is missing")
    layers = eab["layers"]
    if not isinstance(layers, list) or any(not isinstance(i, int) or not 0 <= i < config.num_hidden_layers for i in layers):
        raise ValueError(f"config.json: `eab.layers` {layers!r} must list layers below num_hidden_layers {config.num_hidden_layers}")
    # Qwen2's config has no head_dim attribute unless config.json gives one; its attention falls
    # back to hidden_size / num_attention_heads, as here.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if (eab["n_kv_heads"], eab["head_dim"]) != (config.num_key_value_heads, head_dim):
        raise ValueError(
            f"config.json: `eab` slots of {eab['n_kv_heads']} x {eab['head_dim']} do not fit the model's "
            f"{config.num_key_value_heads} KV heads x head_dim {head_dim}"
        )
    mask_first_token = bool(eab["mask_first_token"])
    if mask_first_token and sorted(set(layers)) != list(range(config.num_hidden_layers)):
        raise ValueError("config.json: `eab.mask_first_token` needs a slot in every layer (position 0 would have nothing to attend to)")
    return set(layers), mask_first_token


__all__ = ["Eab__Family__Config"]
