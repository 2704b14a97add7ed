//! `eabfit generate`: KV-cached decoding with the EAB slots equals a step-by-step greedy decode
//! that recomputes the whole sequence through the differentiable path each step (slots,
//! mask_first_token, a Mistral window shorter than the sequence); the chat template is applied;
//! bad settings are usage errors; on the real SmolLM2 the greedy text is readable.

mod common;

use candle_core::{DType, Device, Tensor};
use common::export::{eabfit, ok};
use common::{json as read_json, make_adapter, tiny, Arch};
use eabfit::adapters::{AdapterSet, Adapters};
use eabfit::checkpoint::Checkpoint;
use eabfit::generate::{decode, Sampler};
use eabfit::model::{KvCache, Model};
use std::path::Path;

const EOS: u32 = 2;

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in row.iter().enumerate() {
        if l > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding without a cache: every step runs the whole sequence again.
fn full_recompute_greedy(model: &Model, prompt: &[u32], n: usize, stop: &[u32]) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let mut out = vec![];
    while out.len() < n {
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.logits(&ids).unwrap().squeeze(0).unwrap();
        let next = argmax(&logits.get(seq.len() - 1).unwrap().to_vec1::<f32>().unwrap());
        out.push(next);
        seq.push(next);
        if stop.contains(&next) {
            break;
        }
    }
    out
}

fn adapted(arch: Arch, mask: bool, slots: &[usize], seed: u64) -> (common::Tiny, Model, Model) {
    let tiny = tiny(arch, seed);
    let dir = tiny.path().join("adapter");
    make_adapter(&tiny, &dir, mask, slots, seed + 1);
    let ckpt = Checkpoint::open(&tiny.spec()).unwrap();
    let set = AdapterSet::load(&dir, &ckpt.config, &Device::Cpu).unwrap();
    let model = ckpt
        .load_model(DType::F32, &Device::Cpu, &set.adapters())
        .unwrap();
    let base = ckpt
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap();
    (tiny, model, base)
}

