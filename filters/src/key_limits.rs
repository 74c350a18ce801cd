//! `key_limits`: per-key request rate, concurrency and cost limits (DESIGN §6), and the cost
//! limits of a user over all its keys, enforced through a `LimitStore` so one node counts in
//! process and several nodes count atomically in Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::chain::{Flow, RequestFilter, RequestView};
use crate::context::RequestCtx;
use crate::cost::{estimate_cost_at, PriceSource};
use crate::error::{ErrorKind, Rejection};
use crate::lock;
use crate::request_body::output_cap;

/// A concurrency slot held by one request; released at the end of the request, or expiring on
/// its own (Redis) if the node holding it dies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotLease {
    pub key_id: String,
    /// The lease's id in a shared store (empty: none was asked for). Kept also when the store
    /// did not answer in time, since it may have taken the lease all the same.
    pub lease_id: String,
    /// Held in this node's memory (there was no shared store, or it did not answer).
    pub in_memory: bool,
    /// When the shared store lets the lease go by itself (epoch ms; 0: none was asked for).
    pub expires_ms: i64,
    /// Shared by every copy of the lease: a store renewing the leases of long requests renews
    /// one only while something still holds it, so a lease dropped without its release runs
    /// out as it would on a dead node.
    pub held: std::sync::Arc<()>,
}

/// A key's cost limits in micro-USD (`None`: no such limit): per UTC day, per UTC calendar
/// month, in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CostLimits {
    pub daily: Option<i64>,
    pub monthly: Option<i64>,
    pub total: Option<i64>,
}

/// Which cost limit refused a request, and whether the key's requests in flight made it so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostLimitHit {
    Daily { in_flight: bool },
    Monthly { in_flight: bool },
    Total { in_flight: bool },
}

/// Billed micro-USD of a limit subject: on one UTC day, in that day's month, in total.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    pub today: i64,
    pub month: i64,
    pub total: i64,
}

impl Spent {
    pub const fn new(today: i64, month: i64, total: i64) -> Self {
        Spent {
            today,
            month,
            total,
        }
    }
}

/// The month `YYYY-MM` of a day `YYYY-MM-DD`.
pub fn month_of(day: &str) -> &str {
    day.get(..7).unwrap_or(day)
}

/// The first day `YYYY-MM-01` of a day's month.
pub fn month_start(day: &str) -> String {
    format!("{}-01", month_of(day))
}

/// The estimated cost a request holds against its key's cost limits while it is in flight,
/// given back when its real cost is booked, or expiring on its own (Redis) if the node holding
/// it dies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CostHold {
    pub micro_usd: i64,
    /// The hold's id in a shared store (empty: none was asked for). Kept also when the store
    /// did not answer in time, since it may have taken the hold all the same.
    pub hold_id: String,
    /// Held in this node's memory (there was no shared store, or it did not answer).
    pub in_memory: bool,
    /// As [`SlotLease::held`].
    pub held: std::sync::Arc<()>,
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
    /// Billed micro-USD of the key: on `day`, in its month, in total.
    async fn spent(&self, key_id: &str, day: &str) -> Spent;
    /// Admits a request under its key's cost limits, atomically: refused when what the key
    /// spent plus what its requests in flight hold reaches a limit; else `estimate` is held
    /// until [`LimitStore::settle_cost`] (at most `ttl`).
    async fn hold_cost(
        &self,
        key_id: &str,
        day: &str,
        limits: CostLimits,
        estimate: i64,
        ttl: Duration,
    ) -> Result<CostHold, CostLimitHit>;
    /// Books a request's cost on `day` and gives its hold back, in one step.
    async fn settle_cost(&self, key_id: &str, day: &str, hold: Option<&CostHold>, micro_usd: i64);
}

/// What a `LimitStore` counts a user's spend over all its keys under (beside its keys' ids).
pub const USER_SUBJECT: &str = "user:";

/// What a `LimitStore` counts a key's drained answers under (beside its keys' ids).
pub const DRAIN_SUBJECT: &str = "drain:";

