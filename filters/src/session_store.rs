//! Session bindings (session key → account) and the store trait behind them, with the bounded
//! in-memory store used when no Redis is configured (DESIGN §7).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// What a session is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub account_id: String,
    pub account_type: String,
    pub platform: String,
    pub model: Option<String>,
    pub user_id: String,
    pub api_key_id: String,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms.
    pub last_used_at: i64,
    pub request_count: u64,
}

/// A binding with the time it has left (shared: a lookup copies no strings).
#[derive(Debug, Clone)]
pub struct StoredBinding {
    pub binding: Arc<Binding>,
    pub remaining: Duration,
}

/// One page of bindings, for operators.
#[derive(Debug, Default)]
pub struct BindingPage {
    /// Session keys and their bindings.
    pub items: Vec<(String, StoredBinding)>,
    /// Where the next page starts (opaque); `None` after the last page.
    pub next: Option<String>,
}

/// Errors of a session store backend (the caller falls back, never fails the request).
#[derive(Debug, thiserror::Error)]
#[error("session store unavailable: {0}")]
pub struct StoreUnavailable(pub String);

/// Where bindings live: in memory or in Redis.
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// The binding of `key`, if any.
    async fn get(&self, key: &str) -> Result<Option<StoredBinding>, StoreUnavailable>;
    /// Stores `binding` unless one exists; returns the binding that holds afterwards, so two
    /// nodes racing end on one account.
    async fn set_if_absent(
        &self,
        key: &str,
        binding: &Binding,
        ttl: Duration,
    ) -> Result<Binding, StoreUnavailable> {
        // No binding names no account: any live one stays.
        self.replace(key, "", binding, ttl).await
    }
    /// Stores `binding` unless the key holds a live binding to another account than
    /// `replaces`; returns the binding that holds afterwards. Moving a conversation off an
    /// account it can no longer use (and renewing one on the same account) goes through
    /// this, so two nodes doing it at once end on one account, and a renewal read before
    /// another node moved the conversation cannot move it back.
    async fn replace(
        &self,
        key: &str,
        replaces: &str,
        binding: &Binding,
        ttl: Duration,
    ) -> Result<Binding, StoreUnavailable>;
    /// Stores `binding`, replacing any other.
    async fn put(
        &self,
        key: &str,
        binding: &Binding,
        ttl: Duration,
    ) -> Result<(), StoreUnavailable>;
    /// Removes a binding.
    async fn delete(&self, key: &str) -> Result<(), StoreUnavailable>;
    /// About `limit` bindings from `cursor` (from a previous page; `None` for the first), for
    /// operators. Not a snapshot: bindings made or ended meanwhile may or may not show.
    async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<BindingPage, StoreUnavailable>;
    /// Number of bindings held (approximate for Redis).
    fn len_hint(&self) -> u64;
}

#[derive(Clone)]
struct Entry {
    binding: Arc<Binding>,
    expires: Instant,
}

struct PerEntryTtl;

impl moka::Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _k: &String, v: &Entry, now: Instant) -> Option<Duration> {
        Some(v.expires.saturating_duration_since(now))
    }
    fn expire_after_update(
        &self,
        _k: &String,
        v: &Entry,
        now: Instant,
        _d: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.expires.saturating_duration_since(now))
    }
}

/// A cache entry ordered by its key, for listing.
struct HeapEntry(Arc<String>, Entry);

impl PartialEq for HeapEntry {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for HeapEntry {}
impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// Bounded in-process store: LRU eviction at `capacity`, per-entry TTL.
pub struct MemorySessionStore {
    cache: moka::sync::Cache<String, Entry, foldhash::fast::RandomState>,
}

impl MemorySessionStore {
    /// A store holding at most `capacity` bindings.
    pub fn new(capacity: u64) -> Arc<Self> {
        let cache = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .expire_after(PerEntryTtl)
            .build_with_hasher(foldhash::fast::RandomState::default());
        Arc::new(MemorySessionStore { cache })
    }

