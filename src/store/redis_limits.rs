//! Per-key limit counters in Redis, atomic across nodes (DESIGN §6): GCRA for rpm, a sorted set
//! of expiring leases for concurrency (a dead node's slots free themselves), and cost counters.
//! Every operation falls back to this node's in-process counters when Redis is unreachable.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use relay_filters::key_limits::{
    CostHold, CostLimitHit, CostLimits, LimitStore, MemoryLimits, SlotLease,
};
use relay_filters::now_ms;

use super::redis_sessions::RedisLink;
use crate::metrics::metrics;

/// GCRA over a stored arrival time; returns 0 when allowed, else the milliseconds to wait.
static RPM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local new = tat + interval
if new - now > burst then return new - now - burst end
redis.call('SET', KEYS[1], new, 'PX', new - now + 1000)
return 0",
    )
});

/// Drops expired leases, then takes one if fewer than the limit are held: 1 taken, 0 full.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) - tonumber(ARGV[1]) + 1000)
return 1",
    )
});

/// Reads (daily, total), seeding absent counters with this node's values (from the database).
static SPENT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]) end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[2]) end
return {tonumber(redis.call('GET', KEYS[1])), tonumber(redis.call('GET', KEYS[2]))}",
    )
});

/// Holds to drop and their amounts: the holds of expired leases leave the held sum first.
/// KEYS: daily, total, hold leases (sorted by expiry), hold amounts, held sum.
const DROP_EXPIRED_HOLDS: &str = r"local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])
for _, id in ipairs(gone) do
  local amount = redis.call('HGET', KEYS[4], id)
  if amount then
    redis.call('DECRBY', KEYS[5], amount)
    redis.call('HDEL', KEYS[4], id)
  end
  redis.call('ZREM', KEYS[3], id)
end
";

/// Seeds absent (daily, total) counters with this node's values (from the database).
const SEED_COST: &str = r"if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4]) end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[3]) end
";

/// Admits a request under the cost limits and holds its estimate: 0 held, 1 over the daily
/// limit, 2 over the total limit (+2 when holds in flight counted). ARGV: now, daily seed,
/// total seed, daily TTL, lease expiry, hold id, estimate, daily limit, total limit (-1: none).
static HOLD_COST: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{DROP_EXPIRED_HOLDS}{SEED_COST}local held = tonumber(redis.call('GET', KEYS[5]) or '0')
local inflight = 0
if held > 0 then inflight = 2 end
local daily_limit = tonumber(ARGV[8])
local total_limit = tonumber(ARGV[9])
if daily_limit >= 0 and tonumber(redis.call('GET', KEYS[1])) + held >= daily_limit then return 1 + inflight end
if total_limit >= 0 and tonumber(redis.call('GET', KEYS[2])) + held >= total_limit then return 2 + inflight end
local estimate = tonumber(ARGV[7])
if estimate > 0 then
  local ttl = tonumber(ARGV[5]) - tonumber(ARGV[1]) + 1000
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[6])
  redis.call('HSET', KEYS[4], ARGV[6], estimate)
  redis.call('INCRBY', KEYS[5], estimate)
  for i = 3, 5 do
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
return 0"
    ))
});

/// Books a cost and gives a hold back in one step, seeding absent counters first so no
/// history is lost. ARGV: now, daily seed, total seed, daily TTL, cost, hold id ('' for none).
static SETTLE_COST: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{SEED_COST}if tonumber(ARGV[5]) ~= 0 then
  redis.call('INCRBY', KEYS[1], ARGV[5])
  redis.call('INCRBY', KEYS[2], ARGV[5])
end
if ARGV[6] ~= '' then
  local amount = redis.call('HGET', KEYS[4], ARGV[6])
  if amount then
    redis.call('DECRBY', KEYS[5], amount)
    redis.call('HDEL', KEYS[4], ARGV[6])
  end
  redis.call('ZREM', KEYS[3], ARGV[6])
end
return 1"
    ))
});

/// Daily counters outlive their day by a day (late bookings across midnight still land).
const DAILY_TTL_MS: i64 = 2 * 86_400_000;

/// Limit counters shared by every node through Redis.
pub struct RedisLimits {
    link: Arc<RedisLink>,
    prefix: String,
    memory: Arc<MemoryLimits>,
}

impl RedisLimits {
    /// Counters under `{prefix}limit:...` and `{prefix}cost:apikey:...`; `memory` serves when
    /// Redis cannot be reached and seeds Redis counters that do not exist yet.
    pub fn new(link: Arc<RedisLink>, prefix: &str, memory: Arc<MemoryLimits>) -> Self {
        RedisLimits {
            link,
            prefix: prefix.to_string(),
            memory,
        }
    }

    /// The cost keys of an API key: daily and total spend, then its holds in flight (leases
    /// by expiry, amounts, their sum).
    fn cost_keys(&self, key_id: &str, day: &str) -> [String; 5] {
        let p = &self.prefix;
        [
            format!("{p}cost:apikey:daily:{key_id}:{day}"),
            format!("{p}cost:apikey:total:{key_id}"),
            format!("{p}cost:apikey:holds:{key_id}"),
            format!("{p}cost:apikey:held:{key_id}"),
            format!("{p}cost:apikey:heldsum:{key_id}"),
        ]
    }

    fn fallback(&self, what: &str, e: &dyn std::fmt::Display) {
        metrics().session_store_fallback.inc();
        tracing::debug!(error = %e, "Redis {what} failed, counting in memory");
    }
}

