//! A test hook for crash safety: with `EABFIT_TEST_KILL_AT=PHASE:N` set, the process sends
//! itself SIGKILL the Nth time it reaches `point(PHASE)` (no destructors, no flushes: exactly a
//! `kill -9` at a known place). Phases are named where `train` calls `point`. Without the
//! variable a point does nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

pub const VAR: &str = "EABFIT_TEST_KILL_AT";

pub fn point(phase: &str) {
    static TARGET: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let target = TARGET.get_or_init(|| {
        let v = std::env::var(VAR).ok()?;
        let (p, n) = v.split_once(':')?;
        Some((p.to_string(), n.parse().ok()?))
    });
    let Some((p, n)) = target else { return };
    if p == phase && SEEN.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        #[cfg(unix)]
        // Safety: kill(2) on our own pid; it does not return.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// The data-parallel counterpart: with `EABFIT_TEST_FAIL_AT=RANK:PHASE:N` set, rank RANK
/// returns an error the Nth time it reaches `point(PHASE)`, so that a test can watch the other
/// ranks stop with that rank's error. Without the variable it does nothing.
pub const FAIL_VAR: &str = "EABFIT_TEST_FAIL_AT";

pub fn fail_point(rank: usize, phase: &str) -> crate::Result<()> {
    static TARGET: OnceLock<Option<(usize, String, usize)>> = OnceLock::new();
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let target = TARGET.get_or_init(|| {
        let v = std::env::var(FAIL_VAR).ok()?;
        let mut it = v.splitn(3, ':');
        let r = it.next()?.parse().ok()?;
        let p = it.next()?.to_string();
        Some((r, p, it.next()?.parse().ok()?))
    });
    let Some((r, p, n)) = target else {
        return Ok(());
    };
    // Only the chosen rank counts its passes: the count does not depend on the others.
    if *r == rank && p == phase && SEEN.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        return Err(crate::Error::Msg(format!(
            "injected failure at pass {n} of `{phase}` ({FAIL_VAR})"
        )));
    }
    Ok(())
}
