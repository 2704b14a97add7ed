//! Grouped-query self-attention with an optional EAB slot ahead of the keys, through the fused
//! attention op.

use super::layers::{Linear, RmsNorm, Rope};
use super::taps::{AttnStats, LinearInput, Taps};
use super::{Adapters, CResult, Config, EabSlot};
use crate::ops::attention::{self, Spec};
use candle_core::Tensor;
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Attention {
    pub(super) q_proj: Linear,
    pub(super) k_proj: Linear,
    pub(super) v_proj: Linear,
    pub(super) o_proj: Linear,
    /// Qwen3's RMSNorm over each query and key head (head_dim), before RoPE.
    pub(super) q_norm: Option<RmsNorm>,
    pub(super) k_norm: Option<RmsNorm>,
    pub(super) slot: Option<EabSlot>,
    pub(super) n_heads: usize,
    pub(super) n_kv: usize,
    pub(super) head_dim: usize,
    pub(super) layer: usize,
}

pub(super) struct AttnOut {
    pub(super) out: Tensor,
    pub(super) stats: Option<AttnStats>,
    pub(super) first_kv: Option<(Tensor, Tensor)>,
    /// Post-RoPE keys and values of positions 0..start + T, (B, KV, start + T, hd): what a KV
    /// cache keeps (the slot is no position and never enters it).
    pub(super) kv: (Tensor, Tensor),
}

impl Attention {
    pub(super) fn load(
        vb: VarBuilder,
        cfg: &Config,
        layer: usize,
        adapters: &Adapters,
    ) -> CResult<Self> {
        let (h, kv, hd, d) = (
            cfg.num_attention_heads,
            cfg.n_kv_heads(),
            cfg.head_dim(),
            cfg.hidden_size,
        );
        let (qkv_bias, o_bias) = (cfg.qkv_bias(), cfg.o_bias());
        let norm = |name: &str| -> CResult<Option<RmsNorm>> {
            cfg.qk_norm()
                .then(|| RmsNorm::load(vb.pp(name), hd, cfg.rms_norm_eps))
                .transpose()
        };
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), d, h * hd, qkv_bias, adapters)?,
            k_proj: Linear::load(vb.pp("k_proj"), d, kv * hd, qkv_bias, adapters)?,
            v_proj: Linear::load(vb.pp("v_proj"), d, kv * hd, qkv_bias, adapters)?,
            o_proj: Linear::load(vb.pp("o_proj"), h * hd, d, o_bias, adapters)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            slot: adapters.slots.get(layer).cloned().flatten(),
            n_heads: h,
            n_kv: kv,
            head_dim: hd,
            layer,
        })
    }

    /// x: the tokens at positions `masks.start..masks.start + T`; `past`: the keys and values
    /// of the positions before them.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        masks: &Masks,
        taps: &Taps,
        past: Option<Past>,
    ) -> CResult<AttnOut> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let x = &taps.linear_input(self.layer, LinearInput::Qkv, x.clone())?;
        let heads = |proj: &Linear, n: usize, norm: &Option<RmsNorm>| -> CResult<Tensor> {
            let y = proj.forward(x)?.reshape((b, t, n, hd))?; // (B, T, n, hd)
            let y = match norm {
                Some(norm) => norm.forward(&y)?,
                None => y,
            };
            y.transpose(1, 2) // (B, n, T, hd)
        };
        let q = heads(&self.q_proj, h, &self.q_norm)?; // (B, H, T, hd)
        let k = heads(&self.k_proj, kv, &self.k_norm)?; // (B, KV, T, hd)
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, kv, hd))?
            .transpose(1, 2)?
            .contiguous()?; // (B, KV, T, hd)
        let (q_raw, k_raw) = (q, k.contiguous()?);
        let q = rope.apply(&q_raw, masks.start)?;
        let k = rope.apply(&k_raw, masks.start)?;
        let (mut k, mut v) = match &taps.hook {
            Some(hook) => hook.key_value(self.layer, &k, &v)?,
            None => (k, v),
        };
        let kv_out = match past {
            None => (k.clone(), v.clone()),
            Some(Past::Rotated((pk, pv))) => {
                k = Tensor::cat(&[pk, &k], 2)?.contiguous()?; // (B, KV, start + T, hd)
                v = Tensor::cat(&[pv, &v], 2)?.contiguous()?;
                (k.clone(), v.clone())
            }
            Some(Past::Raw(None)) => (k_raw, v.clone()),
            Some(Past::Raw(Some((ek, ev)))) => {
                // Entry i of a rolling cache is at position i, whatever token it holds.
                let kept = (
                    Tensor::cat(&[ek, &k_raw], 2)?, // (B, KV, start + T, hd), before RoPE
                    Tensor::cat(&[ev, &v], 2)?,
                );
                k = Tensor::cat(&[&rope.apply(ek, 0)?, &k], 2)?.contiguous()?;
                v = kept.1.contiguous()?;
                kept
            }
        };
        let slot = match (&self.slot, &taps.hook) {
            (Some(s), Some(hook)) => {
                let (kv, hd) = s.k.dims2()?;
                let (k, v) = hook.key_value(
                    self.layer,
                    &s.k.reshape((1, kv, 1, hd))?, // (1, KV, 1, hd)
                    &s.v.reshape((1, kv, 1, hd))?,
                )?;
                Some(EabSlot {
                    k: k.reshape((kv, hd))?, // (KV, hd)
                    v: v.reshape((kv, hd))?,
                })
            }
            (s, _) => s.clone(),
        };
        let first_kv = if taps.first_kv {
            Some((
                k.narrow(2, 0, 1)?.squeeze(2)?,
                v.narrow(2, 0, 1)?.squeeze(2)?,
            )) // (B, KV, hd)
        } else {
            None
        };
        // The slot is key 0 of every KV head, ahead of the tokens; position-free, never rotated.
        let (k, v, mask) = match &slot {
            Some(slot) => {
                // The slot lives where it trains; a split model's layer may sit elsewhere.
                let lead = |x: &Tensor| -> CResult<Tensor> {
                    x.to_device(k.device())?
                        .to_dtype(k.dtype())?
                        .unsqueeze(0)?
                        .unsqueeze(2)?
                        .broadcast_as((b, kv, 1, hd)) // (B, KV, 1, hd)
                };
                (
                    Tensor::cat(&[&lead(&slot.k)?, &k], 2)?, // (B, KV, 1+T, hd)
                    Tensor::cat(&[&lead(&slot.v)?, &v], 2)?,
                    &masks.slot,
                )
            }
            None => (k, v, &masks.plain),
        };
        let mask = mask
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("attention mask not built".into()))?;
        let (out, stats) = if masks.pin && mask.spec().slots > 0 {
            // A chunk of a full rolling cache: the slot and the sinks see every query at the
            // one position each query has in the literal cache (docs/streaming.md).
            let lead = rope.apply_at(&q_raw, masks.start)?;
            (attention::pinned(&q, &lead, &k, &v, mask)?, None)
        } else {
            attention::attention(&q, &k, &v, mask, taps.attn)? // (B, T, H, hd)
        };
        let out = out.reshape((b, t, h * hd))?; // (B, T, H*hd)
        let out = taps.linear_input(self.layer, LinearInput::O, out)?;
        Ok(AttnOut {
            out: self.o_proj.forward(&out)?,
            stats,
            first_kv,
            kv: kv_out,
        })
    }
}

