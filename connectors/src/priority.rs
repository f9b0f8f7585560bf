//! The job's CPU priority follows its work: lower while it catches up, so
//! that the stores' readers on the same cores (an authorisation service's
//! `GET`) are served before a catch-up's batches; the usual one in real
//! time, where the job's own latency is what counts.
//!
//! Linux lets a thread lower its priority (raise its nice) freely, but
//! raising it again needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows it
//! (systemd: `AmbientCapabilities=CAP_SYS_NICE` or `LimitNICE=`). A process
//! with neither keeps the lower priority after its first catch-up, and says
//! so once.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::process::{getpriority_process, setpriority_process, Pid};

/// How long results must stay behind before the job counts as catching up:
/// a start, a stall or a burst does not lower the priority.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What [`configure`] found and set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The nice the job was started with, kept in real time.
    pub usual: i32,
    /// The nice while catching up (never below `usual`).
    pub catching_up: i32,
    /// Whether this process may go back from `catching_up` to `usual`.
    pub can_raise: bool,
}

struct State {
    plan: Plan,
    /// Workers catching up now.
    behind: usize,
    /// The job's threads are at `plan.catching_up`.
    lowered: bool,
    /// The warning that the priority stays low was logged.
    warned: bool,
}

static PRIORITY: OnceLock<Mutex<State>> = OnceLock::new();

/// Set the job's priority plan: `catching_up` is the nice while results are
/// being caught up on. Call once, before the worker threads start; without
/// it [`Behind`] changes nothing (tests, other binaries).
pub fn configure(catching_up: i32) -> std::io::Result<Plan> {
    let usual = getpriority_process(None)?;
    let catching_up = catching_up.clamp(usual, 19);
    let plan = Plan { usual, catching_up, can_raise: catching_up == usual || can_raise(usual) };
    let _ = PRIORITY.set(Mutex::new(State { plan, behind: 0, lowered: false, warned: false }));
    crate::metrics::nice().set(i64::from(usual));
    Ok(plan)
}

/// Whether a thread of this process may go back to `usual` after a higher
/// nice: tried on a thread of its own, which ends at once.
fn can_raise(usual: i32) -> bool {
    std::thread::spawn(move || {
        // `None`: on Linux, the calling thread alone.
        setpriority_process(None, usual + 1).is_ok() && setpriority_process(None, usual).is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// Every thread of this process to `nice`; threads started later take it
/// from the thread that starts them.
fn set_threads(nice: i32) -> std::io::Result<()> {
    for task in std::fs::read_dir("/proc/self/task")? {
        let Some(pid) =
            task?.file_name().to_str().and_then(|t| t.parse().ok()).and_then(Pid::from_raw)
        else {
            continue;
        };
        match setpriority_process(Some(pid), nice) {
            // A thread that ended meanwhile.
            Err(rustix::io::Errno::SRCH) => {}
            r => r?,
        }
    }
    Ok(())
}

/// One worker starts (`true`) or stops (`false`) catching up.
fn report(behind: bool) {
    let Some(state) = PRIORITY.get() else { return };
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    if behind {
        s.behind += 1;
    } else {
        s.behind = s.behind.saturating_sub(1);
    }
    let plan = s.plan;
    if plan.catching_up == plan.usual {
        return;
    }
    let lower = if s.behind > 0 && !s.lowered {
        true
    } else if s.behind == 0 && s.lowered {
        if !plan.can_raise {
            if !std::mem::replace(&mut s.warned, true) {
                tracing::warn!(
                    nice = plan.catching_up,
                    "caught up, but this process may not raise its priority again \
                     (it needs CAP_SYS_NICE or RLIMIT_NICE >= {}): it keeps nice {}",
                    20 - plan.usual,
                    plan.catching_up
                );
            }
            return;
        }
        false
    } else {
        return;
    };
    let nice = if lower { plan.catching_up } else { plan.usual };
    match set_threads(nice) {
        Ok(()) => {
            s.lowered = lower;
            crate::metrics::nice().set(i64::from(nice));
            if lower {
                tracing::info!(nice, "catching up: the job's threads yield to the stores' readers");
            } else {
                tracing::info!(nice, "caught up: the job's threads at their usual priority");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, nice, "the job's threads' priority was left as it was")
        }
    }
}

/// One worker's view: whether its results are being caught up on, reported
/// once they have been behind for [`SETTLE`], and withdrawn at once when
/// they are not, or when it is dropped.
#[derive(Default)]
pub struct Behind {
    since: Option<Instant>,
    reported: bool,
}

impl Behind {
    /// Results are (`true`) or are not behind now. When a spell behind
    /// starts, how long until it counts: the caller looks again then, whether
    /// or not anything else wakes it.
    #[must_use]
    pub fn update(&mut self, behind: bool, now: Instant) -> Option<Duration> {
        if behind {
            let Some(since) = self.since else {
                self.since = Some(now);
                return Some(SETTLE);
            };
            if !self.reported && now.duration_since(since) >= SETTLE {
                self.reported = true;
                report(true);
            }
        } else {
            self.since = None;
            if std::mem::take(&mut self.reported) {
                report(false);
            }
        }
        None
    }

    /// Whether this worker counts as catching up.
    pub fn reported(&self) -> bool {
        self.reported
    }
}

impl Drop for Behind {
    fn drop(&mut self) {
        if self.reported {
            report(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_counts_as_catching_up_only_after_results_stay_behind_for_the_settle_time() {
        let t0 = Instant::now();
        let mut b = Behind::default();
        assert_eq!(b.update(true, t0), Some(SETTLE), "look again when it would count");
        assert_eq!(b.update(true, t0 + SETTLE / 2), None);
        assert!(!b.reported(), "behind for half the settle time");
        // A moment in time ends the spell; the next one starts afresh.
        assert_eq!(b.update(false, t0 + SETTLE / 2), None);
        assert_eq!(b.update(true, t0 + SETTLE), Some(SETTLE), "a new spell");
        assert_eq!(b.update(true, t0 + SETTLE + SETTLE / 2), None);
        assert!(!b.reported(), "two short spells are not one long one");
        assert_eq!(b.update(true, t0 + 2 * SETTLE), None);
        assert!(b.reported(), "behind for the settle time");
        assert_eq!(b.update(true, t0 + 3 * SETTLE), None);
        assert!(b.reported());
        assert_eq!(b.update(false, t0 + 3 * SETTLE), None);
        assert!(!b.reported(), "withdrawn at once when in time");
    }
}
