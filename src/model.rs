//! One LLaMA-family decoder (LLaMA 1/2/3, Mistral), differentiable end to end.
//!
//! Unlike candle-transformers' `llama.rs` it returns logits for every position, runs RMSNorm,
//! RoPE, attention and the frozen projections through `crate::ops` (fused forwards with real
//! backwards; candle's own fused kernels have none), exposes each layer's output hidden state
//! through [`Taps`], and takes adapters (EAB slots, LoRA) through its constructor. Names passed
//! to `vb.pp()` are the Hugging Face tensor names.

use crate::adapters::{Adapters, EabSlot, Lora};
use crate::ops::acc;
use crate::ops::attention::{self, Spec};
use crate::ops::block;
use crate::ops::recompute::{recompute, BlockFn};
use crate::ops::{linear::linear, norm::rms_norm, rope::rope, swiglu::swiglu};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

type CResult<T> = candle_core::Result<T>;

/// Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`); other types are rejected
/// at config validation so that no model silently runs with the wrong positions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn one() -> f64 {
    1.0
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    4096
}

/// The fields of a Hugging Face `config.json` this model reads (LlamaConfig / MistralConfig).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub vocab_size: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

impl Config {
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Checks the combinations serde cannot; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let h = self.num_attention_heads;
        if h == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return Err(
                "hidden_size, num_attention_heads, num_hidden_layers and vocab_size must be > 0"
                    .into(),
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {h}",
                self.hidden_size
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        let kv = self.n_kv_heads();
        if kv == 0 || !h.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"
            ));
        }
        if let Some(rs) = &self.rope_scaling {
            match rs.rope_type.as_str() {
                "default" => {}
                "llama3" => {
                    if rs.low_freq_factor.is_none()
                        || rs.high_freq_factor.is_none()
                        || rs.original_max_position_embeddings.is_none()
                    {
                        return Err("rope_scaling (llama3) needs low_freq_factor, high_freq_factor and original_max_position_embeddings".into());
                    }
                }
                other => {
                    return Err(format!(
                        "rope_scaling.rope_type `{other}` is not supported (llama3 or default)"
                    ))
                }
            }
        }
        Ok(())
    }

    /// Inverse RoPE frequencies, one per pair of head dims, with llama3 scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let base: Vec<f64> = (0..hd)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f64 / hd as f64))
            .collect();
        let Some(rs) = self
            .rope_scaling
            .as_ref()
            .filter(|r| r.rope_type == "llama3")
        else {
            return base;
        };
        let (lo, hi) = (
            rs.low_freq_factor.unwrap_or(1.0),
            rs.high_freq_factor.unwrap_or(4.0),
        );
        let orig = rs.original_max_position_embeddings.unwrap_or(8192) as f64;
        let (lo_wavelen, hi_wavelen) = (orig / lo, orig / hi);
        base.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < hi_wavelen {
                    f
                } else if wavelen > lo_wavelen {
                    f / rs.factor
                } else {
                    let smooth = (orig / wavelen - lo) / (hi - lo);
                    (1.0 - smooth) * f / rs.factor + smooth * f
                }
            })
            .collect()
    }
}

/// The four inputs of a layer's projections: q, k and v read one input, gate and up another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearInput {
    Qkv,
    O,
    GateUp,
    Down,
}

/// Sees, and may replace, the inputs of the projections and the post-RoPE keys and values
/// (fake quantization, activation statistics). Gradients flow through whatever it returns.
pub trait ActHook: std::fmt::Debug + Send + Sync {
    /// `x`: (B, T, d_in), the input of the `input` projections of `layer`.
    fn linear_input(&self, layer: usize, input: LinearInput, x: &Tensor) -> CResult<Tensor>;
    /// `k`, `v`: (B, KV, T, hd) after RoPE; an EAB slot comes through as (1, KV, 1, hd).
    fn key_value(&self, layer: usize, k: &Tensor, v: &Tensor) -> CResult<(Tensor, Tensor)>;
}

