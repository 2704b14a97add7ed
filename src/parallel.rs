//! Data parallel for `train` and `pretrain`: one replica per device, each a thread of this
//! process with its own candle `Device`; each step's global batch (`world x data.batch_size`
//! windows, the same windows a single device with the whole batch would take) is split
//! across the ranks, their gradients are averaged through a [`Collective`], and every rank
//! takes the same optimizer step. Rank 0 alone evaluates and writes checkpoints, summaries
//! and logs.
//!
//! Threads rather than processes: the ranks share the parsed recipe, need no launcher, no
//! id file and no port, and a failing rank reaches the others through shared memory at
//! once (see docs/parallel.md). One device runs on the calling thread with no collective at
//! all, exactly as before data parallel existed.

use crate::collective::threads::{Hub, ThreadsCollective};
use crate::collective::{mean_f64, mean_grads, Collective};
use crate::device::parse_device;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// `train.devices` / `--devices`: a comma-separated list (`cpu,cpu`, `cuda:0,cuda:1`) or
/// `KIND*N` (`cpu*2`, `cuda*4` = cuda:0..cuda:3). Every entry is one rank.
pub fn parse_devices(spec: &str) -> std::result::Result<Vec<String>, String> {
    let spec = spec.trim();
    let list: Vec<String> = match spec.split_once('*') {
        Some((kind, n)) => {
            let n: usize = n
                .trim()
                .parse()
                .map_err(|_| format!("`{spec}`: expected KIND*N with a count N"))?;
            if n == 0 {
                return Err(format!("`{spec}`: at least one device"));
            }
            match kind.trim() {
                "cpu" => vec!["cpu".to_string(); n],
                "cuda" => (0..n).map(|i| format!("cuda:{i}")).collect(),
                k => return Err(format!("`{spec}`: `{k}*N` takes cpu or cuda")),
            }
        }
        None => spec.split(',').map(|d| d.trim().to_string()).collect(),
    };
    for d in &list {
        let ok = d == "cpu"
            || d == "cuda"
            || d.strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !ok {
            return Err(format!(
                "`{spec}`: `{d}` is not a device (expected cpu, cuda or cuda:N)"
            ));
        }
    }
    let cpu = list.iter().filter(|d| d.as_str() == "cpu").count();
    if cpu != 0 && cpu != list.len() {
        return Err(format!("`{spec}`: all CPU or all CUDA, not both"));
    }
    let ordinals: Vec<&str> = list
        .iter()
        .map(|d| if d == "cuda" { "cuda:0" } else { d.as_str() })
        .filter(|d| *d != "cpu")
        .collect();
    if let Some(d) = ordinals
        .iter()
        .enumerate()
        .find_map(|(i, d)| ordinals[..i].contains(d).then_some(d))
    {
        return Err(format!(
            "`{spec}`: `{d}` twice (NCCL takes one rank per GPU)"
        ));
    }
    Ok(list)
}

/// The devices of a run: `train.devices` if set, else `model.device` alone.
pub fn run_devices(model_device: &str, devices: Option<&str>) -> Result<Vec<String>> {
    match devices {
        None => Ok(vec![model_device.to_string()]),
        Some(s) => parse_devices(s).map_err(|e| Error::Usage(format!("train.devices: {e}"))),
    }
}

/// A resume at another world size changes the global batch, so it continues the run but not
/// the one the checkpoint came from.
pub fn warn_world(saved: usize, now: usize) {
    if saved != now {
        eprintln!(
            "note: the checkpoint was written by {saved} device(s), this run has {now}: each step now sees {now} x data.batch_size windows, so this is not an exact resume"
        );
    }
}

/// One rank's view of the run: its place, its device and its collective (none alone).
pub struct Rank {
    pub rank: usize,
    pub world: usize,
    pub device: Device,
    coll: Option<Box<dyn Collective>>,
}

impl Rank {
    /// The only rank of a single-device run.
    pub fn alone(device: Device) -> Self {
        Self {
            rank: 0,
            world: 1,
            device,
            coll: None,
        }
    }