    /// Keeps a copy of a binding read elsewhere (Redis), for the time it has left there;
    /// nothing is written when this store already holds the same account.
    pub fn mirror(&self, key: &str, found: &StoredBinding) {
        let same = self
            .cache
            .get(key)
            .is_some_and(|e| e.binding.account_id == found.binding.account_id);
        if !same && !found.remaining.is_zero() {
            self.cache.insert(
                key.to_string(),
                Entry {
                    binding: found.binding.clone(),
                    expires: Instant::now() + found.remaining,
                },
            );
        }
    }

    /// Drops expired entries and applies pending evictions (run periodically).
    pub fn purge(&self) {
        self.cache.run_pending_tasks();
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    async fn get(&self, key: &str) -> Result<Option<StoredBinding>, StoreUnavailable> {
        let now = Instant::now();
        Ok(self.cache.get(key).and_then(|e| {
            (e.expires > now).then(|| StoredBinding {
                remaining: e.expires - now,
                binding: e.binding,
            })
        }))
    }

    async fn replace(
        &self,
        key: &str,
        replaces: &str,
        binding: &Binding,
        ttl: Duration,
    ) -> Result<Binding, StoreUnavailable> {
        use moka::ops::compute::Op;
        let now = Instant::now();
        let mut kept = None;
        self.cache
            .entry(key.to_string())
            .and_compute_with(|current| match current {
                Some(e) if e.value().expires > now && e.value().binding.account_id != replaces => {
                    kept = Some(e.value().binding.clone());
                    Op::Nop
                }
                _ => Op::Put(Entry {
                    binding: Arc::new(binding.clone()),
                    expires: now + ttl,
                }),
            });
        Ok(kept.map_or_else(|| binding.clone(), |b| Binding::clone(&b)))
    }

    async fn put(
        &self,
        key: &str,
        binding: &Binding,
        ttl: Duration,
    ) -> Result<(), StoreUnavailable> {
        self.cache.insert(
            key.to_string(),
            Entry {
                binding: Arc::new(binding.clone()),
                expires: Instant::now() + ttl,
            },
        );
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), StoreUnavailable> {
        self.cache.invalidate(key);
        Ok(())
    }

    /// In session key order; the cursor is the last key of the page before.
    async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<BindingPage, StoreUnavailable> {
        // The `limit + 1` smallest keys after the cursor, in a max-heap: one pass over the
        // cache, keys shared (not copied) until they make the page.
        let now = Instant::now();
        let mut heap: std::collections::BinaryHeap<HeapEntry> =
            std::collections::BinaryHeap::with_capacity(limit + 1);
        for (k, e) in self.cache.iter() {
            if e.expires <= now || cursor.is_some_and(|c| k.as_str() <= c) {
                continue;
            }
            if heap.len() <= limit {
                heap.push(HeapEntry(k, e));
            } else if heap.peek().is_some_and(|top| k.as_str() < top.0.as_str()) {
                heap.pop();
                heap.push(HeapEntry(k, e));
            }
        }
        let mut page = heap.into_sorted_vec();
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more {
            page.last().map(|h| String::clone(&h.0))
        } else {
            None
        };
        Ok(BindingPage {
            items: page
                .into_iter()
                .map(|HeapEntry(k, e)| {
                    (
                        String::clone(&k),
                        StoredBinding {
                            remaining: e.expires.saturating_duration_since(now),
                            binding: e.binding,
                        },
                    )
                })
                .collect(),
            next,
        })
    }

    fn len_hint(&self) -> u64 {
        self.cache.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(account: &str) -> Binding {
        Binding {
            account_id: account.into(),
            account_type: "claude".into(),
            platform: "claude".into(),
            model: None,
            user_id: "u".into(),
            api_key_id: "k".into(),
            created_at: 0,
            last_used_at: 0,
            request_count: 1,
        }
    }

    #[tokio::test]
    async fn listed_page_by_page_in_key_order_without_expired_ones() {
        let s = MemorySessionStore::new(100);
        for i in 0..5 {
            s.put(
                &format!("k{i}"),
                &binding(&format!("a{i}")),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        }
        s.put("k9", &binding("gone"), Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let first = s.list(None, 2).await.unwrap();
        let keys = |p: &BindingPage| p.items.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&first), ["k0", "k1"]);
        assert_eq!(first.items[1].1.binding.account_id, "a1");
        assert!(first.items[0].1.remaining > Duration::from_secs(50));
        let second = s.list(first.next.as_deref(), 2).await.unwrap();
        assert_eq!(keys(&second), ["k2", "k3"]);
        let last = s.list(second.next.as_deref(), 2).await.unwrap();
        assert_eq!(keys(&last), ["k4"]);
        assert_eq!(last.next, None);
    }

    #[tokio::test]
    async fn set_if_absent_keeps_the_first() {
        let s = MemorySessionStore::new(100);
        let ttl = Duration::from_secs(60);
        assert_eq!(
            s.set_if_absent("k", &binding("a"), ttl)
                .await
                .unwrap()
                .account_id,
            "a"
        );
        assert_eq!(
            s.set_if_absent("k", &binding("b"), ttl)
                .await
                .unwrap()
                .account_id,
            "a"
        );
        s.put("k", &binding("c"), ttl).await.unwrap();
        assert_eq!(s.get("k").await.unwrap().unwrap().binding.account_id, "c");
        s.delete("k").await.unwrap();
        assert!(s.get("k").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn replace_moves_only_off_the_account_named() {
        let s = MemorySessionStore::new(100);
        let ttl = Duration::from_secs(60);
        let holder = |b: Binding| b.account_id;
        // Nothing bound: stored.
        assert_eq!(
            holder(s.replace("k", "x", &binding("a"), ttl).await.unwrap()),
            "a"
        );
        // Moved off `a`, once: the second mover, also leaving `a`, follows the first.
        assert_eq!(
            holder(s.replace("k", "a", &binding("b"), ttl).await.unwrap()),
            "b"
        );
        assert_eq!(
            holder(s.replace("k", "a", &binding("c"), ttl).await.unwrap()),
            "b"
        );
        // A renewal of `a` read before the move does not move it back.
        assert_eq!(
            holder(s.replace("k", "a", &binding("a"), ttl).await.unwrap()),
            "b"
        );
        assert_eq!(s.get("k").await.unwrap().unwrap().binding.account_id, "b");
        // A renewal on the account that holds it is stored, with the new lifetime.
        let mut renewed = binding("b");
        renewed.request_count = 7;
        s.replace("k", "b", &renewed, Duration::from_secs(600))
            .await
            .unwrap();
        let got = s.get("k").await.unwrap().unwrap();
        assert_eq!(got.binding.request_count, 7);
        assert!(got.remaining > Duration::from_secs(500));
        // An expired binding counts as none.
        s.put("e", &binding("a"), Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            holder(s.replace("e", "x", &binding("d"), ttl).await.unwrap()),
            "d"
        );
    }

    #[tokio::test]
    async fn entries_expire() {
        let s = MemorySessionStore::new(100);
        s.put("k", &binding("a"), Duration::from_millis(30))
            .await
            .unwrap();
        let got = s.get("k").await.unwrap().unwrap();
        assert!(got.remaining <= Duration::from_millis(30));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(s.get("k").await.unwrap().is_none());
        // An expired binding is replaced by set_if_absent.
        assert_eq!(
            s.set_if_absent("k", &binding("b"), Duration::from_secs(5))
                .await
                .unwrap()
                .account_id,
            "b"
        );
    }

    #[tokio::test]
    async fn bounded() {
        let s = MemorySessionStore::new(10);
        for i in 0..100 {
            s.put(&format!("k{i}"), &binding("a"), Duration::from_secs(60))
                .await
                .unwrap();
        }
        s.purge();
        assert!(s.len_hint() <= 10, "{}", s.len_hint());
    }
}
