//! SQLite's worker threads at the lowest CPU priority while the usage queue is short.
//!
//! With SQLite, every statement runs on one of sqlx's worker threads in this process. A batch of
//! usage records takes a few milliseconds of CPU every flush; at normal priority that burst
//! competes with the proxy's threads for the cores and shows up as a cluster of slow requests
//! every flush (the 99th percentile at one connection went from about 0.4 ms to 1.3 ms). Under
//! Linux's `SCHED_IDLE` policy those threads run only on CPU time no normal thread wants, and a
//! waking proxy thread preempts them at once. Admin queries on SQLite share those threads.
//!
//! Under full load no CPU time is left over: the writer starved, the queue filled, and every
//! request waited for room while the writer caught up, a stall of tens of milliseconds (the
//! 99th percentile at 64 connections went from about 11 to 30–70 ms). So the threads are idle
//! only while the queue is short: once it holds a quarter of its capacity they run at normal
//! priority, taking their fair share, until it is down to a twentieth.
//!
//! sqlx opens connections (and their threads) whenever its pool needs them, so the threads are
//! looked up by name every second rather than once.

use std::collections::HashSet;
use std::time::Duration;

use pingora::server::ShutdownWatch;

use super::usage_writer::Backlog;

/// The start of the names sqlx gives its SQLite worker threads, as the kernel keeps them
/// (15 bytes).
const SQLITE_WORKER: &str = "sqlx-sqlite-wor";

/// The SQLite threads put to idle priority: sqlx's workers and the usage batches' own thread.
const SQLITE_THREADS: [&str; 2] = [SQLITE_WORKER, crate::store::sqlite_usage::THREAD_NAME];

/// How often the queue is looked at: it fills from a quarter to full in about half a second at
/// 13 000 requests/s with the default capacity.
const TICK: Duration = Duration::from_millis(50);

/// Ticks between two lookups of new threads.
const LOOKUP_EVERY: u32 = 20;

/// Whether the threads should be idle next, given whether they are now and the queue's fill.
pub fn stay_idle(idle: bool, waiting: usize, capacity: usize) -> bool {
    if idle {
        waiting < capacity.div_ceil(4)
    } else {
        waiting <= capacity / 20
    }
}

