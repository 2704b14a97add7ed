//! The layer split on several CPU "devices" (`cpu:0`, `cpu:1`, ...): one host, but the model
//! places and copies tensors between them as between GPUs. Against the same model on one
//! device, the split must give bit-identical logits, gradients and trained adapters (the
//! arithmetic is the same; only copies are added), and bad maps must fail with exit 2 and a
//! message naming the problem.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{bin, tiny, Arch};
use eabfit::adapters::{AdapterSet, Adapters};
use eabfit::checkpoint::{Base, Checkpoint};
use eabfit::device_map::Spec;
use eabfit::model::{Edit, KvCache, Model, Taps};
use std::process::Command;

const IDS: &[u32] = &[1, 5, 9, 3, 17, 22, 40, 8, 8, 31, 12, 6, 50, 2];

fn base(spec: &str, map: Option<&str>, dtype: DType) -> Base {
    let ckpt = Checkpoint::open(spec).unwrap();
    match map {
        None => ckpt.base(dtype, &Device::Cpu).unwrap(),
        Some(m) => {
            let p = Spec::parse(m)
                .unwrap()
                .layout(ckpt.config.num_hidden_layers)
                .unwrap()
                .resolve()
                .unwrap();
            ckpt.base_placed(dtype, &p).unwrap()
        }
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Two batches of the same model run bit for bit alike.
fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (va, vb) = (values(a), values(b));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&va) == bits(&vb), "{what}: the split changed values");
}

const MAPS: &[&str] = &[
    "cpu:0=0,cpu:1=1,cpu:2=2",
    "cpu:1=0-1,cpu:0=2",
    "cpu:0=0,cpu:1=1-2,embed=cpu:2,head=cpu:3",
    "cpu:0=0,cpu:1=1,cpu:0=2",
];

#[test]
fn split_logits_match_one_device_bit_for_bit() {
    for arch in [Arch::Llama, Arch::Llama3, Arch::Mistral] {
        let t = tiny(arch, 41);
        let ids = common::row(IDS);
        let one = base(&t.spec(), None, DType::F32)
            .model(&Adapters::none())
            .unwrap();
        let reference = one.logits(&ids).unwrap();
        for map in MAPS {
            let split = base(&t.spec(), Some(map), DType::F32)
                .model(&Adapters::none())
                .unwrap();
            assert!(split.placement().is_split(), "{map}");
            assert_same(
                &split.logits(&ids).unwrap(),
                &reference,
                &format!("{arch:?} {map}"),
            );
        }
    }
}

/// Hidden states, attention statistics, position-0 keys and values and edits come back as on
/// one device; so does KV-cached decoding, whose cache stays on each layer's device.
#[test]
fn split_taps_and_cached_decoding_match_one_device() {
    let t = tiny(Arch::Llama, 42);
    let dir = tempfile::tempdir().unwrap();
    let set = common::make_adapter(&t, dir.path(), false, &[0, 2], 5);
    let taps = Taps {
        hidden: true,
        attn: true,
        first_kv: true,
        edits: vec![Edit {
            layer: 1,
            position: 3,
            dim: 4,
            value: 7.5,
        }],
        ..Default::default()
    };
    let ids = common::row(IDS);
    let one = base(&t.spec(), None, DType::F32)
        .model(&set.adapters())
        .unwrap();
    let split = base(&t.spec(), Some(MAPS[2]), DType::F32)
        .model(&set.adapters())
        .unwrap();
    let (a, b) = (
        one.forward(&ids, &taps).unwrap(),
        split.forward(&ids, &taps).unwrap(),
    );
    assert_same(&a.logits, &b.logits, "logits");
    assert_eq!(a.hidden.len(), 3);
    for (l, (x, y)) in a.hidden.iter().zip(&b.hidden).enumerate() {
        assert_same(x, y, &format!("hidden {l}"));
    }
    for (l, (x, y)) in a.attn.iter().zip(&b.attn).enumerate() {
        assert_same(&x.first_token, &y.first_token, &format!("attn {l}"));
        if let (Some(p), Some(q)) = (&x.slot, &y.slot) {
            assert_same(p, q, &format!("slot attn {l}"));
        }
    }
    for (l, (x, y)) in a.first_kv.iter().zip(&b.first_kv).enumerate() {
        assert_same(&x.0, &y.0, &format!("first k {l}"));
        assert_same(&x.1, &y.1, &format!("first v {l}"));
    }
    let decode = |m: &Model| {
        let mut cache = KvCache::new();
        let mut out = vec![m
            .forward_cached(&common::row(&IDS[..9]), &mut cache)
            .unwrap()];
        for &id in &IDS[9..] {
            out.push(m.forward_cached(&common::row(&[id]), &mut cache).unwrap());
        }
        Tensor::cat(&out, 1).unwrap()
    };
    assert_same(&decode(&one), &decode(&split), "cached decoding");
}

