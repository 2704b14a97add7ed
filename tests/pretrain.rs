//! `eabfit tokenize` and `eabfit pretrain` on the CPU with recipes/pretrain-tiny.yaml: the token
//! file round-trips against the tokenizers crate itself, the loss starts at ln(vocab) and falls
//! toward the text's own entropy, the written folder reloads for `scan` with the perplexity the
//! run measured, a killed run resumes bit for bit, and the slot variant trains its slots.

mod common;
use common::{json, scalars};

use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/pretrain-tiny.yaml");
/// The fixture tokenizer's vocabulary: <unk>, <s>, </s> and the words.
const VOCAB: usize = common::WORDS.len() + 3;
const SEP: u32 = 2;
/// The slot of the template sentence and the words it takes, uniformly.
const CHOICES: [&str; 4] = ["king", "prince", "ghost", "friend"];
const TEMPLATE: [&str; 13] = [
    "the", "_", "and", "the", "queen", "of", "the", "castle", "speak", "to", "my", "lord", ".",
];

/// A document of `n` template sentences, the slot filled at random: ln(4) nats of news per
/// 13 tokens, so a model that learns the template predicts at perplexity near 4^(1/13) = 1.11.
fn document(n: usize, seed: u64) -> String {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut words = vec![];
    for _ in 0..n {
        for w in TEMPLATE {
            words.push(match w {
                "_" => CHOICES[rng.gen_range(0..4)],
                w => w,
            });
        }
    }
    words.join(" ")
}

fn run(args: &[String]) -> Output {
    Command::new(common::bin()).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{:?}: {err}", o.status);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Docs a..e (c is empty), the tokenizer, and the corpus tokenize made of them (every fourth
/// non-empty document held out: d).
struct Fixture {
    root: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let docs = root.path().join("docs");
        std::fs::create_dir_all(docs.join("sub")).unwrap();
        std::fs::write(docs.join("a.txt"), document(60, 1)).unwrap();
        std::fs::write(docs.join("b.txt"), document(40, 2)).unwrap();
        std::fs::write(docs.join("c.txt"), "").unwrap();
        std::fs::write(docs.join("sub/d.txt"), document(8, 3)).unwrap();
        std::fs::write(docs.join("sub/e.txt"), document(50, 4)).unwrap();
        std::fs::write(docs.join("skip.md"), "not a txt file").unwrap();
        let tok = root.path().join("tok");
        std::fs::create_dir(&tok).unwrap();
        common::write_tokenizer(&tok);
        let f = Self { root };
        ok(&run(&[
            "tokenize".into(),
            "--tokenizer".into(),
            s(&tok),
            "--out".into(),
            s(&f.corpus()),
            "--val-fraction".into(),
            "0.25".into(),
            s(&docs),
        ]));
        f
    }
    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }
    fn corpus(&self) -> PathBuf {
        self.path("corpus")
    }

    /// `pretrain` of the tiny recipe into `out`, with `extra` overrides.
    fn pretrain_cmd(&self, out: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(common::bin());
        c.args(["pretrain", TINY])
            .arg(format!("data.corpus={}", s(&self.corpus())))
            .arg(format!("train.out_dir={}", s(out)))
            .arg(format!("log.dir={}", s(&out.join("tb"))))
            .args(extra);
        c
    }

    /// Resumes the run in `out` with the overrides `extra`; asserts success, returns stderr.
    fn resume(&self, out: &Path, extra: &[&str]) -> String {
        let o = self
            .pretrain_cmd(out, extra)
            .arg("--resume")
            .arg(out)
            .output()
            .unwrap();
        ok(&o);
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// `scan --json` of the model folder `model` on the held-out document's first 2 windows of
    /// 15 tokens after BOS, exactly a run's eval windows: (the report, scan's stdout).
    fn scan(&self, model: &Path) -> (Value, String) {
        let scan_json = self.path("scan.json");
        let stdout = ok(&run(&[
            "scan".into(),
            "--model".into(),
            s(model),
            "--text".into(),
            s(&self.path("docs/sub/e.txt")),
            "--seq-len".into(),
            "15".into(),
            "--num-seqs".into(),
            "2".into(),
            "--json".into(),
            s(&scan_json),
        ]));
        (json(&scan_json), stdout)
    }
}

