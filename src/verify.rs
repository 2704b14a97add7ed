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
use crate::recipe::{Recipe, StreamCheck};
use crate::scan::{scan_taps, Rule, ScanReport, Scanner};
use crate::stream::{stream_ppl, Rolling};
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
    /// Each text is verified on its own; the plan passes only if every one does.
    pub texts: Vec<PathBuf>,
    pub seq_len: usize,
    pub num_seqs: usize,
    /// A second pass at long windows: (seq_len, windows per text).
    pub long: Option<(usize, usize)>,
    pub rule: Rule,
    pub max_massive: usize,
    pub max_ppl_increase: f64,
    /// Quantization setting and the largest gap to float perplexity allowed for the adapted model.
    pub quant: Option<(Setting, f64)>,
    /// Rolling-cache setting whose perplexity increase the adapted model is held to.
    pub stream: Option<StreamCheck>,
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
            texts: r
                .verify
                .text
                .as_ref()
                .unwrap_or(&r.data.eval)
                .paths()
                .to_vec(),
            seq_len: r.verify.seq_len,
            num_seqs: r.verify.windows,
            long: r.verify.long.as_ref().map(|l| (l.seq_len, l.windows)),
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
            stream: r
                .verify
                .stream
                .max_ppl_increase
                .is_some()
                .then(|| r.verify.stream.clone()),
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

/// The adapted model's perplexity through a rolling cache against its own dense perplexity on
/// the same tokens (one window).
#[derive(Debug, Serialize)]
pub struct StreamGap {
    pub cache: usize,
    pub sink_tokens: usize,
    pub tokens: usize,
    pub dense_ppl: f64,
    pub stream_ppl: f64,
    pub ppl_after_eviction: Option<f64>,
    /// stream / dense - 1.
    pub increase: f64,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub adapter: String,
    pub text: String,
    pub base: ScanReport,
    pub adapted: ScanReport,
    /// KL(base || adapted) per position, over the same windows.
    pub kl: f64,
    pub ppl_increase: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quant: Option<QuantGap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamGap>,
    pub checks: Vec<Check>,
    pub pass: bool,
}

