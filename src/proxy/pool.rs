//! Idle upstream connections kept for reuse, keyed by the peer's reuse hash (address, TLS and
//! its settings).
//!
//! Pingora's connector pool spawns a task per released connection that watches it while idle
//! (a timer, a close notification, the connection behind a mutex in an `Arc`) and checks the
//! socket's peer address with a system call on every reuse: per request, a task spawned and
//! woken to end, a timer set and cancelled, and a `getpeername`. Here an idle connection is a
//! socket in a list. It is checked when it goes in and when it comes out (a read that must find
//! nothing: data or a close means it cannot serve), taken newest first (the warmest, and the
//! least likely to have been closed by the upstream), and dropped once its idle time is up: when
//! it would be taken, and by a sweep every few seconds that also closes the connections of
//! upstreams no longer called. The exchange resends a request on a fresh connection when a
//! pooled one turns out closed before any byte of an answer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt;
use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

/// How often idle connections past their time are closed.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

struct Idle {
    stream: Stream,
    until: Instant,
}

#[derive(Default)]
struct Lists {
    by_peer: HashMap<u64, VecDeque<Idle>, foldhash::fast::RandomState>,
    count: usize,
}

/// The idle upstream connections of one relay.
pub struct UpstreamPool {
    lists: Mutex<Lists>,
    max_idle: usize,
    sweeping: AtomicBool,
}

impl UpstreamPool {
    /// A pool holding at most `max_idle` idle connections in all.
    pub fn new(max_idle: usize) -> Arc<Self> {
        Arc::new(UpstreamPool {
            lists: Mutex::new(Lists::default()),
            max_idle,
            sweeping: AtomicBool::new(false),
        })
    }

    fn lists(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection to the peer, if one is still usable.
    pub fn take(&self, key: u64) -> Option<Stream> {
        let now = Instant::now();
        loop {
            let idle = {
                let mut lists = self.lists();
                let list = lists.by_peer.get_mut(&key)?;
                let idle = list.pop_back();
                if list.is_empty() {
                    lists.by_peer.remove(&key);
                }
                let idle = idle?;
                lists.count -= 1;
                idle
            };
            let mut stream = idle.stream;
            if idle.until > now && quiet(&mut stream) {
                return Some(stream);
            }
        }
    }

    /// Keeps a connection that served a request whole, for at most `idle`.
    pub fn put(&self, key: u64, mut stream: Stream, idle: Duration) {
        if idle.is_zero() || !quiet(&mut stream) {
            return;
        }
        let until = Instant::now() + idle;
        let mut evicted = None;
        {
            let mut lists = self.lists();
            if lists.count >= self.max_idle {
                // Full: the oldest connection of this peer makes room, else one of the peer
                // with the most.
                let victim = if lists.by_peer.contains_key(&key) {
                    Some(key)
                } else {
                    lists
                        .by_peer
                        .iter()
                        .max_by_key(|(_, list)| list.len())
                        .map(|(k, _)| *k)
                };
                let Some(victim) = victim else { return };
                let list = lists.by_peer.get_mut(&victim);
                evicted = list.and_then(VecDeque::pop_front);
                if evicted.is_none() {
                    return;
                }
                if lists.by_peer.get(&victim).is_some_and(VecDeque::is_empty) {
                    lists.by_peer.remove(&victim);
                }
            } else {
                lists.count += 1;
            }
            lists
                .by_peer
                .entry(key)
                .or_default()
                .push_back(Idle { stream, until });
        }
        // Closed outside the lock.
        drop(evicted);
    }

    /// Closes the connections whose idle time is up.
    fn sweep(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut lists = self.lists();
            let mut removed = 0;
            lists.by_peer.retain(|_, list| {
                // Idle limits differ (an upstream's `Keep-Alive: timeout`): look at each.
                let mut i = 0;
                while i < list.len() {
                    if list[i].until <= now {
                        if let Some(old) = list.remove(i) {
                            expired.push(old);
                            removed += 1;
                        }
                    } else {
                        i += 1;
                    }
                }
                !list.is_empty()
            });
            lists.count -= removed;
        }
        drop(expired);
    }

    /// Starts the periodic sweep on the current runtime, once; it ends with the pool.
    pub fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.load(Ordering::Relaxed) || self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    /// Idle connections held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lists().count
    }
}

