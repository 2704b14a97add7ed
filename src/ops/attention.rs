//! Scaled dot-product attention over `[slots; tokens]` keys: causal, Mistral's sliding window,
//! position 0 optionally hidden, grouped-query heads without repeating K/V, blocked over queries.
//!
//! EAB's `softmax([Q K^T, Q k'] / sqrt(d)) [V; v']` is causal attention over S = slots + n keys
//! with the slot as key 0, aligned bottom-right: query i (token position p = past + i) sees the
//! slot keys always and token j when j <= p, p - j < window and not (hide_first and j == 0).
//!
//! Memory is what decides whether a 7B model trains at all: a composite attention keeps the
//! (B, H, T, S) f32 scores, the softmax and their casts of every layer for the backward pass.
//! This op keeps only its output. Forward and backward walk blocks of queries (the
//! flash-attention-2 schedule at block granularity), each block's scores living only while that
//! block is computed: the GEMMs run on cuBLAS (tensor cores on CUDA), the softmax through
//! candle's fused kernel, and the backward recomputes the probabilities from Q and K:
//!
//!   P = softmax(S),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
//!   dQ = scale * dS K,  dK = dS^T (scale * Q).

use super::{acc, Given};
use candle_core::{CustomOp3, DType, Device, Tensor, D};
use std::sync::{Arc, OnceLock};

type CResult<T> = candle_core::Result<T>;

/// Which keys each query may see.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    /// Keys before the first token that every query sees (1 with an EAB slot, else 0).
    pub slots: usize,
    /// Mistral's sliding window: token j is visible from position p when p - j < window.
    pub window: Option<usize>,
    /// Hide token 0 from every query (the slot stands in for it).
    pub hide_first: bool,
    /// Queries per block; 0 picks one that keeps a block's f32 scores near 256 MiB.
    pub block: usize,
}

/// Attention mass on the first token and on the slot, averaged over batch, heads and the
/// queries at positions >= 1 (position 0 has no choice). Scalar f32 tensors.
#[derive(Debug, Clone)]
pub struct Stats {
    pub first_token: Tensor,
    pub slot: Option<Tensor>,
}

/// Which keys T queries over S keys may see, as `spec` says. The additive (T, S) tensor the
/// blocked path adds to its scores is built on first use only: the fused kernel reads the spec,
/// and building that tensor on the host (LLaMA at T 2048: 4M entries, ~10 ms, then a 16 MiB
/// upload) left the GPU idle at the start of every forward pass.
#[derive(Debug, Clone)]
pub struct Mask {
    t: usize,
    s: usize,
    spec: Spec,
    dtype: DType,
    device: Device,
    dense: Arc<OnceLock<Tensor>>,
}

/// The mask of T queries that are the last T of the S - slots tokens, in the accumulation dtype
/// of `dtype` once built.
pub fn mask(t: usize, s: usize, spec: &Spec, dtype: DType, dev: &Device) -> CResult<Mask> {
    s.checked_sub(spec.slots)
        .filter(|&n| n >= t)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "attention: {t} queries over {s} keys with {} slots",
                spec.slots
            ))
        })?;
    Ok(Mask {
        t,
        s,
        spec: *spec,
        dtype: acc(dtype),
        device: dev.clone(),
        dense: Arc::new(OnceLock::new()),
    })
}

impl Mask {
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// (queries, keys).
    pub fn dims(&self) -> (usize, usize) {
        (self.t, self.s)
    }

    /// The additive (T, S) tensor: 0 where visible, -inf where not.
    pub fn dense(&self) -> CResult<&Tensor> {
        if let Some(m) = self.dense.get() {
            return Ok(m);
        }
        let (t, s, spec) = (self.t, self.s, &self.spec);
        let n = s - spec.slots;
        let past = n - t;
        let window = spec.window.unwrap_or(usize::MAX);
        let mut data = vec![0f32; t * s];
        for i in 0..t {
            let p = past + i;
            for j in 0..n {
                if j > p || p - j >= window || (spec.hide_first && j == 0) {
                    data[i * s + spec.slots + j] = f32::NEG_INFINITY;
                }
            }
        }
        let m = Tensor::from_vec(data, (t, s), &self.device)?.to_dtype(self.dtype)?;
        Ok(self.dense.get_or_init(|| m))
    }
}

/// The shapes of one call, and the query blocks it is cut into.
struct Plan {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    s: usize,
    hd: usize,
    /// Token position of query 0 (tokens before the queries, e.g. in a KV cache).
    past: usize,
    slots: usize,
    block: usize,
    scale: f64,
}