impl VerifyReport {
    pub fn markdown(&self) -> String {
        let mut s = format!("# eabfit verify\n\nadapter `{}` on `{}`, text `{}`, {} windows x {} tokens, rule |h| >= {} and |h|/median >= {}\n\n",
            self.adapter, self.base.model, self.text, self.base.num_seqs, self.base.seq_len, self.base.rule.abs, self.base.rule.ratio);
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
        if let Some(g) = &self.stream {
            s += &format!(
                "| perplexity, rolling cache {} ({} sink tokens), {} tokens | - | {:.4} ({:+.2}% against dense {:.4}) |\n",
                g.cache,
                g.sink_tokens,
                g.tokens,
                g.stream_ppl,
                100.0 * g.increase,
                g.dense_ppl
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

type Scans = (
    ScanReport,
    ScanReport,
    f64,
    Option<QuantGap>,
    Option<StreamGap>,
);

/// One pass of a plan: one text at one window length.
struct Pass<'a> {
    text: &'a Path,
    seq_len: usize,
    num_seqs: usize,
    out: PathBuf,
}

fn scan_both(plan: &VerifyPlan, pass: &Pass) -> Result<Scans> {
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
    let text = read_text(pass.text)?;
    let windows = Windows::new(
        &ckpt.tokenizer,
        &text,
        pass.seq_len,
        Some(pass.num_seqs),
        pass.text,
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
        sb.finish(&ckpt.tokenizer, &name, pass.seq_len, bos),
        sa.finish(&ckpt.tokenizer, &name, pass.seq_len, bos),
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
    // The stream check runs once per text, with the passes at the plan's first window length.
    let stream = match &plan.stream {
        Some(c) if pass.seq_len == plan.seq_len => {
            Some(stream_gap(&student, &ckpt.tokenizer, &text, pass.text, c)?)
        }
        _ => None,
    };
    Ok((rb, ra, kl / windows.len() as f64, quant, stream))
}

/// The first `c.tokens` tokens of the text, dense in one window and through the rolling cache.
fn stream_gap(
    model: &crate::model::Model,
    tok: &crate::checkpoint::Tok,
    text: &str,
    origin: &Path,
    c: &StreamCheck,
) -> Result<StreamGap> {
    let max_pos = model.config().max_position_embeddings;
    if c.tokens > max_pos {
        return Err(Error::Usage(format!(
            "verify.stream.tokens {} exceeds max_position_embeddings {max_pos}: the dense reference is one window",
            c.tokens
        )));
    }
    let mut ids: Vec<u32> = tok.bos.filter(|_| tok.add_bos).into_iter().collect();
    ids.extend(tok.encode(text)?);
    if ids.len() < c.tokens {
        return Err(Error::file(
            origin,
            format!(
                "text too short: {} tokens, verify.stream.tokens is {}",
                ids.len(),
                c.tokens
            ),
        ));
    }
    ids.truncate(c.tokens);
    let x = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?; // (1, N)
    let dense_nll = crate::perplexity::nll_sum(&model.logits(&x)?, &x)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        / (ids.len() - 1) as f64;
    let r = Rolling::new(c.cache, c.sink_tokens, 256)?;
    let s = stream_ppl(model, &ids, &r)?;
    Ok(StreamGap {
        cache: c.cache,
        sink_tokens: c.sink_tokens,
        tokens: ids.len(),
        dense_ppl: dense_nll.exp(),
        stream_ppl: s.ppl,
        ppl_after_eviction: s.ppl_after_eviction,
        increase: s.ppl / dense_nll.exp() - 1.0,
    })
}

/// The plan's passes: each text at `seq_len`, then each at the long length. A plan of one pass
/// writes into `plan.out` itself; otherwise each pass gets `plan.out/<text stem>-<seq_len>/`.
fn passes(plan: &VerifyPlan) -> Vec<Pass<'_>> {
    let mut lens = vec![(plan.seq_len, plan.num_seqs)];
    lens.extend(plan.long);
    let n = lens.len() * plan.texts.len();
    let mut seen = std::collections::BTreeSet::new();
    let mut v = vec![];
    for &(seq_len, num_seqs) in &lens {
        for (i, text) in plan.texts.iter().enumerate() {
            let stem = text
                .file_stem()
                .map_or("text".into(), |s| s.to_string_lossy().into_owned());
            let mut name = format!("{stem}-{seq_len}");
            if !seen.insert(name.clone()) {
                // Two texts of one name: the index keeps their folders apart.
                name = format!("{stem}.{i}-{seq_len}");
            }
            let out = if n == 1 {
                plan.out.clone()
            } else {
                plan.out.join(name)
            };
            v.push(Pass {
                text,
                seq_len,
                num_seqs,
                out,
            });
        }
    }
    v
}

/// Verifies every pass of the plan (see [`passes`]), each with its report files and printed
/// table, then prints a one-line-per-pass summary when there is more than one.
pub fn verify(plan: &VerifyPlan) -> Result<Vec<VerifyReport>> {
    let passes = passes(plan);
    let mut reports = vec![];
    for pass in &passes {
        if passes.len() > 1 {
            println!(
                "\n## {} at {} x {} tokens\n",
                pass.text.display(),
                pass.num_seqs,
                pass.seq_len
            );
        }
        reports.push(verify_pass(plan, pass)?);
    }
    if passes.len() > 1 {
        println!("\n## summary\n\n| text | windows | ppl base | ppl adapted | change | KL | massive base | massive adapted | result |\n|---|---|---|---|---|---|---|---|---|");
        for (p, r) in passes.iter().zip(&reports) {
            println!(
                "| {} | {} x {} | {:.4} | {:.4} | {:+.2}% | {:.5} | {} | {} | {} |",
                p.text.display(),
                p.num_seqs,
                p.seq_len,
                r.base.ppl,
                r.adapted.ppl,
                100.0 * r.ppl_increase,
                r.kl,
                r.base.massive_count(),
                r.adapted.massive_count(),
                if r.pass { "pass" } else { "FAIL" }
            );
        }
    }
    Ok(reports)
}

/// Runs both scans, writes `verify.json`, `verify.md` and `verify.png`/`.svg` into `pass.out`,
/// prints the report.
fn verify_pass(plan: &VerifyPlan, pass: &Pass) -> Result<VerifyReport> {
    let (base, adapted, kl, quant, stream) = scan_both(plan, pass)?;
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
    if let (Some(g), Some(limit)) = (
        &stream,
        plan.stream.as_ref().and_then(|c| c.max_ppl_increase),
    ) {
        checks.push(Check {
            name: "stream_ppl_increase".into(),
            value: g.increase,
            limit,
            pass: g.increase <= limit,
        });
    }
    let ok = checks.iter().all(|c| c.pass);
    let report = VerifyReport {
        adapter: plan.adapter.display().to_string(),
        text: pass.text.display().to_string(),
        base,
        adapted,
        kl,
        ppl_increase,
        quant,
        stream,
        checks,
        pass: ok,
    };
    let out = &pass.out;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, e))?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::file(out, e))?;
    write_atomic(&out.join("verify.json"), json.as_bytes())?;
    let md = report.markdown();
    write_atomic(&out.join("verify.md"), md.as_bytes())?;
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
        &out.join("verify"),
    )? {
        eprintln!("warning: {w}");
    }
    print!("{md}");
    Ok(report)
}

/// The error for a failed verification: every failed check of every pass, by text, window
/// length and name, with value and limit.
pub fn failure(reports: &[VerifyReport]) -> Error {
    let failed: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.checks.iter().filter(|c| !c.pass).map(move |c| {
                format!(
                    "{} {:.6} > {:.6} ({}, {} x {} tokens)",
                    c.name, c.value, c.limit, r.text, r.base.num_seqs, r.base.seq_len
                )
            })
        })
        .collect();
    Error::Msg(format!("verify failed: {}", failed.join("; ")))
}
