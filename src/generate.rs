//! `eabfit generate`: KV-cached decoding with the EAB slots, the first thing to run to see
//! that a retrofit did not hurt the model.
//!
//! The prompt goes through the tokenizer's chat template when it has one (one user message,
//! generation prompt added, as transformers' `apply_chat_template` does), else it is encoded
//! as it is with BOS when the tokenizer config asks for it. Greedy by default; with
//! `--temperature` > 0, nucleus sampling (`--top-p`) from a seeded generator. Decoding stops
//! after `--max-new-tokens` or at an end-of-sequence token (the tokenizer's EOS and every id
//! of config.json's `eos_token_id`).

use crate::adapters::{AdapterSet, Adapters};
use crate::checkpoint::Tok;
use crate::fsio::write_atomic;
use crate::model::{KvCache, Model};
use crate::model_args::ModelArgs;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Adapter folder to run on the model (an export's own slots need none)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt (a user message when the tokenizer has a chat template)
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy; above 0 samples from softmax(logits / T)
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only from the smallest set of tokens whose probability reaches P
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Encode the prompt as it is even when the tokenizer has a chat template
    #[arg(long)]
    pub raw: bool,
    /// Also write {"prompt_ids", "ids", "text", ...} here
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// How the next token is chosen from a row of logits.
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: StdRng,
}

