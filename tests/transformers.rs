//! The exports run by transformers itself (torch + transformers + peft from the pinned virtual
//! environment of scripts/lib/py-env.sh, whose interpreter scripts/test.sh exports as EABFIT_PYTHON)
//! against eabfit, on tiny random checkpoints: LLaMA, Mistral with a window (5) shorter than the
//! sequence (48), LLaMA-3 rope scaling, Qwen2 and Qwen3; slot masked and unmasked. scripts/lib/remote_code_compare.py
//! checks logits under eager and sdpa (max relative difference <= 1e-5), greedy `generate()`
//! against `eabfit generate`, left-padded batches against each row alone (tokens, and step logits
//! within 1e-5), that the KV cache never holds the slot, bfloat16/float16 and (one case)
//! torch.compile; scripts/lib/peft_compare.py holds the PEFT export under eager and sdpa. A
//! missing EABFIT_PYTHON fails the test, never skips it.

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
