//! The in-process collective: ranks are threads of one process, the sums go through buffers
//! they share. It is what data parallel uses on the CPU, and what lets the tests exercise the
//! batch split, the reduction, the checkpointing and the failure handling without a GPU.
//!
//! [`Hub`] is the rendezvous: each rank leaves its buffer in its slot, the last to arrive sums
//! the slots in rank order (so the result does not depend on who came first) and wakes the
//! others. A rank that fails calls [`Hub::fail`]; every rank waiting then, or arriving later,
//! gets an error naming it. A wait longer than the timeout fails the run too, naming the
//! ranks that did not come.

use super::Collective;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Seconds a rank waits for the others at one collective before the run fails
/// ([`TIMEOUT_VAR`] overrides it). Rank 0 evaluates and writes checkpoints while the others
/// wait at the next step's reduction, so it must cover the longest evaluation.
pub const DEFAULT_TIMEOUT_S: f64 = 1800.0;
pub const TIMEOUT_VAR: &str = "EABFIT_COLLECTIVE_TIMEOUT_S";

/// The first failure of a run: which rank, and its error.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub rank: usize,
    pub msg: String,
}

impl Failure {
    /// What a rank that did not fail itself returns.
    fn stop(&self) -> Error {
        Error::Msg(format!(
            "stopped because rank {} failed: {}",
            self.rank, self.msg
        ))
    }
}

