//! Session bindings and account cooldowns shared by every node through Redis (DESIGN §7, §8),
//! with the memory fallback that keeps a node serving when Redis is unreachable.
//!
//! Keys (each under a configurable prefix, empty in production):
//! - `session:binding:{session_key}` → the [`Binding`] as JSON, with a TTL (`PX`);
//! - `account:cooldown:{account_id}` → epoch ms until which the account cools down, expiring then.
//!
//! A dead Redis must never stall a request: opening a link does no I/O (the connection is made
//! by a task on first use), every operation, waiting for that connection included, is bounded
//! by a short timeout, and after a failure the link answers "unavailable" at once for a retry
//! interval, letting one caller probe Redis per interval.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError};
use relay_filters::session_store::{
    Binding, BindingPage, MemorySessionStore, SessionStore, StoreUnavailable, StoredBinding,
};
use tokio::sync::Notify;

use super::now_ms;
use crate::metrics::metrics;

/// Timeouts and retry pacing of a [`RedisLink`].
#[derive(Debug, Clone)]
pub struct RedisLinkConfig {
    /// Longest one operation may take, round trip included.
    pub op_timeout: Duration,
    /// Longest one connection attempt may take.
    pub connect_timeout: Duration,
    /// After a failure, how long operations are refused before one caller probes Redis again.
    pub retry_interval: Duration,
}

impl Default for RedisLinkConfig {
    fn default() -> Self {
        RedisLinkConfig {
            op_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(1),
            retry_interval: Duration::from_secs(1),
        }
    }
}

/// One Redis connection shared by the stores of a node: connects in the background on first
/// use, reconnects by itself (`ConnectionManager`), and fails fast while Redis is down.
pub struct RedisLink {
    client: redis::Client,
    config: RedisLinkConfig,
    manager: OnceLock<ConnectionManager>,
    connecting: AtomicBool,
    /// Woken when a connection attempt ends, whatever its outcome.
    attempt_done: Notify,
    /// No connection attempt before this time (epoch ms).
    next_connect_ms: AtomicI64,
    /// Operations are refused until this time (epoch ms); 0 = healthy.
    down_until_ms: AtomicI64,
}

impl RedisLink {
    /// A link to `url` with the default timeouts; does no I/O (start-up never waits on Redis).
    pub fn open(url: &str) -> Result<Arc<RedisLink>, RedisError> {
        Self::open_with(url, RedisLinkConfig::default())
    }

    /// A link to `url` with the given timeouts; does no I/O.
    pub fn open_with(url: &str, config: RedisLinkConfig) -> Result<Arc<RedisLink>, RedisError> {
        Ok(Arc::new(RedisLink {
            client: redis::Client::open(url)?,
            config,
            manager: OnceLock::new(),
            connecting: AtomicBool::new(false),
            attempt_done: Notify::new(),
            next_connect_ms: AtomicI64::new(0),
            down_until_ms: AtomicI64::new(0),
        }))
    }

    /// Whether the first connection has been made (later outages are not reflected here).
    pub fn is_connected(&self) -> bool {
        self.manager.get().is_some()
    }