#[async_trait]
impl LimitStore for RedisLimits {
    async fn hit_rpm(&self, key_id: &str, limit: u32, now_ms: i64) -> Result<(), u64> {
        let limit = limit.max(1);
        let interval = 60_000 / i64::from(limit);
        let burst = interval * i64::from(limit);
        let key = format!("{}limit:rpm:{key_id}", self.prefix);
        let res: Result<i64, _> = self
            .link
            .run(|mut c| async move {
                RPM.key(key)
                    .arg(now_ms)
                    .arg(interval)
                    .arg(burst)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match res {
            Ok(0) => Ok(()),
            Ok(wait_ms) => Err((wait_ms.max(1) as u64).div_ceil(1000)),
            Err(e) => {
                // Same rule, this node's view only.
                self.fallback("rate limit", &e);
                self.memory.hit_rpm(key_id, limit, now_ms).await
            }
        }
    }

    async fn acquire_slot(
        &self,
        key_id: &str,
        limit: u32,
        lease_ttl: Duration,
    ) -> Option<SlotLease> {
        let key = format!("{}limit:slots:{key_id}", self.prefix);
        let lease_id = crate::store::new_id();
        let now = now_ms();
        let expires = now + i64::try_from(lease_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let id = lease_id.clone();
        let res: Result<i64, _> = self
            .link
            .run(|mut c| async move {
                ACQUIRE
                    .key(key)
                    .arg(now)
                    .arg(expires)
                    .arg(limit)
                    .arg(id)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match res {
            Ok(1) => Some(SlotLease {
                key_id: key_id.to_string(),
                lease_id,
            }),
            Ok(_) => None,
            Err(e) => {
                self.fallback("concurrency slot", &e);
                self.memory.acquire_slot(key_id, limit, lease_ttl).await
            }
        }
    }

    async fn release_slot(&self, lease: &SlotLease) {
        // A lease taken in memory (Redis was down) has no id.
        if lease.lease_id.is_empty() {
            return self.memory.release_slot(lease).await;
        }
        let key = format!("{}limit:slots:{}", self.prefix, lease.key_id);
        let id = lease.lease_id.clone();
        let res: Result<i64, _> = self
            .link
            .run(|mut c| async move {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(id)
                    .query_async(&mut c)
                    .await
            })
            .await;
        if let Err(e) = res {
            // The lease expires by itself.
            self.fallback("slot release", &e);
        }
    }

    async fn spent(&self, key_id: &str, day: &str) -> (i64, i64) {
        let (seed_day, seed_total) = self.memory.spent(key_id, day).await;
        let [daily, total, ..] = self.cost_keys(key_id, day);
        let res: Result<(i64, i64), _> = self
            .link
            .run(|mut c| async move {
                SPENT
                    .key(daily)
                    .key(total)
                    .arg(seed_day)
                    .arg(seed_total)
                    .arg(DAILY_TTL_MS)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match res {
            Ok(v) => v,
            Err(e) => {
                self.fallback("cost read", &e);
                (seed_day, seed_total)
            }
        }
    }

    async fn hold_cost(
        &self,
        key_id: &str,
        day: &str,
        limits: CostLimits,
        estimate: i64,
        ttl: Duration,
    ) -> Result<CostHold, CostLimitHit> {
        let (seed_day, seed_total) = self.memory.spent(key_id, day).await;
        let keys = self.cost_keys(key_id, day);
        let hold_id = crate::store::new_id();
        let now = now_ms();
        let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2));
        let estimate = estimate.max(0);
        let id = hold_id.clone();
        let res: Result<i64, _> = self
            .link
            .run(|mut c| async move {
                HOLD_COST
                    .key(&keys[..])
                    .arg(now)
                    .arg(seed_day)
                    .arg(seed_total)
                    .arg(DAILY_TTL_MS)
                    .arg(expires)
                    .arg(id)
                    .arg(estimate)
                    .arg(limits.daily.unwrap_or(-1))
                    .arg(limits.total.unwrap_or(-1))
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match res {
            Ok(0) => Ok(CostHold {
                hold_id,
                micro_usd: estimate,
            }),
            Ok(code) => {
                let in_flight = code > 2;
                Err(if code % 2 == 1 {
                    CostLimitHit::Daily { in_flight }
                } else {
                    CostLimitHit::Total { in_flight }
                })
            }
            Err(e) => {
                // This node's view: its spend and its own holds.
                self.fallback("cost hold", &e);
                self.memory
                    .hold_cost(key_id, day, limits, estimate, ttl)
                    .await
            }
        }
    }

    async fn settle_cost(&self, key_id: &str, day: &str, hold: Option<&CostHold>, micro_usd: i64) {
        let (seed_day, seed_total) = self.memory.spent(key_id, day).await;
        // This node's counters always take the cost (they seed Redis and serve without it); a
        // hold kept in memory (Redis was down) is given back there.
        let memory_hold = hold.filter(|h| h.hold_id.is_empty());
        self.memory
            .settle_cost(key_id, day, memory_hold, micro_usd)
            .await;
        let redis_hold = hold
            .filter(|h| !h.hold_id.is_empty())
            .map(|h| h.hold_id.clone())
            .unwrap_or_default();
        if micro_usd == 0 && redis_hold.is_empty() {
            return;
        }
        let keys = self.cost_keys(key_id, day);
        let res: Result<i64, _> = self
            .link
            .run(|mut c| async move {
                SETTLE_COST
                    .key(&keys[..])
                    .arg(now_ms())
                    .arg(seed_day)
                    .arg(seed_total)
                    .arg(DAILY_TTL_MS)
                    .arg(micro_usd)
                    .arg(redis_hold)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        if let Err(e) = res {
            // The hold expires by itself; the cost reaches Redis again from the database
            // seed only once its counters are gone.
            self.fallback("cost booking", &e);
        }
    }
}