/// What a caller wants to observe or change during one forward pass.
#[derive(Debug, Clone, Default)]
pub struct Taps {
    /// Keep every layer's output hidden state in [`Output::hidden`].
    pub hidden: bool,
    /// Keep per-layer attention statistics in [`Output::attn`].
    pub attn: bool,
    /// Keep each layer's post-RoPE key and value of position 0 in [`Output::first_kv`].
    pub first_kv: bool,
    /// Entries of layer outputs to overwrite in flight (the paper's interventions).
    pub edits: Vec<Edit>,
    /// Keep only each block's input for the backward pass and run the block again there
    /// (activation recomputation; blocks with LoRA are kept whole). Only `hidden` combines
    /// with it.
    pub recompute: bool,
    /// Sees every projection input and every key/value (see [`ActHook`]).
    pub hook: Option<std::sync::Arc<dyn ActHook>>,
    /// Run each LoRA-free block as one op with a hand-written backward ([`crate::ops::block`]):
    /// `None` decides (on for CUDA bf16 with head_dim 64 or 128), `Some` forces it on or off.
    /// Only `hidden` combines with it; other taps keep the per-op path.
    pub block_op: Option<bool>,
    /// Blocks whose weights train (pretraining) take the block op too, and its backward puts
    /// their weight gradients here instead of in candle's gradient store.
    pub weight_grads: Option<std::sync::Arc<block::WeightGrads>>,
}

impl Taps {
    fn linear_input(&self, layer: usize, input: LinearInput, x: Tensor) -> CResult<Tensor> {
        match &self.hook {
            Some(h) => h.linear_input(layer, input, &x),
            None => Ok(x),
        }
    }
}

/// Set `h[:, position, dim] = value` in the output of decoder layer `layer`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Edit {
    pub layer: usize,
    pub position: usize,
    pub dim: usize,
    pub value: f32,
}

/// Attention mass that queries put on position 0 and on the EAB slot, averaged over the batch,
/// the heads and the queries 1..T (query 0 has nowhere else to look). Scalar f32 tensors.
pub type AttnStats = attention::Stats;

#[derive(Debug)]
pub struct Output {
    /// (B, T, V) in f32 (f64 for an f64 model).
    pub logits: Tensor,
    /// Per layer, (B, T, D) in the model dtype, when `Taps::hidden`.
    pub hidden: Vec<Tensor>,
    pub attn: Vec<AttnStats>,
    /// Per layer, post-RoPE (key, value) of position 0, each (B, KV, hd), when `Taps::first_kv`.
    pub first_kv: Vec<(Tensor, Tensor)>,
}

/// A bias-free projection `y = x W^T`, plus `scale * (x A^T) B^T` when a LoRA adapter is attached.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    lora: Option<Lora>,
}

impl Linear {
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, adapters: &Adapters) -> CResult<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let lora = adapters.lora.get(&vb.prefix()).cloned();
        Ok(Self { weight, lora })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (b, t, d) = x.dims3()?;
        let x2 = x.reshape((b * t, d))?; // (B*T, in)
        let mut y = linear(&x2, &self.weight)?; // (B*T, out)
        if let Some(l) = &self.lora {
            // Adapters stay f32 (bf16 LoRA updates lose most of their low-rank signal).
            let xa = x2.to_dtype(l.a.dtype())?.matmul(&l.a.t()?)?; // (B*T, r)
            let delta = (xa.matmul(&l.b.t()?)? * l.scale)?; // (B*T, out)
            let delta = delta.to_dtype(y.dtype())?;
            y = (y + delta)?;
        }
        y.reshape((b, t, ()))
    }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> CResult<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// cos/sin tables for rotate-half RoPE (the Hugging Face layout), (max_pos, head_dim / 2): the
