//! A LLaMA decoder block (frozen weights, optional EAB slot) as one op with a hand-written
//! backward.
//!
//! Through candle's autograd a block is ~50 graph nodes, and candle's backward gives every edge
//! a zero-filled gradient buffer and an add: on LLaMA-2-7B at batch 4 x 2048 those adds, copies
//! and casts took 0.9 s of a 1.8 s training step, more than all the GEMMs. Here the graph holds
//! one node per block (inputs: x and the slot's k', v'); the forward keeps what the backward
//! reads (q, k, v after RoPE, the attention output and its log-sum-exp, the residual h, the
//! gate and up projections) and the backward runs the chain rule by hand on detached tensors,
//! through the same ops the model calls:
//!
//!   y = h + W_d swiglu(W_g n2, W_u n2),  n2 = norm(h),   h = x + W_o attn(q, k, v) + b_o,
//!   q, k, v = rope(qn(W_q n1 + b_q)), rope(kn(W_k n1 + b_k)), W_v n1 + b_v,  n1 = norm(x),
//!
//! where the biases b (Qwen2's q/k/v, `attention_bias`'s o) and the per-head norms qn, kn
//! (Qwen3) are there when the checkpoint has them (identity otherwise).
//!
//! Only the input gradients of frozen projections are formed (x^T dy for a frozen weight never
//! is). When the block trains its weights (pretraining), the backward also forms every weight's
//! gradient and hands it to a [`WeightGrads`] outside candle's graph, which holds one node per
//! block and so cannot reach them.

use super::attention::{self, Mask, Saved as AttnSaved};
use super::{heads, linear, norm, swiglu, Given};
use candle_core::{CustomOp1, CustomOp3, Tensor};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

type CResult<T> = candle_core::Result<T>;

/// The frozen tensors of one block, by their Hugging Face names' last parts.
#[derive(Debug, Clone)]
pub struct Weights {
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub eps: f64,
    /// (out, in) each.
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    pub gate_proj: Tensor,
    pub up_proj: Tensor,
    pub down_proj: Tensor,
    /// Biases (out) of q, k, v and o, where the checkpoint has them.
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub o_bias: Option<Tensor>,
    /// RMSNorm weights (head_dim) over each query and key head before RoPE (`q_norm`,
    /// `k_norm`), with `eps`.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Set when these weights train: the prefix of their names (`model.layers.3.`) and where
    /// their gradients go. The tensors above are detached then.
    pub trained: Option<(String, Arc<WeightGrads>)>,
}

/// Weight gradients of trained blocks by Hugging Face name, summed over the backward passes
/// that wrote them (micro-batches) until taken.
#[derive(Debug, Default)]
pub struct WeightGrads(Mutex<BTreeMap<String, Tensor>>);

impl WeightGrads {
    fn add(&self, name: String, g: Tensor) -> CResult<()> {
        let mut m = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight gradients poisoned".into()))?;
        let g = match m.remove(&name) {
            Some(acc) => (acc + g)?,
            None => g,
        };
        m.insert(name, g);
        Ok(())
    }

    /// Every gradient written since the last call.
    pub fn take(&self) -> CResult<BTreeMap<String, Tensor>> {
        let mut m = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight gradients poisoned".into()))?;
        Ok(std::mem::take(&mut *m))
    }
}

/// What every block of one forward pass shares: RoPE tables of positions 0..T (T, hd/2) in
/// the model dtype and the attention mask.
#[derive(Debug, Clone)]
pub struct Context {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Mask,
}

/// The forward's tensors the backward reads.
struct Saved {
    /// The pre-norm q and k rows (B*T, n*hd) when the heads are normed: their backward reads them.
    q_rows: Option<Tensor>,
    k_rows: Option<Tensor>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_out: Tensor,
    attn: AttnSaved,
    h: Tensor,
    gate: Tensor,
    up: Tensor,
    /// When the weights train: the inputs of their gradients (B*T, ...) that the backward does
    /// not otherwise read, the two normed hidden states and the SwiGLU output.
    weight_inputs: Option<WeightInputs>,
}

