//! `key_limits`: per-key request rate, concurrency and cost limits (DESIGN §6), enforced through
//! a `LimitStore` so one node counts in process and several nodes count atomically in Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::chain::{Flow, RequestFilter, RequestView};
use crate::context::RequestCtx;
use crate::error::{ErrorKind, Rejection};

/// A concurrency slot held by one request; released at the end of the request, or expiring on
/// its own (Redis) if the node holding it dies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLease {
    pub key_id: String,
    pub lease_id: String,
}

/// Counters behind the limits.
#[async_trait]
pub trait LimitStore: Send + Sync {
    /// Counts one request against `limit` per minute; `Err(seconds)` to wait when over.
    async fn hit_rpm(&self, key_id: &str, limit: u32, now_ms: i64) -> Result<(), u64>;
    /// Takes one of `limit` concurrency slots; `None` when all are taken.
    async fn acquire_slot(
        &self,
        key_id: &str,
        limit: u32,
        lease_ttl: Duration,
    ) -> Option<SlotLease>;
    /// Gives a slot back.
    async fn release_slot(&self, lease: &SlotLease);
    /// Billed micro-USD of the key: (on `day`, in total).
    async fn spent(&self, key_id: &str, day: &str) -> (i64, i64);
    /// Adds a booked cost.
    async fn add_cost(&self, key_id: &str, day: &str, micro_usd: i64);
}

