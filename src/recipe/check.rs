//! The rules serde cannot express: ranges and cross-field constraints of a training recipe,
//! and the small checks the pretraining recipe shares. Each message starts with the dotted path
//! of the field at fault, which the loader uses to find its line.

use super::load::{is_field_path, unknown_path};
use super::*;

impl Recipe {
    /// Range and cross-field rules serde cannot express. The message starts with the
    /// dotted path of the field at fault, which `parse_str` uses to find its line.
    pub fn validate(&self) -> Result<(), String> {
        check_device("model.device", &self.model.device)?;
        check_run_devices(
            &self.model.device,
            self.model.dtype,
            self.train.devices.as_deref(),
        )?;
        if let Some(m) = &self.model.device_map {
            crate::device_map::Spec::parse(m).map_err(|e| format!("model.device_map: {e}"))?;
        }

        let data = &self.data;
        at_least_one("data.seq_len", data.seq_len)?;
        at_least_one("data.batch_size", data.batch_size)?;
        if let Some(n) = data.max_train_windows {
            at_least_one("data.max_train_windows", n)?;
        }
        at_least_one("data.eval_windows", data.eval_windows)?;
        let why = "a file or a non-empty list of files";
        check(!data.train.paths().is_empty(), "data.train", why, "[]")?;
        check(!data.eval.paths().is_empty(), "data.eval", why, "[]")?;
        if let Some(long) = &data.long {
            at_least_one("data.long.seq_len", long.seq_len)?;
            at_least_one("data.long.windows", long.windows)?;
            at_least_one("data.long.every", long.every)?;
            // A micro-batch stacks equal-length windows; a long one stands alone.
            let why = "1 when data.long is set (a long window is a micro-batch of its own)";
            check(
                data.batch_size == 1,
                "data.batch_size",
                why,
                data.batch_size,
            )?;
        }

        let eab = &self.adapters.eab;
        non_negative("adapters.eab.init_std", eab.init_std)?;
        if eab.enabled && eab.init == EabInit::FirstToken {
            at_least_one("adapters.eab.calib_windows", eab.calib_windows)?;
        }
        if !eab.enabled && eab.mask_first_token {
            return Err(
                "adapters.eab.mask_first_token must be false when adapters.eab.enabled \
                        is false: without a slot nothing stands in for the masked first token"
                    .into(),
            );
        }

        if let Some(w) = eab.window {
            at_least_one("adapters.eab.window", w)?;
            if !eab.enabled {
                return Err(
                    "adapters.eab.window needs adapters.eab.enabled: without a slot \
                            the window leaves the late queries no sink"
                        .into(),
                );
            }
            let why = &format!("below data.seq_len ({}) to hide any token", data.seq_len);
            check(w < data.seq_len, "adapters.eab.window", why, w)?;
        }

        let lora = &self.adapters.lora;
        positive("adapters.lora.alpha", lora.alpha)?;
        non_negative("adapters.lora.init_std", lora.init_std)?;
        if lora.rank > 0 {
            let why = "non-empty when adapters.lora.rank > 0";
            check(!lora.targets.is_empty(), "adapters.lora.targets", why, "[]")?;
            let no_layers = lora.layers == LoraLayers::List(Vec::new());
            check(!no_layers, "adapters.lora.layers", why, "[]")?;
        }

        let hold = &self.loss.hold;
        non_negative("loss.hold.weight", hold.weight)?;
        positive("loss.hold.temperature", hold.temperature)?;
        let ma = &self.loss.ma;
        non_negative("loss.ma.weight", ma.weight)?;
        positive("loss.ma.threshold", ma.threshold)?;
        match ma.ratio {
            Some(ratio) => positive("loss.ma.ratio", ratio)?,
            None if ma.target == MaTarget::Ratio => {
                return Err("loss.ma.ratio must be set when loss.ma.target is `ratio`".into())
            }
            None => {}
        }

        self.optim.check()?;

        at_least_one("train.steps", self.train.steps)?;
        at_least_one("train.checkpoint_every", self.train.checkpoint_every)?;
        at_least_one("eval.every", self.eval.every)?;
        non_negative("eval.abs", self.eval.abs)?;
        non_negative("eval.ratio", self.eval.ratio)?;
        at_least_one("log.every", self.log.every)?;
        let v = &self.verify;
        non_negative("verify.max_ppl_increase", v.max_ppl_increase)?;
        at_least_one("verify.seq_len", v.seq_len)?;
        at_least_one("verify.windows", v.windows)?;
        if let Some(t) = &v.text {
            let why = "a file or a non-empty list of files";
            check(!t.paths().is_empty(), "verify.text", why, "[]")?;
        }
        if let Some(long) = &v.long {
            at_least_one("verify.long.seq_len", long.seq_len)?;
            at_least_one("verify.long.windows", long.windows)?;
        }
        if let Some(gap) = v.quant.max_gap {
            non_negative("verify.quant.max_gap", gap)?;
        }
        let st = &v.stream;
        if let Some(inc) = st.max_ppl_increase {
            non_negative("verify.stream.max_ppl_increase", inc)?;
        }
        at_least_one("verify.stream.cache", st.cache)?;
        let below = format!("below verify.stream.cache ({})", st.cache);
        check(
            st.sink_tokens < st.cache,
            "verify.stream.sink_tokens",
            &below,
            st.sink_tokens,
        )?;
        let past = format!(
            "above verify.stream.cache ({}) so that the cache evicts",
            st.cache
        );
        check(
            st.tokens > st.cache,
            "verify.stream.tokens",
            &past,
            st.tokens,
        )?;
        for (path, bits) in [
            ("verify.quant.w", v.quant.w),
            ("verify.quant.a", v.quant.a),
            ("verify.quant.kv", v.quant.kv),
        ] {
            check(
                (2..=16).contains(&bits),
                path,
                "in 2..=16 (16 = float)",
                bits,
            )?;
        }

        // Checked here so that a misspelt grid key fails before the first of many runs.
        let fields = field_paths();
        for (key, values) in &self.ablate.grid {
            check_ablate_key("ablate.grid", key, &fields)?;
            check(
                !values.is_empty(),
                &format!("ablate.grid.{key}"),
                "a non-empty list",
                "[]",
            )?;
        }
        for (i, point) in self.ablate.points.iter().enumerate() {
            for key in point.keys() {
                check_ablate_key(&format!("ablate.points[{i}]"), key, &fields)?;
            }
        }
        Ok(())
    }
}