impl Plan {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask) -> CResult<Self> {
        let spec = mask.spec();
        let (b, h, t, hd) = q.dims4()?;
        let (bk, kv, s, hdk) = k.dims4()?;
        if bk != b || hdk != hd || k.dims() != v.dims() || kv == 0 || h % kv != 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit (B, H, T, hd) / (B, KV, S, hd)",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if mask.dims() != (t, s) {
            candle_core::bail!(
                "attention: mask {:?} for {t} queries and {s} keys",
                mask.dims()
            );
        }
        let past = s - spec.slots - t;
        let block = if spec.block > 0 {
            spec.block
        } else {
            let budget = 64 << 20; // f32 elements of one block's scores
            (budget / (b * h * s).max(1)).clamp(16, t.max(16)) / 16 * 16
        };
        Ok(Self {
            b,
            h,
            kv,
            t,
            s,
            hd,
            past,
            slots: spec.slots,
            block: block.min(t).max(1),
            scale: 1.0 / (hd as f64).sqrt(),
        })
    }

    fn rep(&self) -> usize {
        self.h / self.kv
    }

    /// (first query, queries, keys needed): a block needs the keys up to its last query's own.
    fn blocks(&self) -> Vec<(usize, usize, usize)> {
        (0..self.t)
            .step_by(self.block)
            .map(|i0| {
                let bq = self.block.min(self.t - i0);
                (i0, bq, (self.slots + self.past + i0 + bq).min(self.s))
            })
            .collect()
    }

    /// Rows [i0, i0 + bq) of a (B, KV, rep, T, x) tensor as (B, KV, rep * bq, x).
    fn rows(&self, x: &Tensor, i0: usize, bq: usize) -> CResult<Tensor> {
        let last = x.dim(D::Minus1)?;
        x.narrow(3, i0, bq)?
            .contiguous()?
            .reshape((self.b, self.kv, self.rep() * bq, last))
    }

    /// Softmax probabilities of one block, (B, KV, rep, bq, hi) in the accumulation dtype.
    /// `lead`: the block's rows of other queries that score the slot keys (see [`pinned`]).
    fn probs(
        &self,
        qb: &Tensor,
        lead: Option<&Tensor>,
        k: &Tensor,
        mask: &Tensor,
        blk: (usize, usize, usize),
    ) -> CResult<Tensor> {
        let (i0, bq, hi) = blk;
        let scores = match lead {
            None => qb.matmul(&k.narrow(2, 0, hi)?.t()?)?, // (B, KV, rep*bq, hi)
            Some(lb) => {
                let n = self.slots;
                let on_slots = lb.matmul(&k.narrow(2, 0, n)?.t()?)?; // (B, KV, rep*bq, slots)
                let on_tokens = qb.matmul(&k.narrow(2, n, hi - n)?.t()?)?;
                Tensor::cat(&[&on_slots, &on_tokens], 3)? // (B, KV, rep*bq, hi)
            }
        };
        let scores = scores
            .to_dtype(mask.dtype())?
            .reshape((self.b, self.kv, self.rep(), bq, hi))?
            .broadcast_add(&mask.narrow(0, i0, bq)?.narrow(1, 0, hi)?)?;
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

/// Forward from detached tensors: the output (B, T, H, hd) and, when asked, the stats.
/// `lead`: queries (B, H, T, hd) that score the slot keys in place of `q` (see [`pinned`]).
fn forward(
    q: &Tensor,
    lead: Option<&Tensor>,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    p: &Plan,
    stats: bool,
) -> CResult<(Tensor, Option<Stats>)> {
    let (b, h, t, hd, kv, rep) = (p.b, p.h, p.t, p.hd, p.kv, p.rep());
    let grouped = |x: &Tensor| (x * p.scale)?.reshape((b, kv, rep, t, hd)); // (B, KV, rep, T, hd)
    let qg = grouped(q)?;
    let lg = lead.map(grouped).transpose()?;
    let mut outs = vec![];
    let (mut on_first, mut on_slot) = (None::<Tensor>, None::<Tensor>);
    for blk in p.blocks() {
        let (i0, bq, hi) = blk;
        let qb = p.rows(&qg, i0, bq)?; // (B, KV, rep*bq, hd)
        let lb = lg.as_ref().map(|l| p.rows(l, i0, bq)).transpose()?;
        let probs = p.probs(&qb, lb.as_ref(), k, mask, blk)?; // (B, KV, rep, bq, hi)
        if stats {
            // queries at token position >= 1 only
            let skip = (1usize.saturating_sub(p.past + i0)).min(bq);
            let rows = probs.narrow(3, skip, bq - skip)?;
            let add = |acc: Option<Tensor>, key: usize| -> CResult<Option<Tensor>> {
                let s = rows
                    .narrow(D::Minus1, key, 1)?
                    .sum_all()?
                    .to_dtype(DType::F32)?;
                Ok(Some(match acc {
                    Some(a) => (a + s)?,
                    None => s,
                }))
            };
            on_first = add(on_first, p.slots)?;
            if p.slots > 0 {
                on_slot = add(on_slot, 0)?;
            }
        }
        let pb = probs.to_dtype(v.dtype())?.reshape((b, kv, rep * bq, hi))?;
        let ob = pb.matmul(&v.narrow(2, 0, hi)?)?; // (B, KV, rep*bq, hd)
        outs.push(ob.reshape((b, kv, rep, bq, hd))?);
    }
    let out = Tensor::cat(&outs, 3)? // (B, KV, rep, T, hd)
        .reshape((b, h, t, hd))?
        .transpose(1, 2)?
        .contiguous()?; // (B, T, H, hd)
    let stats = if stats {
        let n = (b * h * t.saturating_sub(1usize.saturating_sub(p.past)).max(1)) as f64;
        let zero = || Tensor::zeros((), DType::F32, q.device());
        Some(Stats {
            first_token: (on_first.map_or_else(zero, Ok)? / n)?,
            slot: on_slot.map(|s| s / n).transpose()?,
        })
    } else {
        None
    };
    Ok((out, stats))
}

/// What the backward pass needs besides q, k, v and the output.
pub enum Saved {
    /// The blocked path recomputes everything from q, k, v and the mask.
    Blocked,
    /// The kernel's row log-sum-exp (base 2), (B, H, T) f32.
    #[cfg(feature = "cuda")]
    Kernel(Tensor),
}

/// The forward from detached tensors without stats: the output (B, T, H, hd) and what
/// [`backward`] needs. The fused kernel where it applies (CUDA, bf16, head_dim 64 or 128),
/// the blocked composite elsewhere.
pub fn forward_saved(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask) -> CResult<(Tensor, Saved)> {
    let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
    let p = Plan::new(q, k, v, mask)?;
    #[cfg(feature = "cuda")]
    if fused::supported(q) && use_kernel() {
        let (out, lse) = fused::forward(q, k, v, &p, mask.spec())?;
        return Ok((out, Saved::Kernel(lse)));
    }
    Ok((
        forward(q, None, k, v, mask.dense()?, &p, false)?.0,
        Saved::Blocked,
    ))
}

/// Gradients (dq (B, H, T, hd), dk, dv (B, KV, S, hd)) from the detached inputs, the output
/// (B, T, H, hd) of [`forward_saved`], what it saved and the output gradient.
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
    mask: &Mask,
    saved: &Saved,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
    let p = Plan::new(q, k, v, mask)?;
    match saved {
        #[cfg(feature = "cuda")]
        Saved::Kernel(lse) => fused::backward(q, k, v, out, d_out, lse, &p, mask.spec()),
        Saved::Blocked => blocked_backward(q, k, v, out, d_out, mask.dense()?, &p),
    }
}