    /// Starts connecting if needed and waits up to `within` for the first connection; for
    /// tests and for callers that prefer to wait once at start-up.
    pub async fn ready(self: &Arc<Self>, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(_)) = tokio::time::timeout_at(deadline, self.connection()).await {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // The last attempt failed; the next one is allowed after the retry interval.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The connection; before the first one is made, starts an attempt and waits for the one
    /// in flight (the caller bounds the wait), so the first requests after start-up use Redis
    /// rather than falling back. Fails at once when no attempt is allowed yet.
    async fn connection(self: &Arc<Self>) -> Option<ConnectionManager> {
        loop {
            // Created before the checks so an attempt ending in between still wakes us.
            let attempt_done = self.attempt_done.notified();
            if let Some(manager) = self.manager.get() {
                return Some(manager.clone());
            }
            self.start_connecting();
            if !self.connecting.load(Ordering::Acquire) {
                return self.manager.get().cloned();
            }
            attempt_done.await;
        }
    }

    /// Spawns one connection attempt unless one is running or the last failed too recently.
    fn start_connecting(self: &Arc<Self>) {
        if now_ms() < self.next_connect_ms.load(Ordering::Relaxed)
            || self.connecting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        // The manager's tasks live on the runtime that creates it, so it is created on the
        // caller's runtime (Pingora's), never on a short-lived start-up runtime.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.connecting.store(false, Ordering::Release);
            return;
        };
        let link = Arc::clone(self);
        runtime.spawn(async move {
            // Zero retries: the retry interval of the link paces attempts, and a manager that
            // retried with backoff would hold callers on a reconnect future for seconds.
            let config = ConnectionManagerConfig::new()
                .set_number_of_retries(0)
                .set_connection_timeout(link.config.connect_timeout)
                .set_response_timeout(link.config.op_timeout);
            let attempt = tokio::time::timeout(
                link.config.connect_timeout,
                ConnectionManager::new_with_config(link.client.clone(), config),
            )
            .await;
            match attempt {
                Ok(Ok(manager)) => {
                    let _ = link.manager.set(manager);
                    tracing::info!("connected to Redis");
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "Redis connection attempt failed");
                    link.delay_next_connect();
                }
                Err(_) => {
                    tracing::debug!("Redis connection attempt timed out");
                    link.delay_next_connect();
                }
            }
            link.connecting.store(false, Ordering::Release);
            link.attempt_done.notify_waiters();
        });
    }

    fn delay_next_connect(&self) {
        self.next_connect_ms
            .store(now_ms() + self.retry_ms(), Ordering::Relaxed);
    }

    fn retry_ms(&self) -> i64 {
        i64::try_from(self.config.retry_interval.as_millis()).unwrap_or(i64::MAX)
    }

    /// Runs `op` on the connection within the operation timeout, failing fast while Redis is
    /// marked down; an outage marks it down for the retry interval.
    pub(crate) async fn run<T, F, Fut>(self: &Arc<Self>, op: F) -> Result<T, StoreUnavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let now = now_ms();
        let down_until = self.down_until_ms.load(Ordering::Acquire);
        if down_until != 0 {
            // Down: refuse until the interval is over, then let exactly one caller probe (it
            // pushes the deadline on, so the others keep failing fast meanwhile).
            if now < down_until
                || self
                    .down_until_ms
                    .compare_exchange(
                        down_until,
                        now + self.retry_ms(),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_err()
            {
                return Err(StoreUnavailable("Redis marked down, retrying soon".into()));
            }
        }
        let attempt = async {
            match self.connection().await {
                Some(conn) => op(conn).await.map(Some),
                None => Ok(None),
            }
        };
        match tokio::time::timeout(self.config.op_timeout, attempt).await {
            Ok(Ok(Some(value))) => {
                self.down_until_ms.store(0, Ordering::Release);
                Ok(value)
            }
            // Not marked down: connection attempts are paced by `next_connect_ms` already.
            Ok(Ok(None)) => Err(StoreUnavailable("Redis not connected".into())),
            Ok(Err(e)) => {
                if is_outage(&e) {
                    self.mark_down();
                }
                Err(StoreUnavailable(format!("Redis: {e}")))
            }
            Err(_) => {
                self.mark_down();
                Err(StoreUnavailable(format!(
                    "Redis did not answer within {:?}",
                    self.config.op_timeout
                )))
            }
        }
    }

    fn mark_down(&self) {
        self.down_until_ms
            .store(now_ms() + self.retry_ms(), Ordering::Release);
    }
}

/// Whether an error means Redis cannot be reached (as opposed to Redis refusing one command).
fn is_outage(e: &RedisError) -> bool {
    !matches!(
        e.kind(),
        ErrorKind::ResponseError
            | ErrorKind::TypeError
            | ErrorKind::ExtensionError
            | ErrorKind::ExecAbortError
            | ErrorKind::NoScriptError
            | ErrorKind::ParseError
    )
}

/// `PX` argument for `ttl`: whole milliseconds, at least 1 (Redis refuses 0).
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// GET and PTTL in one round trip: nil when absent, else `{value, pttl}`.
static GET_WITH_TTL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('PTTL', KEYS[1])}",
    )
});

