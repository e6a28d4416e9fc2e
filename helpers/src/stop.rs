//! Ending training early and cleanly, after the current step and with a checkpoint: on SIGTERM
//! (what a preempted pod or a cluster's scheduler sends, some seconds before SIGKILL) or when the
//! Stop button on the W&B run page is pressed.
//!
//! ```text
//! let sigterm = helpers::stop::on_sigterm()?;          // before the loop: SIGTERM sets a flag
//! for step in .. {
//!     ...                                               // the step, its checkpoint
//!     if let Some(why) = helpers::stop::requested(&dist, wandb.stopped())? { ...; break }
//! }
//! drop(sigterm);                                        // SIGTERM ends the process again
//! ```
//!
//! While the guard lives, the first SIGTERM only sets a flag the loop reads after each step; a
//! second one ends the process as SIGTERM normally does (a stuck step cannot hold it). Every rank
//! must stop at the same step, so under several processes the flags are summed over ranks.
use crate::dist::Dist;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static TERMINATED: AtomicBool = AtomicBool::new(false);
static GUARDS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_term(_: libc::c_int) {
    if TERMINATED.swap(true, Ordering::SeqCst) {
        // The second SIGTERM: the default action (both calls are async-signal-safe).
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::raise(libc::SIGTERM);
        }
    }
}

/// Why training stops early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: the machine is going away. The W&B run is marked preempting, the process ends
    /// with a non-zero status (143 = 128 + SIGTERM) so a scheduler requeues it.
    Terminated,
    /// The Stop button on the W&B run page: training ends, the rest of the run (results, export)
    /// goes on with the weights so far.
    StoppedInUi,
}

impl Stop {
    /// The exit code W&B records and the process returns: 143 for SIGTERM, 0 for Stop.
    pub fn exit_code(self) -> i32 {
        match self {
            Stop::Terminated => 128 + libc::SIGTERM,
            Stop::StoppedInUi => 0,
        }
    }
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::Terminated => "SIGTERM (preempted)",
            Stop::StoppedInUi => "Stop pressed on the W&B run page",
        })
    }
}

/// While the returned guard lives, SIGTERM asks the loop to stop (see the module docs).
pub fn on_sigterm() -> Result<SigtermGuard> {
    if GUARDS.fetch_add(1, Ordering::SeqCst) == 0 {
        TERMINATED.store(false, Ordering::SeqCst);
        let handler = on_term as extern "C" fn(libc::c_int) as libc::sighandler_t;
        if unsafe { libc::signal(libc::SIGTERM, handler) } == libc::SIG_ERR {
            GUARDS.fetch_sub(1, Ordering::SeqCst);
            anyhow::bail!("cannot install a SIGTERM handler: {}", std::io::Error::last_os_error());
        }
    }
    Ok(SigtermGuard(()))
}

/// Restores SIGTERM's default action when the last guard is dropped.
pub struct SigtermGuard(());

impl Drop for SigtermGuard {
    fn drop(&mut self) {
        if GUARDS.fetch_sub(1, Ordering::SeqCst) == 1 {
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_DFL) };
        }
    }
}

/// True once SIGTERM arrived while a guard lived.
pub fn terminated() -> bool {
    TERMINATED.load(Ordering::SeqCst)
}

/// Whether to stop after this step, the same answer on every rank: SIGTERM on any rank, or Stop on
/// the W&B page (`wandb_stopped`, known on rank 0). One small all-reduce per call under several
/// processes; nothing in a single process.
pub fn requested(dist: &Dist, wandb_stopped: bool) -> Result<Option<Stop>> {
    let (mut term, mut ui) = (terminated(), wandb_stopped);
    if dist.world > 1 {
        let flags = tch::Tensor::from_slice(&[term as i64, ui as i64]);
        dist.all_reduce_sum(std::slice::from_ref(&flags))?;
        let v: Vec<i64> = Vec::try_from(&flags)?;
        (term, ui) = (v[0] > 0, v[1] > 0);
    }
    Ok(if term { Some(Stop::Terminated) } else if ui { Some(Stop::StoppedInUi) } else { None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigterm_sets_the_flag_while_a_guard_lives() {
        let guard = on_sigterm().unwrap();
        assert_eq!(requested(&Dist::single(), false).unwrap(), None);
        assert_eq!(requested(&Dist::single(), true).unwrap(), Some(Stop::StoppedInUi));
        unsafe { libc::raise(libc::SIGTERM) }; // the process goes on
        assert!(terminated());
        assert_eq!(requested(&Dist::single(), true).unwrap(), Some(Stop::Terminated), "SIGTERM wins");
        assert_eq!(Stop::Terminated.exit_code(), 143);
        drop(guard);
        // A new guard starts with the flag cleared.
        let _guard = on_sigterm().unwrap();
        assert!(!terminated());
    }
}