impl Sampler {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            rng: StdRng::seed_from_u64(0),
        }
    }

    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Result<Self> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::Usage(format!(
                "--temperature {temperature}: expected a number >= 0 (0 is greedy)"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::Usage(format!(
                "--top-p {top_p}: expected a number in (0, 1]"
            )));
        }
        Ok(Self {
            temperature,
            top_p,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The argmax (the first one on ties) when greedy, else a draw from the nucleus.
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) / self.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let (mut kept, mut mass) = (0, 0.0);
        for &(_, p) in &probs {
            kept += 1;
            mass += p / total;
            if mass >= self.top_p {
                break;
            }
        }
        let nucleus = &probs[..kept];
        let norm: f64 = nucleus.iter().map(|p| p.1).sum();
        let mut u = self.rng.gen::<f64>() * norm;
        for &(id, p) in nucleus {
            if u < p {
                return id;
            }
            u -= p;
        }
        nucleus[kept - 1].0
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Decodes up to `max_new` tokens after `prompt` (non-empty) with one KV cache: the prompt in
/// one pass, then one position per token. Stops after a token in `stop` (which is kept).
/// `on_token` sees each new token as it comes.
pub fn decode(
    model: &Model,
    prompt: &[u32],
    max_new: usize,
    stop: &[u32],
    sampler: &mut Sampler,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let max_pos = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(Error::Usage("the prompt has no tokens".into()));
    }
    if prompt.len() + max_new > max_pos {
        return Err(Error::Usage(format!(
            "{} prompt tokens + --max-new-tokens {max_new} exceed max_position_embeddings {max_pos}",
            prompt.len()
        )));
    }
    let mut cache = KvCache::new();
    let mut input = prompt.to_vec();
    let mut out = Vec::with_capacity(max_new);
    while out.len() < max_new {
        let ids = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?; // (1, T)
        let logits = model.forward_cached(&ids, &mut cache)?; // (1, T, V)
        let last: Vec<f32> = logits
            .squeeze(0)?
            .get(input.len() - 1)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let next = sampler.next(&last);
        out.push(next);
        on_token(next)?;
        if stop.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// The prompt's token ids, and whether the chat template made them.
pub fn prompt_ids(tok: &Tok, prompt: &str, raw: bool) -> Result<(Vec<u32>, bool)> {
    match (&tok.chat_template, raw) {
        (Some(template), false) => {
            let text = render_chat(tok, template, prompt)?;
            Ok((tok.encode(&text)?, true))
        }
        _ => {
            let mut ids: Vec<u32> = tok.bos.filter(|_| tok.add_bos).into_iter().collect();
            ids.extend(tok.encode(prompt)?);
            Ok((ids, false))
        }
    }
}

/// One user message through the chat template, with the generation prompt; BOS and EOS are
/// the template's to place (`bos_token`, `eos_token`), as in transformers.
pub fn render_chat(tok: &Tok, template: &str, prompt: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // Hugging Face templates call Python string methods (`.strip()`, `.startswith()`).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let bad = |e: minijinja::Error| Error::Msg(format!("chat template ({}): {e}", tok.origin));
    env.add_template("chat", template).map_err(bad)?;
    let text = |id: Option<u32>| id.map(|i| tok.token_text(i)).unwrap_or_default();
    env.get_template("chat")
        .map_err(bad)?
        .render(minijinja::context! {
            messages => vec![json!({"role": "user", "content": prompt})],
            add_generation_prompt => true,
            bos_token => text(tok.bos),
            eos_token => text(tok.eos),
        })
        .map_err(bad)
}

/// The tokenizer's EOS and every id of config.json's `eos_token_id` (a number or a list).
pub fn stop_ids(tok: &Tok, eos_token_id: Option<&serde_json::Value>) -> Vec<u32> {
    let mut ids: Vec<u32> = tok.eos.into_iter().collect();
    let listed = match eos_token_id {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).collect(),
        Some(v) => v.as_u64().into_iter().collect(),
        None => vec![],
    };
    ids.extend(listed.into_iter().map(|i| i as u32));
    ids.sort_unstable();
    ids.dedup();
    ids
}

pub fn generate_cmd(args: &GenerateArgs) -> Result<()> {
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed)?;
    if args.max_new_tokens == 0 {
        return Err(Error::Usage("--max-new-tokens must be at least 1".into()));
    }
    let ckpt = args.model.open()?;
    let base = args.model.base(&ckpt)?;
    let adapters = match &args.adapter {
        Some(d) => AdapterSet::load(d, &ckpt.config, &base.device)?.adapters(),
        None => Adapters::none(),
    };
    let model = base.model(&adapters)?;
    let tok = &ckpt.tokenizer;
    let (prompt, templated) = prompt_ids(tok, &args.prompt, args.raw)?;
    let stop = stop_ids(tok, ckpt.config.eos_token_id.as_ref());
    let text_of = |ids: &[u32]| -> Result<String> {
        tok.inner
            .decode(ids, true)
            .map_err(|e| Error::Msg(format!("tokenizer ({}): {e}", tok.origin)))
    };
    // Streams the text as it grows; a token that ends inside a UTF-8 character waits.
    let (mut ids, mut shown) = (Vec::new(), 0usize);
    let mut stdout = std::io::stdout();
    let started = std::time::Instant::now();
    let out = decode(
        &model,
        &prompt,
        args.max_new_tokens,
        &stop,
        &mut sampler,
        |id| {
            ids.push(id);
            let text = text_of(&ids)?;
            if text.len() > shown && !text.ends_with('\u{FFFD}') && text.is_char_boundary(shown) {
                let _ = write!(stdout, "{}", &text[shown..]);
                let _ = stdout.flush();
                shown = text.len();
            }
            Ok(())
        },
    )?;
    let secs = started.elapsed().as_secs_f64();
    let text = text_of(&out)?;
    if text.len() > shown && text.is_char_boundary(shown) {
        print!("{}", &text[shown..]);
    }
    println!();
    let stopped = out.last().is_some_and(|t| stop.contains(t));
    eprintln!(
        "{} prompt tokens{}, {} new ({}) in {secs:.2} s, {:.1} tokens/s",
        prompt.len(),
        if templated { " (chat template)" } else { "" },
        out.len(),
        if stopped { "end of sequence" } else { "limit" },
        out.len() as f64 / secs.max(1e-9)
    );
    if let Some(path) = &args.json {
        let v = json!({
            "model": ckpt.source.display().to_string(),
            "adapter": args.adapter.as_ref().map(|p| p.display().to_string()),
            "chat_template": templated,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
            "prompt_ids": prompt,
            "ids": out,
            "stopped_at_eos": stopped,
            "text": text,
        });
        let body = serde_json::to_string_pretty(&v).map_err(|e| Error::file(path, e))?;
        write_atomic(path, body.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_the_first_argmax() {
        let mut s = Sampler::greedy();
        assert_eq!(s.next(&[0.5, 2.0, -1.0, 2.0]), 1);
    }

    #[test]
    fn a_tiny_nucleus_is_greedy() {
        let mut s = Sampler::new(0.7, 1e-6, 3).unwrap();
        for _ in 0..20 {
            assert_eq!(s.next(&[0.1, 0.3, 3.0, 2.9]), 2);
        }
    }

    #[test]
    fn samples_follow_the_tempered_softmax() {
        let logits = [1.0f32, 0.0, -1.0, 0.5];
        let t = 0.8;
        let z: f64 = logits.iter().map(|&l| (l as f64 / t).exp()).sum();
        let want: Vec<f64> = logits.iter().map(|&l| (l as f64 / t).exp() / z).collect();
        let mut s = Sampler::new(t, 1.0, 11).unwrap();
        let n = 40_000;
        let mut count = [0usize; 4];
        for _ in 0..n {
            count[s.next(&logits) as usize] += 1;
        }
        for (c, p) in count.iter().zip(&want) {
            let f = *c as f64 / n as f64;
            // 5 standard errors of a binomial proportion.
            assert!(
                (f - p).abs() < 5.0 * (p * (1.0 - p) / n as f64).sqrt(),
                "{f} vs {p}"
            );
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two, renormalised 5/8, 3/8.
        let logits = [0.5f64.ln() as f32, 0.3f64.ln() as f32, 0.2f64.ln() as f32];
        let mut s = Sampler::new(1.0, 0.7, 5).unwrap();
        let n = 20_000;
        let mut count = [0usize; 3];
        for _ in 0..n {
            count[s.next(&logits) as usize] += 1;
        }
        assert_eq!(count[2], 0);
        let f = count[0] as f64 / n as f64;
        assert!(
            (f - 0.625).abs() < 5.0 * (0.625 * 0.375 / n as f64).sqrt(),
            "{f}"
        );
    }

    #[test]
    fn bad_sampling_settings_are_usage_errors() {
        for (t, p) in [(-1.0, 1.0), (f64::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            let e = Sampler::new(t, p, 0).err().expect("refused");
            assert!(e.is_usage(), "{e}");
        }
    }
}