fn blocked_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    d_out: &Tensor,
    mask: &Tensor,
    p: &Plan,
) -> CResult<(Tensor, Tensor, Tensor)> {
    let (b, h, t, hd, kv, rep, s) = (p.b, p.h, p.t, p.hd, p.kv, p.rep(), p.s);
    let dt = q.dtype();
    let ac = mask.dtype();
    let grouped = |x: &Tensor| -> CResult<Tensor> {
        x.transpose(1, 2)?
            .contiguous()?
            .reshape((b, kv, rep, t, hd)) // (B, KV, rep, T, hd)
    };
    let d_o = grouped(&d_out.to_dtype(dt)?)?;
    // rowsum(dO * O): (B, KV, rep, T, 1)
    let delta = (d_o.to_dtype(ac)? * grouped(out)?.to_dtype(ac)?)?.sum_keepdim(D::Minus1)?;
    let qg = (q * p.scale)?.reshape((b, kv, rep, t, hd))?;
    let dk = Tensor::zeros((b, kv, s, hd), ac, q.device())?;
    let dv = Tensor::zeros((b, kv, s, hd), ac, q.device())?;
    let mut dqs = vec![];
    for blk in p.blocks() {
        let (i0, bq, hi) = blk;
        let qb = p.rows(&qg, i0, bq)?; // (B, KV, rep*bq, hd)
        let dob = p.rows(&d_o, i0, bq)?; // (B, KV, rep*bq, hd)
        let probs = p.probs(&qb, None, k, mask, blk)?; // (B, KV, rep, bq, hi)
        let pb = probs.to_dtype(dt)?.reshape((b, kv, rep * bq, hi))?;
        let (kb, vb) = (k.narrow(2, 0, hi)?, v.narrow(2, 0, hi)?); // (B, KV, hi, hd)
        let dv_part = pb.t()?.matmul(&dob)?; // (B, KV, hi, hd)
        let dp = dob
            .matmul(&vb.t()?)?
            .to_dtype(ac)?
            .reshape((b, kv, rep, bq, hi))?;
        let ds = (probs * dp.broadcast_sub(&delta.narrow(3, i0, bq)?)?)?
            .to_dtype(dt)?
            .reshape((b, kv, rep * bq, hi))?; // (B, KV, rep*bq, hi)
        let dq = (ds.matmul(&kb)? * p.scale)?; // (B, KV, rep*bq, hd)
        dqs.push(dq.reshape((b, kv, rep, bq, hd))?);
        let dk_part = ds.t()?.matmul(&qb)?; // (B, KV, hi, hd)
        for (acc, part) in [(&dk, dk_part), (&dv, dv_part)] {
            let sum = (acc.narrow(2, 0, hi)? + part.to_dtype(ac)?)?;
            acc.slice_set(&sum, 2, 0)?;
        }
    }
    let dq = Tensor::cat(&dqs, 3)?.reshape((b, h, t, hd))?; // (B, H, T, hd)
    Ok((dq, dk.to_dtype(dt)?, dv.to_dtype(dt)?))
}