    /// Rank 0 evaluates, logs and writes.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// This rank's part of a global batch: the `rank`-th of `world` equal runs.
    pub fn share<'a, T>(&self, global: &'a [T]) -> &'a [T] {
        let per = global.len() / self.world;
        &global[self.rank * per..(self.rank + 1) * per]
    }

    /// A crash-test point ([`crate::killpoint`]) that can also fail this rank on request.
    pub fn point(&self, phase: &str) -> Result<()> {
        crate::killpoint::point(phase);
        crate::killpoint::fail_point(self.rank, phase)
    }

    /// Every gradient replaced by its mean over ranks (nothing to do alone).
    pub fn mean_grads(&mut self, grads: &mut BTreeMap<String, Tensor>) -> Result<()> {
        match self.coll.as_deref_mut() {
            Some(c) => mean_grads(c, grads),
            None => Ok(()),
        }
    }

    /// The mean over ranks of a few numbers (the loss terms of a step).
    pub fn mean(&mut self, v: &[f64]) -> Result<Vec<f64>> {
        match self.coll.as_deref_mut() {
            Some(c) => mean_f64(c, v),
            None => Ok(v.to_vec()),
        }
    }

    /// Whether `flag` holds on any rank (a decision every rank must take together).
    pub fn any(&mut self, flag: bool) -> Result<bool> {
        Ok(self.mean(&[flag as u8 as f64])?[0] > 0.0)
    }
}

#[cfg(feature = "nccl")]
type CommId = Option<crate::collective::nccl::Id>;
#[cfg(not(feature = "nccl"))]
type CommId = Option<()>;

/// The NCCL id all ranks of a GPU run join (made before their threads start).
fn comm_id(cuda: bool) -> Result<CommId> {
    #[cfg(feature = "nccl")]
    if cuda {
        return Ok(Some(crate::collective::nccl::new_id()?));
    }
    let _ = cuda;
    Ok(None)
}

/// Rank `r`'s collective: NCCL on a GPU, the in-process one on the CPU.
fn collective(
    hub: &Arc<Hub>,
    r: usize,
    device: &Device,
    id: CommId,
) -> Result<Box<dyn Collective>> {
    #[cfg(feature = "nccl")]
    if let (true, Some(id)) = (device.is_cuda(), id) {
        let c = crate::collective::nccl::NcclCollective::new(hub.clone(), r, device, id)?;
        return Ok(Box::new(c));
    }
    let _ = id;
    Ok(Box::new(ThreadsCollective::new(
        hub.clone(),
        r,
        device.clone(),
    )))
}

/// Names the rank an error came from; a usage error stays one (exit code 2).
fn on_rank(e: Error, rank: usize, device: &str) -> Error {
    match e {
        Error::Usage(m) => Error::Usage(format!("rank {rank} ({device}): {m}")),
        e => Error::Msg(format!("rank {rank} ({device}): {e}")),
    }
}

/// How long the others get to stop after one rank failed before the error is returned
/// anyway (a rank busy in a long forward pass notices only at its next collective).
const GRACE: Duration = Duration::from_secs(120);