/// Stores ARGV[1] for ARGV[2] ms unless the key holds a binding to another account than
/// ARGV[3], atomically: nil when ours was stored, else the binding that holds. A value that
/// is no binding is overwritten.
static REPLACE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, b = pcall(cjson.decode, cur)
  if ok and type(b) == 'table' and type(b.account_id) == 'string' and b.account_id ~= ARGV[3] then
    return cur
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false",
    )
});

/// Keeps the later of the stored and the new cooldown; returns the one that holds. Values are
/// compared as Lua numbers (exact for epoch ms) but stored and returned as the strings given,
/// so no float ever reaches the reply.
/// A cooldown observed (ARGV[3]) no later than an operator's last clear (KEYS[2]) is not
/// published: `'0'`, no cooldown, comes back.
static PUBLISH_COOLDOWN: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local cleared = redis.call('GET', KEYS[2])
if cleared and tonumber(cleared) and tonumber(cleared) >= tonumber(ARGV[3]) then
  return redis.call('GET', KEYS[1]) or '0'
end
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(cur) and tonumber(cur) >= tonumber(ARGV[1]) then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]",
    )
});

/// How long an operator's clear of a cooldown is remembered in Redis: far longer than a
/// cooldown observed before it takes to be published.
const COOLDOWN_CLEAR_MEMORY_MS: i64 = 15 * 60 * 1000;

/// Session bindings in Redis under `{prefix}session:binding:{session_key}`.
pub struct RedisSessionStore {
    link: Arc<RedisLink>,
    prefix: String,
}

impl RedisSessionStore {
    /// A store on `link` whose keys start with `prefix` (empty in production).
    pub fn new(link: Arc<RedisLink>, prefix: &str) -> Self {
        RedisSessionStore {
            link,
            prefix: prefix.to_owned(),
        }
    }

    /// The Redis key of a session key.
    pub fn redis_key(&self, session_key: &str) -> String {
        format!("{}session:binding:{session_key}", self.prefix)
    }
}

fn encode(binding: &Binding) -> Result<String, StoreUnavailable> {
    serde_json::to_string(binding)
        .map_err(|e| StoreUnavailable(format!("cannot encode binding: {e}")))
}