struct WeightInputs {
    n1: Tensor,
    n2: Tensor,
    act: Tensor,
}

/// n1 (B*T, D) through a projection, as split wants it: its rows (B*T, n*hd) and what split
/// does before RoPE. A normed projection goes in with its bias added, and those rows come back
/// a second time for the backward.
fn project<'a>(
    n1: &Tensor,
    proj: &Tensor,
    bias: &'a Option<Tensor>,
    qk_norm: &'a Option<Tensor>,
    eps: f64,
) -> CResult<(Tensor, heads::Pre<'a>, Option<Tensor>)> {
    let pre = heads::Pre {
        bias: bias.as_ref(),
        norm: qk_norm.as_ref().map(|n| (n, eps)),
    };
    let y = linear::linear(n1, proj)?; // (B*T, n*hd)
    if pre.norm.is_none() {
        return Ok((y, pre, None));
    }
    let rows = heads::biased(&y, pre)?;
    let pre = heads::Pre { bias: None, ..pre };
    Ok((rows.clone(), pre, Some(rows)))
}

/// x (B, T, D) -> (B, T, D); `slot`: the layer's (k', v'), each (KV, hd), any float dtype.
fn forward(
    x: &Tensor,
    w: &Weights,
    cx: &Context,
    slot: Option<(&Tensor, &Tensor)>,
) -> CResult<(Tensor, Saved)> {
    let (b, t, d) = x.dims3()?;
    let (h, kv, hd) = (w.heads, w.kv_heads, w.head_dim);
    let n1 = norm::forward(x, &w.input_layernorm, w.eps)?.reshape((b * t, d))?; // (B*T, D)
    let (sk, sv) = (slot.map(|s| s.0), slot.map(|s| s.1));
    let rope = Some((&cx.cos, &cx.sin));
    let (yq, pre_q, q_rows) = project(&n1, &w.q_proj, &w.q_bias, &w.q_norm, w.eps)?;
    let (yk, pre_k, k_rows) = project(&n1, &w.k_proj, &w.k_bias, &w.k_norm, w.eps)?;
    let (yv, pre_v, _) = project(&n1, &w.v_proj, &w.v_bias, &None, w.eps)?;
    let q = heads::split(&yq, b, h, rope, None, pre_q)?; // (B, H, T, hd)
    let k = heads::split(&yk, b, kv, rope, sk, pre_k)?; // (B, KV, S, hd)
    let v = heads::split(&yv, b, kv, None, sv, pre_v)?; // (B, KV, S, hd)
    let (attn_out, attn) = attention::forward_saved(&q, &k, &v, &cx.mask)?; // (B, T, H, hd)
    let o = linear::linear(&attn_out.reshape((b * t, h * hd))?, &w.o_proj)?; // (B*T, D)
    let o = match &w.o_bias {
        Some(bias) => o.broadcast_add(bias)?,
        None => o,
    };
    let hres = (x + o.reshape((b, t, d))?)?;
    let n2 = norm::forward(&hres, &w.post_attention_layernorm, w.eps)?.reshape((b * t, d))?;
    let gate = linear::linear(&n2, &w.gate_proj)?; // (B*T, F)
    let up = linear::linear(&n2, &w.up_proj)?;
    let act = swiglu::forward(&gate, &up)?;
    let y = (&hres + linear::linear(&act, &w.down_proj)?.reshape((b, t, d))?)?;
    let saved = Saved {
        q_rows,
        k_rows,
        q,
        k,
        v,
        attn_out,
        attn,
        h: hres,
        gate,
        up,
        weight_inputs: w.trained.is_some().then_some(WeightInputs { n1, n2, act }),
    };
    Ok((y, saved))
}

