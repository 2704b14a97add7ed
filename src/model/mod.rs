//! One LLaMA-family decoder (LLaMA 1/2/3, Mistral, Qwen2/2.5, Qwen3), differentiable end to end.
//! Qwen is a few fields of the same decoder: Qwen2's q/k/v biases ([`Config::qkv_bias`]) and
//! Qwen3's per-head RMSNorm of queries and keys before RoPE ([`Config::qk_norm`]).
//!
//! Unlike candle-transformers' `llama.rs` it returns logits for every position, runs RMSNorm,
//! RoPE, attention and the frozen projections through `crate::ops` (fused forwards with real
//! backwards; candle's own fused kernels have none), exposes each layer's output hidden state
//! through [`Taps`], and takes adapters (EAB slots, LoRA) through its constructor. Names passed
//! to `vb.pp()` are the Hugging Face tensor names.
//!
//! One file per piece, each with `load(vb, cfg, ..)` and `forward`: [`config`](Config) (what
//! `config.json` says, checked), `layers` (projections with LoRA, RMSNorm, RoPE tables),
//! `attention`, `mlp`, `block` (one decoder layer), and [`Model`] here (embedding, the layers,
//! the head). `adapters` holds what the constructor takes beside the checkpoint, `taps` what a
//! forward pass may observe or change, `cache` the keys and values decoding keeps.

mod adapters;
mod attention;
mod block;
mod cache;
mod config;
mod layers;
mod mlp;
mod taps;

pub use adapters::{Adapters, EabSlot, Lora};
pub use cache::{KvCache, StreamCache};
pub use config::{Config, Family, RopeScaling};
pub use layers::Linear;
pub use taps::{ActHook, AttnStats, Edit, LinearInput, Output, Taps};

use crate::device_map::Placement;
use crate::ops::acc;
use crate::ops::attention as attn_op;
use crate::ops::block as block_op;
use crate::ops::linear::linear;
use attention::{Masks, Past};
use block::Block;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use layers::{RmsNorm, Rope};
use std::sync::Arc;
use taps::apply_edits;

type CResult<T> = candle_core::Result<T>;

#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    /// One RoPE table per device of the placement (by slot).
    ropes: Vec<Rope>,
    cfg: Config,
    mask_first_token: bool,
    placement: Placement,
}

impl Model {
    /// `vb` is rooted at the checkpoint's top level (tensors `model.*` and `lm_head.weight`).
    pub fn load(vb: VarBuilder, cfg: &Config, adapters: &Adapters) -> CResult<Self> {
        let placement = Placement::single(vb.device());
        Self::load_placed(vb, cfg, adapters, &placement)
    }

