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