/// Runs `f` once per device, each on its own thread with its own [`Rank`], and returns rank
/// 0's result. A rank that fails (or panics) stops every other at its next collective; the
/// error returned is the first failure's, naming its rank and device.
pub fn launch<T: Send + 'static>(
    devices: Vec<String>,
    f: impl Fn(&mut Rank) -> Result<T> + Send + Sync + 'static,
) -> Result<T> {
    if devices.len() == 1 {
        let mut rank = Rank::alone(parse_device(&devices[0])?);
        return f(&mut rank);
    }
    let world = devices.len();
    let hub = Hub::new(world, Hub::timeout_from_env()?);
    let cuda = devices[0] != "cpu";
    if cuda && !cfg!(feature = "nccl") {
        return Err(Error::Usage(format!(
            "train.devices {devices:?}: data parallel over GPUs needs NCCL, and this eabfit was built without it (scripts/cuda-build.sh --features nccl)"
        )));
    }
    let id = comm_id(cuda)?;
    let f = Arc::new(f);
    let (tx, rx) = mpsc::channel::<(usize, Result<T>)>();
    for (r, spec) in devices.iter().enumerate() {
        let (hub, f, tx, spec) = (hub.clone(), f.clone(), tx.clone(), spec.clone());
        std::thread::Builder::new()
            .name(format!("rank-{r}"))
            .spawn(move || {
                let body = || -> Result<T> {
                    let device = parse_device(&spec)?;
                    let coll = collective(&hub, r, &device, id)?;
                    let mut rank = Rank {
                        rank: r,
                        world,
                        device,
                        coll: Some(coll),
                    };
                    f(&mut rank)
                };
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body))
                    .unwrap_or_else(|p| {
                        let what = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "a panic".into());
                        Err(Error::Msg(format!("panicked: {what}")))
                    });
                if let Err(e) = &out {
                    hub.fail(r, &e.to_string());
                }
                let _ = tx.send((r, out));
            })
            .map_err(|e| Error::Msg(format!("cannot start rank {r}: {e}")))?;
    }
    drop(tx);
    let mut results: Vec<Option<Result<T>>> = (0..world).map(|_| None).collect();
    let mut done = 0;
    let mut deadline: Option<std::time::Instant> = None;
    while done < world {
        let got = match deadline {
            None => rx.recv().ok(),
            Some(d) => rx
                .recv_timeout(d.saturating_duration_since(std::time::Instant::now()))
                .ok(),
        };
        let Some((r, out)) = got else { break };
        results[r] = Some(out);
        done += 1;
        if deadline.is_none() && hub.failure().is_some() {
            deadline = Some(std::time::Instant::now() + GRACE);
        }
    }
    if let Some(fail) = hub.failure() {
        return Err(match results[fail.rank].take() {
            Some(Err(e)) => on_rank(e, fail.rank, &devices[fail.rank]),
            _ => Error::Msg(format!(
                "rank {} ({}): {}",
                fail.rank, devices[fail.rank], fail.msg
            )),
        });
    }
    match results[0].take() {
        Some(out) => out,
        None => Err(Error::Msg("rank 0 ended without a result".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_devices("cpu*3").unwrap(), vec!["cpu"; 3]);
        assert_eq!(parse_devices("cpu, cpu").unwrap(), vec!["cpu"; 2]);
        assert_eq!(
            parse_devices("cuda*2").unwrap(),
            vec!["cuda:0".to_string(), "cuda:1".into()]
        );
        assert_eq!(
            parse_devices("cuda:1,cuda:0").unwrap(),
            vec!["cuda:1".to_string(), "cuda:0".into()]
        );
        for (bad, says) in [
            ("cpu,cuda:0", "not both"),
            ("cuda:0,cuda", "twice"),
            ("gpu*2", "cpu or cuda"),
            ("cpu*0", "at least one"),
            ("cpu*x", "count"),
            ("cpu,tpu", "`tpu` is not a device"),
        ] {
            let e = parse_devices(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn shares_tile_the_global_batch_in_rank_order() {
        let global: Vec<usize> = (0..6).collect();
        let parts: Vec<Vec<usize>> = (0..3)
            .map(|r| {
                let rank = Rank {
                    rank: r,
                    world: 3,
                    device: Device::Cpu,
                    coll: None,
                };
                rank.share(&global).to_vec()
            })
            .collect();
        assert_eq!(parts, vec![vec![0, 1], vec![2, 3], vec![4, 5]]);
    }

    #[test]
    fn a_failing_rank_is_named_and_the_others_stop() {
        let t0 = std::time::Instant::now();
        let e = launch(vec!["cpu".into(); 3], |rank| {
            let mut g = BTreeMap::new();
            g.insert("w".to_string(), Tensor::new(&[1f32, 2.0], &rank.device)?);
            rank.mean_grads(&mut g)?;
            if rank.rank == 2 {
                return Err(Error::file("/x/y", "cannot write"));
            }
            for _ in 0..3 {
                rank.mean_grads(&mut g)?;
            }
            Ok(rank.rank)
        })
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(20));
        assert_eq!(e.to_string(), "rank 2 (cpu): /x/y: cannot write");
    }

    #[test]
    fn a_panicking_rank_is_named() {
        let e = launch(vec!["cpu".into(); 2], |rank| {
            if rank.rank == 1 {
                panic!("boom");
            }
            rank.mean(&[1.0])?;
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "rank 1 (cpu): panicked: boom");
    }
}