/// A loss through the head, and with `hidden` through the hidden-state taps too (the
/// suppression term), back through every layer boundary to the slots and LoRA.
fn grads(model: &Model, set: &AdapterSet, hidden: bool, recompute: bool) -> Vec<(String, Tensor)> {
    let ids = common::row(IDS);
    let taps = Taps {
        hidden,
        recompute,
        ..Default::default()
    };
    let out = model.forward(&ids, &taps).unwrap();
    let (b, t, v) = out.logits.dims3().unwrap();
    let w = Tensor::arange(0f32, (b * t * v) as f32, &Device::Cpu)
        .unwrap()
        .reshape((b, t, v))
        .unwrap()
        .sin()
        .unwrap()
        .to_dtype(out.logits.dtype())
        .unwrap();
    let mut loss = (&out.logits * &w).unwrap().sum_all().unwrap();
    for h in &out.hidden {
        loss = (loss + h.sqr().unwrap().mean_all().unwrap()).unwrap();
    }
    let g = loss.backward().unwrap();
    set.vars
        .iter()
        .map(|(name, var)| {
            let gv = g
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            (name.clone(), gv.clone())
        })
        .collect()
}

/// Through the head alone the split adds only a chain of copies to the graph: every
/// gradient is summed in the same order, so it comes out bit for bit the same.
#[test]
fn split_gradients_match_one_device_bit_for_bit() {
    let t = tiny(Arch::Llama, 43);
    let dir = tempfile::tempdir().unwrap();
    let set = common::make_adapter(&t, dir.path(), true, &[0, 1, 2], 6);
    for recompute in [false, true] {
        let one = base(&t.spec(), None, DType::F32)
            .model(&set.adapters())
            .unwrap();
        let reference = grads(&one, &set, false, recompute);
        for map in MAPS {
            let split = base(&t.spec(), Some(map), DType::F32)
                .model(&set.adapters())
                .unwrap();
            let got = grads(&split, &set, false, recompute);
            for ((name, a), (_, b)) in reference.iter().zip(&got) {
                assert!(common::max_abs(a) > 0.0, "{name}: zero gradient");
                assert_same(
                    a,
                    b,
                    &format!("{map} recompute {recompute}: grad of {name}"),
                );
            }
        }
    }
}

/// The hidden-state taps are copied to the head's device, so a layer's output gradient sums
/// the same terms grouped differently (tap and next layer through one copy each): equal up to
/// the last bits. In f64 the two agree to 1e-12 of the gradient's size.
#[test]
fn split_gradients_through_the_taps_match_one_device_in_f64() {
    let t = tiny(Arch::Llama, 48);
    let dir = tempfile::tempdir().unwrap();
    let set = common::make_adapter(&t, dir.path(), true, &[0, 1, 2], 7);
    // The same adapters as f64 Vars.
    let wide = AdapterSet {
        meta: set.meta.clone(),
        vars: set
            .vars
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    candle_core::Var::from_tensor(&v.to_dtype(DType::F64).unwrap()).unwrap(),
                )
            })
            .collect(),
    };
    for recompute in [false, true] {
        let one = base(&t.spec(), None, DType::F64)
            .model(&wide.adapters())
            .unwrap();
        let reference = grads(&one, &wide, true, recompute);
        for map in MAPS {
            let split = base(&t.spec(), Some(map), DType::F64)
                .model(&wide.adapters())
                .unwrap();
            let got = grads(&split, &wide, true, recompute);
            for ((name, a), (_, b)) in reference.iter().zip(&got) {
                let (size, diff) = (common::max_abs(a), common::max_abs_diff(a, b));
                assert!(size > 0.0, "{name}: zero gradient");
                assert!(
                    diff <= 1e-12 * size,
                    "{map} recompute {recompute}: grad of {name} off by {diff:e} (size {size:e})"
                );
            }
        }
    }
}