/// (dx, d k', d v') from the output gradient dy (B, T, D).
fn backward(
    x: &Tensor,
    w: &Weights,
    cx: &Context,
    s: &Saved,
    dy: &Tensor,
) -> CResult<(Tensor, Option<(Tensor, Tensor)>)> {
    let (b, t, d) = x.dims3()?;
    let (h, kv, hd) = (w.heads, w.kv_heads, w.head_dim);
    let dy = dy.to_dtype(x.dtype())?;
    // The weight gradients (dW = dy^T input, each (out, in)) when the weights train.
    let wg = |name: &str, dout: &Tensor, input: &Tensor| -> CResult<()> {
        match &w.trained {
            Some((prefix, sink)) => sink.add(format!("{prefix}{name}"), dout.t()?.matmul(input)?),
            None => Ok(()),
        }
    };
    let wg_norm = |name: &str, x: &Tensor, nw: &Tensor, dn: &Tensor| -> CResult<()> {
        match &w.trained {
            Some((prefix, sink)) => sink.add(
                format!("{prefix}{name}"),
                norm::backward_dw(x, nw, dn, w.eps)?,
            ),
            None => Ok(()),
        }
    };
    // A bias's gradient: the rows of its output's gradient summed.
    let bias_grad = |name: &str, bias: &Option<Tensor>, dout: &Tensor| -> CResult<()> {
        match (&w.trained, bias) {
            (Some((prefix, sink)), Some(_)) => sink.add(format!("{prefix}{name}"), dout.sum(0)?),
            _ => Ok(()),
        }
    };
    let rows = |y: &Tensor| y.reshape((b * t, ())); // (B*T, ...)
                                                    // MLP
    let dy_rows = rows(&dy)?;
    let d_act = dy_rows.matmul(&w.down_proj)?; // (B*T, F)
    let (dg, du) = swiglu::backward(&s.gate, &s.up, &d_act)?;
    let d_n2 = (dg.matmul(&w.gate_proj)? + du.matmul(&w.up_proj)?)?; // (B*T, D)
    let d_n2 = d_n2.reshape((b, t, d))?;
    if let Some(wi) = &s.weight_inputs {
        wg("mlp.down_proj.weight", &dy_rows, &wi.act)?;
        wg("mlp.gate_proj.weight", &dg, &wi.n2)?;
        wg("mlp.up_proj.weight", &du, &wi.n2)?;
        wg_norm(
            "post_attention_layernorm.weight",
            &s.h,
            &w.post_attention_layernorm,
            &d_n2,
        )?;
    }
    let dh = (&dy + norm::backward_dx(&s.h, &w.post_attention_layernorm, &d_n2, w.eps)?)?;
    // attention
    let dh_rows = rows(&dh)?;
    wg("self_attn.o_proj.weight", &dh_rows, &rows(&s.attn_out)?)?;
    bias_grad("self_attn.o_proj.bias", &w.o_bias, &dh_rows)?;
    let d_attn = dh_rows.matmul(&w.o_proj)?.reshape((b, t, h, hd))?; // (B, T, H, hd)
    let (dq, dk, dv) =
        attention::backward(&s.q, &s.k, &s.v, &s.attn_out, &d_attn, &cx.mask, &s.attn)?; // (B, H, T, hd), (B, KV, S, hd) x 2
    let slots = cx.mask.spec().slots;
    let d_slot = if slots > 0 {
        let per_head = |g: &Tensor| -> CResult<Tensor> {
            g.narrow(2, 0, 1)?.sum(0)?.reshape((kv, hd)) // (KV, hd)
        };
        Some((per_head(&dk)?, per_head(&dv)?))
    } else {
        None
    };
    let rope = Some((&cx.cos, &cx.sin));
    // Back through RoPE and the head norm to the biased projection rows (B*T, n*hd).
    let unsplit = |g: &Tensor,
                   slots: usize,
                   name: &str,
                   qk_norm: &Option<Tensor>,
                   rows_kept: &Option<Tensor>| {
        let (Some(nw), Some(u)) = (qk_norm, rows_kept) else {
            return heads::merge(g, slots, rope, None);
        };
        if let Some((prefix, sink)) = &w.trained {
            // The norm weight's gradient wants the gradient at the norm's output too.
            let dn = heads::merge(g, slots, rope, None)?.reshape(((), hd))?; // (B*T*n, hd)
            let dw = norm::backward_dw(&u.reshape(((), hd))?, nw, &dn, w.eps)?;
            sink.add(format!("{prefix}{name}"), dw)?;
        }
        heads::merge(g, slots, rope, Some((u, nw, w.eps)))
    };
    let dq = unsplit(&dq, 0, "self_attn.q_norm.weight", &w.q_norm, &s.q_rows)?; // (B*T, H*hd)
    let dk = unsplit(&dk, slots, "self_attn.k_norm.weight", &w.k_norm, &s.k_rows)?; // (B*T, KV*hd)
    let dv = heads::merge(&dv, slots, None, None)?;
    bias_grad("self_attn.q_proj.bias", &w.q_bias, &dq)?;
    bias_grad("self_attn.k_proj.bias", &w.k_bias, &dk)?;
    bias_grad("self_attn.v_proj.bias", &w.v_bias, &dv)?;
    let d_n1 = ((dq.matmul(&w.q_proj)? + dk.matmul(&w.k_proj)?)? + dv.matmul(&w.v_proj)?)?;
    let d_n1 = d_n1.reshape((b, t, d))?;
    if let Some(wi) = &s.weight_inputs {
        wg("self_attn.q_proj.weight", &dq, &wi.n1)?;
        wg("self_attn.k_proj.weight", &dk, &wi.n1)?;
        wg("self_attn.v_proj.weight", &dv, &wi.n1)?;
        wg_norm("input_layernorm.weight", x, &w.input_layernorm, &d_n1)?;
    }
    let dx = (dh + norm::backward_dx(x, &w.input_layernorm, &d_n1, w.eps)?)?;
    Ok((dx, d_slot))
}