/// The `LimitStore` subject of a user's keys together.
pub fn user_subject(user_id: &str) -> String {
    format!("{USER_SUBJECT}{user_id}")
}

/// Whose cost limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whose {
    Key,
    User,
}

/// The refusal of a request over a cost limit, named for the refusal metric.
fn over_cost_limit(hit: CostLimitHit, whose: Whose) -> Rejection {
    let (which, limit, in_flight) = match hit {
        CostLimitHit::Daily { in_flight } => ("daily", "daily_cost", in_flight),
        CostLimitHit::Monthly { in_flight } => ("monthly", "monthly_cost", in_flight),
        CostLimitHit::Total { in_flight } => ("total", "total_cost", in_flight),
    };
    let (subject, its, owner) = match whose {
        Whose::Key => ("this API key", "its", "key"),
        Whose::User => ("the user of this API key", "the user's", "user"),
    };
    if in_flight {
        // Passing: the room comes back as those requests end. A rate limit, which clients
        // retry on their own.
        let requests = match whose {
            Whose::Key => "this API key's requests",
            Whose::User => "the requests of this API key's user",
        };
        let mut r = Rejection::new(
            ErrorKind::RateLimit,
            format!(
                "{requests} in flight may cost what is left of {its} {which} cost limit; retry \
                 when they end"
            ),
        );
        r.retry_after = Some(IN_FLIGHT_RETRY_SECS);
        r.of_limit(limit, owner)
    } else {
        Rejection::new(
            ErrorKind::InsufficientQuota,
            match hit {
                CostLimitHit::Daily { .. } => {
                    format!("{subject} has reached {its} daily cost limit; it resets at 00:00 UTC")
                }
                CostLimitHit::Monthly { .. } => format!(
                    "{subject} has reached {its} monthly cost limit; it resets on the first of \
                     next month at 00:00 UTC"
                ),
                CostLimitHit::Total { .. } => {
                    format!("{subject} has reached {its} total cost limit")
                }
            },
        )
        .of_limit(limit, owner)
    }
}

/// `Retry-After` of a refusal that the key's requests in flight caused.
const IN_FLIGHT_RETRY_SECS: u64 = 5;