/// UTC day `YYYY-MM-DD` of an epoch-ms time (civil-from-days, no calendar crate needed); a
/// time outside years 0000–9999 counts as today.
pub fn utc_day(ms: i64) -> String {
    const MIN_MS: i64 = -62_167_219_200_000; // 0000-01-01
    const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999
    let ms = if (MIN_MS..=MAX_MS).contains(&ms) {
        ms
    } else {
        crate::now_ms()
    };
    let days = ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // Digit by digit: `format!` with widths cost several times the arithmetic above, once
    // per request. The range check keeps `y` within 0..=9999.
    let mut text = [b'-'; 10];
    for (at, width, value) in [(0, 4, y), (5, 2, m), (8, 2, d)] {
        let mut v = value;
        for i in (at..at + width).rev() {
            text[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    text.iter().map(|&b| char::from(b)).collect()
}

/// In-process counters: exact on one node.
#[derive(Default)]
pub struct MemoryLimits {
    /// GCRA theoretical arrival time per key (epoch ms).
    tat: Mutex<HashMap<String, i64>>,
    slots: Mutex<HashMap<String, u32>>,
    /// (day, spent that day, spent in total) per key.
    cost: Mutex<HashMap<String, (String, i64, i64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl MemoryLimits {
    /// Seeds a key's cost counters (from the database at start-up).
    pub fn seed_cost(&self, key_id: &str, day: &str, today: i64, total: i64) {
        lock(&self.cost).insert(key_id.to_string(), (day.to_string(), today, total));
    }
}

/// GCRA: `limit` requests per minute with a burst of `limit`. Returns the new arrival time or
/// the milliseconds to wait.
pub fn gcra(tat: Option<i64>, limit: u32, now_ms: i64) -> Result<i64, i64> {
    let interval = 60_000 / i64::from(limit.max(1));
    let burst = interval * i64::from(limit.max(1));
    let start = tat.unwrap_or(now_ms).max(now_ms);
    let new_tat = start + interval;
    if new_tat - now_ms > burst {
        Err(new_tat - now_ms - burst)
    } else {
        Ok(new_tat)
    }
}

#[async_trait]
impl LimitStore for MemoryLimits {
    async fn hit_rpm(&self, key_id: &str, limit: u32, now_ms: i64) -> Result<(), u64> {
        let mut tat = lock(&self.tat);
        match gcra(tat.get(key_id).copied(), limit, now_ms) {
            Ok(t) => {
                tat.insert(key_id.to_string(), t);
                Ok(())
            }
            Err(wait_ms) => Err((wait_ms as u64).div_ceil(1000).max(1)),
        }
    }

    async fn acquire_slot(&self, key_id: &str, limit: u32, _ttl: Duration) -> Option<SlotLease> {
        let mut slots = lock(&self.slots);
        let n = slots.entry(key_id.to_string()).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(SlotLease {
            key_id: key_id.to_string(),
            lease_id: String::new(),
        })
    }

    async fn release_slot(&self, lease: &SlotLease) {
        if let Some(n) = lock(&self.slots).get_mut(&lease.key_id) {
            *n = n.saturating_sub(1);
        }
    }

    async fn spent(&self, key_id: &str, day: &str) -> (i64, i64) {
        match lock(&self.cost).get(key_id) {
            Some((d, today, total)) if d == day => (*today, *total),
            Some((_, _, total)) => (0, *total),
            None => (0, 0),
        }
    }

    async fn add_cost(&self, key_id: &str, day: &str, micro_usd: i64) {
        let mut cost = lock(&self.cost);
        let e = cost
            .entry(key_id.to_string())
            .or_insert_with(|| (day.to_string(), 0, 0));
        // Days are `YYYY-MM-DD`: their text order is their time order. A request is booked on
        // the day it started, so a stream begun before midnight ends after today's first
        // bookings: it counts for its own day (gone here) and the total, never resets today.
        match day.cmp(e.0.as_str()) {
            std::cmp::Ordering::Greater => *e = (day.to_string(), micro_usd, e.2),
            std::cmp::Ordering::Equal => e.1 += micro_usd,
            std::cmp::Ordering::Less => {}
        }
        e.2 += micro_usd;
    }
}

/// The filter.
pub struct KeyLimits {
    store: Arc<dyn LimitStore>,
    /// Concurrency leases expire after this even if never released (a dead node).
    lease_ttl: Duration,
}

impl KeyLimits {
    /// A filter counting in `store`.
    pub fn new(store: Arc<dyn LimitStore>, lease_ttl: Duration) -> Self {
        KeyLimits { store, lease_ttl }
    }

    /// The counters (for booking costs and releasing slots at the end of a request).
    pub fn store(&self) -> &Arc<dyn LimitStore> {
        &self.store
    }
}

#[async_trait]
impl RequestFilter for KeyLimits {
    fn name(&self) -> &'static str {
        "key_limits"
    }

    async fn on_request(&self, ctx: &mut RequestCtx, _req: &RequestView<'_>) -> Flow {
        let Some(key) = ctx.auth.as_ref().map(|a| a.key.clone()) else {
            return Flow::Continue;
        };
        if key.daily_cost_limit.is_some() || key.total_cost_limit.is_some() {
            let (today, total) = self.store.spent(&key.id, &utc_day(ctx.started_ms)).await;
            if key.daily_cost_limit.is_some_and(|l| today >= l) {
                return Flow::Reject(Rejection::new(
                    ErrorKind::InsufficientQuota,
                    "this API key has reached its daily cost limit",
                ));
            }
            if key.total_cost_limit.is_some_and(|l| total >= l) {
                return Flow::Reject(Rejection::new(
                    ErrorKind::InsufficientQuota,
                    "this API key has reached its total cost limit",
                ));
            }
        }
        if let Some(rpm) = key.rpm_limit.filter(|r| *r > 0) {
            if let Err(wait) = self.store.hit_rpm(&key.id, rpm, ctx.started_ms).await {
                let mut r = Rejection::new(
                    ErrorKind::RateLimit,
                    format!("this API key allows {rpm} requests per minute"),
                );
                r.retry_after = Some(wait);
                return Flow::Reject(r);
            }
        }
        if let Some(max) = key.max_concurrency.filter(|m| *m > 0) {
            match self.store.acquire_slot(&key.id, max, self.lease_ttl).await {
                Some(lease) => ctx.limits.slot = Some(lease),
                None => {
                    let mut r = Rejection::new(
                        ErrorKind::RateLimit,
                        format!("this API key allows {max} concurrent requests"),
                    );
                    r.retry_after = Some(1);
                    return Flow::Reject(r);
                }
            }
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(1_763_769_600_000), "2025-11-22");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(utc_day(1_763_769_599_999), "2025-11-21");
    }

    #[test]
    fn gcra_allows_burst_then_paces() {
        let mut tat = None;
        for i in 0..60 {
            tat = Some(gcra(tat, 60, 0).unwrap_or_else(|_| panic!("request {i} refused")));
        }
        let wait = gcra(tat, 60, 0).unwrap_err();
        assert_eq!(wait, 1000);
        assert!(gcra(tat, 60, 1000).is_ok());
    }

    #[tokio::test]
    async fn memory_limits() {
        let m = MemoryLimits::default();
        for _ in 0..3 {
            assert!(m.hit_rpm("k", 3, 0).await.is_ok());
        }
        assert_eq!(m.hit_rpm("k", 3, 0).await, Err(20));
        let ttl = Duration::from_secs(60);
        let a = m.acquire_slot("k", 2, ttl).await.unwrap();
        let _b = m.acquire_slot("k", 2, ttl).await.unwrap();
        assert!(m.acquire_slot("k", 2, ttl).await.is_none());
        m.release_slot(&a).await;
        assert!(m.acquire_slot("k", 2, ttl).await.is_some());
        m.add_cost("k", "2026-01-01", 5).await;
        m.add_cost("k", "2026-01-01", 7).await;
        assert_eq!(m.spent("k", "2026-01-01").await, (12, 12));
        assert_eq!(m.spent("k", "2026-01-02").await, (0, 12));
        m.add_cost("k", "2026-01-02", 1).await;
        assert_eq!(m.spent("k", "2026-01-02").await, (1, 13));
        // A stream begun yesterday, booked after today's first requests: today keeps its spend.
        m.add_cost("k", "2026-01-01", 100).await;
        assert_eq!(m.spent("k", "2026-01-02").await, (1, 113));
        m.add_cost("k", "2026-01-02", 2).await;
        assert_eq!(m.spent("k", "2026-01-02").await, (3, 115));
    }
}
