//! Per-key limit counters in Redis, atomic across nodes (DESIGN §6): GCRA for rpm, a sorted set
//! of expiring leases for concurrency (a dead node's slots free themselves), and cost counters.
//! Every operation falls back to this node's in-process counters when Redis is unreachable; a
//! lease or hold Redis may have taken all the same, or one whose release it missed, is given
//! back apart once it answers again.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use relay_filters::key_limits::{
    month_of, CostHold, CostLimitHit, CostLimits, LimitStore, MemoryLimits, SlotLease, Spent,
    USER_SUBJECT,
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
local ttl = tonumber(ARGV[2]) - tonumber(ARGV[1]) + 1000
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1",
    )
});

/// Reads (daily, monthly, total), seeding absent counters with this node's values (from the
/// database). ARGV: as [`SEED_COST`]'s.
static SPENT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{SEED_COST}return {{tonumber(redis.call('GET', KEYS[1])), tonumber(redis.call('GET', KEYS[2])), tonumber(redis.call('GET', KEYS[3]))}}"
    ))
});

/// Drops the holds whose leases ran out, taking their amounts off the held sum; a sum left
/// without holds (keys evicted apart) is reset. KEYS: the cost keys (daily, monthly and total
/// spend, then hold leases by expiry, hold amounts, held sum). ARGV[1]: now.
const DROP_EXPIRED_HOLDS: &str = r"local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[1])
for _, id in ipairs(gone) do
  local amount = redis.call('HGET', KEYS[5], id)
  if amount then
    redis.call('DECRBY', KEYS[6], amount)
    redis.call('HDEL', KEYS[5], id)
  end
  redis.call('ZREM', KEYS[4], id)
end
if redis.call('ZCARD', KEYS[4]) == 0 then redis.call('DEL', KEYS[5], KEYS[6]) end
";

/// Seeds absent (daily, monthly, total) counters with this node's values (from the database).
/// KEYS[1..3]: the counters. ARGV[2..6]: daily, monthly and total seeds, daily and monthly TTL.
const SEED_COST: &str = r"if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[5]) end
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[6]) end
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], ARGV[4]) end
";

/// Admits a request under the cost limits and holds its estimate. Returns 0 held; 1, 2 or 3
/// when the spend alone reaches the daily, monthly or total limit; 4, 5 or 6 when the holds in
/// flight make it reach one. KEYS: the cost keys ([`RedisLimits::cost_keys`]). ARGV: now,
/// daily, monthly and total seeds, daily and monthly TTL, lease expiry, hold id, estimate,
/// daily, monthly and total limits (-1: none).
static HOLD_COST: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{DROP_EXPIRED_HOLDS}{SEED_COST}local held = math.max(0, tonumber(redis.call('GET', KEYS[6]) or '0'))
local spent = {{tonumber(redis.call('GET', KEYS[1])), tonumber(redis.call('GET', KEYS[2])), tonumber(redis.call('GET', KEYS[3]))}}
local limits = {{tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])}}
for pass = 0, 1 do
  for i = 1, 3 do
    if limits[i] >= 0 and spent[i] + held * pass >= limits[i] then return i + 3 * pass end
  end
end
if ARGV[9] ~= '0' then
  local ttl = tonumber(ARGV[7]) - tonumber(ARGV[1]) + 1000
  redis.call('ZADD', KEYS[4], ARGV[7], ARGV[8])
  redis.call('HSET', KEYS[5], ARGV[8], ARGV[9])
  redis.call('INCRBY', KEYS[6], ARGV[9])
  for i = 4, 6 do
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
return 0"
    ))
});

/// Books a cost and gives a hold back in one step, seeding absent counters first so no
/// history is lost. KEYS: the cost keys, then the hold's settlement mark (with a hold). ARGV:
/// now, the seeds and TTLs at 2 to 6 (as [`SEED_COST`]'s), cost at 7, hold id ('' for none)
/// at 8, mark TTL at 9.
/// A hold is settled once: a settlement retried after its answer was lost finds the mark and
/// books nothing more, while one that never ran books in full, also for a hold Redis never
/// took (it was held in a node's memory).
static SETTLE_COST: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        r"if ARGV[8] ~= '' then
  if redis.call('EXISTS', KEYS[7]) == 1 then return 0 end
  local amount = redis.call('HGET', KEYS[5], ARGV[8])
  if amount then
    redis.call('DECRBY', KEYS[6], amount)
    redis.call('HDEL', KEYS[5], ARGV[8])
  end
  redis.call('ZREM', KEYS[4], ARGV[8])
  redis.call('SET', KEYS[7], 1, 'PX', ARGV[9])