/// two halves of a head share their frequencies.
#[derive(Debug, Clone)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &Config, dtype: DType, dev: &Device) -> CResult<Self> {
        let inv = cfg.inv_freq();
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * inv.len() * 2);
        let mut sin = Vec::with_capacity(n * inv.len() * 2);
        for p in 0..n {
            cos.extend(inv.iter().map(|f| (p as f64 * f).cos()));
            sin.extend(inv.iter().map(|f| (p as f64 * f).sin()));
        }
        let shape = (n, inv.len());
        // Rounded through f32 as before for f32/bf16/f16 models; full precision for f64 ones.
        let table = |v: Vec<f64>| -> CResult<Tensor> {
            Tensor::from_vec(v, shape, dev)?
                .to_dtype(acc(dtype))?
                .to_dtype(dtype)
        };
        Ok(Self {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }

    /// x: (B, H, T, hd) -> same, rotated by positions start..start + T.
    fn apply(&self, x: &Tensor, start: usize) -> CResult<Tensor> {
        let t = x.dim(2)?;
        let table = |tab: &Tensor| tab.narrow(0, start, t)?.contiguous(); // (T, hd/2)
        rope(x, &table(&self.cos)?, &table(&self.sin)?)
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    slot: Option<EabSlot>,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    layer: usize,
}

struct AttnOut {
    out: Tensor,
    stats: Option<AttnStats>,
    first_kv: Option<(Tensor, Tensor)>,
    /// Post-RoPE keys and values of positions 0..start + T, (B, KV, start + T, hd): what a KV
    /// cache keeps (the slot is no position and never enters it).
    kv: (Tensor, Tensor),
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config, layer: usize, adapters: &Adapters) -> CResult<Self> {
        let (h, kv, hd, d) = (
            cfg.num_attention_heads,
            cfg.n_kv_heads(),
            cfg.head_dim(),
            cfg.hidden_size,
        );
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), d, h * hd, adapters)?,
            k_proj: Linear::load(vb.pp("k_proj"), d, kv * hd, adapters)?,
            v_proj: Linear::load(vb.pp("v_proj"), d, kv * hd, adapters)?,
            o_proj: Linear::load(vb.pp("o_proj"), h * hd, d, adapters)?,
            slot: adapters.slots.get(layer).cloned().flatten(),
            n_heads: h,
            n_kv: kv,
            head_dim: hd,
            layer,
        })
    }

    /// x: the tokens at positions `masks.start..masks.start + T`; `past`: the cached keys and
    /// values of the positions before them.
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        masks: &Masks,
        taps: &Taps,
        past: Option<&(Tensor, Tensor)>,
    ) -> CResult<AttnOut> {
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let x = &taps.linear_input(self.layer, LinearInput::Qkv, x.clone())?;
        let q = self
            .q_proj
            .forward(x)?
            .reshape((b, t, h, hd))?
            .transpose(1, 2)?; // (B, H, T, hd)
        let k = self
            .k_proj
            .forward(x)?
            .reshape((b, t, kv, hd))?
            .transpose(1, 2)?; // (B, KV, T, hd)
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, kv, hd))?
            .transpose(1, 2)?
            .contiguous()?; // (B, KV, T, hd)
        let q = rope.apply(&q, masks.start)?;
        let k = rope.apply(&k, masks.start)?;
        let (mut k, mut v) = match &taps.hook {
            Some(hook) => hook.key_value(self.layer, &k, &v)?,
            None => (k, v),
        };
        if let Some((pk, pv)) = past {
            k = Tensor::cat(&[pk, &k], 2)?.contiguous()?; // (B, KV, start + T, hd)
            v = Tensor::cat(&[pv, &v], 2)?.contiguous()?;
        }
        let kv_out = (k.clone(), v.clone());
        let slot = match (&self.slot, &taps.hook) {
            (Some(s), Some(hook)) => {
                let (kv, hd) = s.k.dims2()?;
                let (k, v) = hook.key_value(
                    self.layer,
                    &s.k.reshape((1, kv, 1, hd))?,
                    &s.v.reshape((1, kv, 1, hd))?,
                )?;
                Some(EabSlot {
                    k: k.reshape((kv, hd))?,
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
                let lead = |x: &Tensor| -> CResult<Tensor> {
                    x.to_dtype(k.dtype())?
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
        let (out, stats) = attention::attention(&q, &k, &v, mask, taps.attn)?; // (B, T, H, hd)
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

/// The attention masks of one forward pass: one for layers without a slot, one for layers with,
/// for T queries at positions start..start + T.
#[derive(Clone)]
struct Masks {
    plain: Option<attention::Mask>,
    slot: Option<attention::Mask>,
    window: Option<usize>,
    hide_first: bool,
    start: usize,
}

impl Masks {
    fn spec(&self, slots: usize) -> Spec {
        Spec {
            slots,
            window: self.window,
            hide_first: self.hide_first,
            block: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    layer: usize,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config, layer: usize, adapters: &Adapters) -> CResult<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(vb.pp("gate_proj"), d, f, adapters)?,
            up_proj: Linear::load(vb.pp("up_proj"), d, f, adapters)?,
            down_proj: Linear::load(vb.pp("down_proj"), f, d, adapters)?,
            layer,
        })
    }

    fn forward(&self, x: &Tensor, taps: &Taps) -> CResult<Tensor> {
        let x = &taps.linear_input(self.layer, LinearInput::GateUp, x.clone())?;
        let inner = taps.linear_input(
            self.layer,
            LinearInput::Down,
            swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?,
        )?;
        self.down_proj.forward(&inner)
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config, layer: usize, adapters: &Adapters) -> CResult<Self> {
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg, layer, adapters)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, layer, adapters)?,
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        masks: &Masks,
        taps: &Taps,
        past: Option<&(Tensor, Tensor)>,
    ) -> CResult<(Tensor, AttnOut)> {
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, rope, masks, taps, past)?;
        let x = (x + &attn.out)?;
        let x = (&x
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&x)?, taps)?)?;
        Ok((x, attn))
    }

    /// The block's seven projections: q, k, v, o, gate, up, down.
    fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    fn lora_free(&self) -> bool {
        self.linears().iter().all(|l| l.lora.is_none())
    }

    /// The weights the block op reads; `None` when the block has LoRA, or trains a weight
    /// (pretraining) and no `grads` was given to take its gradient.
    fn op_weights(
        &self,
        eps: f64,
        layer: usize,
        grads: Option<&Arc<block::WeightGrads>>,
    ) -> Option<block::Weights> {
        if !self.lora_free() {
            return None;
        }
        let norms = [
            &self.input_layernorm.weight,
            &self.post_attention_layernorm.weight,
        ];
        let trains = self.linears().iter().any(|l| l.weight.track_op())
            || norms.iter().any(|w| w.track_op());
        // Trained weights need somewhere for their gradients: no `grads`, no block op.
        let trained = if trains {
            Some((format!("model.layers.{layer}."), grads?.clone()))
        } else {
            None
        };
        let (a, m) = (&self.self_attn, &self.mlp);
        Some(block::Weights {
            input_layernorm: self.input_layernorm.weight.detach(),
            post_attention_layernorm: self.post_attention_layernorm.weight.detach(),
            eps,
            q_proj: a.q_proj.weight.detach(),
            k_proj: a.k_proj.weight.detach(),
            v_proj: a.v_proj.weight.detach(),
            o_proj: a.o_proj.weight.detach(),
            gate_proj: m.gate_proj.weight.detach(),
            up_proj: m.up_proj.weight.detach(),
            down_proj: m.down_proj.weight.detach(),
            heads: a.n_heads,
            kv_heads: a.n_kv,
            head_dim: a.head_dim,
            trained,
        })
    }

    /// The block through [`recompute`]: its slot (the only trainable tensors of a LoRA-free
    /// block) goes in as the op's parameters.
    fn recomputed(&self, x: &Tensor, rope: &Rope, masks: &Masks) -> CResult<Tensor> {
        let (block, rope, masks) = (self.clone(), rope.clone(), masks.clone());
        let params = match &self.self_attn.slot {
            Some(s) => vec![s.k.clone(), s.v.clone()],
            None => vec![],
        };
        let f: BlockFn = Arc::new(move |x: &Tensor| {
            Ok(block.forward(x, &rope, &masks, &Taps::default(), None)?.0)
        });
        recompute(f, x, &params)
    }
}

