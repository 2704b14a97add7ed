//! One pre-norm decoder layer: attention and MLP with residuals, run per op, as the fused block
//! op, or recomputed in the backward pass.

use super::attention::{Attention, AttnOut, Masks, Past};
use super::layers::{Linear, RmsNorm, Rope};
use super::mlp::Mlp;
use super::taps::Taps;
use super::{Adapters, CResult, Config};
use crate::ops::block as block_op;
use crate::ops::recompute::{recompute, BlockFn};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Block {
    pub(super) self_attn: Attention,
    pub(super) mlp: Mlp,
    pub(super) input_layernorm: RmsNorm,
    pub(super) post_attention_layernorm: RmsNorm,
}

impl Block {
    pub(super) fn load(
        vb: VarBuilder,
        cfg: &Config,
        layer: usize,
        adapters: &Adapters,
    ) -> CResult<Self> {
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

    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        masks: &Masks,
        taps: &Taps,
        past: Option<Past>,
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
    pub(super) fn linears(&self) -> [&Linear; 7] {
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

    pub(super) fn lora_free(&self) -> bool {
        self.linears().iter().all(|l| l.lora.is_none())
    }

    /// The weights the block op reads; `None` when the block has LoRA, or trains a weight
    /// (pretraining) and no `grads` was given to take its gradient.
    pub(super) fn op_weights(
        &self,
        eps: f64,
        layer: usize,
        grads: Option<&Arc<block_op::WeightGrads>>,
    ) -> Option<block_op::Weights> {
        if !self.lora_free() {
            return None;
        }
        let norms = [
            &self.input_layernorm.weight,
            &self.post_attention_layernorm.weight,
        ];
        let (a, m) = (&self.self_attn, &self.mlp);
        // Biases and head norms train with the weights (pretraining) or not at all.
        let extras = self.linears().into_iter().filter_map(|l| l.bias.as_ref());
        let head_norms = [&a.q_norm, &a.k_norm].into_iter().flatten();
        let extras = extras.chain(head_norms.map(|n| &n.weight));
        let trains = self.linears().iter().any(|l| l.weight.track_op())
            || norms.into_iter().chain(extras).any(|w| w.track_op());
        // Trained weights need somewhere for their gradients: no `grads`, no block op.
        let trained = if trains {
            Some((format!("model.layers.{layer}."), grads?.clone()))
        } else {
            None
        };
        let detach = |t: &Option<Tensor>| t.as_ref().map(Tensor::detach);
        let head_norm = |n: &Option<RmsNorm>| n.as_ref().map(|n| n.weight.detach());
        Some(block_op::Weights {
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
            q_bias: detach(&a.q_proj.bias),
            k_bias: detach(&a.k_proj.bias),
            v_bias: detach(&a.v_proj.bias),
            o_bias: detach(&a.o_proj.bias),
            q_norm: head_norm(&a.q_norm),
            k_norm: head_norm(&a.k_norm),
            heads: a.n_heads,
            kv_heads: a.n_kv,
            head_dim: a.head_dim,
            trained,
        })
    }

    /// The block through [`recompute`]: its slot (the only trainable tensors of a LoRA-free
    /// block) goes in as the op's parameters.
    pub(super) fn recomputed(&self, x: &Tensor, rope: &Rope, masks: &Masks) -> CResult<Tensor> {
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