#[derive(Debug, Clone)]
enum Buf {
    /// A barrier: nothing to sum.
    Empty,
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Buf {
    fn describe(&self) -> String {
        match self {
            Buf::Empty => "a barrier".into(),
            Buf::F32(v) => format!("{} f32", v.len()),
            Buf::F64(v) => format!("{} f64", v.len()),
        }
    }
}

struct State {
    /// Completed rendezvous so far: a waiter knows its own is done when this moves on.
    round: u64,
    slots: Vec<Option<Buf>>,
    result: Option<Arc<Buf>>,
    failure: Option<Failure>,
}

pub struct Hub {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    wake: Condvar,
}

impl Hub {
    pub fn new(world: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            world,
            timeout,
            state: Mutex::new(State {
                round: 0,
                slots: vec![None; world],
                result: None,
                failure: None,
            }),
            wake: Condvar::new(),
        })
    }

    /// The timeout from [`TIMEOUT_VAR`], else [`DEFAULT_TIMEOUT_S`].
    pub fn timeout_from_env() -> Result<Duration> {
        let Ok(v) = std::env::var(TIMEOUT_VAR) else {
            return Ok(Duration::from_secs_f64(DEFAULT_TIMEOUT_S));
        };
        match v.parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            _ => Err(Error::Usage(format!(
                "{TIMEOUT_VAR}={v}: expected a positive number of seconds"
            ))),
        }
    }

    pub fn world(&self) -> usize {
        self.world
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock left nothing half-done that matters:
        // the slots are rewritten each round.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `rank`'s failure (the first one only) and wakes every waiter.
    pub fn fail(&self, rank: usize, msg: &str) {
        let mut s = self.lock();
        if s.failure.is_none() {
            s.failure = Some(Failure {
                rank,
                msg: msg.to_string(),
            });
        }
        drop(s);
        self.wake.notify_all();
    }

    pub fn failure(&self) -> Option<Failure> {
        self.lock().failure.clone()
    }

    /// Waits for every rank to come with its buffer; returns their sum.
    fn exchange(&self, rank: usize, buf: Buf) -> Result<Arc<Buf>> {
        let mut s = self.lock();
        if let Some(f) = &s.failure {
            return Err(f.stop());
        }
        let round = s.round;
        s.slots[rank] = Some(buf);
        if s.slots.iter().all(Option::is_some) {
            let bufs: Vec<Buf> = s.slots.iter_mut().filter_map(Option::take).collect();
            return match sum_in_rank_order(bufs) {
                Ok(total) => {
                    let total = Arc::new(total);
                    s.result = Some(total.clone());
                    s.round += 1;
                    drop(s);
                    self.wake.notify_all();
                    Ok(total)
                }
                Err(msg) => {
                    let f = Failure { rank, msg };
                    s.failure = Some(f.clone());
                    drop(s);
                    self.wake.notify_all();
                    Err(Error::Msg(format!("rank {}: {}", f.rank, f.msg)))
                }
            };
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            if s.round != round {
                // The next round cannot finish without this rank: the result is still ours.
                return s
                    .result
                    .clone()
                    .ok_or_else(|| Error::Msg("collective finished without a result".into()));
            }
            if let Some(f) = &s.failure {
                return Err(f.stop());
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> =
                    (0..self.world).filter(|&r| s.slots[r].is_none()).collect();
                let f = Failure {
                    rank: missing.first().copied().unwrap_or(rank),
                    msg: format!(
                        "rank(s) {missing:?} did not reach the collective within {:.0} s (rank {rank} waited; {TIMEOUT_VAR} sets the limit)",
                        self.timeout.as_secs_f64()
                    ),
                };
                s.failure = Some(f.clone());
                drop(s);
                self.wake.notify_all();
                return Err(Error::Msg(f.msg));
            }
            s = self
                .wake
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Every rank comes here before any goes on.
    pub fn barrier(&self, rank: usize) -> Result<()> {
        self.exchange(rank, Buf::Empty).map(|_| ())
    }
}

/// The element-wise sum of one buffer per rank, added in rank order; all must be alike.
fn sum_in_rank_order(bufs: Vec<Buf>) -> std::result::Result<Buf, String> {
    let first = bufs[0].describe();
    if let Some((r, b)) = bufs.iter().enumerate().find(|(_, b)| b.describe() != first) {
        return Err(format!(
            "ranks disagree on a collective: rank 0 sent {first}, rank {r} sent {}",
            b.describe()
        ));
    }
    let mut it = bufs.into_iter();
    let acc = it.next().unwrap_or(Buf::Empty);
    Ok(it.fold(acc, |acc, b| match (acc, b) {
        (Buf::F32(mut a), Buf::F32(b)) => {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            Buf::F32(a)
        }
        (Buf::F64(mut a), Buf::F64(b)) => {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            Buf::F64(a)
        }
        (acc, _) => acc,
    }))
}

/// One rank's handle on a [`Hub`], for ranks on the CPU.
pub struct ThreadsCollective {
    hub: Arc<Hub>,
    rank: usize,
    device: Device,
}

impl ThreadsCollective {
    pub fn new(hub: Arc<Hub>, rank: usize, device: Device) -> Self {
        Self { hub, rank, device }
    }
}

impl Collective for ThreadsCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.hub.world
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn sync(&mut self) -> Result<()> {
        self.hub.barrier(self.rank)
    }

    fn sum(&mut self, buf: &Tensor) -> Result<Tensor> {
        let n = buf.elem_count();
        let mine = match buf.dtype() {
            DType::F32 => Buf::F32(buf.flatten_all()?.to_vec1()?),
            DType::F64 => Buf::F64(buf.flatten_all()?.to_vec1()?),
            other => {
                return Err(Error::Msg(format!(
                    "collective sum of {other:?}: only f32 and f64 are summed"
                )))
            }
        };
        let total = self.hub.exchange(self.rank, mine)?;
        let t = match &*total {
            Buf::F32(v) => Tensor::from_slice(v, n, &self.device)?,
            Buf::F64(v) => Tensor::from_slice(v, n, &self.device)?,
            Buf::Empty => return Err(Error::Msg("collective sum came back empty".into())),
        };
        Ok(t.reshape(buf.shape())?)
    }

    fn abort(&self, msg: &str) {
        self.hub.fail(self.rank, msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f(rank, collective)` on `world` threads; their results in rank order.
    fn on_threads<T: Send + 'static>(
        world: usize,
        timeout: Duration,
        f: impl Fn(usize, &mut ThreadsCollective) -> Result<T> + Send + Sync + 'static,
    ) -> (Arc<Hub>, Vec<Result<T>>) {
        let hub = Hub::new(world, timeout);
        let f = Arc::new(f);
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (hub, f) = (hub.clone(), f.clone());
                std::thread::spawn(move || {
                    let mut c = ThreadsCollective::new(hub, r, Device::Cpu);
                    let out = f(r, &mut c);
                    if let Err(e) = &out {
                        c.abort(&e.to_string());
                    }
                    out
                })
            })
            .collect();
        let out = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (hub, out)
    }

    fn data(rank: usize, n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| ((rank * 31 + i * 7) % 13) as f64 * 0.37 - 1.1)
            .collect()
    }

    #[test]
    fn sum_and_mean_match_a_direct_sum() {
        for world in [2, 3, 5] {
            let n = 17;
            let (_, out) = on_threads(world, Duration::from_secs(30), move |r, c| {
                let t = Tensor::new(data(r, n).as_slice(), &Device::Cpu)?;
                let s64 = c.sum(&t)?.to_vec1::<f64>()?;
                let s32 = c.sum(&t.to_dtype(DType::F32)?)?.to_vec1::<f32>()?;
                let mean = super::super::mean_f64(c, &data(r, n))?;
                Ok((s64, s32, mean))
            });
            let want: Vec<f64> = (0..n)
                .map(|i| (0..world).map(|r| data(r, n)[i]).sum())
                .collect();
            let want32: Vec<f32> = (0..n)
                .map(|i| (0..world).map(|r| data(r, n)[i] as f32).sum())
                .collect();
            for (r, o) in out.into_iter().enumerate() {
                let (s64, s32, mean) = o.unwrap();
                // Rank order is the order of the direct sums above: equal to the bit.
                assert_eq!(s64, want, "world {world} rank {r}");
                assert_eq!(s32, want32, "world {world} rank {r}");
                for (m, w) in mean.iter().zip(&want) {
                    assert_eq!(*m, w / world as f64);
                }
            }
        }
    }

    #[test]
    fn grad_mean_over_buckets_matches_the_mean_of_each_tensor() {
        let world = 3;
        let (_, out) = on_threads(world, Duration::from_secs(30), move |r, c| {
            let mut g = std::collections::BTreeMap::new();
            for (k, n) in [("a", 5usize), ("b", 3), ("c", 40_000)] {
                let v: Vec<f64> = data(r + k.len() * 10, n);
                g.insert(k.to_string(), Tensor::new(v.as_slice(), &Device::Cpu)?);
            }
            super::super::mean_grads(c, &mut g)?;
            Ok(g)
        });
        let results: Vec<_> = out.into_iter().map(|o| o.unwrap()).collect();
        for (k, n) in [("a", 5usize), ("b", 3), ("c", 40_000)] {
            for i in [0, n / 2, n - 1] {
                let want: f64 = (0..world)
                    .map(|r| data(r + k.len() * 10, n)[i])
                    .sum::<f64>()
                    / world as f64;
                for g in &results {
                    let got = g[k].to_vec1::<f64>().unwrap()[i];
                    assert!(
                        (got - want).abs() <= 1e-15 * want.abs().max(1.0),
                        "{k}[{i}]"
                    );
                }
            }
        }
    }

    #[test]
    fn a_failing_rank_wakes_every_waiter_with_its_error() {
        let t0 = Instant::now();
        let (hub, out) = on_threads(3, Duration::from_secs(60), |r, c| {
            c.sync()?;
            if r == 1 {
                std::thread::sleep(Duration::from_millis(50));
                return Err(Error::Msg("disk on fire".into()));
            }
            c.sync()
        });
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "waiters were not woken"
        );
        assert_eq!(
            hub.failure(),
            Some(Failure {
                rank: 1,
                msg: "disk on fire".into()
            })
        );
        for r in [0, 2] {
            let e = out[r].as_ref().unwrap_err().to_string();
            assert_eq!(e, "stopped because rank 1 failed: disk on fire");
        }
        // A later call fails at once too.
        let mut c = ThreadsCollective::new(hub, 0, Device::Cpu);
        assert!(c.sync().is_err());
    }

    #[test]
    fn a_rank_that_never_comes_times_out_naming_it() {
        let (hub, out) = on_threads(2, Duration::from_millis(200), |r, c| {
            if r == 0 {
                c.sync()?;
            }
            Ok(())
        });
        let e = out[0].as_ref().unwrap_err().to_string();
        assert!(e.contains("rank(s) [1] did not reach"), "{e}");
        assert_eq!(hub.failure().map(|f| f.rank), Some(1));
    }

    #[test]
    fn ranks_that_disagree_on_sizes_fail_instead_of_mixing() {
        let (_, out) = on_threads(2, Duration::from_secs(30), |r, c| {
            let t = Tensor::zeros(3 + r, DType::F32, &Device::Cpu)?;
            c.sum(&t).map(|_| ())
        });
        for o in &out {
            let e = o.as_ref().unwrap_err().to_string();
            assert!(e.contains("rank 0 sent 3 f32, rank 1 sent 4 f32"), "{e}");
        }
    }
}