/// Per layer, the post-RoPE keys and values (B, KV, T, hd) of the positions that
/// [`Model::forward_cached`] has run. The EAB slot is not in it: it is no position.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(k, _)| k.dims().get(2).copied().unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    rope: Rope,
    cfg: Config,
    mask_first_token: bool,
    device: Device,
}

impl Model {
    /// `vb` is rooted at the checkpoint's top level (tensors `model.*` and `lm_head.weight`).
    pub fn load(vb: VarBuilder, cfg: &Config, adapters: &Adapters) -> CResult<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        // The mask is shared by all layers: one without a slot would give query 0 nothing to
        // attend to (an all -inf row), and its NaN would reach every logit.
        if adapters.mask_first_token {
            if let Some(i) = (0..cfg.num_hidden_layers)
                .find(|&i| adapters.slots.get(i).is_none_or(Option::is_none))
            {
                candle_core::bail!(
                    "mask_first_token needs an EAB slot in every layer: layer {i} has none, so position 0 would have nothing to attend to"
                );
            }
        }
        let m = vb.pp("model");
        let embed_tokens = m
            .pp("embed_tokens")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(m.pp("layers").pp(i), cfg, i, adapters))
            .collect::<CResult<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        // Tied checkpoints usually omit lm_head.weight; some untied ones still carry a copy.
        let lm_head = if !cfg.tie_word_embeddings || vb.contains_tensor("lm_head.weight") {
            vb.pp("lm_head")
                .get((cfg.vocab_size, cfg.hidden_size), "weight")?
        } else {
            embed_tokens.clone()
        };
        Ok(Self {
            rope: Rope::new(cfg, vb.dtype(), vb.device())?,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
            mask_first_token: adapters.mask_first_token,
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }
    pub fn layer_mlp_down(&self, layer: usize) -> &Linear {
        &self.layers[layer].mlp.down_proj
    }

    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The masks the layers of this model need for T tokens after `start` cached ones.
    fn masks(&self, t: usize, start: usize) -> CResult<Masks> {
        let mut m = Masks {
            plain: None,
            slot: None,
            window: self.cfg.sliding_window,
            hide_first: self.mask_first_token,
            start,
        };
        let (dt, n) = (self.dtype(), start + t);
        if self.layers.iter().any(|l| l.self_attn.slot.is_some()) {
            m.slot = Some(attention::mask(t, n + 1, &m.spec(1), dt, &self.device)?);
        }
        if self.layers.iter().any(|l| l.self_attn.slot.is_none()) {
            m.plain = Some(attention::mask(t, n, &m.spec(0), dt, &self.device)?);
        }
        Ok(m)
    }

    /// The shared inputs of the block op for T tokens from position 0 (without, with a slot),
    /// or `None` when this pass does not use it (see [`Taps::block_op`]).
    #[allow(clippy::type_complexity)]
    fn block_contexts(
        &self,
        taps: &Taps,
        t: usize,
        masks: &Masks,
    ) -> CResult<Option<(Option<Arc<block::Context>>, Option<Arc<block::Context>>)>> {
        let auto = self.device.is_cuda()
            && self.dtype() == DType::BF16
            && matches!(self.cfg.head_dim(), 64 | 128);
        let plain_taps = taps.hook.is_none()
            && taps.edits.is_empty()
            && !taps.attn
            && !taps.first_kv
            && !taps.recompute;
        if !(taps.block_op.unwrap_or(auto) && plain_taps) {
            return Ok(None);
        }
        let cos = self.rope.cos.narrow(0, 0, t)?.contiguous()?; // (T, hd/2)
        let sin = self.rope.sin.narrow(0, 0, t)?.contiguous()?;
        let cx = |mask: &Option<attention::Mask>| {
            mask.as_ref().map(|m| {
                Arc::new(block::Context {
                    cos: cos.clone(),
                    sin: sin.clone(),
                    mask: m.clone(),
                })
            })
        };
        Ok(Some((cx(&masks.plain), cx(&masks.slot))))
    }

    fn check_len(&self, n: usize) -> CResult<()> {
        if n > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {n} tokens exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        Ok(())
    }

    fn embed(&self, input_ids: &Tensor) -> CResult<Tensor> {
        let (b, t) = input_ids.dims2()?;
        crate::ops::embedding::embed(&self.embed_tokens, input_ids)?.reshape((
            b,
            t,
            self.cfg.hidden_size,
        )) // (B, T, D)
    }

    /// input_ids: (B, T) u32 -> the final normed hidden state (B, T, D) in the model dtype, plus
    /// whatever `taps` asked for; `Output::logits` is left a scalar zero. Training computes
    /// its hold term through the head in chunks from here ([`crate::ops::kl`]).
    pub fn forward_trunk(&self, input_ids: &Tensor, taps: &Taps) -> CResult<(Tensor, Output)> {
        let t = input_ids.dim(1)?;
        self.check_len(t)?;
        let mut x = self.embed(input_ids)?;
        let masks = self.masks(t, 0)?;
        let mut out = Output {
            logits: Tensor::zeros((), DType::F32, &self.device)?,
            hidden: vec![],
            attn: vec![],
            first_kv: vec![],
        };
        if taps.recompute && (taps.attn || taps.first_kv || !taps.edits.is_empty()) {
            candle_core::bail!("recompute combines with the hidden-state tap only");
        }
        let contexts = self.block_contexts(taps, t, &masks)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some((plain, with_slot)) = &contexts {
                let grads = taps.weight_grads.as_ref();
                if let Some(w) = layer.op_weights(self.cfg.rms_norm_eps, i, grads) {
                    let slot = layer.self_attn.slot.as_ref();
                    let cx = if slot.is_some() { with_slot } else { plain };
                    let cx = cx
                        .clone()
                        .ok_or_else(|| candle_core::Error::Msg("block context not built".into()))?;
                    x = block::block(&x, Arc::new(w), cx, slot.map(|s| (&s.k, &s.v)))?;
                    if taps.hidden {
                        out.hidden.push(x.clone());
                    }
                    continue;
                }
            }
            if taps.recompute && layer.lora_free() {
                x = layer.recomputed(&x, &self.rope, &masks)?;
                if taps.hidden {
                    out.hidden.push(x.clone());
                }
                continue;
            }
            let (h, attn) = layer.forward(&x, &self.rope, &masks, taps, None)?;
            x = apply_edits(&h, i, &taps.edits)?;
            if taps.hidden {
                out.hidden.push(x.clone());
            }
            out.attn.extend(attn.stats);
            out.first_kv.extend(attn.first_kv);
        }
        Ok((self.norm.forward(&x)?, out))
    }

    /// Final normed hidden (B, T, D) -> logits (B, T, V) in f32 (f64 for an f64 model).
    pub fn head(&self, x: &Tensor) -> CResult<Tensor> {
        let (b, t, d) = x.dims3()?;
        linear(&x.reshape((b * t, d))?, &self.lm_head)? // (B*T, V)
            .reshape((b, t, ()))?
            .to_dtype(acc(x.dtype()))
    }

    /// input_ids: (B, T) u32 -> logits (B, T, V) f32 plus whatever `taps` asked for.
    pub fn forward(&self, input_ids: &Tensor, taps: &Taps) -> CResult<Output> {
        let (x, mut out) = self.forward_trunk(input_ids, taps)?;
        out.logits = self.head(&x)?;
        Ok(out)
    }

    /// Logits (B, T, V) f32 of `input_ids` (B, T) continuing the positions in `cache`, which
    /// then holds them too: decoding one token costs one position, not the whole prefix.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> CResult<Tensor> {
        let (t, start) = (input_ids.dim(1)?, cache.len());
        self.check_len(start + t)?;
        let mut x = self.embed(input_ids)?;
        let masks = self.masks(t, start)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let (h, attn) = layer.forward(
                &x,
                &self.rope,
                &masks,
                &Taps::default(),
                cache.layers.get(i),
            )?;
            x = h;
            layers.push(attn.kv);
        }
        cache.layers = layers;
        self.head(&self.norm.forward(&x)?)
    }

    /// Logits only, (B, T, V) f32, differentiable.
    pub fn logits(&self, input_ids: &Tensor) -> CResult<Tensor> {
        Ok(self.forward(input_ids, &Taps::default())?.logits)
    }
}

/// h * (1 - M) + M * values, with M marking the edited (position, dim) entries: differentiable,
/// and exactly the identity when a layer has no edit.
fn apply_edits(h: &Tensor, layer: usize, edits: &[Edit]) -> CResult<Tensor> {
    let mine: Vec<&Edit> = edits.iter().filter(|e| e.layer == layer).collect();
    if mine.is_empty() {
        return Ok(h.clone());
    }
    let (_, t, d) = h.dims3()?;
    let mut keep = vec![1f32; t * d];
    let mut vals = vec![0f32; t * d];
    for e in mine {
        if e.position < t && e.dim < d {
            keep[e.position * d + e.dim] = 0.0;
            vals[e.position * d + e.dim] = e.value;
        }
    }
    let keep = Tensor::from_vec(keep, (t, d), h.device())?.to_dtype(h.dtype())?;
    let vals = Tensor::from_vec(vals, (t, d), h.device())?.to_dtype(h.dtype())?;
    h.broadcast_mul(&keep)?.broadcast_add(&vals)
}