/// The keys and values of the positions before a forward pass's tokens.
pub(super) enum Past<'a> {
    /// After RoPE, positions 0..start ([`super::KvCache`]).
    Rotated(&'a (Tensor, Tensor)),
    /// Before RoPE, a rolling cache's entries ([`super::StreamCache`]; none while it is
    /// empty), rotated here at their cache positions 0..start; the pass returns them with its
    /// own tokens', unrotated.
    Raw(Option<&'a (Tensor, Tensor)>),
}

/// The attention masks of one forward pass: one for layers without a slot, one for layers with,
/// for T queries at positions start..start + T.
#[derive(Clone)]
pub(super) struct Masks {
    pub(super) plain: Option<attention::Mask>,
    pub(super) slot: Option<attention::Mask>,
    pub(super) window: Option<usize>,
    pub(super) hide_first: bool,
    pub(super) start: usize,
    /// Keys every query sees ahead of the tokens besides the slot: a rolling cache's sinks.
    pub(super) lead: usize,
    /// The slot and `lead` keys are scored by the queries rotated at `start` (all of them).
    pub(super) pin: bool,
}

impl Masks {
    /// The spec of the layers with `slots` slot keys (0 or 1).
    pub(super) fn spec(&self, slots: usize) -> Spec {
        Spec {
            slots: slots + self.lead,
            window: self.window,
            hide_first: self.hide_first,
            block: 0,
        }
    }
}