/// Parses a stored binding; a value that is not one (another version, a hand edit) counts as
/// absent so it is overwritten instead of failing every request of that session.
fn decode(key: &str, json: &str) -> Option<Binding> {
    match serde_json::from_str(json) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(key, error = %e, "ignoring a session binding that does not parse");
            None
        }
    }
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    async fn get(&self, key: &str) -> Result<Option<StoredBinding>, StoreUnavailable> {
        let rkey = self.redis_key(key);
        let found: Option<(String, i64)> = self
            .link
            .run(|mut conn| {
                let rkey = rkey.clone();
                async move { GET_WITH_TTL.key(rkey).invoke_async(&mut conn).await }
            })
            .await?;
        Ok(found.and_then(|(json, pttl)| {
            decode(&rkey, &json).map(|binding| StoredBinding {
                binding: std::sync::Arc::new(binding),
                // PTTL -1 (no expiry, set by hand) reads as nothing left, so the scheduler
                // renews the binding and gives it a TTL again.
                remaining: Duration::from_millis(u64::try_from(pttl).unwrap_or(0)),
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
        let rkey = self.redis_key(key);
        let json = encode(binding)?;
        let held: Option<String> = self
            .link
            .run(|mut conn| {
                let (rkey, json) = (rkey.clone(), json.clone());
                async move {
                    REPLACE
                        .key(rkey)
                        .arg(json)
                        .arg(ttl_ms(ttl))
                        .arg(replaces)
                        .invoke_async(&mut conn)
                        .await
                }
            })
            .await?;
        // A binding the script read but this version cannot: overwritten.
        match held.as_deref().map(|h| decode(&rkey, h)) {
            None => Ok(binding.clone()),
            Some(Some(other)) => Ok(other),
            Some(None) => {
                self.put(key, binding, ttl).await?;
                Ok(binding.clone())
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        binding: &Binding,
        ttl: Duration,
    ) -> Result<(), StoreUnavailable> {
        let rkey = self.redis_key(key);
        let json = encode(binding)?;
        self.link
            .run(|mut conn| async move {
                redis::cmd("SET")
                    .arg(rkey)
                    .arg(json)
                    .arg("PX")
                    .arg(ttl_ms(ttl))
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreUnavailable> {
        let rkey = self.redis_key(key);
        self.link
            .run(|mut conn| async move {
                redis::cmd("DEL")
                    .arg(rkey)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }

    /// By `SCAN`: the cursor is Redis's; pages come in no particular order, and a binding
    /// renewed meanwhile may show twice.
    async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<BindingPage, StoreUnavailable> {
        let mut cursor: u64 = match cursor {
            None => 0,
            Some(c) => c
                .parse()
                .map_err(|_| StoreUnavailable(format!("not a page cursor: {c:?}")))?,
        };
        let pattern = format!("{}session:binding:*", glob_escape(&self.prefix));
        let prefix_len = self.redis_key("").len();
        let mut keys: Vec<String> = Vec::new();
        // The relay's other keys (limits, cost holds) share the keyspace and SCAN walks them
        // all: it goes on until the page is full, the keyspace ends or the time is up.
        let started = std::time::Instant::now();
        while keys.len() < limit && started.elapsed() < SCAN_BUDGET {
            let count = (limit - keys.len()).clamp(10, SCAN_COUNT);
            let (next, found): (u64, Vec<Vec<u8>>) = self
                .link
                .run(|mut conn| {
                    let pattern = pattern.clone();
                    async move {
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(count)
                            .arg("TYPE")
                            .arg("string")
                            .query_async(&mut conn)
                            .await
                    }
                })
                .await?;
            // A key that is no UTF-8 is none of the relay's.
            keys.extend(found.into_iter().filter_map(|k| String::from_utf8(k).ok()));
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut items = Vec::with_capacity(keys.len());
        if !keys.is_empty() {
            // GET and PTTL of each key, in one round trip.
            let found: Vec<redis::Value> = self
                .link
                .run(|mut conn| {
                    let keys = keys.clone();
                    async move {
                        let mut pipe = redis::pipe();
                        for k in &keys {
                            pipe.cmd("GET").arg(k).cmd("PTTL").arg(k);
                        }
                        pipe.query_async(&mut conn).await
                    }
                })
                .await?;
            for (rkey, pair) in keys.iter().zip(found.chunks(2)) {
                let [value, pttl] = pair else { continue };
                let (Ok(Some(json)), Ok(pttl)) = (
                    redis::from_redis_value::<Option<String>>(value),
                    redis::from_redis_value::<i64>(pttl),
                ) else {
                    continue; // ended between SCAN and GET
                };
                if let Some(binding) = decode(rkey, &json) {
                    items.push((
                        rkey[prefix_len..].to_string(),
                        StoredBinding {
                            binding: std::sync::Arc::new(binding),
                            remaining: Duration::from_millis(u64::try_from(pttl).unwrap_or(0)),
                        },
                    ));
                }
            }
        }
        Ok(BindingPage {
            items,
            next: (cursor != 0).then(|| cursor.to_string()),
        })
    }

    /// Always 0: Redis holds the bindings of every node and counting them costs a round trip.
    fn len_hint(&self) -> u64 {
        0
    }
}

/// How long [`RedisSessionStore::list`] scans for one page at most.
const SCAN_BUDGET: Duration = Duration::from_millis(250);
/// Keys `SCAN` looks at per call.
const SCAN_COUNT: usize = 1000;

/// `s` with Redis glob characters escaped, for a `MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Redis first, memory when Redis fails: the relay keeps serving, says so in logs and in
/// `relay_session_store_fallback_total`, and goes back to Redis as soon as it answers.
///
/// Bindings read from Redis and successful Redis writes are mirrored into memory, so during
/// an outage the conversations this node already served stay on their accounts, whichever
/// node bound them. Writes made in memory during an outage
/// are not replayed to Redis afterwards: they are short-lived and another node may have bound
/// the same session meanwhile, so Redis stays the authority once it is back. A conversation
/// bound in memory then finds no binding in Redis and is bound afresh; the scheduler's keyed
/// pick (`weighted`) gives it the same account as long as the pool is the same.
pub struct FallbackSessionStore {
    primary: RedisSessionStore,
    memory: Arc<MemorySessionStore>,
    degraded: AtomicBool,
    last_warning_ms: AtomicI64,
}

/// At most one "Redis unreachable" warning per this many ms.
const WARNING_INTERVAL_MS: i64 = 10_000;

impl FallbackSessionStore {
    /// Serves from `primary`, falling back to `memory`.
    pub fn new(primary: RedisSessionStore, memory: Arc<MemorySessionStore>) -> Self {
        FallbackSessionStore {
            primary,
            memory,
            degraded: AtomicBool::new(false),
            last_warning_ms: AtomicI64::new(0),
        }
    }

    /// Whether the last operation was served from memory because Redis failed.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn redis_ok(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            tracing::info!("Redis reachable again, session bindings back in Redis");
        }
    }

    fn redis_failed(&self, error: &StoreUnavailable) {
        metrics().session_store_fallback.inc();
        self.degraded.store(true, Ordering::Release);
        let now = now_ms();
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if now - last >= WARNING_INTERVAL_MS
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %error.0, "Redis unreachable, serving session bindings from memory");
        }
    }
}

#[async_trait]
impl SessionStore for FallbackSessionStore {
    async fn get(&self, key: &str) -> Result<Option<StoredBinding>, StoreUnavailable> {
        match self.primary.get(key).await {
            Ok(found) => {
                self.redis_ok();
                // Kept here too (bound by any node), so an outage does not split it.
                if let Some(f) = &found {
                    self.memory.mirror(key, f);
                }
                Ok(found)
            }
            Err(e) => {
                self.redis_failed(&e);
                self.memory.get(key).await
            }
        }
    }

    async fn replace(
        &self,
        key: &str,
        replaces: &str,
        binding: &Binding,
        ttl: Duration,
    ) -> Result<Binding, StoreUnavailable> {
        match self.primary.replace(key, replaces, binding, ttl).await {
            Ok(held) => {
                self.redis_ok();
                self.memory.put(key, &held, ttl).await?;
                Ok(held)
            }
            Err(e) => {
                self.redis_failed(&e);
                self.memory.replace(key, replaces, binding, ttl).await
            }
        }
    }

    async fn put(
        &self,
        key: &str,
        binding: &Binding,
        ttl: Duration,
    ) -> Result<(), StoreUnavailable> {
        if let Err(e) = self.primary.put(key, binding, ttl).await {
            self.redis_failed(&e);
        } else {
            self.redis_ok();
        }
        self.memory.put(key, binding, ttl).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreUnavailable> {
        if let Err(e) = self.primary.delete(key).await {
            self.redis_failed(&e);
        } else {
            self.redis_ok();
        }
        self.memory.delete(key).await
    }

    /// From Redis; from this node's memory while Redis fails.
    async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<BindingPage, StoreUnavailable> {
        match self.primary.list(cursor, limit).await {
            Ok(page) => {
                self.redis_ok();
                Ok(page)
            }
            Err(e) => {
                self.redis_failed(&e);
                self.memory.list(None, limit).await
            }
        }
    }

    /// Bindings held in this node's memory (mirrored or made during an outage).
    fn len_hint(&self) -> u64 {
        self.memory.len_hint()
    }
}

/// Account cooldowns shared by every node under `{prefix}account:cooldown:{account_id}`.
pub struct RedisCooldowns {
    link: Arc<RedisLink>,
    prefix: String,
}

impl RedisCooldowns {
    /// Cooldowns on `link` whose keys start with `prefix` (empty in production).
    pub fn new(link: Arc<RedisLink>, prefix: &str) -> Self {
        RedisCooldowns {
            link,
            prefix: prefix.to_owned(),
        }
    }

    /// The Redis key of an account's cooldown.
    pub fn redis_key(&self, account_id: &str) -> String {
        format!("{}account:cooldown:{account_id}", self.prefix)
    }

    /// The Redis key of when an operator last ended an account's cooldown (epoch ms).
    fn cleared_key(&self, account_id: &str) -> String {
        format!("{}account:cooldown-cleared:{account_id}", self.prefix)
    }

    /// Publishes that `account_id` cools down until `until_ms` (epoch ms), keeping a later
    /// cooldown already published; returns the cooldown in force afterwards. The key expires
    /// when the cooldown ends. A cooldown already over is not published.
    pub async fn publish(
        &self,
        account_id: &str,
        until_ms: i64,
        observed_at: i64,
    ) -> Result<i64, StoreUnavailable> {
        let ttl = until_ms.saturating_sub(now_ms());
        if ttl <= 0 {
            return Ok(until_ms);
        }
        let (rkey, cleared) = (self.redis_key(account_id), self.cleared_key(account_id));
        let held: String = self
            .link
            .run(|mut conn| async move {
                PUBLISH_COOLDOWN
                    .key(rkey)
                    .key(cleared)
                    .arg(until_ms)
                    .arg(ttl)
                    .arg(observed_at)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(held.parse().unwrap_or(until_ms))
    }

    /// Ends the cooldown published for `account_id` (an operator cleared it), and remembers
    /// when, so that a cooldown observed before is not published after.
    pub async fn clear(&self, account_id: &str) -> Result<(), StoreUnavailable> {
        let (rkey, cleared) = (self.redis_key(account_id), self.cleared_key(account_id));
        let now = now_ms();
        self.link
            .run(|mut conn| async move {
                redis::pipe()
                    .atomic()
                    .cmd("SET")
                    .arg(cleared)
                    .arg(now)
                    .arg("PX")
                    .arg(COOLDOWN_CLEAR_MEMORY_MS)
                    .ignore()
                    .cmd("DEL")
                    .arg(rkey)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await?;
        Ok(())
    }

    /// Cooldowns published for `ids` that have not expired, by account id; empty when Redis
    /// cannot be reached (local cooldowns still apply then).
    pub async fn fetch_all(&self, ids: &[String]) -> HashMap<String, i64> {
        if ids.is_empty() {
            return HashMap::new();
        }
        let keys: Vec<String> = ids.iter().map(|id| self.redis_key(id)).collect();
        let values = self
            .link
            .run(|mut conn| async move {
                redis::cmd("MGET")
                    .arg(keys)
                    .query_async::<Vec<Option<String>>>(&mut conn)
                    .await
            })
            .await;
        match values {
            Ok(values) => ids
                .iter()
                .zip(values)
                .filter_map(|(id, v)| Some((id.clone(), v?.parse().ok()?)))
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e.0, "cooldowns could not be read from Redis");
                HashMap::new()
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    #[test]
    fn ttl_is_whole_ms_and_never_zero() {
        assert_eq!(ttl_ms(Duration::from_secs(3)), 3000);
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_micros(999)), 1);
    }

    #[test]
    fn keys_follow_the_design() {
        let link = RedisLink::open("redis://127.0.0.1:1").unwrap();
        let s = RedisSessionStore::new(link.clone(), "");
        assert_eq!(s.redis_key("apikey:k1"), "session:binding:apikey:k1");
        let c = RedisCooldowns::new(link, "t:");
        assert_eq!(c.redis_key("a1"), "t:account:cooldown:a1");
    }

    #[test]
    fn outages_are_told_from_refusals() {
        let io: RedisError = std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert!(is_outage(&io));
        let refused: RedisError = (ErrorKind::ResponseError, "WRONGTYPE").into();
        assert!(!is_outage(&refused));
    }

    #[tokio::test]
    async fn a_dead_redis_fails_fast_and_falls_back() {
        // Port 1 on loopback: nothing listens, the connection is refused.
        let link = RedisLink::open("redis://127.0.0.1:1").unwrap();
        let store = FallbackSessionStore::new(
            RedisSessionStore::new(link, ""),
            MemorySessionStore::new(10),
        );
        let b = Binding {
            account_id: "a".into(),
            account_type: "claude".into(),
            platform: "claude".into(),
            model: None,
            user_id: "u".into(),
            api_key_id: "k".into(),
            created_at: 0,
            last_used_at: 0,
            request_count: 1,
        };
        let started = std::time::Instant::now();
        let before = metrics().session_store_fallback.get();
        let won = store
            .set_if_absent("s", &b, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(won.account_id, "a");
        assert_eq!(
            store.get("s").await.unwrap().unwrap().binding.account_id,
            "a"
        );
        assert!(store.is_degraded());
        assert!(metrics().session_store_fallback.get() >= before + 2);
        assert!(started.elapsed() < Duration::from_millis(200));
    }
}
