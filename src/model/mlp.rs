//! The SwiGLU feed-forward of a decoder layer.

use super::layers::Linear;
use super::taps::{LinearInput, Taps};
use super::{Adapters, CResult, Config};
use crate::ops::swiglu::swiglu;
use candle_core::Tensor;
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct Mlp {
    pub(super) gate_proj: Linear,
    pub(super) up_proj: Linear,
    pub(super) down_proj: Linear,
    pub(super) layer: usize,
}

impl Mlp {
    pub(super) fn load(
        vb: VarBuilder,
        cfg: &Config,
        layer: usize,
        adapters: &Adapters,
    ) -> CResult<Self> {
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(vb.pp("gate_proj"), d, f, false, adapters)?,
            up_proj: Linear::load(vb.pp("up_proj"), d, f, false, adapters)?,
            down_proj: Linear::load(vb.pp("down_proj"), f, d, false, adapters)?,
            layer,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, taps: &Taps) -> CResult<Tensor> {
        let x = &taps.linear_input(self.layer, LinearInput::GateUp, x.clone())?;
        let inner = taps.linear_input(
            self.layer,
            LinearInput::Down,
            swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?,
        )?;
        self.down_proj.forward(&inner)
    }
}
