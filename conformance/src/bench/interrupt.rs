//! Ctrl-C (SIGINT), SIGTERM and SIGHUP end a benchmark through its error path, so every lab
//! drop guard runs (namespaces removed, etcd and the netds killed) instead of the process
//! dying where it stands. The signals are blocked in every thread and taken by one thread
//! in `sigwait`, which only raises a flag: no code runs in a signal handler, and no
//! `unsafe`. The phases look at the flag between operations ([`check`]).
//!
//! Children started with `std::process::Command` get an empty signal mask, so plugins,
//! etcd and netd still die of a terminal's Ctrl-C as usual.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SigSet, Signal};

use super::BenchError;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Blocks SIGINT, SIGTERM and SIGHUP and starts the thread that waits for them. Call it
/// first thing in `main`, before any other thread exists (threads inherit the mask).
pub fn install() -> std::io::Result<()> {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    set.thread_block().map_err(std::io::Error::from)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            if let Ok(signal) = set.wait() {
                if !INTERRUPTED.swap(true, Ordering::SeqCst) {
                    tracing::warn!(%signal, "interrupted: stopping and tearing the lab down");
                }
            }
        })?;
    Ok(())
}

/// Whether a stop signal arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// [`BenchError::Interrupted`] once a stop signal arrived.
pub fn check() -> Result<(), BenchError> {
    if interrupted() {
        Err(BenchError::Interrupted)
    } else {
        Ok(())
    }
}
