//! Streaming through a rolling KV cache (`ppl --cache`, `generate --cache`): chunked passes
//! equal token-by-token decoding through the literal cache; on a one-layer model (whose keys
//! and values depend on the token alone) every prediction equals a dense pass over exactly
//! the tokens the cache should hold, which pins down what is kept (the sinks), what is evicted
//! (the oldest non-sink entry), the positions, and the slot (never evicted); streams run far
//! past max_position_embeddings; a cache as long as the text is dense perplexity; impossible
//! caches are usage errors.

mod common;

use candle_core::{DType, Device};
use common::export::{eabfit, ok};
use common::{json as read_json, make_adapter, row, tiny, Arch};
use eabfit::adapters::{AdapterMeta, AdapterSet, Adapters, SlotInit};
use eabfit::checkpoint::Checkpoint;
use eabfit::model::{Model, StreamCache};
use eabfit::stream::{stream_nll, Rolling};
use std::path::Path;

fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut v = vec![1u32];
    v.extend((1..n).map(|i| 3 + ((i as u64 * 7919 + seed * 104_729) % 58) as u32));
    v
}

fn load(tiny: &common::Tiny, adapter: Option<&Path>) -> Model {
    let ckpt = Checkpoint::open(&tiny.spec()).unwrap();
    let adapters = match adapter {
        Some(d) => AdapterSet::load(d, &ckpt.config, &Device::Cpu)
            .unwrap()
            .adapters(),
        None => Adapters::none(),
    };
    ckpt.load_model(DType::F32, &Device::Cpu, &adapters)
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn chunked_streams_equal_token_by_token_decoding_through_the_literal_cache() {
    // 150 tokens: past the tiny models' max_position_embeddings of 128.
    let stream = ids(150, 3);
    for (arch, mask, slots, cache, sinks) in [
        (Arch::Llama, false, vec![0, 1, 2], 12, 0),
        (Arch::Llama, false, vec![0, 1, 2], 12, 3),
        (Arch::Llama, true, vec![0, 1, 2], 12, 0),
        (Arch::Llama3, false, vec![1], 20, 4),
        (Arch::Mistral, false, vec![0, 2], 5, 1),
    ] {
        let tiny = tiny(arch, 70);
        let dir = tiny.path().join("adapter");
        make_adapter(&tiny, &dir, mask, &slots, 71);
        let model = load(&tiny, Some(&dir));
        let literal = stream_nll(&model, &stream, &Rolling::new(cache, sinks, 1).unwrap()).unwrap();
        assert_eq!(literal.len(), stream.len() - 1);
        for chunk in [7, 64] {
            let r = Rolling::new(cache, sinks, chunk).unwrap();
            let chunked = stream_nll(&model, &stream, &r).unwrap();
            let d = max_diff(&chunked, &literal);
            assert!(d < 1e-4, "{arch:?} L {cache} S {sinks} chunk {chunk}: {d}");
        }
        // The cache matters: the same stream dense (within the context) predicts otherwise.
        let dense = dense_nll(&model, &stream[..100]);
        let d = max_diff(&dense[cache..], &literal[cache..99]);
        assert!(d > 1e-3, "{arch:?}: the rolling cache changed nothing");
    }
}

/// Next-token NLL of `ids` in one dense pass, in f64 through the tests' own loss.
fn dense_nll(model: &Model, ids: &[u32]) -> Vec<f32> {
    let logits = model.logits(&row(ids)).unwrap().squeeze(0).unwrap();
    (0..ids.len() - 1)
        .map(|t| {
            let r: Vec<f32> = logits.get(t).unwrap().to_vec1().unwrap();
            common::nll_f64(&r, ids[t + 1]) as f32
        })
        .collect()
}

/// The tiny LLaMA with one layer: its keys and values are functions of the token alone.
fn one_layer(seed: u64) -> common::Tiny {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(Arch::Llama);
    cfg["num_hidden_layers"] = 1.into();
    common::write_checkpoint(dir.path(), &cfg, &common::weights(&cfg, seed));
    common::Tiny { dir, config: cfg }
}

fn slot_adapter(tiny: &common::Tiny, dir: &Path) {
    let cfg = Checkpoint::open(&tiny.spec()).unwrap().config;
    let mut meta = AdapterMeta::for_config(&cfg, &tiny.spec());
    meta.eab_layers = vec![0];
    let set = AdapterSet::new(
        meta,
        SlotInit::Normal { std: 1.0, seed: 5 },
        0.0,
        5,
        &Device::Cpu,
    )
    .unwrap();
    set.save(dir).unwrap();
}

#[test]
fn the_cache_keeps_the_sinks_and_the_newest_tokens_and_the_slot_forever() {
    let tiny = one_layer(80);
    let adapter = tiny.path().join("slot");
    slot_adapter(&tiny, &adapter);
    // 300 tokens through a cache of 10: positions stay below 10 for a stream 2.3x the context.
    let stream = ids(300, 9);
    let (cache, sinks) = (10usize, 3usize);
    for with_slot in [false, true] {
        let model = load(&tiny, with_slot.then_some(adapter.as_path()));
        let r = Rolling::new(cache, sinks, 16).unwrap();
        let got = stream_nll(&model, &stream, &r).unwrap();
        // Token t + 1 is predicted from the cache after token t entered: the sinks 0..S and
        // the newest L - S tokens up to t, at positions 0..L, the slot beside them.
        for t in (0..stream.len() - 1).step_by(7) {
            let held: Vec<u32> = if t < cache {
                stream[..=t].to_vec()
            } else {
                let recent = &stream[t + 1 - (cache - sinks)..=t];
                stream[..sinks].iter().chain(recent).copied().collect()
            };
            assert_eq!(held.len(), (t + 1).min(cache));
            let logits = model.logits(&row(&held)).unwrap().squeeze(0).unwrap();
            let last: Vec<f32> = logits.get(held.len() - 1).unwrap().to_vec1().unwrap();
            let want = common::nll_f64(&last, stream[t + 1]) as f32;
            assert!(
                (got[t] - want).abs() < 1e-4,
                "slot {with_slot}, token {}: stream {} vs the held tokens {want}",
                t + 1,
                got[t]
            );
        }
    }
    // The slot is still there at the end of the stream: without it the predictions differ.
    let r = Rolling::new(cache, sinks, 16).unwrap();
    let with = stream_nll(&load(&tiny, Some(&adapter)), &stream, &r).unwrap();
    let without = stream_nll(&load(&tiny, None), &stream, &r).unwrap();
    let d = max_diff(&with[280..], &without[280..]);
    assert!(d > 1e-2, "the slot changes nothing at the end: {d}");
}

#[test]
fn the_cache_reports_what_it_holds() {
    let tiny = one_layer(81);
    let model = load(&tiny, None);
    let mut cache = StreamCache::new(6, 2).unwrap();
    let stream = ids(20, 4);
    model
        .forward_stream(&row(&stream[..4]), &mut cache)
        .unwrap();
    assert_eq!(cache.held(), vec![0, 1, 2, 3]);
    model
        .forward_stream(&row(&stream[4..13]), &mut cache)
        .unwrap();
    assert_eq!((cache.seen(), cache.len()), (13, 6));
    assert_eq!(cache.held(), vec![0, 1, 9, 10, 11, 12]);
    model
        .forward_stream(&row(&stream[13..14]), &mut cache)
        .unwrap();
    assert_eq!(cache.held(), vec![0, 1, 10, 11, 12, 13]);
}

#[test]
fn a_cache_as_long_as_the_text_is_dense_perplexity() {
    let tiny = tiny(Arch::Llama, 72);
    let adapter = tiny.path().join("adapter");
    make_adapter(&tiny, &adapter, false, &[0, 1, 2], 73);
    // 90 words: one window of 90 tokens + BOS, well within the 128 positions.
    let text = common::write_text(tiny.path(), "t.txt", 90, 5);
    let (dense, stream) = (tiny.path().join("d.json"), tiny.path().join("s.json"));
    let common_args = [
        "ppl",
        "--model",
        &tiny.spec(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        common_args
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let run = |a: Vec<String>| eabfit(&a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&run(with(&[
        "--seq-len",
        "90",
        "--json",
        dense.to_str().unwrap(),
    ])));
    let plot = tiny.path().join("stream.png");
    let o = run(with(&[
        "--cache",
        "91",
        "--chunk",
        "32",
        "--json",
        stream.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]));
    ok(&o);
    let (d, s) = (read_json(&dense), read_json(&stream));
    assert_eq!(s["stream_tokens"], 91);
    assert_eq!(d["tokens"], 90);
    let per_token = s["nll_per_token"].as_array().unwrap();
    assert_eq!(per_token.len(), 90);
    let (dn, sn) = (d["nll"].as_f64().unwrap(), s["nll"].as_f64().unwrap());
    assert!((dn - sn).abs() < 1e-5, "dense {dn} vs stream {sn}");
    assert!(s["ppl_after_eviction"].is_null(), "the cache never filled");
    assert!(std::fs::metadata(&plot).unwrap().len() > 1000);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("stream perplexity"), "{stdout}");

    // A smaller cache evicts and predicts otherwise; `eabfit plot` overlays both runs.
    let small = tiny.path().join("small.json");
    ok(&run(with(&[
        "--cache",
        "16",
        "--json",
        small.to_str().unwrap(),
    ])));
    let v = read_json(&small);
    assert_eq!(v["tokens_after_eviction"], 90 - 16);
    assert!((v["nll"].as_f64().unwrap() - dn).abs() > 1e-4);
    let both = tiny.path().join("both.svg");
    ok(&eabfit(&[
        "plot",
        stream.to_str().unwrap(),
        small.to_str().unwrap(),
        "--out",
        both.to_str().unwrap(),
    ]));
    assert!(std::fs::read_to_string(&both).unwrap().contains("<svg"));
}

#[test]
fn generation_runs_past_the_context_through_the_rolling_cache() {
    let tiny = tiny(Arch::Llama, 74);
    let adapter = tiny.path().join("adapter");
    make_adapter(&tiny, &adapter, false, &[0, 1, 2], 75);
    let json = tiny.path().join("gen.json");
    // 200 new tokens: past max_position_embeddings 128, which plain decoding refuses.
    let args = |cache: bool| {
        let mut a = vec![
            "generate",
            "--model",
            tiny.path().to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            "the king and the queen of the castle",
            "--max-new-tokens",
            "200",
            "--json",
            json.to_str().unwrap(),
        ];
        if cache {
            a.extend(["--cache", "24", "--sink-tokens", "2"]);
        }
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| eabfit(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(run(args(false)).status.code(), Some(2));
    ok(&run(args(true)));
    let v = read_json(&json);
    let prompt: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
    let out: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(out.len(), 200, "no EOS in the tiny vocabulary's greedy run");
    // Each new token is the argmax of the literal cache's prediction, token by token.
    let model = load(&tiny, Some(&adapter));
    let mut cache = StreamCache::new(24, 2).unwrap();
    let seq: Vec<u32> = prompt.iter().chain(&out).copied().collect();
    for t in 0..seq.len() - 1 {
        let logits = model.forward_stream(&row(&seq[t..=t]), &mut cache).unwrap();
        let last: Vec<f32> = logits
            .squeeze(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        if t + 1 >= prompt.len() {
            let best = (0..last.len())
                .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
                .unwrap() as u32;
            assert_eq!(best, seq[t + 1], "token {}", t + 1);
        }
    }
}

#[test]
fn impossible_caches_are_usage_errors() {
    let llama = tiny(Arch::Llama, 76);
    let mistral = tiny(Arch::Mistral, 77);
    let masked = llama.path().join("masked");
    make_adapter(&llama, &masked, true, &[0, 1, 2], 78);
    let text = common::write_text(llama.path(), "t.txt", 60, 6);
    let masked = masked.to_str().unwrap();
    for (model, extra, needle) in [
        (&llama, vec!["--cache", "0"], "--cache 0"),
        (
            &llama,
            vec!["--cache", "4", "--sink-tokens", "4"],
            "--sink-tokens 4 >= --cache 4",
        ),
        (
            &llama,
            vec!["--cache", "4", "--sink-tokens", "9"],
            "--sink-tokens 9",
        ),
        (&llama, vec!["--cache", "8", "--chunk", "0"], "--chunk"),
        (
            &llama,
            vec!["--cache", "129"],
            "max_position_embeddings 128",
        ),
        (&mistral, vec!["--cache", "8"], "sliding_window 5"),
        (
            &llama,
            vec!["--cache", "8", "--sink-tokens", "2", "--adapter", masked],
            "mask_first_token",
        ),
        (&llama, vec!["--cache", "8", "--seq-len", "16"], "--seq-len"),
    ] {
        let mut args = vec!["ppl", "--model", model.path().to_str().unwrap()];
        args.extend(["--text", text.to_str().unwrap()]);
        args.extend(extra.iter().copied());
        let o = eabfit(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(needle) && !stderr.contains("panicked"),
            "{extra:?}: {stderr}"
        );
    }
    let o = eabfit(&[
        "generate",
        "--model",
        llama.path().to_str().unwrap(),
        "--prompt",
        "the king",
        "--cache",
        "3",
        "--sink-tokens",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--sink-tokens 3 >= --cache 3"));
}

#[test]
fn verify_holds_the_stream_to_the_models_own_dense_perplexity() {
    use eabfit::recipe::StreamCheck;
    use eabfit::verify::{verify, VerifyPlan};
    let tiny = tiny(Arch::Llama, 79);
    let adapter = tiny.path().join("adapter");
    make_adapter(&tiny, &adapter, false, &[0, 1, 2], 80);
    let text = common::write_text(tiny.path(), "t.txt", 120, 7);
    let check = |limit: f64| StreamCheck {
        max_ppl_increase: Some(limit),
        cache: 16,
        sink_tokens: 2,
        tokens: 100,
    };
    let plan = |limit: f64| VerifyPlan {
        model: tiny.spec(),
        device: "cpu".into(),
        device_map: None,
        dtype: None,
        adapter: adapter.clone(),
        texts: vec![text.clone()],
        seq_len: 16,
        num_seqs: 2,
        long: None,
        rule: Default::default(),
        max_massive: 1000,
        max_ppl_increase: 10.0,
        quant: None,
        stream: Some(check(limit)),
        out: tiny.path().join("verify"),
    };
    let report = verify(&plan(10.0)).unwrap().remove(0);
    let g = report.stream.as_ref().expect("the stream check ran");
    // The same 100 tokens (BOS + 99 words) dense in one window and through the cache.
    let model = load(&tiny, Some(&adapter));
    let ckpt = Checkpoint::open(&tiny.spec()).unwrap();
    let mut ids = vec![1u32];
    ids.extend(
        ckpt.tokenizer
            .encode(&std::fs::read_to_string(&text).unwrap())
            .unwrap(),
    );
    ids.truncate(100);
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let dense = mean(&dense_nll(&model, &ids)).exp();
    let stream = mean(&stream_nll(&model, &ids, &Rolling::new(16, 2, 256).unwrap()).unwrap()).exp();
    assert!(
        (g.dense_ppl / dense - 1.0).abs() < 1e-4,
        "{} vs {dense}",
        g.dense_ppl
    );
    assert!(
        (g.stream_ppl / stream - 1.0).abs() < 1e-4,
        "{} vs {stream}",
        g.stream_ppl
    );
    assert!((g.increase - (stream / dense - 1.0)).abs() < 1e-4);
    assert!(report.pass);
    // A limit below the increase fails the check, by name.
    let failed = verify(&plan(g.increase - 1e-3)).unwrap().remove(0);
    let c = failed
        .checks
        .iter()
        .find(|c| c.name == "stream_ppl_increase")
        .unwrap();
    assert!(!c.pass && !failed.pass, "{c:?}");
}