/// Which limit `spent` alone, else `spent` plus `held`, reaches. A limit the spend alone
/// reaches is named first: that refusal lasts, whatever ends in flight.
fn cost_limit_hit(limits: CostLimits, spent: Spent, held: i64) -> Option<CostLimitHit> {
    let held = held.max(0);
    type Check = (Option<i64>, i64, fn(bool) -> CostLimitHit);
    let checks: [Check; 3] = [
        (limits.daily, spent.today, |in_flight| CostLimitHit::Daily {
            in_flight,
        }),
        (limits.monthly, spent.month, |in_flight| {
            CostLimitHit::Monthly { in_flight }
        }),
        (limits.total, spent.total, |in_flight| CostLimitHit::Total {
            in_flight,
        }),
    ];
    [(0, false), (held, true)]
        .into_iter()
        .find_map(|(held, in_flight)| {
            checks.iter().find_map(|&(limit, spent, hit)| {
                limit
                    .is_some_and(|l| spent.saturating_add(held) >= l)
                    .then(|| hit(in_flight))
            })
        })
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

/// A subject's spend as of the latest day it was counted on.
#[derive(Debug, Clone, Default)]
struct Counted {
    day: String,
    spent: Spent,
}

impl Counted {
    fn new(day: &str) -> Self {
        Counted {
            day: day.to_string(),
            spent: Spent::default(),
        }
    }
}

/// Counters by subject (a key's id, or a user's behind its prefix: the relay's own ids), hashed
/// fast.
type BySubject<V> = HashMap<String, V, foldhash::fast::RandomState>;

/// In-process counters: exact on one node.
#[derive(Default)]
pub struct MemoryLimits {
    /// GCRA theoretical arrival time per key (epoch ms).
    tat: Mutex<BySubject<i64>>,
    slots: Mutex<BySubject<u32>>,
    /// The latest day counted, and the spend then, per key.
    cost: Mutex<BySubject<Counted>>,
    /// Estimated cost held by requests in flight, per key.
    held: Mutex<BySubject<i64>>,
}

impl MemoryLimits {
    /// Seeds a key's cost counters (from the database at start-up).
    pub fn seed_cost(&self, key_id: &str, day: &str, spent: Spent) {
        lock(&self.cost).insert(
            key_id.to_string(),
            Counted {
                day: day.to_string(),
                spent,
            },
        );
    }

    /// Raises a key's cost counters to what the database holds (booked by every node), each
    /// kept where this node counted more (its bookings not stored yet).
    pub fn raise_cost(&self, key_id: &str, day: &str, stored: Spent) {
        let mut cost = lock(&self.cost);
        let e = cost
            .entry(key_id.to_string())
            .or_insert_with(|| Counted::new(day));
        let same_month = month_of(day) == month_of(&e.day);
        let total = e.spent.total.max(stored.total);
        match day.cmp(e.day.as_str()) {
            std::cmp::Ordering::Greater => {
                let month = if same_month {
                    e.spent.month.max(stored.month)
                } else {
                    stored.month
                };
                *e = Counted {
                    day: day.to_string(),
                    spent: Spent::new(stored.today, month, total),
                };
            }
            std::cmp::Ordering::Equal => {
                e.spent = Spent::new(
                    e.spent.today.max(stored.today),
                    e.spent.month.max(stored.month),
                    total,
                );
            }
            std::cmp::Ordering::Less => {
                if same_month {
                    e.spent.month = e.spent.month.max(stored.month);
                }
                e.spent.total = total;
            }
        }
    }
}

/// GCRA: `limit` requests per minute with a burst of `limit`. Returns the new arrival time or
/// the milliseconds to wait.
pub fn gcra(tat: Option<i64>, limit: u32, now_ms: i64) -> Result<i64, i64> {
    let (interval, burst) = gcra_params(limit);
    let start = tat.unwrap_or(now_ms).max(now_ms);
    let new_tat = start + interval;
    if new_tat - now_ms > burst {
        Err(new_tat - now_ms - burst)
    } else {
        Ok(new_tat)
    }
}

/// GCRA's emission interval and burst tolerance (milliseconds) for `limit` requests per
/// minute. The interval is at least a millisecond: past 60 000 a minute (which the admin API
/// refuses) it would round to 0 and let every request through; such a limit is held to
/// 60 000 a minute instead.
pub fn gcra_params(limit: u32) -> (i64, i64) {
    let limit = i64::from(limit.max(1));
    let interval = (60_000 / limit).max(1);
    (interval, interval * limit)
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
            in_memory: true,
            ..SlotLease::default()
        })
    }

    async fn release_slot(&self, lease: &SlotLease) {
        if let Some(n) = lock(&self.slots).get_mut(&lease.key_id) {
            *n = n.saturating_sub(1);
        }
    }

    async fn spent(&self, key_id: &str, day: &str) -> Spent {
        self.spent_now(key_id, day)
    }

    async fn hold_cost(
        &self,
        key_id: &str,
        day: &str,
        limits: CostLimits,
        estimate: i64,
        _ttl: Duration,
    ) -> Result<CostHold, CostLimitHit> {
        // Held while deciding: two requests of one key never both take the last room, and a
        // settling request's cost is booked before its hold can go (it may count twice for a
        // moment, never zero times).
        let mut held = lock(&self.held);
        let spent = self.spent_now(key_id, day);
        let now_held = held.get(key_id).copied().unwrap_or(0);
        if let Some(hit) = cost_limit_hit(limits, spent, now_held) {
            return Err(hit);
        }
        let estimate = estimate.max(0);
        if estimate > 0 {
            held.insert(key_id.to_string(), now_held.saturating_add(estimate));
        }
        Ok(CostHold {
            micro_usd: estimate,
            in_memory: true,
            ..CostHold::default()
        })
    }

    async fn settle_cost(&self, key_id: &str, day: &str, hold: Option<&CostHold>, micro_usd: i64) {
        // Booked before the hold goes, so no moment counts the request as neither.
        if micro_usd != 0 {
            self.book_cost(key_id, day, micro_usd);
        }
        if let Some(h) = hold.filter(|h| h.in_memory && h.micro_usd > 0) {
            let mut held = lock(&self.held);
            if let Some(n) = held.get_mut(key_id) {
                *n = n.saturating_sub(h.micro_usd);
                if *n <= 0 {
                    held.remove(key_id);
                }
            }
        }
    }
}

