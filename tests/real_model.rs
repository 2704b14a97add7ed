//! The real SmolLM2-135M (GGUF, dequantized) on Shakespeare, against candle's own quantized
//! llama on the same windows. Needs `scripts/fetch-assets.sh` (the test script runs it).

mod common;

use candle_core::{Device, Tensor};
use eabfit::adapters::Adapters;
use eabfit::checkpoint::Checkpoint;
use eabfit::data::{read_text, Windows};
use eabfit::perplexity::perplexity;

fn assets() -> (std::path::PathBuf, std::path::PathBuf) {
    common::real_assets()
        .expect("real assets missing: run scripts/fetch-assets.sh (scripts/test.sh does)")
}

/// candle's quantized llama, fed one token at a time with its KV cache.
fn quantized_ppl(gguf: &std::path::Path, windows: &Windows) -> f64 {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut f = std::fs::File::open(gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let (mut nll, mut n) = (0f64, 0usize);
    for w in &windows.ids {
        model.clear_kv_cache();
        for p in 0..w.len() - 1 {
            let x = Tensor::new(&w[p..=p], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits: Vec<f32> = model
                .forward(&x, p)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            nll += common::nll_f64(&logits, w[p + 1]);
            n += 1;
        }
    }
    (nll / n as f64).exp()
}

#[test]
fn smollm2_perplexity_agrees_with_candle_quantized_llama() {
    let (gguf, text) = assets();
    let ckpt = Checkpoint::open(gguf.to_str().unwrap()).unwrap();
    assert_eq!(ckpt.config.num_hidden_layers, 30);
    assert_eq!(ckpt.config.n_kv_heads(), 3);
    assert!(ckpt.config.tie_word_embeddings);
    let model = ckpt
        .load_model(candle_core::DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap();
    let windows = Windows::new(
        &ckpt.tokenizer,
        &read_text(&text).unwrap(),
        128,
        Some(1),
        &text,
    )
    .unwrap();
    let ours = perplexity(&model, &windows).unwrap().ppl;
    let reference = quantized_ppl(&gguf, &windows);
    eprintln!("eabfit ppl {ours:.3}, candle quantized llama {reference:.3}");
    // The reference multiplies Q4_1 weights by 8-bit-quantized activations; eabfit dequantizes to
    // f32. Same model, slightly different arithmetic: a few percent apart at most.
    assert!(
        (ours - reference).abs() / reference < 0.03,
        "eabfit {ours} vs candle {reference}"
    );
    assert!(ours > 5.0 && ours < 60.0, "implausible perplexity {ours}");
}

#[test]
fn smollm2_tokenizer_round_trips_shakespeare() {
    let (gguf, _) = assets();
    let ckpt = Checkpoint::open(gguf.to_str().unwrap()).unwrap();
    let tok = &ckpt.tokenizer;
    let line = "To be, or not to be: that is the question. 1604";
    let ids = tok.encode(line).unwrap();
    assert_eq!(tok.inner.decode(&ids, false).unwrap(), line);
    // Digits are split one by one (SmolLM's pre-tokenizer), and common words are single tokens.
    assert_eq!(ids.iter().rev().take(4).count(), 4);
    let digits: Vec<String> = ids[ids.len() - 4..]
        .iter()
        .map(|&i| tok.token_text(i))
        .collect();
    assert_eq!(digits, ["1", "6", "0", "4"]);
    assert!(ids.len() < 20, "{} tokens: merges not applied?", ids.len());
}