end
if ARGV[7] ~= '0' then
  {SEED_COST}  for i = 1, 3 do redis.call('INCRBY', KEYS[i], ARGV[7]) end
end
return 1"
    ))
});

/// Waits between the tries of a settlement Redis did not take (then the hold runs out).
const SETTLE_RETRIES: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(4),
    Duration::from_secs(16),
    Duration::from_secs(64),
];

/// How long a hold's settlement mark is kept: past every retry.
const SETTLED_MARK_TTL_MS: i64 = 10 * 60_000;

/// Waits between the tries of a slot release Redis did not take: doubling from the first to
/// the last, until the lease runs out by itself.
const RELEASE_RETRY_FIRST: Duration = Duration::from_secs(1);
const RELEASE_RETRY_LAST: Duration = Duration::from_secs(64);

/// Settlements, and apart from them slot releases, being retried at most at once; past this a
/// hold or lease is left to run out. Each has its own budget: releases pile up during an
/// outage (every request then ends with one), and must never leave a cost booking unretried.
const MAX_RETRYING: usize = 10_000;

/// Settlements being retried now.
static SETTLEMENTS_RETRYING: AtomicUsize = AtomicUsize::new(0);
/// Slot releases being retried now.
static RELEASES_RETRYING: AtomicUsize = AtomicUsize::new(0);

/// Runs `retries` apart from the request, unless [`MAX_RETRYING`] of its kind (`running`) are
/// running already.
fn spawn_retrying(
    running: &'static AtomicUsize,
    retries: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use std::sync::atomic::Ordering;
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if running.fetch_add(1, Ordering::Relaxed) >= MAX_RETRYING {
        running.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    rt.spawn(async move {
        retries.await;
        running.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Extends a lease or hold still in KEYS[1] (a sorted set by expiry) to ARGV[2], and the
/// lifetime of KEYS[1..] to at least ARGV[3] ms: 1 renewed, 0 gone (given back, or run out).
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
for i = 1, #KEYS do
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return 1",
    )
});

/// Renewals sent to Redis at once.
const RENEWALS_AT_ONCE: usize = 64;

/// A lease or hold this node took in Redis and has not given back.
struct Live {
    /// Its sorted set, then the keys whose lifetime follows it.
    keys: Vec<String>,
    ttl_ms: i64,
    /// When Redis lets it go unless renewed (epoch ms).
    expires_ms: i64,
    /// Gone when no request holds it any more (see [`SlotLease::held`]).
    held: std::sync::Weak<()>,
}

/// The leases and holds this node took in Redis and has not given back, by id. A request
/// running longer than `concurrency_lease_ttl` keeps its slot and its hold: each is renewed
/// once half its life is over, while a request still holds it; one no request holds any more
/// (dropped without its release) is left to run out, as a dead node's would.
struct Renewals {
    link: Arc<RedisLink>,
    live: std::sync::Mutex<std::collections::HashMap<String, Live>>,
    running: std::sync::atomic::AtomicBool,
}

impl Renewals {
    fn live(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Live>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renews every lease and hold still held whose first half of life is over, so a request
    /// running longer than `concurrency_lease_ttl` keeps its slot and its hold; one no request
    /// holds any more is left to run out. Returns how many were renewed.
    async fn renew_due(&self) -> usize {
        let now = now_ms();
        let due: Vec<(String, Vec<String>, i64)> = {
            let mut live = self.live();
            live.retain(|_, l| l.held.strong_count() > 0 && l.expires_ms > now);
            live.iter()
                .filter(|(_, l)| l.expires_ms.saturating_sub(now) < l.ttl_ms / 2)
                .map(|(id, l)| (id.clone(), l.keys.clone(), l.ttl_ms))
                .collect()
        };
        // Many at once on the multiplexed link: thousands of long requests renew within one
        // round trip's time or so, well inside half a lifetime.
        use futures::StreamExt;
        let results: Vec<(String, i64, Result<i64, _>)> = futures::stream::iter(due)
            .map(|(id, keys, ttl_ms)| async move {
                let expires = now.saturating_add(ttl_ms);
                let res: Result<i64, _> = self
                    .link
                    .run(|mut c| {
                        let (keys, id) = (keys.clone(), id.clone());
                        async move {
                            RENEW
                                .key(&keys[..])
                                .arg(id)
                                .arg(expires)
                                .arg(ttl_ms.saturating_add(1000))
                                .invoke_async(&mut c)
                                .await
                        }
                    })
                    .await;
                (id, expires, res)
            })
            .buffer_unordered(RENEWALS_AT_ONCE)
            .collect()
            .await;
        let mut renewed = 0;
        let mut live = self.live();
        for (id, expires, res) in results {
            match res {
                Ok(1) => {
                    if let Some(l) = live.get_mut(&id) {
                        l.expires_ms = expires;
                        renewed += 1;
                    }
                }
                // Given back meanwhile, or run out in Redis: nothing left to renew.
                Ok(_) => {
                    live.remove(&id);
                }
                // Tried again on the next round, while it has life left.
                Err(e) => {
                    metrics().session_store_fallback.inc();
                    tracing::debug!(error = %e, "Redis lease renewal failed, tried again");
                }
            }
        }
        renewed
    }

    /// Runs [`Renewals::renew_due`] every `every`, while the store lives.
    fn spawn(me: &Arc<Self>, every: Duration) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            me.running
                .store(false, std::sync::atomic::Ordering::Release);
            return;
        };
        let me = Arc::downgrade(me);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else {
                    return;
                };
                me.renew_due().await;
            }
        });
    }
}

