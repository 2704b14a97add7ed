//! The commands that read a model without training it: info, ppl, scan, intervene, plot; the
//! ones that adapt it and check the result are in `retrofit`.

use crate::adapters::Adapters;
use crate::assets::text_path;
use crate::data::{read_text, Windows};
use crate::fsio::write_atomic;
use crate::intervene::intervene;
use crate::model_args::ModelArgs;
use crate::perplexity::perplexity;
use crate::plot::LayerSeries;
use crate::scan::{scan, Rule, ScanReport};
use crate::{Error, Result};
use std::path::PathBuf;

mod retrofit;
pub use retrofit::{ablate_cmd, train_cmd, verify_cmd, AblateArgs, TrainArgs, VerifyArgs};

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn info(args: &InfoArgs) -> Result<()> {
    let ckpt = args.model.open()?;
    let (placement, dtype) = args.model.placement(&ckpt)?;
    let c = &ckpt.config;
    let t = &ckpt.tokenizer;
    let tok_name =
        |id: Option<u32>| id.map_or("none".to_string(), |i| format!("{i} {:?}", t.token_text(i)));
    println!("source          {}", ckpt.source.display());
    println!("format          {}", ckpt.format);
    let extras = [
        (c.qkv_bias(), "q/k/v biases"),
        (c.o_bias(), "o bias"),
        (c.qk_norm(), "q/k head norms"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, what)| *what)
    .collect::<Vec<_>>();
    println!(
        "architecture    {} (LLaMA-family decoder{})",
        c.family().name(),
        if extras.is_empty() {
            String::new()
        } else {
            format!(" with {}", extras.join(", "))
        }
    );
    println!("layers          {}", c.num_hidden_layers);
    println!("hidden          {}", c.hidden_size);
    println!("ffn             {}", c.intermediate_size);
    println!(
        "heads           {} query / {} kv, head_dim {}",
        c.num_attention_heads,
        c.n_kv_heads(),
        c.head_dim()
    );
    println!("vocab           {}", c.vocab_size);
    println!("context         {}", c.max_position_embeddings);
    println!(
        "rope            theta {}{}",
        c.rope_theta,
        c.rope_scaling.as_ref().map_or(String::new(), |r| format!(
            ", scaling {} x{}",
            r.rope_type, r.factor
        ))
    );
    println!(
        "sliding window  {}",
        c.window().map_or("none".into(), |w| w.to_string())
    );
    println!(
        "lm_head         {}",
        if c.tie_word_embeddings {
            "tied to embed_tokens"
        } else {
            "separate"
        }
    );
    println!("stored dtype    {}", ckpt.stored_dtype);
    let map = placement.map(c.num_hidden_layers);
    let on = match &args.model.device_map {
        Some(_) => format!("device map {}", map.to_spec()),
        None => args.model.device.clone(),
    };
    println!("load dtype      {dtype:?} on {on}");
    if placement.is_split() {
        print!("{}", map.plan(crate::checkpoint::sizes(c, dtype), &[]));
    }
    println!(
        "parameters      {} ({:.1} M)",
        ckpt.param_count(),
        ckpt.param_count() as f64 / 1e6
    );
    println!("tokenizer       {}", t.origin);
    println!("  vocab         {}", t.vocab_size());
    println!("  bos           {}", tok_name(t.bos));
    println!("  eos           {}", tok_name(t.eos));
    println!("  add_bos       {}", t.add_bos);
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file, or folder of *.txt [default: the fetched Hamlet]
    #[arg(long)]
    pub text: Option<PathBuf>,
    #[arg(long, default_value_t = 512, conflicts_with = "cache")]
    pub seq_len: usize,
    /// Use at most this many windows
    #[arg(long, conflicts_with = "cache")]
    pub max_windows: Option<usize>,
    /// Adapter folder to run on the model (an export's own slots need none)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub stream: crate::stream::CacheArgs,
    /// With --cache: the stream's first N tokens only [default: the whole text]
    #[arg(long, value_name = "N", requires = "cache")]
    pub max_tokens: Option<usize>,
    /// With --cache: draw the running NLL along the stream (.png, .svg, or both)
    #[arg(long, requires = "cache")]
    pub plot: Option<PathBuf>,
    /// Also write the result as JSON here (with --cache: the NLL of every token too)
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn ppl(args: &PplArgs) -> Result<()> {
    let rolling = args.stream.rolling()?;
    let text_file = text_path(&args.text)?;
    let text = read_text(&text_file)?;
    let ckpt = args.model.open()?;
    let base = args.model.base(&ckpt)?;
    let adapters = match &args.adapter {
        Some(d) => crate::adapters::AdapterSet::load(d, &ckpt.config, &base.device)?
            .adapters()
            .detached(),
        None => Adapters::none(),
    };
    let model = base.model(&adapters)?;
    if let Some(r) = rolling {
        return stream_ppl_cmd(args, &r, &ckpt, &model, &text, &text_file);
    }
    let windows = Windows::new(
        &ckpt.tokenizer,
        &text,
        args.seq_len,
        args.max_windows,
        &text_file,
    )?;
    let start = std::time::Instant::now();
    let p = perplexity(&model, &windows)?;
    let secs = start.elapsed().as_secs_f64();
    let fed = windows.len() * windows.width();
    println!(
        "perplexity {:.4}  (nll {:.4}, {} tokens predicted, {} windows of {} + bos {})",
        p.ppl, p.nll, p.tokens, p.windows, p.seq_len, p.bos
    );
    println!(
        "forward    {:.1} tokens/s ({fed} tokens in {secs:.2} s)",
        fed as f64 / secs
    );
    if let Some(out) = &args.json {
        let mut v = serde_json::to_value(&p).map_err(|e| Error::file(out, e))?;
        v["model"] = ckpt.source.display().to_string().into();
        v["tokens_per_s"] = (fed as f64 / secs).into();
        write_json(out, &v)?;
    }
    Ok(())
}

/// `ppl --cache`: one stream of BOS (when the tokenizer adds it) and the text's tokens.
fn stream_ppl_cmd(
    args: &PplArgs,
    r: &crate::stream::Rolling,
    ckpt: &crate::checkpoint::Checkpoint,
    model: &crate::model::Model,
    text: &str,
    text_file: &std::path::Path,
) -> Result<()> {
    let tok = &ckpt.tokenizer;
    let mut ids: Vec<u32> = tok.bos.filter(|_| tok.add_bos).into_iter().collect();
    ids.extend(tok.encode(text)?);
    if let Some(n) = args.max_tokens {
        if n < 2 {
            return Err(Error::Usage("--max-tokens must be at least 2".into()));
        }
        ids.truncate(n);
    }
    if ids.len() < 2 {
        return Err(Error::file(
            text_file,
            "text too short: a stream needs 2 tokens",
        ));
    }
    let p = crate::stream::stream_ppl(model, &ids, r)?;
    print!("{}", p.lines());
    let label = |p: &std::path::Path| p.display().to_string();
    if let Some(out) = &args.json {
        let mut v = serde_json::to_value(&p).map_err(|e| Error::file(out, e))?;
        v["model"] = ckpt.source.display().to_string().into();
        v["adapter"] = args.adapter.as_deref().map(label).into();
        v["text"] = label(text_file).into();
        write_json(out, &v)?;
    }
    if let Some(out) = &args.plot {
        let name = match &args.adapter {
            Some(a) => format!("adapter {}", plot_title(a)),
            None => "base".into(),
        };
        let line = crate::plot_stream::StreamLine::of(&p, &name);
        let title = plot_title(&ckpt.source);
        for w in crate::plot_stream::draw_stream(&[line], &title, out)? {
            eprintln!("warning: {w}");
        }
    }
    Ok(())
}

/// The text and window flags of `scan` (and of `intervene`'s two texts).
#[derive(Debug, Clone, clap::Args)]
pub struct RuleArgs {
    /// Flag |h| >= ABS (0 gives the ratio-only rule for small models)
    #[arg(long, default_value_t = 100.0)]
    pub abs: f64,
    /// ... and |h| / median(|h|) >= RATIO
    #[arg(long, default_value_t = 1000.0)]
    pub ratio: f64,
}

impl RuleArgs {
    pub fn rule(&self) -> Result<Rule> {
        if !(self.abs >= 0.0 && self.ratio >= 0.0) {
            return Err(Error::Usage("--abs and --ratio must be >= 0".into()));
        }
        Ok(Rule {
            abs: self.abs,
            ratio: self.ratio,
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file, or folder of *.txt [default: the fetched Hamlet]
    #[arg(long)]
    pub text: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Number of windows
    #[arg(long, default_value_t = 10)]
    pub num_seqs: usize,
    #[command(flatten)]
    pub rule: RuleArgs,
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The paper's Fig. 2 (top-1/2/3 and median per layer): .png, .svg, or both for another name
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

fn windows_of(
    tok: &crate::checkpoint::Tok,
    path: &Option<PathBuf>,
    seq_len: usize,
    n: usize,
) -> Result<Windows> {
    let file = text_path(path)?;
    if n == 0 {
        return Err(Error::Usage("--num-seqs must be at least 1".into()));
    }
    Windows::new(tok, &read_text(&file)?, seq_len, Some(n), &file)
}

fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let body = serde_json::to_string_pretty(value).map_err(|e| Error::file(path, e))?;
    write_atomic(path, body.as_bytes())
}

pub fn scan_cmd(args: &ScanArgs) -> Result<()> {
    let rule = args.rule.rule()?;
    let (ckpt, model) = args.model.load(&Adapters::none())?;
    let windows = windows_of(&ckpt.tokenizer, &args.text, args.seq_len, args.num_seqs)?;
    let start = std::time::Instant::now();
    let report = scan(
        &model,
        &ckpt.tokenizer,
        &windows,
        rule,
        &ckpt.source.display().to_string(),
    )
    .map_err(|e| {
        // Windows run one at a time, so only their length sets the memory.
        let lower = "--seq-len";
        crate::error::explain_oom(e, "scan", 1, windows.width(), lower)
    })?;
    let secs = start.elapsed().as_secs_f64();
    print!("{}", report.table());
    println!(
        "{} windows x {} tokens (bos {}) in {secs:.1} s",
        report.num_seqs,
        windows.width(),
        report.bos
    );
    if let Some(p) = &args.json {
        write_json(p, &report)?;
    }
    if let Some(p) = &args.plot {
        draw_scans(&[(&report, "scan")], p)?;
    }
    Ok(())
}

fn draw_scans(scans: &[(&ScanReport, &str)], out: &std::path::Path) -> Result<()> {
    let series: Vec<LayerSeries> = scans
        .iter()
        .map(|(r, label)| LayerSeries {
            label: label.to_string(),
            top: r.layers.iter().map(|l| l.top).collect(),
            median: r.layers.iter().map(|l| l.median).collect(),
        })
        .collect();
    let name = plot_title(std::path::Path::new(&scans[0].0.model));
    for w in crate::plot::draw(&series, &name, out)? {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// A model's name for a plot title: its folder's name, with the run folder's in front when the
/// folder is one a run writes (`final`, `best`, `step-N`), which alone names no model.
fn plot_title(model: &std::path::Path) -> String {
    let name = |p: &std::path::Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let last = name(model);
    let generic = last == "final" || last == "best" || last.starts_with("step-");
    match model
        .parent()
        .map(name)
        .filter(|p| generic && !p.is_empty())
    {
        // checkpoints/step-N: the run is one folder further up.
        Some(p) if p == "checkpoints" => {
            let run = model.parent().and_then(|c| c.parent()).map(name);
            format!("{}/{last}", run.unwrap_or_default())
        }
        Some(p) => format!("{p}/{last}"),
        None => last,
    }
}

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// One or two scan JSON files (two are overlaid: before / after), or any number of
    /// `ppl --cache --json` files (one running-NLL line each)
    #[arg(required = true, num_args = 1..)]
    pub scans: Vec<PathBuf>,
    /// .png, .svg, or another name for both
    #[arg(long, default_value = "scan.png")]
    pub out: PathBuf,
}

pub fn plot_cmd(args: &PlotArgs) -> Result<()> {
    let values: Vec<serde_json::Value> = args
        .scans
        .iter()
        .map(|p| {
            let s = std::fs::read_to_string(p).map_err(|e| Error::file(p, e))?;
            serde_json::from_str(&s).map_err(|e| Error::file(p, format!("not JSON: {e}")))
        })
        .collect::<Result<_>>()?;
    if values.iter().any(|v| v.get("nll_per_token").is_some()) {
        return plot_streams(args, values);
    }
    if args.scans.len() > 2 {
        return Err(Error::Usage(format!(
            "{} scans given: plot overlays one or two",
            args.scans.len()
        )));
    }
    let reports: Vec<ScanReport> = args
        .scans
        .iter()
        .map(|p| {
            let s = std::fs::read_to_string(p).map_err(|e| Error::file(p, e))?;
            serde_json::from_str(&s).map_err(|e| Error::file(p, format!("not a scan JSON: {e}")))
        })
        .collect::<Result<_>>()?;
    let labels: Vec<String> = args
        .scans
        .iter()
        .map(|p| {
            p.file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let pairs: Vec<(&ScanReport, &str)> = reports
        .iter()
        .zip(labels.iter().map(String::as_str))
        .collect();
    draw_scans(&pairs, &args.out)
}

/// `eabfit plot` of `ppl --cache --json` files: one line each, labelled by file name.
fn plot_streams(args: &PlotArgs, values: Vec<serde_json::Value>) -> Result<()> {
    let mut lines = vec![];
    let mut title = String::new();
    for (path, v) in args.scans.iter().zip(values) {
        let model = v["model"].as_str().unwrap_or_default().to_string();
        let p: crate::stream::StreamPpl = serde_json::from_value(v)
            .map_err(|e| Error::file(path, format!("not a `ppl --cache --json` file: {e}")))?;
        if title.is_empty() {
            title = plot_title(std::path::Path::new(&model));
        }
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        lines.push(crate::plot_stream::StreamLine::of(&p, &stem));
    }
    for w in crate::plot_stream::draw_stream(&lines, &title, &args.out)? {
        eprintln!("warning: {w}");
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct InterveneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text on which the massive dims and their means are found [default: the fetched Hamlet]
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Text on which perplexity is measured three ways [default: the fetched Hamlet]
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Layer to intervene at [default: the first layer with massive activations]
    #[arg(long)]
    pub layer: Option<usize>,
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Windows of each text
    #[arg(long, default_value_t = 10)]
    pub num_seqs: usize,
    #[command(flatten)]
    pub rule: RuleArgs,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn intervene_cmd(args: &InterveneArgs) -> Result<()> {
    let rule = args.rule.rule()?;
    let (ckpt, model) = args.model.load(&Adapters::none())?;
    let calib = windows_of(&ckpt.tokenizer, &args.calib, args.seq_len, args.num_seqs)?;
    let eval = windows_of(&ckpt.tokenizer, &args.text, args.seq_len, args.num_seqs)?;
    let report = intervene(
        &model,
        &ckpt.tokenizer,
        &calib,
        &eval,
        args.layer,
        rule,
        &ckpt.source.display().to_string(),
    )?;
    print!("{}", report.table());
    if let Some(p) = &args.json {
        write_json(p, &report)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::plot_title;
    use std::path::Path;

    #[test]
    fn plot_titles_name_the_run_for_run_folders() {
        assert_eq!(
            plot_title(Path::new("/x/pair/default/final")),
            "default/final"
        );
        assert_eq!(
            plot_title(Path::new("/x/eab/checkpoints/step-002212")),
            "eab/step-002212"
        );
        assert_eq!(plot_title(Path::new("runs/smollm2/best")), "smollm2/best");
        assert_eq!(plot_title(Path::new("/m/SmolLM2.gguf")), "SmolLM2.gguf");
        assert_eq!(plot_title(Path::new("final")), "final");
    }
}