fn adapter_tensors(dir: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<(String, Vec<u32>)> =
        candle_core::safetensors::load(dir.join("adapter.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, values(&t).iter().map(|x| x.to_bits()).collect()))
            .collect();
    v.sort();
    v
}

/// `eabfit train` with `model.device_map` (the KL teacher sharing the split weights, LoRA on
/// the planted birth layer 1, slots everywhere) ends with the adapters one device trains.
#[test]
fn a_split_training_run_trains_the_same_adapters() {
    let r = common::TrainRun::new(44);
    let one = r.tiny.path().join("one");
    let o = r.train(&one, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (i, map) in ["cpu:0=0,cpu:1=1,cpu:2=2", "cpu:1=0-1,cpu:0=2,embed=cpu:2"]
        .iter()
        .enumerate()
    {
        let out = r.tiny.path().join(format!("split{i}"));
        let o = r.train(&out, &[&format!("model.device_map={map}")]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for d in ["final", "best"] {
            let (a, b) = (adapter_tensors(&one.join(d)), adapter_tensors(&out.join(d)));
            assert_eq!(a.len(), b.len());
            for ((na, va), (nb, vb)) in a.iter().zip(&b) {
                assert_eq!(na, nb);
                assert!(va == vb, "{map}: {d}/{na} differs from one device's");
            }
        }
        let resolved = std::fs::read_to_string(out.join("recipe.yaml")).unwrap();
        assert!(
            resolved.contains(&format!("device_map: {map}")),
            "{resolved}"
        );
    }
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

#[test]
fn the_cli_takes_a_map_and_prints_its_plan() {
    let t = tiny(Arch::Llama, 45);
    let text = common::write_text(t.path(), "t.txt", 300, 3);
    let ppl = |map: Option<&str>| {
        let mut a = vec![
            "ppl".to_string(),
            "--model".into(),
            t.spec(),
            "--text".into(),
            text.display().to_string(),
            "--seq-len".into(),
            "16".into(),
        ];
        if let Some(m) = map {
            a.extend(["--device-map".to_string(), m.to_string()]);
        }
        let o = Command::new(bin()).args(&a).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let s = String::from_utf8(o.stdout).unwrap();
        s.lines().next().unwrap().to_string() // the perplexity line, not the timing
    };
    assert_eq!(ppl(Some("cpu:0=0,cpu:1=1-2")), ppl(None));
    let o = run(&[
        "info",
        "--model",
        &t.spec(),
        "--device-map",
        "cpu:0=0,cpu:1=1-2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(s.contains("on device map cpu:0=0,cpu:1=1-2"), "{s}");
    assert!(s.contains("cpu:0    layers 0 + embed: weights"), "{s}");
    assert!(
        s.contains("cpu:1    layers 1-2 + norm+head: weights"),
        "{s}"
    );
    // Without CUDA, `auto` keeps everything on the CPU and says so.
    #[cfg(not(feature = "cuda"))]
    {
        let o = run(&["info", "--model", &t.spec(), "--device-map", "auto"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("device map auto: cpu:0=0-2 (3 layers)"),
            "{err}"
        );
    }
}

/// `bench` builds its random weights on each layer's device and reports the split.
#[test]
fn bench_runs_split() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("b.json");
    let o = run(&[
        "bench",
        "--shape",
        "tiny",
        "--device-map",
        "cpu:0=0,cpu:1=1",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["device_map"], "cpu:0=0,cpu:1=1");
    assert_eq!(r["device"], "cpu:0+cpu:1");
    assert!(r["loss"].as_f64().unwrap().is_finite());
}

#[test]
fn bad_maps_exit_2_naming_the_problem() {
    let t = tiny(Arch::Llama, 46);
    let mut cases = vec![
        ("cpu:0=0,cpu:1=2", "layer 1 is on no device"),
        (
            "cpu:0=0-1,cpu:1=1-2",
            "layer 1 is placed twice (cpu:0 and cpu:1)",
        ),
        ("cpu:0=0-1,gpu:1=2", "unknown device `gpu:1`"),
        (
            "cpu:0=0-1,cpu:1=2-3",
            "layer 3 is out of range: the model has 3 layers (0-2)",
        ),
        ("cpu:0=0-1,cpu:1", "`cpu:1`: expected DEVICE=FIRST-LAST"),
    ];
    if !cfg!(feature = "cuda") {
        cases.push((
            "cuda:0=0-1,cuda:1=2",
            "`cuda:0`: this eabfit was built without CUDA",
        ));
    }
    for (map, needle) in cases {
        for cmd in ["info", "ppl", "generate"] {
            let mut a = vec![
                cmd,
                "--model",
                &t.path().to_str().unwrap(),
                "--device-map",
                map,
            ];
            if cmd == "generate" {
                a.extend(["--prompt", "the king"]);
            }
            let o = run(&a);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{cmd} {map}: {err}");
            assert!(
                err.contains(&format!("--device-map `{map}`: {needle}")),
                "{cmd}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    // In a recipe: the syntax is checked with the recipe, the layers when the model is known.
    let r = common::TrainRun::new(47);
    let out = r.tiny.path().join("run");
    for (map, needle) in [
        ("cpu:0=0,tpu=1-2", "model.device_map: unknown device `tpu`"),
        (
            "cpu:0=0,cpu:1=1-3",
            "model.device_map `cpu:0=0,cpu:1=1-3`: layer 3 is out of range",
        ),
    ] {
        let o = r.train(&out, &[&format!("model.device_map={map}")]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{map}: {err}");
        assert!(err.contains(needle), "{err}");
    }
}
