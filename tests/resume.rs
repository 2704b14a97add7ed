//! kill -9 at 20 seeded points of a tiny training run (inside a step, while a checkpoint is
//! written, during an eval, between an eval and its checkpoint, and at seeded delays), then
//! `--resume`: every resumed run must end byte-identical to an uninterrupted one (adapters,
//! optimizer moments, best/, final/) with the same loss curve in summary.json, scalars.jsonl
//! and TensorBoard, no step logged twice or missing.
//!
//! Points are hit through `EABFIT_TEST_KILL_AT=PHASE:N` (src/killpoint.rs: the process sends
//! itself SIGKILL at the Nth pass of a named point) and through a real SIGKILL from here.

mod common;
use common::json;

use rand::{seq::SliceRandom, Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Fixture {
    tiny: common::Tiny,
    train: PathBuf,
    eval: PathBuf,
    root: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tiny = common::planted(41);
        let train = common::write_text(tiny.path(), "train.txt", 400, 1);
        let eval = common::write_text(tiny.path(), "eval.txt", 100, 2);
        Fixture {
            tiny,
            train,
            eval,
            root: tempfile::tempdir().unwrap(),
        }
    })
}

/// The tiny-debug run: 8 steps of 2 micro-batches, checkpoints every 2, eval every 4.
fn train_cmd(out: &Path) -> Command {
    let f = fixture();
    let mut c = Command::new(common::bin());
    c.args([
        "train".to_string(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/tiny-debug.yaml").to_string(),
        format!("model.path={}", f.tiny.spec()),
        format!("data.train={}", f.train.display()),
        format!("data.eval={}", f.eval.display()),
        format!("train.out_dir={}", out.display()),
        format!("log.dir={}", out.join("tb").display()),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

/// The uninterrupted run, and how long it ran after its first checkpoint appeared (the
/// window the seeded real kills aim into).
fn reference() -> &'static (PathBuf, Duration) {
    static R: OnceLock<(PathBuf, Duration)> = OnceLock::new();
    R.get_or_init(|| {
        let out = fixture().root.path().join("reference");
        let mut child = train_cmd(&out).stderr(Stdio::null()).spawn().unwrap();
        let first = out.join("checkpoints/step-000002/state.json");
        let t0 = Instant::now();
        let mut seen = None;
        let status = loop {
            if seen.is_none() && first.is_file() {
                seen = Some(Instant::now());
            }
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "reference run hangs"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        assert!(status.success(), "reference run failed");
        let span = seen.map_or(Duration::ZERO, |t| t.elapsed());
        (out, span)
    })
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// SIGKILL from inside at the Nth pass of a named point.
    At(&'static str, usize),
    /// SIGKILL from here, this fraction of the reference's post-checkpoint span after the
    /// first checkpoint appeared.
    After(f64),
}

/// The 20 points, drawn with a fixed seed. Only points after the first checkpoint (step 2)
/// count: before it there is nothing to resume from. Passes per uninterrupted run: `step` 16
/// (after each micro-batch's backward; 5.. are after step 2), `checkpoint` 4 (between the
/// adapters and the optimizer file), `eval` 8 (after each of 2 windows of the base, step-0,
/// step-4 and step-8 evals; 5.. are after step 2), `logged` 2 (eval logged and best/ written,
/// checkpoint not yet).
fn kill_points() -> Vec<Kill> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let mut pool: Vec<Kill> = (5..=16).map(|n| Kill::At("step", n)).collect();
    pool.extend((2..=4).map(|n| Kill::At("checkpoint", n)));
    pool.extend((5..=8).map(|n| Kill::At("eval", n)));
    pool.extend((1..=2).map(|n| Kill::At("logged", n)));
    pool.shuffle(&mut rng);
    let mut points: Vec<Kill> = pool.into_iter().take(14).collect();
    points.extend((0..6).map(|_| Kill::After(rng.gen_range(0.0..1.0))));
    points
}

fn kill_run(out: &Path, kill: Kill) {
    match kill {
        Kill::At(phase, n) => {
            let o = train_cmd(out)
                .env(eabfit::killpoint::VAR, format!("{phase}:{n}"))
                .output()
                .unwrap();
            assert_eq!(
                o.status.signal(),
                Some(9),
                "{kill:?}: the run was not killed ({:?}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Kill::After(frac) => {
            let delay = reference().1.mul_f64(frac);
            let mut child = train_cmd(out).stderr(Stdio::null()).spawn().unwrap();
            let first = out.join("checkpoints/step-000002/state.json");
            let t0 = Instant::now();
            while !first.is_file() && t0.elapsed() < Duration::from_secs(120) {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(delay);
            // The run may have finished already; resuming a finished run must change nothing.
            let _ = child.kill();
            let status = child.wait().unwrap();
            eprintln!("{kill:?}: delay {delay:?}, {status:?}");
        }
    }
}

fn resume(out: &Path) -> String {
    let o = train_cmd(out)
        .args(["--resume".to_string(), out.display().to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "resume failed: {stderr}");
    stderr
}
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Curve of every scalar but the wall-clock one, as (tag, step, value bits).
fn tb_curve(out: &Path) -> Vec<(String, i64, u32)> {
    let dir = out.join("tb").join(out.file_name().unwrap());
    let events: Vec<String> = names(&dir)
        .into_iter()
        .filter(|n| n.starts_with("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1, "one event file per run: {events:?}");
    eabfit::metrics::read_scalars(&dir)
        .unwrap()
        .into_iter()
        .filter(|(t, _, _)| t != "train/tokens_per_s")
        .map(|(t, s, v)| (t, s, v.to_bits()))
        .collect()
}

fn jsonl_curve(out: &Path) -> Vec<(String, u64, String)> {
    let dir = out.join("tb").join(out.file_name().unwrap());
    std::fs::read_to_string(dir.join("scalars.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["tag"] != "train/tokens_per_s")
        .map(|v| {
            (
                v["tag"].as_str().unwrap().to_string(),
                v["step"].as_u64().unwrap(),
                v["value"].to_string(),
            )
        })
        .collect()
}

/// Everything the run leaves, minus what measures time (and the log position, which names
/// this run's own event file).
fn assert_same(case: &str, a: &Path, b: &Path) {
    for sub in ["final", "best"] {
        for f in ["adapter.safetensors", "adapter_config.json"] {
            let (x, y) = (a.join(sub).join(f), b.join(sub).join(f));
            assert!(
                std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(),
                "{case}: {sub}/{f} differs"
            );
        }
    }
    let (ca, cb) = (a.join("checkpoints"), b.join("checkpoints"));
    assert_eq!(names(&ca), names(&cb), "{case}: checkpoint folders");
    for step in names(&ca) {
        for f in [
            "adapter.safetensors",
            "optim.safetensors",
            "adapter_config.json",
        ] {
            let (x, y) = (ca.join(&step).join(f), cb.join(&step).join(f));
            assert!(
                std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(),
                "{case}: {step}/{f} differs"
            );
        }
        // The resolved recipe names its own run folder; all else must match.
        let recipe = |p: &Path| {
            std::fs::read_to_string(p.join(&step).join("recipe.yaml"))
                .unwrap()
                .replace(&p.parent().unwrap().display().to_string(), "OUT")
        };
        assert_eq!(recipe(&ca), recipe(&cb), "{case}: {step}/recipe.yaml");
        let state = |p: &Path| {
            let mut v = json(&p.join(&step).join("state.json"));
            v.as_object_mut().unwrap().remove("log");
            v
        };
        assert_eq!(state(&ca), state(&cb), "{case}: {step}/state.json");
    }
    let summary = |p: &Path| {
        let mut v = json(&p.join("summary.json"));
        let o = v.as_object_mut().unwrap();
        o.remove("wall_s");
        o.remove("tokens_per_s");
        v
    };
    assert_eq!(summary(a), summary(b), "{case}: summary.json");
    let (ta, tb) = (tb_curve(a), tb_curve(b));
    let mut seen = BTreeMap::new();
    for (t, s, _) in &tb {
        *seen.entry((t.clone(), *s)).or_insert(0) += 1;
    }
    let dup: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dup.is_empty(), "{case}: steps logged twice: {dup:?}");
    assert_eq!(ta, tb, "{case}: TensorBoard curve");
    assert_eq!(
        jsonl_curve(a),
        jsonl_curve(b),
        "{case}: scalars.jsonl curve"
    );
}

fn run_cases(which: std::ops::Range<usize>) {
    let reference = &reference().0;
    for (i, kill) in kill_points().into_iter().enumerate() {
        if !which.contains(&i) {
            continue;
        }
        let case = format!("case {i} {kill:?}");
        let out = fixture().root.path().join(format!("case-{i}"));
        kill_run(&out, kill);
        let stderr = resume(&out);
        assert!(stderr.contains("resuming from"), "{case}: {stderr}");
        assert_same(&case, reference, &out);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn kill_points_0_to_4_resume_bit_exact() {
    run_cases(0..5);
}

#[test]
fn kill_points_5_to_9_resume_bit_exact() {
    run_cases(5..10);
}

#[test]
fn kill_points_10_to_14_resume_bit_exact() {
    run_cases(10..15);
}

#[test]
fn kill_points_15_to_19_resume_bit_exact() {
    run_cases(15..20);
}

#[test]
fn the_twenty_points_cover_every_phase() {
    let k = kill_points();
    assert_eq!(k.len(), 20);
    for phase in ["step", "checkpoint", "eval", "logged"] {
        assert!(
            k.iter().any(|p| matches!(p, Kill::At(q, _) if *q == phase)),
            "{phase}: {k:?}"
        );
    }
}

#[test]
fn a_run_killed_twice_still_ends_bit_exact() {
    let reference = &reference().0;
    let out = fixture().root.path().join("twice");
    kill_run(&out, Kill::At("checkpoint", 2));
    // The first resume dies too, inside a step after its own checkpoint.
    let o = train_cmd(&out)
        .args(["--resume".to_string(), out.display().to_string()])
        .env(eabfit::killpoint::VAR, "step:5")
        .output()
        .unwrap();
    assert_eq!(
        o.status.signal(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    resume(&out);
    assert_same("twice", reference, &out);
}
