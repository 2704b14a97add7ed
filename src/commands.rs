//! `info` and `ppl`: the two commands that only read a model.

use crate::adapters::Adapters;
use crate::data::{read_text, Windows};
use crate::perplexity::perplexity;
use crate::runtime::{text_path, write_atomic, ModelArgs};
use crate::Result;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn info(args: &InfoArgs) -> Result<()> {
    let ckpt = args.model.open()?;
    let device = args.model.device()?;
    let dtype = args.model.dtype(&device)?;
    let c = &ckpt.config;
    let t = &ckpt.tokenizer;
    let tok_name = |id: Option<u32>| id.map_or("none".to_string(), |i| format!("{i} {:?}", t.token_text(i)));
    println!("source          {}", ckpt.source.display());
    println!("format          {}", ckpt.format);
    println!("architecture    {} (LLaMA-family decoder)", c.model_type.as_deref().unwrap_or("llama"));
    println!("layers          {}", c.num_hidden_layers);
    println!("hidden          {}", c.hidden_size);
    println!("ffn             {}", c.intermediate_size);
    println!("heads           {} query / {} kv, head_dim {}", c.num_attention_heads, c.n_kv_heads(), c.head_dim());
    println!("vocab           {}", c.vocab_size);
    println!("context         {}", c.max_position_embeddings);
    println!("rope            theta {}{}", c.rope_theta, c.rope_scaling.as_ref().map_or(String::new(), |r| format!(", scaling {} x{}", r.rope_type, r.factor)));
    println!("sliding window  {}", c.sliding_window.map_or("none".into(), |w| w.to_string()));
    println!("lm_head         {}", if c.tie_word_embeddings { "tied to embed_tokens" } else { "separate" });
    println!("stored dtype    {}", ckpt.stored_dtype);
    println!("load dtype      {dtype:?} on {}", args.model.device);
    println!("parameters      {} ({:.1} M)", ckpt.param_count(), ckpt.param_count() as f64 / 1e6);
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
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Use at most this many windows
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Also write the result as JSON here
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn ppl(args: &PplArgs) -> Result<()> {
    let text_file = text_path(&args.text)?;
    let text = read_text(&text_file)?;
    let (ckpt, model) = args.model.load(&Adapters::none())?;
    let windows = Windows::new(&ckpt.tokenizer, &text, args.seq_len, args.max_windows, &text_file)?;
    let start = std::time::Instant::now();
    let p = perplexity(&model, &windows)?;
    let secs = start.elapsed().as_secs_f64();
    let fed = windows.len() * windows.width();
    println!("perplexity {:.4}  (nll {:.4}, {} tokens predicted, {} windows of {} + bos {})", p.ppl, p.nll, p.tokens, p.windows, p.seq_len, p.bos);
    println!("forward    {:.1} tokens/s ({fed} tokens in {secs:.2} s)", fed as f64 / secs);
    if let Some(out) = &args.json {
        let mut v = serde_json::to_value(&p).map_err(|e| crate::Error::Msg(e.to_string()))?;
        v["model"] = ckpt.source.display().to_string().into();
        v["tokens_per_s"] = (fed as f64 / secs).into();
        write_atomic(out, serde_json::to_string_pretty(&v).unwrap_or_default().as_bytes())?;
    }
    Ok(())
}