/// Whether an idle connection has nothing to say: a read must not be ready. Data means the
/// upstream broke the protocol, a close or an error means it is gone.
fn quiet(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    // Unconstrained: a ready read must not be reported pending because the task's budget ran
    // out.
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A loopback connection: the pooled end, and the upstream's end.
    async fn pair() -> (Stream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = listener.accept().await.unwrap();
        (
            Box::new(pingora::protocols::l4::stream::Stream::from(ours)),
            theirs,
        )
    }

    /// Lets the runtime's reactor see what arrived on the sockets.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn the_newest_idle_connection_is_taken_first_and_only_for_its_peer() {
        let pool = UpstreamPool::new(10);
        let (first, _a) = pair().await;
        let (second, _b) = pair().await;
        let (first_id, second_id) = (first.id(), second.id());
        pool.put(1, first, MINUTE);
        pool.put(1, second, MINUTE);
        assert_eq!(pool.len(), 2);
        assert!(pool.take(2).is_none());
        assert_eq!(pool.take(1).unwrap().id(), second_id);
        assert_eq!(pool.take(1).unwrap().id(), first_id);
        assert!(pool.take(1).is_none());
        assert_eq!(pool.len(), 0);
    }

    #[tokio::test]
    async fn closed_or_talking_connections_are_not_kept_nor_handed_out() {
        let pool = UpstreamPool::new(10);
        // Closed before it is put back.
        let (s, peer) = pair().await;
        drop(peer);
        settle().await;
        pool.put(1, s, MINUTE);
        assert_eq!(pool.len(), 0);
        // Closed while idle.
        let (s, peer) = pair().await;
        pool.put(1, s, MINUTE);
        assert_eq!(pool.len(), 1);
        drop(peer);
        settle().await;
        assert!(pool.take(1).is_none());
        // Unexpected bytes while idle.
        let (s, mut peer) = pair().await;
        pool.put(1, s, MINUTE);
        peer.write_all(b"x").await.unwrap();
        settle().await;
        assert!(pool.take(1).is_none());
        assert_eq!(pool.len(), 0);
        // A quiet one is kept and handed out.
        let (s, _peer) = pair().await;
        pool.put(1, s, MINUTE);
        settle().await;
        assert!(pool.take(1).is_some());
    }

    #[tokio::test]
    async fn idle_time_is_kept_at_take_and_by_the_sweep() {
        let pool = UpstreamPool::new(10);
        let (a, _pa) = pair().await;
        let (b, _pb) = pair().await;
        let (c, _pc) = pair().await;
        pool.put(1, a, MINUTE);
        pool.put(2, b, Duration::from_millis(1));
        pool.put(3, c, Duration::from_millis(1));
        settle().await;
        pool.sweep();
        assert_eq!(pool.len(), 1, "the expired connections are closed");
        assert!(pool.take(2).is_none());
        let (d, _pd) = pair().await;
        pool.put(4, d, Duration::from_millis(1));
        settle().await;
        assert!(
            pool.take(4).is_none(),
            "past its time when it would be taken"
        );
        assert_eq!(pool.len(), 1);
        assert!(pool.take(1).is_some());
    }

    #[tokio::test]
    async fn a_full_pool_makes_room_with_the_oldest_of_the_peer_or_of_the_fullest() {
        let pool = UpstreamPool::new(2);
        let (a, _pa) = pair().await;
        let (b, _pb) = pair().await;
        let (c, _pc) = pair().await;
        let (d, _pd) = pair().await;
        let (b_id, c_id, d_id) = (b.id(), c.id(), d.id());
        pool.put(1, a, MINUTE);
        pool.put(1, b, MINUTE);
        // Full: peer 1's oldest (a) makes room for its newest.
        pool.put(1, c, MINUTE);
        assert_eq!(pool.len(), 2);
        // Full, and peer 2 has none: the fullest peer's oldest (b) makes room.
        pool.put(2, d, MINUTE);
        assert_eq!(pool.len(), 2);
        assert_eq!(pool.take(2).unwrap().id(), d_id);
        assert_eq!(pool.take(1).unwrap().id(), c_id);
        assert!(pool.take(1).is_none(), "a and b were closed, not {b_id}");
        assert_eq!(pool.len(), 0);
    }
}