struct AttentionOp {
    out: Given,
    mask: Mask,
    saved: Saved,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "eab-attention"
    }

    super::given_forward!(a: la, b: lb, c: lc);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        d_out: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (dq, dk, dv) = backward(&q, &k, &v, out, d_out, &self.mask, &self.saved)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// q: (B, H, T, hd), k, v: (B, KV, S, hd), `mask` from [`mask`] -> (B, T, H, hd), plus the
/// attention stats when `stats`. Differentiable in q, k and v (the slot enters through k, v).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Mask,
    stats: bool,
) -> CResult<(Tensor, Option<Stats>)> {
    // The GEMMs take strided rows but not arbitrary views (a `cat` along dim 2 is one).
    let (q, k, v) = (&q.contiguous()?, &k.contiguous()?, &v.contiguous()?);
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (out, st, saved) = if stats {
        let p = Plan::new(q, k, v, mask)?;
        let (out, st) = forward(&qd, None, &kd, &vd, mask.dense()?, &p, true)?;
        (out, st, Saved::Blocked)
    } else {
        let (out, saved) = forward_saved(&qd, &kd, &vd, mask)?;
        (out, None, saved)
    };
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok((out, st));
    }
    let op = AttentionOp {
        out: Given::new(out),
        mask: mask.clone(),
        saved,
    };
    Ok((q.apply_op3(k, v, op)?, st))
}

/// Attention whose slot keys (the spec's `slots` leading keys) are scored by `lead` (B, H, T, hd)
/// instead of `q`: a rolling KV cache computes a chunk of queries at once this way, the sinks'
/// scores taken from the queries rotated at the one position every query of the literal cache
/// has (docs/streaming.md). Inference only: the blocked path, and its output is detached (no
/// gradient flows back through it, to a slot or anything else).
pub fn pinned(q: &Tensor, lead: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask) -> CResult<Tensor> {
    let (q, lead, k, v) = (&q.detach(), &lead.detach(), &k.detach(), &v.detach());
    if lead.dims() != q.dims() {
        candle_core::bail!(
            "attention::pinned: lead {:?} for q {:?}",
            lead.dims(),
            q.dims()
        );
    }
    let (q, lead, k, v) = (
        &q.contiguous()?,
        &lead.contiguous()?,
        &k.contiguous()?,
        &v.contiguous()?,
    );
    let p = Plan::new(q, k, v, mask)?;
    Ok(forward(q, Some(lead), k, v, mask.dense()?, &p, false)?.0)
}

static BLOCKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keeps CUDA on the blocked composite path instead of the fused kernel (`bench --attention
/// blocked`, or `EABFIT_ATTENTION=blocked` for any command): to measure the kernel against it,
/// or to rule it out.
pub fn force_blocked(on: bool) {
    BLOCKED.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(feature = "cuda")]
fn use_kernel() -> bool {
    static ENV_BLOCKED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let env = *ENV_BLOCKED
        .get_or_init(|| std::env::var("EABFIT_ATTENTION").is_ok_and(|v| v == "blocked"));
    !(env || BLOCKED.load(std::sync::atomic::Ordering::Relaxed))
}

/// The tensor-core kernels of `attention.cu` (bf16, head_dim 64 or 128, CUDA).
#[cfg(feature = "cuda")]
#[path = "attention_kernel.rs"]
mod fused;