impl<D> Optim<D> {
    /// The optimizer's ranges, the same for fine-tuning and pretraining.
    pub(crate) fn check(&self) -> Result<(), String> {
        positive("optim.lr", self.lr)?;
        non_negative("optim.weight_decay", self.weight_decay)?;
        for (i, beta) in self.betas.into_iter().enumerate() {
            check(
                (0.0..1.0).contains(&beta),
                &format!("optim.betas[{i}]"),
                "in [0, 1)",
                beta,
            )?;
        }
        positive("optim.eps", self.eps)?;
        check(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "optim.min_lr_ratio",
            "in [0, 1]",
            self.min_lr_ratio,
        )?;
        non_negative("optim.grad_clip", self.grad_clip)?;
        at_least_one("optim.grad_accum", self.grad_accum)
    }
}

pub(crate) fn check_device(path: &str, device: &str) -> Result<(), String> {
    let device_ok = device == "cpu"
        || device == "cuda"
        || device
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
    check(
        device_ok,
        path,
        "`cpu`, `cuda` or `cuda:N`",
        format!("`{device}`"),
    )
}

/// `train.devices` parses, and f64 stays on the CPU.
pub(crate) fn check_run_devices(
    device: &str,
    dtype: Option<Dtype>,
    devices: Option<&str>,
) -> Result<(), String> {
    let list = match devices {
        Some(s) => crate::parallel::parse_devices(s).map_err(|e| format!("train.devices: {e}"))?,
        None => vec![device.to_string()],
    };
    if dtype == Some(Dtype::F64) && list.iter().any(|d| d != "cpu") {
        return Err(
            "model.dtype: f64 runs on the CPU only (the CUDA kernels take f32, bf16 and f16)"
                .into(),
        );
    }
    Ok(())
}

pub(crate) fn check(ok: bool, path: &str, rule: &str, got: impl Display) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{path} must be {rule}, got {got}"))
    }
}

// `is_finite` because YAML accepts `.inf` and `.nan`, which no rule below means.
pub(crate) fn positive(path: &str, v: f64) -> Result<(), String> {
    check(v > 0.0 && v.is_finite(), path, "> 0", v)
}

pub(crate) fn non_negative(path: &str, v: f64) -> Result<(), String> {
    check(v >= 0.0 && v.is_finite(), path, ">= 0", v)
}

pub(crate) fn at_least_one(path: &str, v: usize) -> Result<(), String> {
    check(v >= 1, path, ">= 1", v)
}

fn check_ablate_key(at: &str, key: &str, fields: &[String]) -> Result<(), String> {
    if key.starts_with("ablate.") {
        return Err(format!("{at}: `{key}` cannot vary the ablation itself"));
    }
    if !is_field_path(key, fields) {
        return Err(format!("{at}: {}", unknown_path(key, fields)));
    }
    Ok(())
}