struct BlockOp {
    out: Given,
    weights: Arc<Weights>,
    cx: Arc<Context>,
    saved: Mutex<Option<Saved>>,
}

impl BlockOp {
    fn grads(&self, x: &Tensor, dy: &Tensor) -> CResult<(Tensor, Option<(Tensor, Tensor)>)> {
        // Taken, not borrowed: the saved activations go as soon as the gradient exists.
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("block op state poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("block op: backward ran twice".into()))?;
        backward(&x.detach(), &self.weights, &self.cx, &saved, dy)
    }
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "decoder-block"
    }
    super::given_forward!(x: lx);
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(self.grads(x, dy)?.0))
    }
}

impl CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "decoder-block"
    }
    super::given_forward!(a: la, b: lb, c: lc);
    fn bwd(
        &self,
        x: &Tensor,
        sk: &Tensor,
        sv: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, d_slot) = self.grads(x, dy)?;
        let (dk, dv) =
            d_slot.ok_or_else(|| candle_core::Error::Msg("block op: no slot gradient".into()))?;
        Ok((
            Some(dx),
            Some(dk.to_dtype(sk.dtype())?),
            Some(dv.to_dtype(sv.dtype())?),
        ))
    }
}

/// The block applied to x (B, T, D) at positions 0..T, differentiable in x and in the slot's
/// k', v' (KV, hd) when given (the mask's slots must be 1 then, else 0).
pub fn block(
    x: &Tensor,
    weights: Arc<Weights>,
    cx: Arc<Context>,
    slot: Option<(&Tensor, &Tensor)>,
) -> CResult<Tensor> {
    let slots = cx.mask.spec().slots;
    if slot.is_some() != (slots == 1) || slots > 1 {
        candle_core::bail!(
            "block op: {slots} slot keys in the mask for {} slot",
            if slot.is_some() { "a" } else { "no" }
        );
    }
    let detached = slot.map(|(k, v)| (k.detach(), v.detach()));
    let (y, saved) = forward(
        &x.detach(),
        &weights,
        &cx,
        detached.as_ref().map(|(k, v)| (k, v)),
    )?;
    // Weight gradients flow only when x itself is tracked (in pretraining the embedding is).
    let tracked = x.track_op() || slot.is_some_and(|(k, v)| k.track_op() || v.track_op());
    if !tracked {
        return Ok(y);
    }
    let op = BlockOp {
        out: Given::new(y),
        weights,
        cx,
        saved: Mutex::new(Some(saved)),
    };
    match slot {
        Some((k, v)) => x.apply_op3(k, v, op),
        None => x.apply_op1(op),
    }
}
