//! SQLite's worker threads at the lowest CPU priority.
//!
//! With SQLite, every statement runs on one of sqlx's worker threads in this process. A batch of
//! usage records takes a few milliseconds of CPU every flush; at normal priority that burst
//! competes with the proxy's threads for the cores and shows up as a cluster of slow requests
//! every flush (the 99th percentile at one connection went from about 0.4 ms to 1.3 ms). Under
//! Linux's `SCHED_IDLE` policy those threads run only on CPU time no normal thread wants, and a
//! waking proxy thread preempts them at once. Nothing is lost under full load: the usage queue
//! fills, its back-pressure makes the proxy wait, and the writer gets the idle time it needs.
//! Admin queries on SQLite share those threads and so also yield to the proxy.
//!
//! sqlx opens connections (and their threads) whenever its pool needs them, so the threads are
//! looked up by name every second rather than once.

use std::collections::HashSet;
use std::time::Duration;

use pingora::server::ShutdownWatch;

/// The start of the names sqlx gives its SQLite worker threads, as the kernel keeps them
/// (15 bytes).
const SQLITE_WORKER: &str = "sqlx-sqlite-wor";

/// Keeps every SQLite worker thread of this process at idle priority until shutdown.
pub async fn keep_sqlite_workers_idle(mut shutdown: ShutdownWatch) {
    let mut done = HashSet::new();
    let mut warned = false;
    loop {
        if let Err(e) = idle_threads_named(SQLITE_WORKER, &mut done) {
            if !warned {
                warned = true;
                tracing::warn!(error = %e, "SQLite worker threads keep normal CPU priority");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Moves the threads of this process whose name starts with `prefix` and that are not in
/// `done` to `SCHED_IDLE`; adds them to `done`. Returns how many were moved.
#[cfg(target_os = "linux")]
pub fn idle_threads_named(prefix: &str, done: &mut HashSet<i32>) -> std::io::Result<usize> {
    let mut moved = 0;
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
        if !name.starts_with(prefix) {
            continue;
        }
        alive.insert(tid);
        if done.contains(&tid) {
            continue;
        }
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system call on a thread id of this process with a valid parameter.
        let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // ESRCH: the thread ended meanwhile.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
            continue;
        }
        done.insert(tid);
        moved += 1;
    }
    // Thread ids are reused: forget the ones that ended.
    done.retain(|tid| alive.contains(tid));
    Ok(moved)
}

#[cfg(not(target_os = "linux"))]
pub fn idle_threads_named(_prefix: &str, _done: &mut HashSet<i32>) -> std::io::Result<usize> {
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

    #[test]
    fn named_threads_move_to_idle_and_others_stay() {
        let (stop_idle, idle_rx) = std::sync::mpsc::channel();
        let (stop_normal, normal_rx) = std::sync::mpsc::channel();
        let (idle_tid, idle) = named_thread("prio-test-idle-1", idle_rx);
        let (normal_tid, normal) = named_thread("prio-test-normal", normal_rx);

        let mut done = HashSet::new();
        assert_eq!(idle_threads_named("prio-test-idle", &mut done).unwrap(), 1);
        assert_eq!(policy_of(idle_tid), libc::SCHED_IDLE);
        assert_eq!(policy_of(normal_tid), libc::SCHED_OTHER);
        assert_eq!(done, HashSet::from([idle_tid]));
        // Already moved: not again.
        assert_eq!(idle_threads_named("prio-test-idle", &mut done).unwrap(), 0);

        drop(stop_idle);
        idle.join().unwrap();
        drop(stop_normal);
        normal.join().unwrap();
        // Ended threads are forgotten (their ids may be reused).
        idle_threads_named("prio-test-idle", &mut done).unwrap();
        assert!(done.is_empty());
    }
}