/// Keeps every SQLite worker thread of this process at idle priority while the usage queue is
/// short, and at normal priority while it is long, until shutdown. Does nothing where a thread
/// could not come back from idle priority.
pub async fn keep_sqlite_workers_idle(backlog: Backlog, mut shutdown: ShutdownWatch) {
    if let Err(e) = can_come_back_from_idle() {
        // Idle threads that stay idle would stall the proxy under full load.
        tracing::warn!(
            error = %e,
            "SQLite worker threads keep normal CPU priority: this process may not raise a \
             thread's priority back from idle (it needs CAP_SYS_NICE or RLIMIT_NICE of 20)"
        );
        return;
    }
    let mut known = HashSet::new();
    let mut idle = true;
    let mut warned = false;
    let mut tick = 0u32;
    loop {
        let next = match backlog.fill() {
            Some((waiting, capacity)) => stay_idle(idle, waiting, capacity),
            None => true,
        };
        let result = if next != idle {
            idle = next;
            tracing::debug!(idle, "SQLite worker threads change CPU priority");
            known.clear();
            set_policy_named(&SQLITE_THREADS, idle, &mut known)
        } else if tick % LOOKUP_EVERY == 0 {
            set_policy_named(&SQLITE_THREADS, idle, &mut known)
        } else {
            Ok(0)
        };
        if let Err(e) = result {
            if !warned {
                warned = true;
                tracing::warn!(error = %e, "SQLite worker threads could not change CPU priority");
            }
        }
        tick = tick.wrapping_add(1);
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Whether a thread of this process may go to idle priority and back: an unprivileged process
/// may lower a thread's priority but, on Linux, raise it back from `SCHED_IDLE` only with
/// `CAP_SYS_NICE` or an `RLIMIT_NICE` of 20. Tried on a thread of its own.
#[cfg(target_os = "linux")]
pub fn can_come_back_from_idle() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("priority-probe".into())
        .spawn(|| {
            let param = libc::sched_param { sched_priority: 0 };
            for policy in [libc::SCHED_IDLE, libc::SCHED_OTHER] {
                // SAFETY: plain system call on the calling thread (0) with a valid parameter.
                if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })?
        .join()
        .map_err(|_| std::io::Error::other("the priority probe panicked"))?
}

#[cfg(not(target_os = "linux"))]
pub fn can_come_back_from_idle() -> std::io::Result<()> {
    Err(std::io::Error::other(
        "thread priorities are set on Linux only",
    ))
}

/// Puts the threads of this process whose name starts with one of `prefixes` and that are not in
/// `known` under `SCHED_IDLE` (`idle`) or `SCHED_OTHER`; adds them to `known`. Returns how many
/// were set.
#[cfg(target_os = "linux")]
pub fn set_policy_named(
    prefixes: &[&str],
    idle: bool,
    known: &mut HashSet<i32>,
) -> std::io::Result<usize> {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let mut set = 0;
    let mut alive = HashSet::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // A thread may end between the listing and the read.
        let Ok(name) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        alive.insert(tid);
        if known.contains(&tid) {
            continue;
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system call on a thread id of this process with a valid parameter.
        let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // ESRCH: the thread ended meanwhile.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
            continue;
        }
        known.insert(tid);
        set += 1;
    }
    // Thread ids are reused: forget the ones that ended.
    known.retain(|tid| alive.contains(tid));
    Ok(set)
}

#[cfg(not(target_os = "linux"))]
pub fn set_policy_named(
    _prefixes: &[&str],
    _idle: bool,
    _known: &mut HashSet<i32>,
) -> std::io::Result<usize> {
    Ok(0)
}

#[cfg(all(test, target_os = "linux"))]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    fn policy_of(tid: i32) -> i32 {
        // SAFETY: plain system call on a thread id of this process.
        unsafe { libc::sched_getscheduler(tid) }
    }

    /// Starts a thread named `name` that reports its id and waits for `stop` to close.
    fn named_thread(
        name: &str,
        stop: std::sync::mpsc::Receiver<()>,
    ) -> (i32, std::thread::JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = stop.recv();
            })
            .unwrap();
        (rx.recv().unwrap(), handle)
    }

    /// [`set_policy_named`] until it moves a thread (at most a second): a listing of
    /// `/proc/self/task` can miss a live thread while other threads of the process (the other
    /// tests' runtimes) start and end, as the relay's periodic rounds simply meet it again.
    fn moved_until_found(idle: bool, done: &mut HashSet<i32>) -> usize {
        for _ in 0..100 {
            let moved = set_policy_named(&["prio-test-idle"], idle, done).unwrap();
            if moved > 0 {
                return moved;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        0
    }

    #[test]
    fn named_threads_move_to_idle_and_others_stay() {
        let (stop_idle, idle_rx) = std::sync::mpsc::channel();
        let (stop_normal, normal_rx) = std::sync::mpsc::channel();
        let (idle_tid, idle) = named_thread("prio-test-idle-1", idle_rx);
        let (normal_tid, normal) = named_thread("prio-test-normal", normal_rx);

        let mut done = HashSet::new();
        assert_eq!(moved_until_found(true, &mut done), 1);
        assert_eq!(policy_of(idle_tid), libc::SCHED_IDLE);
        assert_eq!(policy_of(normal_tid), libc::SCHED_OTHER);
        assert_eq!(done, HashSet::from([idle_tid]));
        // Already moved: not again.
        assert_eq!(
            set_policy_named(&["prio-test-idle"], true, &mut done).unwrap(),
            0
        );
        // And back to normal, as a long queue asks.
        done.clear();
        assert_eq!(moved_until_found(false, &mut done), 1);
        assert_eq!(policy_of(idle_tid), libc::SCHED_OTHER);

        drop(stop_idle);
        idle.join().unwrap();
        drop(stop_normal);
        normal.join().unwrap();
        // Ended threads are forgotten (their ids may be reused).
        set_policy_named(&["prio-test-idle"], true, &mut done).unwrap();
        assert!(done.is_empty());
    }

    #[test]
    fn the_probe_tells_whether_threads_can_come_back_from_idle() {
        // CAP_SYS_NICE (bit 23) among the effective capabilities.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let caps = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        let sys_nice = caps & (1 << 23) != 0;
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) }, 0);
        let allowed = sys_nice || limit.rlim_cur >= 20;
        let probe = can_come_back_from_idle();
        if allowed {
            probe.unwrap();
        } else {
            assert_eq!(probe.unwrap_err().raw_os_error(), Some(libc::EPERM));
        }
    }

    #[test]
    fn idle_while_the_queue_is_short_with_a_gap_between() {
        // Idle until a quarter of the queue waits, then normal until a twentieth is left.
        assert!(stay_idle(true, 0, 10_000));
        assert!(stay_idle(true, 2_499, 10_000));
        assert!(!stay_idle(true, 2_500, 10_000));
        assert!(!stay_idle(false, 2_500, 10_000));
        assert!(!stay_idle(false, 501, 10_000));
        assert!(stay_idle(false, 500, 10_000));
        // A queue of one: idle while it is empty.
        assert!(stay_idle(true, 0, 1));
        assert!(!stay_idle(true, 1, 1));
        assert!(stay_idle(false, 0, 1));
    }
}
