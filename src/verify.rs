//! `eabfit verify`: the base model and the adapted one on the same windows, side by side, and
//! the checks that say the massive activations are gone while perplexity holds.

use crate::adapters::{AdapterSet, Adapters};
use crate::checkpoint::Checkpoint;
use crate::data::{read_text, Windows};
use crate::fsio::write_atomic;
use crate::loss::kl_to_teacher;
use crate::plot::LayerSeries;
use crate::quant::Setting;
use crate::quant_eval::quant_ppl;
use crate::recipe::Recipe;
use crate::scan::{scan_taps, Rule, ScanReport, Scanner};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What to verify, resolved from a recipe or from flags.
pub struct VerifyPlan {
    pub model: String,
    pub device: String,
    /// Replaces `device` when set (see [`crate::device_map`]).
    pub device_map: Option<String>,
    pub dtype: Option<String>,
    pub adapter: PathBuf,
    pub text: PathBuf,
    pub seq_len: usize,
    pub num_seqs: usize,
    pub rule: Rule,
    pub max_massive: usize,
    pub max_ppl_increase: f64,
    /// Quantization setting and the largest gap to float perplexity allowed for the adapted model.
    pub quant: Option<(Setting, f64)>,
    pub out: PathBuf,
}

impl VerifyPlan {
    /// What a recipe's run is verified on: its `best/` adapters, eval text and windows, the eval
    /// rule and the `verify:` limits.
    pub fn from_recipe(r: &Recipe) -> Self {
        Self {
            model: r.model.path.clone(),
            device: r.model.device.clone(),
            device_map: r.model.device_map.clone(),
            dtype: r.model.dtype.map(|d| d.name().to_string()),
            adapter: r.train.out_dir.join("best"),
            text: r.verify.text.clone().unwrap_or_else(|| r.data.eval.clone()),
            seq_len: r.verify.seq_len,
            num_seqs: r.verify.windows,
            rule: Rule {
                abs: r.eval.abs,
                ratio: r.eval.ratio,
            },
            max_massive: r.verify.max_massive,
            max_ppl_increase: r.verify.max_ppl_increase,
            quant: r
                .verify
                .quant
                .max_gap
                .map(|g| (r.verify.quant.setting(), g)),
            out: r.train.out_dir.join("verify"),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    pub limit: f64,
    pub pass: bool,
}

/// Perplexity under one fake-quantization setting, base and adapted, on the verify windows.
#[derive(Debug, Serialize)]
pub struct QuantGap {
    pub setting: String,
    pub base_quant_ppl: f64,
    pub quant_ppl: f64,
    /// quant / float - 1 of the base and of the adapted model.
    pub base_gap: f64,
    pub gap: f64,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub adapter: String,
    pub base: ScanReport,
    pub adapted: ScanReport,
    /// KL(base || adapted) per position, over the same windows.
    pub kl: f64,
    pub ppl_increase: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantGap>,
    pub checks: Vec<Check>,
    pub pass: bool,
}

impl VerifyReport {
    pub fn markdown(&self) -> String {
        let mut s = format!("# eabfit verify\n\nadapter `{}` on `{}`, {} windows x {} tokens, rule |h| >= {} and |h|/median >= {}\n\n",
            self.adapter, self.base.model, self.base.num_seqs, self.base.seq_len, self.base.rule.abs, self.base.rule.ratio);
        s += "| | base | adapted |\n|---|---|---|\n";
        s += &format!(
            "| perplexity | {:.4} | {:.4} ({:+.2}%) |\n",
            self.base.ppl,
            self.adapted.ppl,
            100.0 * self.ppl_increase
        );
        s += &format!(
            "| massive count | {} | {} |\n",
            self.base.massive_count(),
            self.adapted.massive_count()
        );
        let worst = |r: &ScanReport| r.layers.iter().map(|l| l.top[0]).fold(0f64, f64::max);
        s += &format!(
            "| max top-1 \\|h\\| | {:.1} | {:.1} |\n",
            worst(&self.base),
            worst(&self.adapted)
        );
        s += &format!("| KL(base \\|\\| adapted) | 0 | {:.5} |\n", self.kl);
        if let Some(q) = &self.quant {
            s += &format!(
                "| perplexity {} | {:.4} ({:+.2}%) | {:.4} ({:+.2}%) |\n",
                q.setting,
                q.base_quant_ppl,
                100.0 * q.base_gap,
                q.quant_ppl,
                100.0 * q.gap
            );
        }
        s += "\n";
        s += "| layer | top-1 base | top-1 adapted | top-1/median base | top-1/median adapted | attn@0 base | attn@0 adapted | attn@EAB |\n|---|---|---|---|---|---|---|---|\n";
        for (b, a) in self.base.layers.iter().zip(&self.adapted.layers) {
            let ratio = |l: &crate::scan::LayerScan| l.top[0] / l.median.max(f64::MIN_POSITIVE);
            s += &format!(
                "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.3} | {:.3} | {} |\n",
                b.layer,
                b.top[0],
                a.top[0],
                ratio(b),
                ratio(a),
                b.first_token_attn,
                a.first_token_attn,
                a.slot_attn.map_or("-".into(), |x| format!("{x:.3}"))
            );
        }
        s += "\n| check | value | limit | result |\n|---|---|---|---|\n";
        for c in &self.checks {
            s += &format!(
                "| {} | {:.6} | {:.6} | {} |\n",
                c.name,
                c.value,
                c.limit,
                if c.pass { "pass" } else { "FAIL" }
            );
        }
        s
    }
}

type Scans = (ScanReport, ScanReport, f64, Option<QuantGap>);

fn scan_both(plan: &VerifyPlan) -> Result<Scans> {
    let ckpt = Checkpoint::open(&plan.model)?;
    let (placement, dtype) = crate::model_args::placement(
        "device map",
        &plan.device,
        plan.device_map.as_deref(),
        plan.dtype.as_deref(),
        &ckpt.config,
    )?;
    let base = ckpt.base_placed(dtype, &placement)?;
    let device = base.device.clone();
    let set = AdapterSet::load(&plan.adapter, &ckpt.config, &device)?;
    let (teacher, student) = (base.model(&Adapters::none())?, base.model(&set.adapters())?);
    let text = read_text(&plan.text)?;
    let windows = Windows::new(
        &ckpt.tokenizer,
        &text,
        plan.seq_len,
        Some(plan.num_seqs),
        &plan.text,
    )?;
    let n_layers = ckpt.config.num_hidden_layers;
    let (mut sb, mut sa) = (
        Scanner::new(n_layers, plan.rule),
        Scanner::new(n_layers, plan.rule),
    );
    let mut kl = 0f64;
    for w in &windows.ids {
        let ids = Tensor::new(w.as_slice(), &device)?.unsqueeze(0)?;
        let ob = teacher.forward(&ids, &scan_taps())?;
        let oa = student.forward(&ids, &scan_taps())?;
        kl += kl_to_teacher(&oa.logits, &ob.logits, 1.0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        sb.add(&ob, w)?;
        sa.add(&oa, w)?;
    }
    let name = ckpt.source.display().to_string();
    let bos = windows.bos.is_some();
    let (rb, ra) = (
        sb.finish(&ckpt.tokenizer, &name, plan.seq_len, bos),
        sa.finish(&ckpt.tokenizer, &name, plan.seq_len, bos),
    );
    let quant = match &plan.quant {
        Some((s, _)) => {
            let base_quant_ppl = quant_ppl(&base, &Adapters::none(), &windows, s)?;
            let quant_ppl = quant_ppl(&base, &set.adapters(), &windows, s)?;
            Some(QuantGap {
                setting: s.label(),
                base_quant_ppl,
                quant_ppl,
                base_gap: base_quant_ppl / rb.ppl - 1.0,
                gap: quant_ppl / ra.ppl - 1.0,
            })
        }
        None => None,
    };
    Ok((rb, ra, kl / windows.len() as f64, quant))
}

/// Runs both scans, writes `verify.json`, `verify.md` and `verify.png`/`.svg` into `plan.out`,
/// prints the report; the error of a failed verification names every failed check.
pub fn verify(plan: &VerifyPlan) -> Result<VerifyReport> {
    let (base, adapted, kl, quant) = scan_both(plan)?;
    let ppl_increase = adapted.ppl / base.ppl - 1.0;
    let mut checks = vec![
        Check {
            name: "massive_count".into(),
            value: adapted.massive_count() as f64,
            limit: plan.max_massive as f64,
            pass: adapted.massive_count() <= plan.max_massive,
        },
        Check {
            name: "ppl_increase".into(),
            value: ppl_increase,
            limit: plan.max_ppl_increase,
            pass: ppl_increase <= plan.max_ppl_increase,
        },
    ];
    if let (Some(q), Some((_, max_gap))) = (&quant, &plan.quant) {
        checks.push(Check {
            name: "quant_gap".into(),
            value: q.gap,
            limit: *max_gap,
            pass: q.gap <= *max_gap,
        });
    }
    let pass = checks.iter().all(|c| c.pass);
    let report = VerifyReport {
        adapter: plan.adapter.display().to_string(),
        base,
        adapted,
        kl,
        ppl_increase,
        quant,
        checks,
        pass,
    };
    std::fs::create_dir_all(&plan.out).map_err(|e| Error::file(&plan.out, e))?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::file(&plan.out, e))?;
    write_atomic(&plan.out.join("verify.json"), json.as_bytes())?;
    let md = report.markdown();
    write_atomic(&plan.out.join("verify.md"), md.as_bytes())?;
    let series = |r: &ScanReport, label: &str| LayerSeries {
        label: label.into(),
        top: r.layers.iter().map(|l| l.top).collect(),
        median: r.layers.iter().map(|l| l.median).collect(),
    };
    let title = Path::new(&report.base.model)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for w in crate::plot::draw(
        &[series(&report.base, "base"), series(&report.adapted, "eab")],
        &title,
        &plan.out.join("verify"),
    )? {
        eprintln!("warning: {w}");
    }
    print!("{md}");
    Ok(report)
}

/// The error for a failed verification: every failed check, by name, with value and limit.
pub fn failure(report: &VerifyReport) -> Error {
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| format!("{} {:.6} > {:.6}", c.name, c.value, c.limit))
        .collect();
    Error::Msg(format!("verify failed: {}", failed.join("; ")))
}