#[test]
fn cached_decoding_equals_full_recompute() {
    // 6 prompt tokens + 30 new: far past the tiny Mistral's window of 5.
    let prompt = [1u32, 5, 9, 3, 22, 7];
    for (arch, mask, slots) in [
        (Arch::Llama, true, vec![0, 1, 2]),
        (Arch::Mistral, true, vec![0, 1, 2]),
        (Arch::Mistral, false, vec![0, 1, 2]),
        (Arch::Llama3, false, vec![1]),
    ] {
        let (_tiny, model, base) = adapted(arch, mask, &slots, 60);
        let ours = decode(&model, &prompt, 30, &[], &mut Sampler::greedy(), |_| Ok(())).unwrap();
        let want = full_recompute_greedy(&model, &prompt, 30, &[]);
        assert_eq!(ours, want, "{arch:?} mask {mask}");

        // Logits too: the prompt in one cached pass, then one token per pass, against one
        // uncached pass over the whole sequence.
        let seq: Vec<u32> = prompt.iter().chain(&ours).copied().collect();
        let all = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let full = model.logits(&all).unwrap();
        let mut cache = KvCache::new();
        let mut parts = vec![model
            .forward_cached(&all.narrow(1, 0, 6).unwrap(), &mut cache)
            .unwrap()];
        for t in 6..seq.len() {
            parts.push(
                model
                    .forward_cached(&all.narrow(1, t, 1).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), seq.len());
        let cached = Tensor::cat(&parts, 1).unwrap();
        let d = common::max_abs_diff(&cached, &full);
        assert!(
            d < 1e-4,
            "{arch:?} mask {mask}: cached vs full logits differ by {d}"
        );
        // The slots change the model: the check above is not one of the base.
        let plain = base.logits(&all).unwrap();
        assert!(
            common::max_abs_diff(&plain, &full) > 1e-2,
            "{arch:?}: slots change nothing"
        );
    }
}

#[test]
fn decoding_stops_after_an_end_of_sequence_token() {
    let (_tiny, model, _) = adapted(Arch::Llama, true, &[0, 1, 2], 61);
    let prompt = [1u32, 4, 8];
    let free = decode(&model, &prompt, 40, &[], &mut Sampler::greedy(), |_| Ok(())).unwrap();
    // Stop at whatever the free run emits fourth: decoding must end right after it.
    let stop = free[3];
    let first = free.iter().position(|&t| t == stop).unwrap();
    let stopped = decode(&model, &prompt, 40, &[stop], &mut Sampler::greedy(), |_| {
        Ok(())
    })
    .unwrap();
    assert_eq!(stopped, free[..=first]);
}

#[test]
fn cli_generate_is_the_greedy_decode_of_the_adapted_model() {
    let (tiny, model, _) = adapted(Arch::Mistral, true, &[0, 1, 2], 62);
    let json = tiny.path().join("gen.json");
    let adapter = tiny.path().join("adapter");
    let o = eabfit(&[
        "generate",
        "--model",
        &tiny.spec(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "the king and the queen",
        "--max-new-tokens",
        "24",
        "--json",
        json.to_str().unwrap(),
    ]);
    ok(&o);
    let v = read_json(&json);
    let ckpt = Checkpoint::open(&tiny.spec()).unwrap();
    let mut want_prompt = vec![1u32];
    want_prompt.extend(ckpt.tokenizer.encode("the king and the queen").unwrap());
    let prompt: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
    assert_eq!(prompt, want_prompt, "BOS + the prompt");
    assert_eq!(v["chat_template"], false);
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(ids, full_recompute_greedy(&model, &prompt, 24, &[EOS]));
    let text = ckpt.tokenizer.inner.decode(&ids, true).unwrap();
    assert_eq!(v["text"], text.as_str());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim_end(), text);

    // Sampling is a pure function of the seed.
    let sample = |seed: &str, out: &Path| {
        ok(&eabfit(&[
            "generate",
            "--model",
            &tiny.spec(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            "the king",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.5",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--json",
            out.to_str().unwrap(),
        ]));
        read_json(out)["ids"].clone()
    };
    let (a, b) = (tiny.path().join("a.json"), tiny.path().join("b.json"));
    assert_eq!(sample("7", &a), sample("7", &b));
}

#[test]
fn chat_template_of_the_tokenizer_config_is_applied() {
    let tiny = tiny(Arch::Llama, 63);
    let tc = serde_json::json!({
        "add_bos_token": true, "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}{{ bos_token }} {{ m['role'] }} {{ m['content'].strip() }}{% endfor %}{% if add_generation_prompt %} lord{% endif %}"
    });
    std::fs::write(tiny.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
    let json = tiny.path().join("gen.json");
    ok(&eabfit(&[
        "generate",
        "--model",
        &tiny.spec(),
        "--prompt",
        "  the ghost speak ",
        "--max-new-tokens",
        "3",
        "--json",
        json.to_str().unwrap(),
    ]));
    let v = read_json(&json);
    assert_eq!(v["chat_template"], true);
    let tok = Checkpoint::open(&tiny.spec()).unwrap().tokenizer;
    let want = tok.encode("<s> user the ghost speak lord").unwrap();
    let got: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
    assert_eq!(got, want);
    // `--raw` skips the template: BOS (add_bos_token) + the prompt as it is.
    ok(&eabfit(&[
        "generate",
        "--model",
        &tiny.spec(),
        "--prompt",
        "the ghost",
        "--raw",
        "--max-new-tokens",
        "3",
        "--json",
        json.to_str().unwrap(),
    ]));
    let got: Vec<u32> = serde_json::from_value(read_json(&json)["prompt_ids"].clone()).unwrap();
    let mut want = vec![1];
    want.extend(tok.encode("the ghost").unwrap());
    assert_eq!(got, want);
}

#[test]
fn bad_settings_are_usage_errors() {
    let tiny = tiny(Arch::Llama, 64);
    for (flag, value, needle) in [
        ("--temperature", "-1", "--temperature"),
        ("--top-p", "0", "--top-p"),
        ("--max-new-tokens", "0", "--max-new-tokens"),
        ("--max-new-tokens", "500", "max_position_embeddings"),
    ] {
        let arg = format!("{flag}={value}");
        let o = eabfit(&[
            "generate",
            "--model",
            &tiny.spec(),
            "--prompt",
            "the king",
            &arg,
        ]);
        assert_eq!(o.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains(needle) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

#[test]
fn smollm2_greedy_text_is_readable_and_is_the_argmax_of_full_recompute() {
    let (gguf, _) = common::real_assets()
        .expect("real assets missing: run scripts/fetch-assets.sh (scripts/test.sh does)");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("gen.json");
    let o = eabfit(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
        "--json",
        json.to_str().unwrap(),
    ]);
    ok(&o);
    let v = read_json(&json);
    assert_eq!(v["chat_template"], true, "the GGUF carries a chat template");
    let prompt: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    let text = v["text"].as_str().unwrap().to_string();
    eprintln!("SmolLM2: {text:?} ({} tokens)", ids.len());

    // One uncached pass over prompt + answer: causal, so row p - 1 + i predicts answer token i.
    let ckpt = Checkpoint::open(gguf.to_str().unwrap()).unwrap();
    let model = ckpt
        .load_model(DType::F32, &Device::Cpu, &Adapters::none())
        .unwrap();
    let seq: Vec<u32> = prompt.iter().chain(&ids).copied().collect();
    let logits = model
        .logits(
            &Tensor::new(seq.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    for (i, &id) in ids.iter().enumerate() {
        let row: Vec<f32> = logits.get(prompt.len() - 1 + i).unwrap().to_vec1().unwrap();
        assert_eq!(argmax(&row), id, "token {i} of {text:?}");
    }
    let ascii = text
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ' || *c == '\n')
        .count();
    assert!(
        ascii as f64 >= 0.95 * text.chars().count() as f64,
        "{text:?}"
    );
    let words = text
        .split_whitespace()
        .filter(|w| w.chars().any(|c| c.is_ascii_alphabetic()))
        .count();
    assert!(words >= 4, "{text:?}");
    assert!(text.contains("Paris"), "{text:?}");
}