impl MemoryLimits {
    fn spent_now(&self, key_id: &str, day: &str) -> Spent {
        match lock(&self.cost).get(key_id) {
            Some(c) if c.day == day => c.spent,
            Some(c) if month_of(&c.day) == month_of(day) => {
                Spent::new(0, c.spent.month, c.spent.total)
            }
            Some(c) => Spent::new(0, 0, c.spent.total),
            None => Spent::default(),
        }
    }

    /// Adds a booked cost to the key's counters.
    fn book_cost(&self, key_id: &str, day: &str, micro_usd: i64) {
        let mut cost = lock(&self.cost);
        let e = cost
            .entry(key_id.to_string())
            .or_insert_with(|| Counted::new(day));
        // Days are `YYYY-MM-DD`: their text order is their time order. A request is booked on
        // the day it started, so a stream begun before midnight ends after today's first
        // bookings: it counts for its own day (gone here), its month while that is the one
        // counted, and the total; it never resets today.
        let same_month = month_of(day) == month_of(&e.day);
        match day.cmp(e.day.as_str()) {
            std::cmp::Ordering::Greater => {
                e.day = day.to_string();
                e.spent.today = micro_usd;
                e.spent.month = if same_month {
                    e.spent.month + micro_usd
                } else {
                    micro_usd
                };
            }
            std::cmp::Ordering::Equal => {
                e.spent.today += micro_usd;
                e.spent.month += micro_usd;
            }
            std::cmp::Ordering::Less if same_month => e.spent.month += micro_usd,
            std::cmp::Ordering::Less => {}
        }
        e.spent.total += micro_usd;
    }
}

/// The filter.
pub struct KeyLimits {
    store: Arc<dyn LimitStore>,
    /// Concurrency leases and cost holds expire after this even if never given back (a dead
    /// node).
    lease_ttl: Duration,
    /// Prices for the cost a request holds while in flight.
    prices: Arc<dyn PriceSource>,
    /// The accounts, whose model maps price a hold for a model with no price of its own.
    accounts: Option<Arc<dyn crate::accounts::AccountDirectory>>,
}

impl KeyLimits {
    /// A filter counting in `store`.
    pub fn new(
        store: Arc<dyn LimitStore>,
        lease_ttl: Duration,
        prices: Arc<dyn PriceSource>,
    ) -> Self {
        KeyLimits {
            store,
            lease_ttl,
            prices,
            accounts: None,
        }
    }

    /// Prices holds for a model with no price of its own (an alias) at the models the
    /// accounts map it to, the dearest of them: the upstream bills those.
    pub fn with_accounts(mut self, accounts: Arc<dyn crate::accounts::AccountDirectory>) -> Self {
        self.accounts = Some(accounts);
        self
    }

    /// Whether the request's model has a price, of its own or at a model an account that could
    /// serve the request maps it to: a model without one is billed nothing, so a cost limit
    /// could not hold it.
    fn priced(&self, ctx: &RequestCtx) -> bool {
        let Some(model) = ctx.requested_model() else {
            return true;
        };
        let table = self.prices.table();
        let at = ctx.started_ms;
        table.get_at(model, at).is_some()
            || self.accounts.as_ref().is_some_and(|accounts| {
                accounts
                    .accounts()
                    .iter()
                    .filter(|a| a.could_serve(&ctx.demand()))
                    .filter_map(|a| a.model_map.get(model))
                    .any(|mapped| table.get_at(mapped, at).is_some())
            })
    }