/// Daily counters outlive their day by a day (late bookings across midnight still land).
const DAILY_TTL_MS: i64 = 2 * 86_400_000;

/// Monthly counters, made at the earliest on their month's first day, outlive its last by a
/// day and more.
const MONTHLY_TTL_MS: i64 = 33 * 86_400_000;

/// Limit counters shared by every node through Redis.
pub struct RedisLimits {
    link: Arc<RedisLink>,
    prefix: String,
    memory: Arc<MemoryLimits>,
    renewals: Arc<Renewals>,
}

impl RedisLimits {
    /// Counters under `{prefix}limit:...` and `{prefix}cost:apikey:...`; `memory` serves when
    /// Redis cannot be reached and seeds Redis counters that do not exist yet.
    pub fn new(link: Arc<RedisLink>, prefix: &str, memory: Arc<MemoryLimits>) -> Self {
        RedisLimits {
            link: link.clone(),
            prefix: prefix.to_string(),
            memory,
            renewals: Arc::new(Renewals {
                link,
                live: std::sync::Mutex::new(std::collections::HashMap::new()),
                running: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Notes a lease or hold Redis took, to renew while it is held; the first one starts the
    /// renewals, every quarter of its lifetime.
    fn track(&self, id: &str, keys: Vec<String>, ttl: Duration, expires_ms: i64, held: &Arc<()>) {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.renewals.live().insert(
            id.to_string(),
            Live {
                keys,
                ttl_ms,
                expires_ms,
                held: Arc::downgrade(held),
            },
        );
        if !self
            .renewals
            .running
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let every = (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(60));
            Renewals::spawn(&self.renewals, every);
        }
    }

    /// Stops renewing `id`; when it is renewed, its expiry now.
    fn untrack(&self, id: &str) -> Option<i64> {
        self.renewals.live().remove(id).map(|l| l.expires_ms)
    }

    /// Renews every lease and hold still held whose first half of life is over (see
    /// [`Renewals`]); returns how many were renewed. Runs by itself; public for tests.
    pub async fn renew_due(&self) -> usize {
        self.renewals.renew_due().await
    }

    /// The cost keys of an API key, or of a user's keys together (a subject made by
    /// `user_subject`): daily, monthly and total spend, then its holds in flight (leases by
    /// expiry, amounts, their sum).
    fn cost_keys(&self, subject: &str, day: &str) -> [String; 6] {
        let p = &self.prefix;
        let (kind, id) = match subject.strip_prefix(USER_SUBJECT) {
            Some(user_id) => ("user", user_id),
            None => ("apikey", subject),
        };
        [
            format!("{p}cost:{kind}:daily:{id}:{day}"),
            format!("{p}cost:{kind}:monthly:{id}:{}", month_of(day)),
            format!("{p}cost:{kind}:total:{id}"),
            format!("{p}cost:{kind}:holds:{id}"),
            format!("{p}cost:{kind}:held:{id}"),
            format!("{p}cost:{kind}:heldsum:{id}"),
        ]
    }

    /// The mark a hold's settlement leaves (see [`SETTLE_COST`]).
    fn settled_mark(&self, hold_id: &str) -> String {
        format!("{}cost:apikey:settled:{hold_id}", self.prefix)
    }

    /// A booking (and hold release) in Redis, owned, to run now or apart.
    fn settlement(
        &self,
        key_id: &str,
        day: &str,
        seeds: Spent,
        hold_id: String,
        micro_usd: i64,
    ) -> Settlement {
        let [daily, monthly, total, holds, held, sum] = self.cost_keys(key_id, day);
        let mark = if hold_id.is_empty() {
            String::new()
        } else {
            self.settled_mark(&hold_id)
        };
        Settlement {
            link: self.link.clone(),
            keys: [daily, monthly, total, holds, held, sum, mark],
            seeds,
            micro_usd,
            hold_id,
        }
    }

    /// The sorted set of an API key's concurrency leases, by expiry.
    fn slots_key(&self, key_id: &str) -> String {
        format!("{}limit:slots:{key_id}", self.prefix)
    }

    /// A lease's release in Redis, owned, to run now or apart.
    fn slot_release(&self, lease: &SlotLease) -> SlotRelease {
        SlotRelease {
            link: self.link.clone(),
            key: self.slots_key(&lease.key_id),
            lease_id: lease.lease_id.clone(),
            expires_ms: lease.expires_ms,
        }
    }

    fn fallback(&self, what: &str, e: &dyn std::fmt::Display) {
        metrics().session_store_fallback.inc();
        tracing::debug!(error = %e, "Redis {what} failed, counting in memory");
    }
}

#[async_trait]
impl LimitStore for RedisLimits {
    async fn hit_rpm(&self, key_id: &str, limit: u32, now_ms: i64) -> Result<(), u64> {
        let (interval, burst) = relay_filters::key_limits::gcra_params(limit);
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
        let key = self.slots_key(key_id);
        let now = now_ms();
        let lease = SlotLease {
            key_id: key_id.to_string(),
            // Made before Redis is asked, so a lease taken there is known by its id also when
            // the answer is lost.
            lease_id: crate::store::new_id(),
            in_memory: false,
            expires_ms: now
                .saturating_add(i64::try_from(lease_ttl.as_millis()).unwrap_or(i64::MAX / 2)),
            held: Arc::new(()),
        };
        let (expires, id) = (lease.expires_ms, lease.lease_id.clone());
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
            Ok(1) => {
                let key = self.slots_key(key_id);
                self.track(&lease.lease_id, vec![key], lease_ttl, expires, &lease.held);
                Some(lease)
            }
            Ok(_) => None,
            Err(e) => {
                // This node's slots only. Redis may have taken the lease all the same (its
                // answer late): the id is kept to give that back as well.
                self.fallback("concurrency slot", &e);
                match self.memory.acquire_slot(key_id, limit, lease_ttl).await {
                    Some(_) => Some(SlotLease {
                        in_memory: true,
                        ..lease
                    }),
                    None => {
                        // Refused here: a lease Redis may have taken goes back apart.
                        self.slot_release(&lease).spawn_retries(false);
                        None
                    }
                }
            }
        }
    }

    async fn release_slot(&self, lease: &SlotLease) {
        if lease.in_memory {
            self.memory.release_slot(lease).await;
        }
        if lease.lease_id.is_empty() {
            return;
        }
        // Also for a lease held in memory: Redis may have taken it before its answer was lost.
        let mut release = self.slot_release(lease);
        if let Some(renewed_until) = self.untrack(&lease.lease_id) {
            release.expires_ms = release.expires_ms.max(renewed_until);
        }
        if let Err(e) = release.run().await {
            self.fallback("slot release", &e);
            // A lease left in Redis would hold its slot on every node until it runs out
            // (`concurrency_lease_ttl`): retried apart while Redis comes back.
            release.spawn_retries(true);
        }
    }

    async fn spent(&self, key_id: &str, day: &str) -> Spent {
        let seeds = self.memory.spent(key_id, day).await;
        let keys = self.cost_keys(key_id, day);
        let res: Result<(i64, i64, i64), _> = self
            .link
            .run(|mut c| async move {
                let mut script = SPENT.key(&keys[..3]);
                script.arg(now_ms());
                with_seeds(&mut script, seeds);
                script.invoke_async(&mut c).await
            })
            .await;
        match res {
            Ok((today, month, total)) => Spent::new(today, month, total),
            Err(e) => {
                self.fallback("cost read", &e);
                seeds
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
        let seeds = self.memory.spent(key_id, day).await;
        let keys = self.cost_keys(key_id, day);
        let hold_id = crate::store::new_id();
        let now = now_ms();
        let expires_ms = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2));
        let estimate = estimate.max(0);
        let id = hold_id.clone();
        let res: Result<i64, _> = self
            .link
            .run(|mut c| async move {
                let mut script = HOLD_COST.key(&keys[..]);
                script.arg(now);
                with_seeds(&mut script, seeds);
                script
                    .arg(expires_ms)
                    .arg(id)
                    .arg(estimate)
                    .arg(limits.daily.unwrap_or(-1))
                    .arg(limits.monthly.unwrap_or(-1))
                    .arg(limits.total.unwrap_or(-1))
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        let hold = CostHold {
            micro_usd: estimate,
            hold_id,
            in_memory: false,
            held: Arc::new(()),
        };
        match res {
            Ok(0) => {
                if estimate != 0 {
                    let [_, _, _, holds, held, sum] = self.cost_keys(key_id, day);
                    let keys = vec![holds, held, sum];
                    self.track(&hold.hold_id, keys, ttl, expires_ms, &hold.held);
                }
                Ok(hold)
            }
            Ok(code) => {
                let in_flight = code > 3;
                Err(match (code - 1) % 3 {
                    0 => CostLimitHit::Daily { in_flight },
                    1 => CostLimitHit::Monthly { in_flight },
                    _ => CostLimitHit::Total { in_flight },
                })
            }
            Err(e) => {
                // This node's view: its spend and its own holds. Redis may have taken the hold
                // all the same (its answer late): the id is kept to give that back as well.
                self.fallback("cost hold", &e);
                let held = self
                    .memory
                    .hold_cost(key_id, day, limits, estimate, ttl)
                    .await;
                match held {
                    Ok(_) => Ok(CostHold {
                        in_memory: true,
                        ..hold
                    }),
                    Err(hit) => {
                        // Refused here: a hold Redis may have taken goes back apart.
                        self.settlement(key_id, day, seeds, hold.hold_id, 0)
                            .spawn_retries(false);
                        Err(hit)
                    }
                }
            }
        }
    }

    async fn settle_cost(&self, key_id: &str, day: &str, hold: Option<&CostHold>, micro_usd: i64) {
        let seeds = self.memory.spent(key_id, day).await;
        // This node's counters always take the cost (they seed Redis and serve without it);
        // a hold kept in memory is given back there.
        self.memory.settle_cost(key_id, day, hold, micro_usd).await;
        let hold_id = hold.map(|h| h.hold_id.clone()).unwrap_or_default();
        self.untrack(&hold_id);
        if micro_usd == 0 && hold_id.is_empty() {
            return;
        }
        let settle = self.settlement(key_id, day, seeds, hold_id, micro_usd);
        if let Err(e) = settle.run().await {
            self.fallback("cost booking", &e);
            // A hold left in Redis would count against the key on every node until it runs
            // out, and the cost would be missing there: retried apart while Redis comes back.
            // A booking without a hold is not retried: without a mark a retry could not tell
            // whether the first one was taken.
            if !settle.hold_id.is_empty() {
                settle.spawn_retries(true);
            }
        }
    }
}

/// Adds [`SEED_COST`]'s arguments from its second on: the seeds and the counters' TTLs.
fn with_seeds(script: &mut redis::ScriptInvocation<'_>, seeds: Spent) {
    script
        .arg(seeds.today)
        .arg(seeds.month)
        .arg(seeds.total)
        .arg(DAILY_TTL_MS)
        .arg(MONTHLY_TTL_MS);
}

/// One request's booking in Redis, owned, to be retried apart from the request.
struct Settlement {
    link: Arc<RedisLink>,
    /// The cost keys, then the hold's settlement mark.
    keys: [String; 7],
    seeds: Spent,
    micro_usd: i64,
    hold_id: String,
}

impl Settlement {
    async fn run(&self) -> Result<i64, relay_filters::session_store::StoreUnavailable> {
        self.link
            .run(|mut c| async move {
                let mut script = SETTLE_COST.key(&self.keys[..]);
                script.arg(now_ms());
                with_seeds(&mut script, self.seeds);
                script
                    .arg(self.micro_usd)
                    .arg(&self.hold_id)
                    .arg(SETTLED_MARK_TTL_MS)
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    /// Tries again apart from the request (`tried`: once already), a bounded number at once.
    fn spawn_retries(self, tried: bool) {
        spawn_retrying(&SETTLEMENTS_RETRYING, async move {
            let first = (!tried).then_some(Duration::ZERO);
            for wait in first.into_iter().chain(SETTLE_RETRIES) {
                tokio::time::sleep(wait).await;
                if self.run().await.is_ok() {
                    return;
                }
            }
            tracing::warn!("a cost hold could not be settled in Redis; it runs out by itself");
        });
    }
}

/// One concurrency lease's release in Redis, owned, to be retried apart from the request.
struct SlotRelease {
    link: Arc<RedisLink>,
    key: String,
    lease_id: String,
    /// When Redis lets the lease go by itself (epoch ms): no try is worth making after it.
    expires_ms: i64,
}

impl SlotRelease {
    /// Gives the lease back; a lease Redis never took, or already gave back, is no error.
    async fn run(&self) -> Result<i64, relay_filters::session_store::StoreUnavailable> {
        self.link
            .run(|mut c| async move {
                redis::cmd("ZREM")
                    .arg(&self.key)
                    .arg(&self.lease_id)
                    .query_async(&mut c)
                    .await
            })
            .await
    }

    /// Tries again apart from the request (`tried`: once already) until Redis takes it or the
    /// lease has run out, a bounded number at once.
    fn spawn_retries(self, tried: bool) {
        spawn_retrying(&RELEASES_RETRYING, async move {
            let mut wait = if tried {
                RELEASE_RETRY_FIRST
            } else {
                Duration::ZERO
            };
            loop {
                let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                if now_ms().saturating_add(wait_ms) >= self.expires_ms {
                    tracing::warn!(
                        "a concurrency slot could not be released in Redis; it runs out by itself"
                    );
                    return;
                }
                tokio::time::sleep(wait).await;
                if self.run().await.is_ok() {
                    return;
                }
                wait = (wait * 2).clamp(RELEASE_RETRY_FIRST, RELEASE_RETRY_LAST);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link to the test Redis and a key prefix of this test's own.
    async fn test_link() -> (Arc<RedisLink>, String) {
        let url = std::env::var("RELAY_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let link = RedisLink::open(&url).expect("redis url");
        assert!(link.ready(Duration::from_secs(5)).await, "Redis reachable");
        (link, format!("relaytest:{}:", crate::store::new_id()))
    }

    /// Removes the keys under a test's prefix.
    async fn remove_keys(c: &mut redis::aio::ConnectionManager, prefix: &str) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(c)
            .await
            .unwrap_or_default();
        let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(c).await;
    }

    /// A hold is settled once, whatever is retried: after a lost answer, after the hold ran
    /// out, and for a hold Redis never took (held in a node's memory).
    #[tokio::test]
    async fn a_retried_settlement_books_once() {
        let (link, prefix) = test_link().await;
        let node = RedisLimits::new(link.clone(), &prefix, Arc::new(MemoryLimits::default()));
        let day = "2026-11-22";
        let limits = CostLimits {
            daily: Some(1000),
            ..CostLimits::default()
        };
        let settlement = |hold: &CostHold, cost| {
            node.settlement("key", day, Spent::default(), hold.hold_id.clone(), cost)
        };
        let ttl = Duration::from_secs(60);

        // Taken, its answer lost, tried again twice.
        let hold = node
            .hold_cost("key", day, limits, 500, ttl)
            .await
            .expect("hold");
        let s = settlement(&hold, 10);
        for _ in 0..3 {
            s.run().await.expect("settled");
        }
        assert_eq!(node.spent("key", day).await, Spent::new(10, 10, 10));
        assert!(
            node.hold_cost("key", day, limits, 990, ttl).await.is_ok(),
            "hold given back"
        );

        // The hold ran out before its request ended: booked once all the same.
        let short = Duration::from_millis(100);
        let expired = node
            .hold_cost("other", day, limits, 5, short)
            .await
            .expect("hold");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = node.settlement("other", day, Spent::default(), expired.hold_id.clone(), 7);
        s.run().await.expect("settled");
        s.run().await.expect("retried");
        assert_eq!(node.spent("other", day).await, Spent::new(7, 7, 7));

        // Held in memory while Redis was away: Redis books it on the first run that reaches it.
        let in_memory = CostHold {
            held: Arc::new(()),
            micro_usd: 5,
            hold_id: crate::store::new_id(),
            in_memory: true,
        };
        let s = node.settlement("third", day, Spent::default(), in_memory.hold_id.clone(), 9);
        s.run().await.expect("settled");
        s.run().await.expect("retried");
        assert_eq!(node.spent("third", day).await, Spent::new(9, 9, 9));

        let mut c = link
            .run(|c| async move { Ok(c) })
            .await
            .expect("connection");
        remove_keys(&mut c, &prefix).await;
    }

    /// A user's spend over its keys is counted under `cost:user:`, apart from its keys' own
    /// counters, and its limit refuses on every node.
    #[tokio::test]
    async fn a_users_spend_has_counters_of_its_own() {
        let (link, prefix) = test_link().await;
        let node = |link: &Arc<RedisLink>| {
            RedisLimits::new(link.clone(), &prefix, Arc::new(MemoryLimits::default()))
        };
        let (a, b) = (node(&link), node(&link));
        let day = "2026-11-22";
        let user = relay_filters::key_limits::user_subject("u1");
        let ttl = Duration::from_secs(60);
        a.settle_cost("k1", day, None, 40).await;
        a.settle_cost(&user, day, None, 40).await;
        b.settle_cost(&user, day, None, 60).await;
        assert_eq!(b.spent(&user, day).await, Spent::new(100, 100, 100));
        assert_eq!(b.spent("k1", day).await, Spent::new(40, 40, 40));
        assert_eq!(
            b.spent("u1", day).await,
            Spent::default(),
            "not a key's counter"
        );
        let limits = CostLimits {
            total: Some(100),
            ..CostLimits::default()
        };
        assert_eq!(
            a.hold_cost(&user, day, limits, 1, ttl).await,
            Err(CostLimitHit::Total { in_flight: false })
        );
        let mut c = link
            .run(|c| async move { Ok(c) })
            .await
            .expect("connection");
        let total: i64 = redis::cmd("GET")
            .arg(format!("{prefix}cost:user:total:u1"))
            .query_async(&mut c)
            .await
            .expect("the user's total");
        assert_eq!(total, 100);
        remove_keys(&mut c, &prefix).await;
    }

    /// A month's counter spans its days on every node, its limit refuses on every node, and a
    /// new month starts from nothing.
    #[tokio::test]
    async fn a_month_counts_its_days_on_every_node() {
        let (link, prefix) = test_link().await;
        let node = |link: &Arc<RedisLink>| {
            RedisLimits::new(link.clone(), &prefix, Arc::new(MemoryLimits::default()))
        };
        let (a, b) = (node(&link), node(&link));
        let ttl = Duration::from_secs(60);
        let (day, next) = ("2026-11-29", "2026-11-30");
        a.settle_cost("k", day, None, 30).await;
        b.settle_cost("k", next, None, 50).await;
        assert_eq!(a.spent("k", next).await, Spent::new(50, 80, 80));
        let limits = CostLimits {
            monthly: Some(100),
            ..CostLimits::default()
        };
        let hold = b
            .hold_cost("k", next, limits, 20, ttl)
            .await
            .expect("under the limit");
        assert_eq!(
            a.hold_cost("k", next, limits, 5, ttl).await,
            Err(CostLimitHit::Monthly { in_flight: true })
        );
        b.settle_cost("k", next, Some(&hold), 20).await;
        assert_eq!(
            a.hold_cost("k", next, limits, 0, ttl).await,
            Err(CostLimitHit::Monthly { in_flight: false })
        );
        // December.
        let december = "2026-12-01";
        let hold = a
            .hold_cost("k", december, limits, 5, ttl)
            .await
            .expect("a new month");
        a.settle_cost("k", december, Some(&hold), 5).await;
        assert_eq!(b.spent("k", december).await, Spent::new(5, 5, 105));

        let mut c = link
            .run(|c| async move { Ok(c) })
            .await
            .expect("connection");
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{prefix}cost:apikey:monthly:k:2026-12"))
            .query_async(&mut c)
            .await
            .expect("the month's counter");
        assert!(pttl > 32 * 86_400_000, "kept past its month: {pttl} ms");
        remove_keys(&mut c, &prefix).await;
    }
}