    /// [`Model::load`] with the embedding, each layer, and the final norm + head on the devices
    /// `placement` gives them. Inputs and outputs live on the head's device
    /// ([`Model::device`]); activations cross between devices at layer boundaries.
    pub fn load_placed(
        vb: VarBuilder,
        cfg: &Config,
        adapters: &Adapters,
        placement: &Placement,
    ) -> CResult<Self> {
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
        let p = placement;
        fn on<'a>(vb: VarBuilder<'a>, p: &Placement, slot: usize) -> VarBuilder<'a> {
            vb.set_device(p.device(slot).clone())
        }
        let m = vb.pp("model");
        let embed_tokens = on(m.pp("embed_tokens"), p, p.embed())
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(on(m.pp("layers").pp(i), p, p.layer(i)), cfg, i, adapters))
            .collect::<CResult<Vec<_>>>()?;
        let norm = RmsNorm::load(
            on(m.pp("norm"), p, p.head()),
            cfg.hidden_size,
            cfg.rms_norm_eps,
        )?;
        // Tied checkpoints usually omit lm_head.weight; some untied ones still carry a copy.
        let lm_head = if !cfg.tie_word_embeddings || vb.contains_tensor("lm_head.weight") {
            on(vb.pp("lm_head"), p, p.head()).get((cfg.vocab_size, cfg.hidden_size), "weight")?
        } else {
            // Tied, with embedding and head on two devices: the head reads its own copy.
            p.transfer(&embed_tokens, p.embed(), p.head())?
        };
        let ropes = (0..p.slots())
            .map(|s| Rope::new(cfg, vb.dtype(), p.device(s)))
            .collect::<CResult<Vec<_>>>()?;
        Ok(Self {
            ropes,
            embed_tokens,
            layers,
            norm,
            lm_head,
            cfg: cfg.clone(),
            mask_first_token: adapters.mask_first_token,
            placement: p.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Where the model takes its inputs and returns its outputs (logits, taps): the head's
    /// device.
    pub fn device(&self) -> &Device {
        self.placement.home()
    }
    pub fn placement(&self) -> &Placement {
        &self.placement
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

    /// The masks the layers of this model need for T tokens after `start` cached ones, one set
    /// per device slot.
    fn masks(&self, t: usize, start: usize) -> CResult<Vec<Masks>> {
        (0..self.placement.slots())
            .map(|s| self.masks_on(t, start, self.placement.device(s)))
            .collect()
    }

    fn masks_on(&self, t: usize, start: usize, device: &Device) -> CResult<Masks> {
        let m = Masks {
            plain: None,
            slot: None,
            window: self.cfg.window(),
            hide_first: self.mask_first_token,
            start,
            lead: 0,
            pin: false,
        };
        self.build_masks(m, t, device)
    }

    /// `m` with its masks built on `device` for T queries after `m.start - m.lead` tokens.
    fn build_masks(&self, mut m: Masks, t: usize, device: &Device) -> CResult<Masks> {
        let (dt, keys) = (self.dtype(), m.start + t);
        if self.layers.iter().any(|l| l.self_attn.slot.is_some()) {
            m.slot = Some(attn_op::mask(t, keys + 1, &m.spec(1), dt, device)?);
        }
        if self.layers.iter().any(|l| l.self_attn.slot.is_none()) {
            m.plain = Some(attn_op::mask(t, keys, &m.spec(0), dt, device)?);
        }
        Ok(m)
    }

    /// This model with every query limited to the last `w` tokens (Mistral's sliding window,
    /// or a narrower one than its own): training the slot to be the sink a rolling cache needs.
    pub fn with_sliding_window(mut self, w: usize) -> Self {
        self.cfg.sliding_window = Some(self.cfg.window().map_or(w, |own| own.min(w)));
        self.cfg.use_sliding_window = Some(true);
        self
    }

    /// The shared inputs of the block op for T tokens from position 0 (without, with a slot)
    /// on device slot `slot`, or `None` when this pass does not use it (see [`Taps::block_op`]).
    #[allow(clippy::type_complexity)]
    fn block_contexts(
        &self,
        taps: &Taps,
        t: usize,
        masks: &Masks,
        slot: usize,
    ) -> CResult<
        Option<(
            Option<Arc<block_op::Context>>,
            Option<Arc<block_op::Context>>,
        )>,
    > {
        let auto = self.placement.device(slot).is_cuda()
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
        let rope = &self.ropes[slot];
        let cos = rope.cos.narrow(0, 0, t)?.contiguous()?; // (T, hd/2)
        let sin = rope.sin.narrow(0, 0, t)?.contiguous()?;
        let cx = |mask: &Option<attn_op::Mask>| {
            mask.as_ref().map(|m| {
                Arc::new(block_op::Context {
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

    /// input_ids (B, T), on any device -> (B, T, D) on the embedding's device.
    fn embed(&self, input_ids: &Tensor) -> CResult<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.to_device(self.embed_tokens.device())?;
        crate::ops::embedding::embed(&self.embed_tokens, &ids)?.reshape((
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
        let p = &self.placement;
        let mut x = self.embed(input_ids)?;
        let mut at = p.embed();
        let masks = self.masks(t, 0)?;
        let mut out = Output {
            logits: Tensor::zeros((), DType::F32, self.device())?,
            hidden: vec![],
            attn: vec![],
            first_kv: vec![],
        };
        if taps.recompute && (taps.attn || taps.first_kv || !taps.edits.is_empty()) {
            candle_core::bail!("recompute combines with the hidden-state tap only");
        }
        let contexts = (0..p.slots())
            .map(|s| self.block_contexts(taps, t, &masks[s], s))
            .collect::<CResult<Vec<_>>>()?;
        // What the taps keep goes to the head's device, where the caller reads it.
        let home = |x: &Tensor, from: usize| p.transfer(x, from, p.head());
        for (i, layer) in self.layers.iter().enumerate() {
            let s = p.layer(i);
            x = p.transfer(&x, at, s)?;
            at = s;
            let (rope, masks) = (&self.ropes[s], &masks[s]);
            if let Some((plain, with_slot)) = &contexts[s] {
                let grads = taps.weight_grads.as_ref();
                if let Some(w) = layer.op_weights(self.cfg.rms_norm_eps, i, grads) {
                    let slot = layer.self_attn.slot.as_ref();
                    let cx = if slot.is_some() { with_slot } else { plain };
                    let cx = cx
                        .clone()
                        .ok_or_else(|| candle_core::Error::Msg("block context not built".into()))?;
                    let dev = p.device(s);
                    let slot = slot
                        .map(|e| CResult::Ok((e.k.to_device(dev)?, e.v.to_device(dev)?)))
                        .transpose()?;
                    x = block_op::block(&x, Arc::new(w), cx, slot.as_ref().map(|(k, v)| (k, v)))?;
                    if taps.hidden {
                        out.hidden.push(home(&x, s)?);
                    }
                    continue;
                }
            }
            if taps.recompute && layer.lora_free() {
                x = layer.recomputed(&x, rope, masks)?;
                if taps.hidden {
                    out.hidden.push(home(&x, s)?);
                }
                continue;
            }
            let (h, attn) = layer.forward(&x, rope, masks, taps, None)?;
            x = apply_edits(&h, i, &taps.edits)?;
            if taps.hidden {
                out.hidden.push(home(&x, s)?);
            }
            if let Some(st) = attn.stats {
                out.attn.push(AttnStats {
                    first_token: home(&st.first_token, s)?,
                    slot: st.slot.map(|t| home(&t, s)).transpose()?,
                });
            }
            if let Some((k, v)) = attn.first_kv {
                out.first_kv.push((home(&k, s)?, home(&v, s)?));
            }
        }
        let x = p.transfer(&x, at, p.head())?;
        Ok((self.norm.forward(&x)?, out))
    }

    /// Final normed hidden (B, T, D) -> logits (B, T, V) in f32 (f64 for an f64 model).
    pub fn head(&self, x: &Tensor) -> CResult<Tensor> {
        let (b, t, d) = x.dims3()?;
        linear(&x.reshape((b * t, d))?, &self.lm_head)? // (B*T, V)
            .reshape((b, t, ()))? // (B, T, V)
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
        let p = &self.placement;
        let mut x = self.embed(input_ids)?;
        let mut at = p.embed();
        let masks = self.masks(t, start)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        // Each layer's keys and values stay on that layer's device.
        for (i, layer) in self.layers.iter().enumerate() {
            let s = p.layer(i);
            x = p.transfer(&x, at, s)?;
            at = s;
            let (h, attn) = layer.forward(
                &x,
                &self.ropes[s],
                &masks[s],
                &Taps::default(),
                cache.layers.get(i).map(Past::Rotated),
            )?;
            x = h;
            layers.push(attn.kv);
        }
        cache.layers = layers;
        let x = p.transfer(&x, at, p.head())?;
        self.head(&self.norm.forward(&x)?)
    }

    /// Logits (B, T, V) f32 of `input_ids` (B, T) entering the rolling cache `cache` (see
    /// [`crate::stream`]), which then holds them too: the same numbers as one token at a time,
    /// for any T. The tokens go in segments that fill the cache, then segments short enough
    /// that the positions stay in the RoPE table (docs/streaming.md).
    pub fn forward_stream(&self, input_ids: &Tensor, cache: &mut StreamCache) -> CResult<Tensor> {
        StreamCache::check(self, cache.capacity, cache.sinks).map_err(candle_core::Error::Msg)?;
        let t = input_ids.dim(1)?;
        let mut outs = Vec::new();
        let mut done = 0;
        while done < t {
            let room = match cache.capacity.checked_sub(cache.seen) {
                Some(free) if free > 0 => free,
                // Queries of a full cache sit at L - 1, L, ...: the table has positions to
                // max_position_embeddings - 1.
                _ => self.cfg.max_position_embeddings + 1 - cache.capacity,
            };
            let n = room.min(t - done);
            outs.push(self.stream_segment(&input_ids.narrow(1, done, n)?, cache)?);
            done += n;
        }
        Tensor::cat(&outs, 1)
    }

    /// T tokens that either all fit the cache's free room or all enter a full cache.
    fn stream_segment(&self, input_ids: &Tensor, cache: &mut StreamCache) -> CResult<Tensor> {
        let t = input_ids.dim(1)?;
        let full = cache.seen >= cache.capacity;
        let entries = cache.visible()?;
        let n = match &entries {
            Some(layers) => layers[0].0.dim(2)?,
            None => 0,
        };
        // Filling, or one token at a time, this is the literal cache: causal attention over the
        // entries at positions 0..n. A chunk entering a full cache keeps each query's distances
        // instead: the sinks lead, seen by every query as from position L - 1, and the other
        // entries and the chunk through a window of L - S (docs/streaming.md).
        let pin = full && t > 1;
        let m = Masks {
            plain: None,
            slot: None,
            window: pin.then(|| cache.capacity - cache.sinks),
            // Token 0 hidden where it is entry 0; past the first eviction it is no entry (a
            // mask_first_token adapter keeps no sinks).
            hide_first: self.mask_first_token && !full,
            start: n,
            lead: if pin { cache.sinks } else { 0 },
            pin,
        };
        let p = &self.placement;
        let masks = (0..p.slots())
            .map(|s| self.build_masks(m.clone(), t, p.device(s)))
            .collect::<CResult<Vec<_>>>()?;
        let mut x = self.embed(input_ids)?;
        let mut at = p.embed();
        let mut layers = Vec::with_capacity(self.layers.len());
        // Each layer's entries stay on that layer's device.
        for (i, layer) in self.layers.iter().enumerate() {
            let s = p.layer(i);
            x = p.transfer(&x, at, s)?;
            at = s;
            let past = Some(Past::Raw(entries.as_ref().map(|e| &e[i])));
            let (h, attn) = layer.forward(&x, &self.ropes[s], &masks[s], &Taps::default(), past)?;
            x = h;
            layers.push(attn.kv);
        }
        cache.update(layers, t)?;
        let x = p.transfer(&x, at, p.head())?;
        self.head(&self.norm.forward(&x)?)
    }

    /// Logits only, (B, T, V) f32, differentiable.
    pub fn logits(&self, input_ids: &Tensor) -> CResult<Tensor> {
        Ok(self.forward(input_ids, &Taps::default())?.logits)
    }
}