    /// What a request may cost at most, as its hold: at its model's price, else at the
    /// dearest model an account maps it to.
    fn estimate(&self, ctx: &RequestCtx, req: &RequestView<'_>, price_rate: i64) -> i64 {
        let table = self.prices.table();
        let cap = output_cap(req.body);
        let tier = req.parsed.service_tier;
        let at = |model: Option<&str>| {
            estimate_cost_at(
                &table,
                model,
                req.body.len(),
                cap,
                tier,
                ctx.started_ms,
                price_rate,
            )
        };
        let requested = ctx.requested_model();
        let own = at(requested);
        match (requested, &self.accounts) {
            (Some(model), Some(accounts))
                if own == 0 && table.get_at(model, ctx.started_ms).is_none() =>
            {
                accounts
                    .accounts()
                    .iter()
                    .filter_map(|a| a.model_map.get(model))
                    .map(|mapped| at(Some(mapped)))
                    .max()
                    .unwrap_or(0)
            }
            _ => own,
        }
    }

    /// The counters (for booking costs and releasing slots at the end of a request).
    pub fn store(&self) -> &Arc<dyn LimitStore> {
        &self.store
    }

    /// For a request whose client left while the relay drains its answer: trades its
    /// concurrency slot for one of as many slots for drained answers, so the client's next
    /// request is not refused while the upstream still works on the last one, and a key keeps
    /// at most twice its cap at the upstream. The slot is kept when those are all taken.
    pub async fn hand_over_to_drain(&self, limits: &mut crate::context::LimitsInfo, max: u32) {
        let Some(slot) = limits.slot.as_ref() else {
            return;
        };
        let subject = format!("{DRAIN_SUBJECT}{}", slot.key_id);
        if let Some(drain) = self.store.acquire_slot(&subject, max, self.lease_ttl).await {
            // Held by the request before the key's slot goes, so a request dropped at the
            // await still gives back whichever it holds.
            let slot = limits.slot.take();
            limits.drain_slot = Some(drain);
            if let Some(slot) = slot {
                self.store.release_slot(&slot).await;
            }
        }
    }
}