fn read_u32s(p: &Path) -> Vec<u32> {
    std::fs::read(p)
        .unwrap()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}
fn curve(sc: &[(String, u64, f64)], tag: &str) -> Vec<(u64, f64)> {
    sc.iter()
        .filter(|(t, _, _)| t == tag)
        .map(|(_, s, v)| (*s, *v))
        .collect()
}

#[test]
fn tokenize_round_trips_against_the_tokenizer_itself() {
    let f = Fixture::new();
    let tok = tokenizers::Tokenizer::from_file(f.path("tok/tokenizer.json")).unwrap();
    let ids = |name: &str| -> Vec<u32> {
        let text = std::fs::read_to_string(f.path("docs").join(name)).unwrap();
        tok.encode(text, false).unwrap().get_ids().to_vec()
    };
    // Path order; c.txt is empty and skipped; the 4th non-empty document (sub/e) is held out.
    let mut train = vec![];
    for d in ["a.txt", "b.txt", "sub/d.txt"] {
        train.extend(ids(d));
        train.push(SEP);
    }
    let mut val = ids("sub/e.txt");
    val.push(SEP);
    assert_eq!(read_u32s(&f.corpus().join("train.bin")), train);
    assert_eq!(read_u32s(&f.corpus().join("val.bin")), val);
    assert_eq!(train.len(), 60 * 13 + 40 * 13 + 8 * 13 + 3);
    let m = json(&f.corpus().join("corpus.json"));
    assert_eq!(m["vocab_size"], VOCAB);
    assert_eq!(
        (m["bos_id"].as_u64(), m["sep_id"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(m["train"]["documents"], 3);
    assert_eq!(m["train"]["tokens"], train.len());
    assert_eq!(m["val"]["documents"], 1);
    assert_eq!(m["val"]["tokens"], 50 * 13 + 1);
    assert_eq!(m["skipped_empty"], 1);
    let listed = std::fs::read_to_string(f.corpus().join("val-files.txt")).unwrap();
    assert_eq!(listed, format!("{}\n", s(&f.path("docs/sub/e.txt"))));
    // The corpus's tokenizer puts BOS first, as the model will see it.
    let own = tokenizers::Tokenizer::from_file(f.corpus().join("tokenizer.json")).unwrap();
    assert_eq!(own.encode("the king", true).unwrap().get_ids(), [1, 3, 4]);

    // A missing input is named; an existing --out is kept without --force.
    let o = run(&[
        "tokenize".into(),
        "--tokenizer".into(),
        s(&f.path("tok")),
        "--out".into(),
        s(&f.path("other")),
        s(&f.path("nope.txt")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&s(&f.path("nope.txt"))), "{err}");
    let o = run(&[
        "tokenize".into(),
        "--tokenizer".into(),
        s(&f.path("tok")),
        "--out".into(),
        s(&f.corpus()),
        s(&f.path("docs")),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(read_u32s(&f.corpus().join("val.bin")), val);

    // A fraction too small to hold out any of the 4 documents is refused, and nothing written.
    let o = run(&[
        "tokenize".into(),
        "--tokenizer".into(),
        s(&f.path("tok")),
        "--val-fraction".into(),
        "0.1".into(),
        "--out".into(),
        s(&f.path("noval")),
        s(&f.path("docs")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "--val-fraction 0.1 holds out none of the 4 documents: raise it to at least 0.250"
        ),
        "{err}"
    );
    assert!(!f.path("noval").exists());
}

#[test]
fn loss_falls_and_the_final_folder_scans_at_the_measured_perplexity() {
    let f = Fixture::new();
    let out = f.path("run");
    let o = f.pretrain_cmd(&out, &[]).output().unwrap();
    ok(&o);
    let sc = scalars(&out);
    let loss = curve(&sc, "train/loss");
    assert_eq!(loss.len(), 80);
    // At init the logits are ~0: the first loss is that of a uniform guess.
    let uniform = (VOCAB as f64).ln();
    assert!(
        (loss[0].1 - uniform).abs() < 0.05,
        "{} vs ln {VOCAB} = {uniform}",
        loss[0].1
    );
    let ppl = curve(&sc, "eval/ppl");
    assert_eq!(
        ppl.iter().map(|p| p.0).collect::<Vec<_>>(),
        [0, 20, 40, 60, 80]
    );
    assert!((ppl[0].1 / VOCAB as f64 - 1.0).abs() < 0.1, "{ppl:?}");
    // The text's own perplexity is 4^(1/13) = 1.11 per token (a window's first tokens cost
    // more: the model must find where in the sentence it starts); 61 for a uniform guess.
    let last = ppl[4].1;
    assert!(last < 1.6 && last > 4f64.powf(1.0 / 13.0), "{ppl:?}");
    assert!(ppl.windows(2).all(|w| w[1].1 < w[0].1 * 1.02), "{ppl:?}");
    assert!(loss[79].1 < 0.6, "{:?}", &loss[70..]);

    // final/ is a Hugging Face folder: scan it on the held-out document's first 2 windows of
    // 15 tokens after BOS, exactly the run's eval windows.
    let final_dir = out.join("final");
    let cfg = json(&final_dir.join("config.json"));
    assert_eq!(cfg["vocab_size"], VOCAB);
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert!(cfg.get("eab").is_none());
    let (rep, stdout) = f.scan(&final_dir);
    assert_eq!(rep["layers"].as_array().unwrap().len(), 2);
    assert_eq!(rep["bos"], true, "{stdout}");
    let scanned = rep["ppl"].as_f64().unwrap();
    assert!(
        (scanned - last).abs() < 1e-4 * last,
        "scan {scanned} vs run {last}"
    );
    // The outlier's separation the run logged is the scan's top-1 over its top-2, layer by layer.
    for (i, l) in rep["layers"].as_array().unwrap().iter().enumerate() {
        let top: Vec<f64> = l["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let logged = curve(&sc, &format!("layers/top1_over_top2/{i:02}"));
        let (step, sep) = *logged.last().unwrap();
        assert_eq!(step, 80);
        let want = top[0] / top[1];
        assert!(
            want >= 1.0 && (sep - want).abs() < 1e-4 * want,
            "layer {i}: {sep} vs {want}"
        );
        // So is the largest entry after position 0, no larger than the top-1.
        let (_, rest) = *curve(&sc, &format!("layers/top1_after_first/{i:02}"))
            .last()
            .unwrap();
        let scanned = l["top1_after_first"].as_f64().unwrap();
        assert!(
            rest > 0.0 && rest <= top[0] && (rest - scanned).abs() < 1e-4 * scanned,
            "layer {i}: {rest} vs {scanned}"
        );
    }
    let summary = json(&out.join("summary.json"));
    assert_eq!(summary["tokens"], 80 * 8 * 16);
    // Every weight trained: 61 x 32 tied embedding, 2 layers, final norm.
    let per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32;
    assert_eq!(summary["parameters"], VOCAB * 32 + 2 * per_layer + 32);
}

#[test]
fn a_killed_run_resumes_bit_for_bit() {
    let f = Fixture::new();
    let extra = ["train.steps=12", "train.checkpoint_every=4", "eval.every=6"];
    let reference = f.path("reference");
    ok(&f.pretrain_cmd(&reference, &extra).output().unwrap());
    let out = f.path("killed");
    // Inside step 7: the checkpoint of step 4 is the one to resume from.
    let o = f
        .pretrain_cmd(&out, &extra)
        .env(eabfit::killpoint::VAR, "step:7")
        .output()
        .unwrap();
    assert_eq!(
        o.status.signal(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.join("checkpoints/step-000008").exists());
    let stderr = f.resume(&out, &extra);
    assert!(stderr.contains("step-000004 at step 4"), "{stderr}");
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    for f in [
        "final/model.safetensors",
        "checkpoints/step-000012/model.safetensors",
        "checkpoints/step-000012/optim-decay.safetensors",
        "checkpoints/step-000012/optim-nodecay.safetensors",
        "checkpoints/step-000008/optim-decay.safetensors",
    ] {
        assert!(
            bytes(&reference.join(f)) == bytes(&out.join(f)),
            "{f} differs"
        );
    }
    assert_eq!(scalars(&reference), scalars(&out), "logged curves differ");
    let state =
        |p: &Path| json(&p.join("checkpoints/step-000012/state.json"))["final_loss"].clone();
    assert_eq!(state(&reference), state(&out));
}

#[test]
fn a_time_limited_run_stops_checkpointed_and_resumes_exactly() {
    let f = Fixture::new();
    let extra = ["train.steps=6", "train.checkpoint_every=4", "eval.every=3"];
    let reference = f.path("reference");
    ok(&f.pretrain_cmd(&reference, &extra).output().unwrap());
    let out = f.path("limited");
    // Any first step outlasts a microsecond: the run stops after step 1.
    let o = f
        .pretrain_cmd(&out, &extra)
        .args(["--max-seconds", "1e-6"])
        .output()
        .unwrap();
    let stdout = ok(&o);
    assert!(
        stdout.contains("stopped at the time limit after step 1 of 6"),
        "{stdout}"
    );
    assert!(out
        .join("checkpoints/step-000001/model.safetensors")
        .exists());
    assert!(!out.join("final").exists());
    assert_eq!(json(&out.join("summary.json"))["steps"], 1);
    f.resume(&out, &extra);
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    for f in [
        "final/model.safetensors",
        "checkpoints/step-000006/optim-decay.safetensors",
    ] {
        assert!(
            bytes(&reference.join(f)) == bytes(&out.join(f)),
            "{f} differs"
        );
    }
    // The stop adds one evaluation, of step 1; every other point is the reference's.
    let (stop_eval, rest): (Vec<_>, Vec<_>) = scalars(&out)
        .into_iter()
        .partition(|(tag, step, _)| *step == 1 && !tag.starts_with("train/"));
    assert!(stop_eval.iter().any(|(tag, _, _)| tag == "eval/ppl"));
    assert_eq!(scalars(&reference), rest, "logged curves differ");
    let o = f
        .pretrain_cmd(&out, &extra)
        .args(["--max-seconds", "0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-seconds"));
}

#[test]
fn the_slot_variant_trains_its_slots() {
    let f = Fixture::new();
    let out = f.path("eab");
    ok(&f
        .pretrain_cmd(&out, &["eab.enabled=true", "train.steps=40"])
        .output()
        .unwrap());
    let w = candle_core::safetensors::load(
        out.join("final/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for l in 0..2 {
        // v' starts at zero: anything else is the optimizer acting on its gradient.
        let v = &w[&format!("model.layers.{l}.self_attn.eab_v")];
        assert_eq!(v.dims(), [2, 8]);
        assert!(common::max_abs(v) > 1e-3, "layer {l}: v' = {v}");
        assert_eq!(v.dtype(), candle_core::DType::F32);
    }
    let cfg = json(&out.join("final/config.json"));
    assert_eq!(cfg["eab"]["layers"], serde_json::json!([0, 1]));
    assert_eq!(
        cfg["auto_map"]["AutoModelForCausalLM"],
        "modeling_eab.EabLlamaForCausalLM"
    );
    let sc = scalars(&out);
    let slot = curve(&sc, "layers/eab_slot_attn/00");
    assert_eq!(slot.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 20, 40]);
    assert!(slot.iter().all(|(_, a)| *a > 0.0 && *a < 1.0), "{slot:?}");
    let ppl = curve(&sc, "eval/ppl");
    assert!(ppl[2].1 < ppl[0].1 / 4.0, "{ppl:?}");
    // The folder loads as --model with its slots: scan reports attention on them.
    let (rep, _) = f.scan(&out.join("final"));
    let a = rep["layers"][0]["slot_attn"].as_f64().unwrap();
    assert!(
        (a - slot[2].1).abs() < 1e-5,
        "scan {a} vs run {}",
        slot[2].1
    );
}

#[test]
fn bf16_compute_keeps_f32_masters() {
    let f = Fixture::new();
    let out = f.path("bf16");
    ok(&f
        .pretrain_cmd(&out, &["model.dtype=bf16", "train.steps=10"])
        .output()
        .unwrap());
    let loss = curve(&scalars(&out), "train/loss");
    assert!(loss[9].1 < loss[0].1 - 0.5, "{loss:?}");
    let w = candle_core::safetensors::load(
        out.join("final/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(w.values().all(|t| t.dtype() == candle_core::DType::F32));
}

/// `eab.mask_first_token`: position 0 (the BOS) hidden from every query, the slot the only key
/// all share. The run's evaluations see no attention on position 0, and the written folder
/// carries the flag: its scan on the run's own eval windows gives the run's perplexity (with
/// position 0 visible it would not) and no attention on position 0 either.
#[test]
fn hiding_the_bos_leaves_the_slot_as_the_only_shared_key() {
    let f = Fixture::new();
    let out = f.path("eab-nobos");
    ok(&f
        .pretrain_cmd(
            &out,
            &[
                "eab.enabled=true",
                "eab.mask_first_token=true",
                "train.steps=40",
            ],
        )
        .output()
        .unwrap());
    let sc = scalars(&out);
    for l in 0..2 {
        let first = curve(&sc, &format!("layers/first_token_attn/{l:02}"));
        assert_eq!(first.len(), 3);
        assert!(first.iter().all(|(_, a)| *a == 0.0), "layer {l}: {first:?}");
        let slot = curve(&sc, &format!("layers/eab_slot_attn/{l:02}"));
        assert!(slot.iter().all(|(_, a)| *a > 0.0 && *a < 1.0), "{slot:?}");
    }
    let ppl = curve(&sc, "eval/ppl");
    assert!(ppl[2].1 < ppl[0].1 / 4.0, "{ppl:?}");
    let cfg = json(&out.join("final/config.json"));
    assert_eq!(cfg["eab"]["mask_first_token"], true);
    let (rep, _) = f.scan(&out.join("final"));
    let scanned = rep["ppl"].as_f64().unwrap();
    assert!(
        (scanned - ppl[2].1).abs() < 1e-4 * ppl[2].1,
        "scan {scanned} vs run {}",
        ppl[2].1
    );
    for l in rep["layers"].as_array().unwrap() {
        assert_eq!(l["first_token_attn"].as_f64(), Some(0.0), "{l}");
    }
}

#[test]
fn a_bad_recipe_key_names_the_field() {
    let f = tempfile::tempdir().unwrap();
    let o = run(&["pretrain".into(), TINY.into(), "optim.lrr=1".into()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unknown recipe field `optim.lrr`; did you mean `optim.lr`?"),
        "{err}"
    );
    let bad = f.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "model:\n  arch:\n    hiden_size: 8\ndata:\n  corpus: c\n",
    )
    .unwrap();
    let o = run(&["pretrain".into(), s(&bad)]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(":3:5: model.arch: unknown field `hiden_size`; did you mean `hidden_size`?"),
        "{err}"
    );
    let o = run(&[
        "pretrain".into(),
        TINY.into(),
        "train.recompute=true".into(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("train.recompute must be false"));
    let o = run(&[
        "pretrain".into(),
        TINY.into(),
        "eab.mask_first_token=true".into(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("eab.mask_first_token must be false"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The optimizer's ranges are the training recipe's rules.
    let o = run(&[
        "pretrain".into(),
        TINY.into(),
        "optim.betas=[0.9, 1.0]".into(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("optim.betas[1]") && err.contains("in [0, 1)"),
        "{err}"
    );
}

#[test]
fn keep_checkpoints_deletes_the_older_ones_and_the_run_still_resumes() {
    let f = Fixture::new();
    let out = f.path("kept");
    let extra = [
        "train.steps=5",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=2",
        "eval.every=5",
    ];
    ok(&f.pretrain_cmd(&out, &extra).output().unwrap());
    let names = |p: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(p.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&out), ["step-000004", "step-000005"]);
    let longer = [
        "train.steps=7",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=2",
        "eval.every=5",
    ];
    let stderr = f.resume(&out, &longer);
    assert!(stderr.contains("step-000005 at step 5"), "{stderr}");
    assert_eq!(names(&out), ["step-000006", "step-000007"]);
}