#[async_trait]
impl RequestFilter for KeyLimits {
    fn name(&self) -> &'static str {
        "key_limits"
    }

    async fn on_request(&self, ctx: &mut RequestCtx, req: &RequestView<'_>) -> Flow {
        let Some(key) = ctx.auth.as_ref().map(|a| a.key.clone()) else {
            return Flow::Continue;
        };
        let limits = CostLimits {
            daily: key.daily_cost_limit,
            monthly: key.monthly_cost_limit,
            total: key.total_cost_limit,
        };
        let user_limits = CostLimits {
            daily: key.user_daily_cost_limit,
            monthly: key.user_monthly_cost_limit,
            total: key.user_total_cost_limit,
        };
        if limits != CostLimits::default() || user_limits != CostLimits::default() {
            // A model without a price would be served free of any cost limit: refused for keys
            // and users that have one (others are served and their records flagged unpriced).
            if ctx.route.billed && !self.priced(ctx) {
                let (whose, owner) = if limits != CostLimits::default() {
                    ("this API key", "key")
                } else {
                    ("this API key's user", "user")
                };
                return Flow::Reject(
                    Rejection::new(
                        ErrorKind::Permission,
                        format!(
                            "model {} has no price on this relay and {whose} has a cost \
                             limit; an administrator can price it",
                            ctx.requested_model().unwrap_or_default()
                        ),
                    )
                    .of_limit("unpriced_model", owner),
                );
            }
            // Requests in flight count with what they may cost: without, a key just under its
            // limit could start any number of requests at once.
            let estimate = if ctx.route.billed {
                self.estimate(ctx, req, key.price_rate)
            } else {
                0
            };
            let day = utc_day(ctx.started_ms);
            // First: a key whose spend reached its limit is told so (402, lasting) rather than
            // to slow down. The holds are given back when the request is booked, also when a
            // later check or filter refuses it.
            if limits != CostLimits::default() {
                match (self.store)
                    .hold_cost(&key.id, &day, limits, estimate, self.lease_ttl)
                    .await
                {
                    Ok(hold) => ctx.limits.cost = Some(hold),
                    Err(hit) => return Flow::Reject(over_cost_limit(hit, Whose::Key)),
                }
            }
            if user_limits != CostLimits::default() {
                let subject = user_subject(&key.user_id);
                match (self.store)
                    .hold_cost(&subject, &day, user_limits, estimate, self.lease_ttl)
                    .await
                {
                    Ok(hold) => ctx.limits.user_cost = Some(hold),
                    Err(hit) => return Flow::Reject(over_cost_limit(hit, Whose::User)),
                }
            }
        }
        // The concurrency slot before the rate: a request refused for want of a slot (which
        // clients retry within a second) does not use up the key's requests per minute.
        if let Some(max) = key.max_concurrency.filter(|m| *m > 0) {
            match self.store.acquire_slot(&key.id, max, self.lease_ttl).await {
                Some(lease) => ctx.limits.slot = Some(lease),
                None => {
                    let mut r = Rejection::new(
                        ErrorKind::RateLimit,
                        format!("this API key allows {max} concurrent requests"),
                    )
                    .of_limit("concurrency", "key");
                    r.retry_after = Some(1);
                    return Flow::Reject(r);
                }
            }
        }
        if let Some(rpm) = key.rpm_limit.filter(|r| *r > 0) {
            if let Err(wait) = self.store.hit_rpm(&key.id, rpm, ctx.started_ms).await {
                let mut r = Rejection::new(
                    ErrorKind::RateLimit,
                    format!("this API key allows {rpm} requests per minute"),
                )
                .of_limit("rpm", "key");
                r.retry_after = Some(wait);
                return Flow::Reject(r);
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
        // Past 60 000 a minute the limit still holds: a burst of the limit, then one a
        // millisecond.
        let mut tat = None;
        for i in 0..100_000 {
            tat = Some(gcra(tat, 100_000, 0).unwrap_or_else(|_| panic!("request {i} refused")));
        }
        assert!(gcra(tat, 100_000, 0).is_err());
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
        m.settle_cost("k", "2026-01-01", None, 5).await;
        m.settle_cost("k", "2026-01-01", None, 7).await;
        assert_eq!(m.spent("k", "2026-01-01").await, Spent::new(12, 12, 12));
        assert_eq!(m.spent("k", "2026-01-02").await, Spent::new(0, 12, 12));
        m.settle_cost("k", "2026-01-02", None, 1).await;
        assert_eq!(m.spent("k", "2026-01-02").await, Spent::new(1, 13, 13));
        // A stream begun yesterday, booked after today's first requests: today keeps its spend.
        m.settle_cost("k", "2026-01-01", None, 100).await;
        assert_eq!(m.spent("k", "2026-01-02").await, Spent::new(1, 113, 113));
        m.settle_cost("k", "2026-01-02", None, 2).await;
        assert_eq!(m.spent("k", "2026-01-02").await, Spent::new(3, 115, 115));
        // A new month starts from nothing; the total goes on.
        assert_eq!(m.spent("k", "2026-02-01").await, Spent::new(0, 0, 115));
        m.settle_cost("k", "2026-02-01", None, 4).await;
        assert_eq!(m.spent("k", "2026-02-01").await, Spent::new(4, 4, 115 + 4));
        // A stream begun on the last day of January, booked in February: January's only.
        m.settle_cost("k", "2026-01-31", None, 50).await;
        assert_eq!(m.spent("k", "2026-02-01").await, Spent::new(4, 4, 169));
        m.settle_cost("k", "2026-02-02", None, 1).await;
        assert_eq!(m.spent("k", "2026-02-02").await, Spent::new(1, 5, 170));
    }

    #[tokio::test]
    async fn stored_spend_raises_counters_and_never_lowers_them() {
        let m = MemoryLimits::default();
        let day = "2026-01-02";
        m.settle_cost("k", day, None, 50).await;
        // Another node's bookings, stored: this node's counters rise to them.
        m.raise_cost("k", day, Spent::new(80, 120, 300));
        assert_eq!(m.spent("k", day).await, Spent::new(80, 120, 300));
        // Stored spend that lags this node's own bookings lowers nothing.
        m.settle_cost("k", day, None, 10).await;
        m.raise_cost("k", day, Spent::new(80, 120, 300));
        assert_eq!(m.spent("k", day).await, Spent::new(90, 130, 310));
        // A new day: today from the store, the month and the total the larger.
        m.raise_cost("k", "2026-01-03", Spent::new(5, 125, 305));
        assert_eq!(m.spent("k", "2026-01-03").await, Spent::new(5, 130, 310));
        // A day past in this month: the month and the total may rise.
        m.raise_cost("k", day, Spent::new(500, 600, 700));
        assert_eq!(m.spent("k", "2026-01-03").await, Spent::new(5, 600, 700));
        // A new month: its spend from the store.
        m.raise_cost("k", "2026-02-01", Spent::new(3, 3, 703));
        assert_eq!(m.spent("k", "2026-02-01").await, Spent::new(3, 3, 703));
        // A day of the month past: only the total may rise.
        m.raise_cost("k", "2026-01-31", Spent::new(9, 900, 800));
        assert_eq!(m.spent("k", "2026-02-01").await, Spent::new(3, 3, 800));
        // A subject this node never counted.
        m.raise_cost("new", day, Spent::new(7, 8, 9));
        assert_eq!(m.spent("new", day).await, Spent::new(7, 8, 9));
    }

    #[tokio::test]
    async fn requests_in_flight_count_against_cost_limits() {
        let m = MemoryLimits::default();
        let ttl = Duration::from_secs(60);
        let day = "2026-01-01";
        let daily = CostLimits {
            daily: Some(100),
            ..CostLimits::default()
        };
        m.settle_cost("k", day, None, 40).await;
        // 40 spent: room for holds until spent + held reaches 100.
        let a = m.hold_cost("k", day, daily, 30, ttl).await.expect("first");
        let b = m.hold_cost("k", day, daily, 30, ttl).await.expect("second");
        assert_eq!(
            m.hold_cost("k", day, daily, 1, ttl).await,
            Err(CostLimitHit::Daily { in_flight: true })
        );
        // Another key is not held up.
        assert!(m.hold_cost("other", day, daily, 500, ttl).await.is_ok());
        // `a` cost less than it held: its room comes back.
        m.settle_cost("k", day, Some(&a), 10).await;
        assert_eq!(m.spent("k", day).await, Spent::new(50, 50, 50));
        let c = m
            .hold_cost("k", day, daily, 0, ttl)
            .await
            .expect("room again");
        assert_eq!(c.micro_usd, 0);
        // `b` cost more than it held; with nothing in flight the spend alone decides.
        m.settle_cost("k", day, Some(&b), 60).await;
        assert_eq!(
            m.hold_cost("k", day, daily, 1, ttl).await,
            Err(CostLimitHit::Daily { in_flight: false })
        );
        // The total limit counts holds the same way.
        let total = CostLimits {
            total: Some(200),
            ..CostLimits::default()
        };
        let d = m
            .hold_cost("k", day, total, 90, ttl)
            .await
            .expect("under total");
        assert_eq!(
            m.hold_cost("k", day, total, 1, ttl).await,
            Err(CostLimitHit::Total { in_flight: true })
        );
        m.settle_cost("k", day, Some(&d), 0).await;
        assert!(m.hold_cost("k", day, total, 1, ttl).await.is_ok());
        // And the monthly limit: this month's spend is 110, over the days before today too.
        let monthly = CostLimits {
            monthly: Some(150),
            ..CostLimits::default()
        };
        let next_day = "2026-01-02";
        let e = m
            .hold_cost("k", next_day, monthly, 39, ttl)
            .await
            .expect("under the month's limit");
        assert_eq!(
            m.hold_cost("k", next_day, monthly, 1, ttl).await,
            Err(CostLimitHit::Monthly { in_flight: true })
        );
        m.settle_cost("k", next_day, Some(&e), 40).await;
        assert_eq!(
            m.hold_cost("k", next_day, monthly, 0, ttl).await,
            Err(CostLimitHit::Monthly { in_flight: false })
        );
        // Next month it starts again.
        assert!(m
            .hold_cost("k", "2026-02-01", monthly, 1, ttl)
            .await
            .is_ok());
    }

    #[test]
    fn refusals_say_which_limit_and_why() {
        // Caused by requests in flight: passing, a rate limit to retry after a while.
        let r = over_cost_limit(CostLimitHit::Daily { in_flight: true }, Whose::Key);
        assert_eq!(r.kind, ErrorKind::RateLimit);
        assert_eq!(r.retry_after, Some(IN_FLIGHT_RETRY_SECS));
        assert!(r.message.contains("daily cost limit"), "{}", r.message);
        assert!(r.message.contains("in flight"), "{}", r.message);
        // The daily limit says when it resets.
        let r = over_cost_limit(CostLimitHit::Daily { in_flight: false }, Whose::User);
        assert_eq!(r.kind, ErrorKind::InsufficientQuota);
        assert!(
            r.message.contains("user's daily cost limit"),
            "{}",
            r.message
        );
        assert!(r.message.contains("resets at 00:00 UTC"), "{}", r.message);
        // Reached by the spend alone: lasting, no retry helps.
        let r = over_cost_limit(CostLimitHit::Total { in_flight: false }, Whose::Key);
        assert_eq!(r.kind, ErrorKind::InsufficientQuota);
        assert_eq!(r.retry_after, None);
        assert!(r.message.contains("total cost limit"), "{}", r.message);
        assert!(!r.message.contains("in flight"), "{}", r.message);
        let r = over_cost_limit(CostLimitHit::Monthly { in_flight: false }, Whose::Key);
        assert_eq!(r.kind, ErrorKind::InsufficientQuota);
        assert!(
            r.message.contains("its monthly cost limit"),
            "{}",
            r.message
        );
        assert!(r.message.contains("first of next month"), "{}", r.message);
        let r = over_cost_limit(CostLimitHit::Monthly { in_flight: true }, Whose::User);
        assert_eq!(r.kind, ErrorKind::RateLimit);
        assert_eq!(
            r.limit,
            Some(crate::error::LimitRefusal {
                limit: "monthly_cost",
                whose: "user"
            })
        );
        assert!(
            r.message.contains("user's monthly cost limit"),
            "{}",
            r.message
        );
    }

    #[test]
    fn a_limit_the_spend_alone_reaches_is_named_first() {
        let all = CostLimits {
            daily: Some(100),
            monthly: Some(500),
            total: Some(1000),
        };
        let s = |today, month, total| Spent::new(today, month, total);
        assert_eq!(cost_limit_hit(all, s(99, 400, 500), 0), None);
        assert_eq!(
            cost_limit_hit(all, s(99, 400, 500), 1),
            Some(CostLimitHit::Daily { in_flight: true })
        );
        // Over by spend, holds or not: lasting.
        assert_eq!(
            cost_limit_hit(all, s(100, 400, 500), 50),
            Some(CostLimitHit::Daily { in_flight: false })
        );
        // Daily reached only with holds, total by spend alone: the total is what lasts.
        assert_eq!(
            cost_limit_hit(all, s(90, 400, 1000), 50),
            Some(CostLimitHit::Total { in_flight: false })
        );
        assert_eq!(
            cost_limit_hit(all, s(10, 400, 990), 20),
            Some(CostLimitHit::Total { in_flight: true })
        );
        // The month, by spend alone and with holds; before the total in each pass.
        assert_eq!(
            cost_limit_hit(all, s(90, 500, 1000), 50),
            Some(CostLimitHit::Monthly { in_flight: false })
        );
        assert_eq!(
            cost_limit_hit(all, s(10, 490, 995), 10),
            Some(CostLimitHit::Monthly { in_flight: true })
        );
        // A negative sum (counters gone apart) counts as nothing held.
        assert_eq!(cost_limit_hit(all, s(10, 10, 10), -500), None);
    }

    #[test]
    fn months_of_days() {
        assert_eq!(month_of("2026-12-03"), "2026-12");
        assert_eq!(month_start("2026-12-03"), "2026-12-01");
        assert_eq!(month_of("bad"), "bad");
    }
}
