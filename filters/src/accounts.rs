//! Upstream accounts as the scheduler sees them: static settings plus live state (in-flight
//! count, cooldown, error streak), and the rules that pick one (DESIGN §8).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use http::HeaderValue;
use rand::Rng;
use serde::Deserialize;

use crate::{AccountType, Protocol};

/// An account credential: never printed. The header values that carry it upstream are made on
/// first use and kept, marked sensitive, so a request clones them instead of building them.
#[derive(Clone)]
pub struct Credential {
    secret: String,
    /// The secret as a header value (`x-api-key`, `x-goog-api-key`); `None` if it cannot be one.
    plain: OnceLock<Option<HeaderValue>>,
    /// `Bearer <secret>` (`authorization`).
    bearer: OnceLock<Option<HeaderValue>>,
}

impl Credential {
    /// Wraps a decrypted credential.
    pub fn new(secret: String) -> Self {
        Credential {
            secret,
            plain: OnceLock::new(),
            bearer: OnceLock::new(),
        }
    }
    /// The secret itself, for the one place that sends it upstream.
    pub fn expose(&self) -> &str {
        &self.secret
    }
    /// The secret as a sensitive header value; `None` if it is not a valid one.
    pub fn header_value(&self) -> Option<HeaderValue> {
        self.plain.get_or_init(|| sensitive(&self.secret)).clone()
    }
    /// `Bearer <secret>` as a sensitive header value; `None` if it is not a valid one.
    pub fn bearer_value(&self) -> Option<HeaderValue> {
        self.bearer
            .get_or_init(|| sensitive(&format!("Bearer {}", self.secret)))
            .clone()
    }
    /// Whether the secret is a JWT (`eyJ...`), as ChatGPT tokens are, rather than an API key:
    /// such an OpenAI credential goes to the ChatGPT backend with its account id.
    pub fn is_jwt(&self) -> bool {
        self.secret.starts_with("eyJ")
    }
}

fn sensitive(s: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(s).ok()?;
    v.set_sensitive(true);
    Some(v)
}

impl PartialEq for Credential {
    fn eq(&self, other: &Self) -> bool {
        self.secret == other.secret
    }
}

impl Eq for Credential {}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(***)")
    }
}

/// Where an account's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    /// Name or IP address (an IPv6 address without brackets).
    pub host: Arc<str>,
    pub port: u16,
    /// Path prefix kept in front of every upstream path, without trailing slash.
    pub path_prefix: String,
    /// The `Host` field for it: the host (an IPv6 address in brackets), and the port unless it
    /// is the scheme's default.
    pub authority: HeaderValue,
}

impl BaseUrl {
    /// Parses `http(s)://host[:port][/prefix]`. User info, a query, a fragment, spaces and
    /// control characters are refused: the relay appends paths to the prefix and sends the
    /// account's credential itself, so none of them could be meant (`https://host?x` would
    /// otherwise be read as host `host?x`).
    pub fn parse(url: &str) -> Result<BaseUrl, String> {
        // Checked before anything echoes the URL back: it may carry a password.
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("base URL must not contain spaces or control characters".into());
        }
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "base URL must start with http:// or https://: {url}"
            ));
        };
        // The authority ends at the first `/`, `?` or `#` (RFC 3986 §3.2).
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if rest[..end].contains('@') {
            return Err(
                "base URL must not carry user info (user:password@): the account's credential \
                 is set apart"
                    .into(),
            );
        }
        // Not echoed either: a query may carry a key (`?key=`).
        match rest.find(['?', '#']) {
            Some(i) if rest[i..].starts_with('?') => {
                return Err("base URL must not have a query (?...)".into());
            }
            Some(_) => return Err("base URL must not have a fragment (#...)".into()),
            None => {}
        }
        let (authority, path) = rest.split_at(end);
        let default_port = if tls { 443 } else { 80 };
        let bad_port = || format!("bad port in base URL: {url}");
        let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
            // An IPv6 literal: `[addr]` or `[addr]:port`.
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("unclosed IPv6 address in base URL: {url}"))?;
            let port = match after {
                "" => default_port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse::<u16>().ok())
                    .ok_or_else(bad_port)?,
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad_port())?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("base URL has no host: {url}"));
        }
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let authority = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        let authority = HeaderValue::from_str(&authority)
            .map_err(|_| format!("base URL host is not a valid Host field: {url}"))?;
        Ok(BaseUrl {
            tls,
            host: host.into(),
            port,
            path_prefix: path.trim_end_matches('/').to_string(),
            authority,
        })
    }
}

/// One upstream account with its live state.
#[derive(Debug)]
pub struct Account {
    pub id: String,
    pub name: String,
    pub account_type: AccountType,
    pub base_url: BaseUrl,
    pub credential: Credential,
    /// Lower is preferred (default 50).
    pub priority: i64,
    /// Relative share inside a priority tier (default 1).
    pub weight: u32,
    /// Models served; empty = all.
    pub models: Vec<String>,
    /// Client model → upstream model.
    pub model_map: HashMap<String, String>,
    pub max_concurrency: Option<u32>,
    /// ChatGPT account id for `openai-responses` accounts with a ChatGPT token.
    pub chatgpt_account_id: Option<String>,
    /// When an OAuth access token expires (epoch ms), when known. Refreshed before then; past
    /// it (its refresh failing) new conversations go to other accounts while any can serve.
    pub token_expires_ms: Option<i64>,
    /// When an operator last set the account's status or credential (epoch ms), as this
    /// snapshot was loaded: a status its requests observe is stored only while it is still
    /// so, never over a change the requests did not see.
    pub status_set_at: Option<i64>,
    pub state: Arc<AccountState>,
}

/// Live, shared state of an account; survives reloads of its settings.
#[derive(Debug, Default)]
pub struct AccountState {
    /// Enabled and status `valid` (cleared by the error threshold or an admin).
    pub schedulable: AtomicBool,
    pub inflight: AtomicU32,
    /// Epoch ms until which the account is cooling down.
    pub cooldown_until_ms: AtomicI64,
    /// Whether the cooldown running, if any, was started on this node for overload or server
    /// errors alone (not a rate limit, used-up credit, or one read from the store): such an
    /// account may still be tried when every other one cools too.
    pub cooling_for_overload: AtomicBool,
    pub consecutive_errors: AtomicU32,
    pub consecutive_server_errors: AtomicU32,
    /// Answers in a row the upstream cut after their head (a reset, a close or a stall inside
    /// the body); a whole answer sets it back to 0.
    pub consecutive_cuts: AtomicU32,
    pub last_used_ms: AtomicI64,
    /// Round-robin and request counter.
    pub requests: AtomicU64,
    /// Set when the relay takes the account out of scheduling itself (auth errors, a blocked
    /// organization): until this epoch ms, a reload whose row still says valid (read before
    /// the change reached the database) does not make it schedulable again. Cleared by a
    /// reload that sees the row out of scheduling, by a success, and by an admin change.
    pub held_off_until_ms: AtomicI64,
    /// The error count of the stored row at the last reload. Stored counts only go down by a
    /// reset (a pass, a success, an operator): a row below it means one happened elsewhere.
    pub stored_errors_seen: AtomicI64,
    /// The stored row's `cooldown_cleared_at` at the last reload: a later one means an operator
    /// ended the cooldown since, and the cooldown this node holds gives way to the row's.
    pub cooldown_cleared_seen: AtomicI64,
}

/// What a request needs of an account, as the scheduler matches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand<'a> {
    pub protocol: Protocol,
    pub model: Option<&'a str>,
    /// A Responses call (`/responses`) that does not ask for a stream: the ChatGPT Codex
    /// backend refuses it (`400 {"detail":"Stream must be set to true"}`). Its
    /// `/responses/compact` answers JSON and is no such call.
    pub unstreamed_response: bool,
}

impl<'a> Demand<'a> {
    /// A request of `protocol` for `model` that any account serving both can take.
    pub fn new(protocol: Protocol, model: Option<&'a str>) -> Self {
        Demand {
            protocol,
            model,
            unstreamed_response: false,
        }
    }
}

impl Account {
    /// Whether this account serves `protocol` and `model` at all (ignoring live state): what
    /// a conversation needs of its account, whatever the form of one of its requests.
    pub fn serves_model(&self, protocol: Protocol, model: Option<&str>) -> bool {
        if !self.account_type.serves(protocol) {
            return false;
        }
        match model {
            Some(m) if !self.models.is_empty() => {
                self.models.iter().any(|x| x == m) || self.model_map.contains_key(m)
            }
            _ => true,
        }
    }

    /// Whether this account can take a request that needs `demand` (ignoring live state).
    pub fn serves(&self, demand: &Demand<'_>) -> bool {
        self.serves_model(demand.protocol, demand.model)
            && !(demand.unstreamed_response && self.has_chatgpt_token())
    }

    /// Whether the account is in operation (cooling down or not) and can take a request that
    /// needs `demand`.
    pub fn could_serve(&self, demand: &Demand<'_>) -> bool {
        self.in_operation() && self.serves(demand)
    }

    /// Whether this is an `openai-responses` account holding a ChatGPT token (a JWT, `eyJ...`):
    /// its upstream is the ChatGPT Codex backend, which answers streamed Responses calls only.
    pub fn has_chatgpt_token(&self) -> bool {
        self.account_type == AccountType::OpenaiResponses && self.credential.is_jwt()
    }

    /// Whether the account can take one more request now.
    pub fn usable(&self, now_ms: i64) -> bool {
        self.available(now_ms) && self.has_room()
    }

    /// Whether the account is in service now: enabled and valid, not cooling down. A
    /// conversation bound to an account that is not moves to another.
    pub fn available(&self, now_ms: i64) -> bool {
        self.in_operation() && self.cooldown_left_ms(now_ms) == 0
    }

    /// Enabled and status `valid` (whether cooling down or not).
    pub fn in_operation(&self) -> bool {
        self.state.schedulable.load(Ordering::Relaxed)
    }

    /// How long the account still cools down (ms; 0 when it does not).
    pub fn cooldown_left_ms(&self, now_ms: i64) -> i64 {
        self.state
            .cooldown_until_ms
            .load(Ordering::Relaxed)
            .saturating_sub(now_ms)
            .max(0)
    }

    /// Whether its access token is known to have expired.
    pub fn token_expired(&self, now_ms: i64) -> bool {
        self.token_expires_ms.is_some_and(|at| at <= now_ms)
    }

    /// Whether the account is under its concurrency cap on this node.
    pub fn has_room(&self) -> bool {
        self.max_concurrency
            .is_none_or(|cap| self.state.inflight.load(Ordering::Relaxed) < cap)
    }

    /// The model name sent upstream.
    pub fn map_model<'a>(&'a self, model: &'a str) -> &'a str {
        self.model_map
            .get(model)
            .map(String::as_str)
            .unwrap_or(model)
    }
}

/// The current set of accounts; implemented by the binary's cache.
pub trait AccountDirectory: Send + Sync {
    /// Every account (a snapshot).
    fn accounts(&self) -> Arc<Vec<Arc<Account>>>;
    /// One account by id.
    fn get(&self, id: &str) -> Option<Arc<Account>>;
}

/// How an account is chosen inside the best priority tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PickStrategy {
    #[default]
    Weighted,
    Lru,
    LeastInflight,
    RoundRobin,
}

/// Picks an account for a request: usable, serving what it needs, not in `exclude`, lowest
/// priority number first, then `strategy` inside that tier.
pub fn select_account(
    accounts: &[Arc<Account>],
    demand: &Demand<'_>,
    exclude: &[String],
    strategy: PickStrategy,
    now_ms: i64,
    rr_counter: &AtomicU64,
) -> Option<Arc<Account>> {
    let tier = best_tier(accounts, demand, exclude, now_ms);
    let chosen = match strategy {
        PickStrategy::Weighted => {
            let total: u64 = tier.iter().map(|a| u64::from(a.weight.max(1))).sum();
            if total == 0 {
                return None;
            }
            let mut roll = rand::rng().random_range(0..total);
            tier.iter()
                .find(|a| {
                    let w = u64::from(a.weight.max(1));
                    if roll < w {
                        true
                    } else {
                        roll -= w;
                        false
                    }
                })
                .copied()
        }
        PickStrategy::Lru => tier
            .iter()
            .min_by_key(|a| a.state.last_used_ms.load(Ordering::Relaxed))
            .copied(),
        PickStrategy::LeastInflight => tier
            .iter()
            .min_by_key(|a| a.state.inflight.load(Ordering::Relaxed))
            .copied(),
        PickStrategy::RoundRobin => {
            if tier.is_empty() {
                None
            } else {
                let n = rr_counter.fetch_add(1, Ordering::Relaxed) as usize;
                tier.get(n % tier.len()).copied()
            }
        }
    };
    chosen.cloned()
}

/// Picks as [`select_account`] does, but inside the tier always the same account for the same
/// `key` while the tier is the same, each account as often as its weight says over many keys
/// (weighted rendezvous hashing). An account leaving the tier moves only the keys it had; one
/// joining takes its share from every other. Every node picks alike.
pub fn select_account_for_key(
    accounts: &[Arc<Account>],
    demand: &Demand<'_>,
    exclude: &[String],
    now_ms: i64,
    key: &str,
) -> Option<Arc<Account>> {
    let key_hash = fnv1a64(key.as_bytes());
    best_tier(accounts, demand, exclude, now_ms)
        .into_iter()
        .map(|a| (rendezvous_score(key_hash, a), a))
        .max_by(|x, y| x.0.total_cmp(&y.0).then_with(|| y.1.id.cmp(&x.1.id)))
        .map(|(_, a)| Arc::clone(a))
}

/// `ln(u) / weight` for `u` in (0, 1] drawn from `key` and the account's id: the account with
/// the highest score wins, with the chance `weight / total` for a random key.
fn rendezvous_score(key_hash: u64, account: &Account) -> f64 {
    let mixed = mix64(key_hash ^ mix64(fnv1a64(account.id.as_bytes())));
    // 53 bits of the hash, shifted off zero: u in (0, 1].
    let u = ((mixed >> 11) + 1) as f64 / (1u64 << 53) as f64;
    u.ln() / f64::from(account.weight.max(1))
}

/// FNV-1a, 64 bits: the same on every node and build (unlike std's hasher).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64's finaliser: spreads every input bit over the output.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The usable accounts that serve the request, not excluded, of the lowest priority number;
/// accounts whose token expired (their refresh failing) only when no other can serve.
fn best_tier<'a>(
    accounts: &'a [Arc<Account>],
    demand: &Demand<'_>,
    exclude: &[String],
    now_ms: i64,
) -> Vec<&'a Arc<Account>> {
    let mut best: Option<i64> = None;
    let mut tier: Vec<&Arc<Account>> = Vec::new();
    let mut expired: Vec<&Arc<Account>> = Vec::new();
    for a in accounts {
        if !a.serves(demand) || !a.usable(now_ms) || exclude.iter().any(|x| *x == a.id) {
            continue;
        }
        if a.token_expired(now_ms) {
            expired.push(a);
            continue;
        }
        match best {
            Some(p) if a.priority > p => continue,
            Some(p) if a.priority == p => tier.push(a),
            _ => {
                best = Some(a.priority);
                tier.clear();
                tier.push(a);
            }
        }
    }
    if tier.is_empty() {
        if let Some(p) = expired.iter().map(|a| a.priority).min() {
            tier = expired.into_iter().filter(|a| a.priority == p).collect();
        }
    }
    tier
}

/// An in-flight slot on an account, released when dropped: in this node's count and, for a
/// capped account on nodes sharing a store, the store's lease (given back apart).
pub struct InflightLease(Arc<AccountState>, Option<SharedSlot>);

/// An account's slot in a store several nodes share.
struct SharedSlot {
    store: Arc<dyn crate::key_limits::LimitStore>,
    lease: crate::key_limits::SlotLease,
}

/// The name an account's concurrency slots go by in a [`crate::key_limits::LimitStore`]
/// (apart from the API keys' own).
pub fn account_slots_name(account_id: &str) -> String {
    format!("account:{account_id}")
}

impl InflightLease {
    /// Takes a slot on `account` if it is under its concurrency cap, atomically (two requests
    /// racing for the last slot cannot both get it). [`InflightLease::mark_used`] then counts
    /// the use, once the request is sure to go there.
    pub fn try_acquire(account: &Account) -> Option<Self> {
        let inflight = &account.state.inflight;
        match account.max_concurrency {
            None => {
                inflight.fetch_add(1, Ordering::AcqRel);
            }
            Some(cap) => {
                inflight
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < cap).then_some(n + 1)
                    })
                    .ok()?;
            }
        }
        Some(InflightLease(account.state.clone(), None))
    }

    /// Marks the account used now (the `lru` strategy's clock, its request count).
    pub fn mark_used(&self, now_ms: i64) {
        self.0.last_used_ms.store(now_ms, Ordering::Relaxed);
        self.0.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives the slot back now, in this node's count and in the shared store, so a request
    /// that follows at once finds the account free on every node.
    pub async fn release(mut self) {
        let shared = self.1.take();
        // This node's count.
        drop(self);
        if let Some(SharedSlot { store, lease }) = shared {
            store.release_slot(&lease).await;
        }
    }

    /// Also holds `lease`, the account's slot in `store` (shared by the nodes).
    pub fn share(
        &mut self,
        store: Arc<dyn crate::key_limits::LimitStore>,
        lease: crate::key_limits::SlotLease,
    ) {
        self.1 = Some(SharedSlot { store, lease });
    }
}

impl fmt::Debug for InflightLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InflightLease")
    }
}

impl Drop for InflightLease {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        if let Some(SharedSlot { store, lease }) = self.1.take() {
            // Without a runtime (shutting down) the lease runs out by itself.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { store.release_slot(&lease).await });
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn account(id: &str, t: AccountType, priority: i64, weight: u32) -> Arc<Account> {
        let state = AccountState::default();
        state.schedulable.store(true, Ordering::Relaxed);
        Arc::new(Account {
            id: id.into(),
            name: id.into(),
            account_type: t,
            base_url: BaseUrl::parse("http://127.0.0.1:9").unwrap(),
            credential: Credential::new(format!("secret-{id}")),
            priority,
            weight,
            models: vec![],
            model_map: HashMap::new(),
            max_concurrency: None,
            chatgpt_account_id: None,
            token_expires_ms: None,
            status_set_at: None,
            state: Arc::new(state),
        })
    }

    #[test]
    fn base_urls() {
        let b = BaseUrl::parse("https://example.com/openai/").unwrap();
        assert_eq!((b.tls, &*b.host, b.port), (true, "example.com", 443));
        assert_eq!(b.path_prefix, "/openai");
        assert_eq!(b.authority, "example.com");
        let b = BaseUrl::parse("http://127.0.0.1:8089").unwrap();
        assert_eq!((b.tls, b.port, b.path_prefix.as_str()), (false, 8089, ""));
        assert_eq!(b.authority, "127.0.0.1:8089");
        let b = BaseUrl::parse("http://[::1]:81/x").unwrap();
        assert_eq!((&*b.host, b.port), ("::1", 81));
        assert_eq!(b.authority, "[::1]:81");
        let b = BaseUrl::parse("https://[2001:db8::1]/v1").unwrap();
        assert_eq!(
            (&*b.host, b.port, b.path_prefix.as_str()),
            ("2001:db8::1", 443, "/v1")
        );
        assert_eq!(b.authority, "[2001:db8::1]");
        assert!(BaseUrl::parse("http://[::1").is_err());
        assert!(BaseUrl::parse("http://[::1]x").is_err());
        assert!(BaseUrl::parse("http://[::1]:").is_err());
        let b = BaseUrl::parse("http://example.com:443").unwrap();
        assert_eq!(b.authority, "example.com:443");
        assert!(BaseUrl::parse("http://exa\x01mple.com").is_err());
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("http://x:notaport").is_err());
    }

    #[test]
    fn base_urls_without_user_info_query_fragment_or_spaces() {
        for (url, says) in [
            ("https://host?x", "query"),
            ("https://host/v1?key=1", "query"),
            ("https://host#frag", "fragment"),
            ("https://host/v1#frag", "fragment"),
            ("https://user:secret@host", "user"),
            ("https://host/v1?key=secret", "query"),
            ("https://host/v1#secret", "fragment"),
            ("https://user@host/v1", "user"),
            ("https://ho st", "space"),
            ("https://host/v 1", "space"),
            (" https://host", "space"),
            ("https://host/\tx", "space"),
            ("https://host/x\n", "space"),
        ] {
            let e = BaseUrl::parse(url).unwrap_err();
            assert!(e.contains(says), "{url:?}: {e}");
            assert!(!e.contains("secret"), "the URL's secret is not echoed: {e}");
        }
        // An `@` in the path is no user info.
        let b = BaseUrl::parse("https://host/v1/@team").unwrap();
        assert_eq!((&*b.host, b.path_prefix.as_str()), ("host", "/v1/@team"));
    }

    #[test]
    fn credential_never_prints() {
        let c = Credential::new("sk-ant-secret".into());
        assert!(!format!("{c:?}").contains("secret"));
        let v = c.header_value().unwrap();
        assert!(v.is_sensitive() && v == "sk-ant-secret");
        assert!(!format!("{v:?}").contains("secret"));
        let v = c.bearer_value().unwrap();
        assert!(v.is_sensitive() && v == "Bearer sk-ant-secret");
        // Made once, handed out again.
        assert_eq!(c.header_value().unwrap(), "sk-ant-secret");
        assert_eq!(c, Credential::new("sk-ant-secret".into()));
        assert!(Credential::new("bad\nvalue".into())
            .header_value()
            .is_none());
        assert!(Credential::new("bad\nvalue".into())
            .bearer_value()
            .is_none());
    }

    #[test]
    fn lowest_priority_tier_wins_and_exclusions_hold() {
        let rr = AtomicU64::new(0);
        let a = account("a", AccountType::Claude, 10, 1);
        let b = account("b", AccountType::Claude, 50, 1);
        let o = account("o", AccountType::Openai, 1, 1);
        let all = vec![a.clone(), b.clone(), o];
        for _ in 0..20 {
            let s = select_account(
                &all,
                &Demand::new(Protocol::Anthropic, None),
                &[],
                PickStrategy::Weighted,
                0,
                &rr,
            );
            assert_eq!(s.unwrap().id, "a");
        }
        let s = select_account(
            &all,
            &Demand::new(Protocol::Anthropic, None),
            &["a".into()],
            PickStrategy::Weighted,
            0,
            &rr,
        );
        assert_eq!(s.unwrap().id, "b");
        a.state.cooldown_until_ms.store(100, Ordering::Relaxed);
        let s = select_account(
            &all,
            &Demand::new(Protocol::Anthropic, None),
            &[],
            PickStrategy::Lru,
            50,
            &rr,
        );
        assert_eq!(s.unwrap().id, "b");
        let s = select_account(
            &all,
            &Demand::new(Protocol::Anthropic, None),
            &["b".into()],
            PickStrategy::Lru,
            50,
            &rr,
        );
        assert!(s.is_none());
    }

    #[test]
    fn a_keyed_pick_is_stable_spread_by_weight_and_moves_only_a_leaving_accounts_keys() {
        let all = vec![
            account("a", AccountType::Claude, 50, 3),
            account("b", AccountType::Claude, 50, 1),
            account("c", AccountType::Claude, 50, 4),
            account("low", AccountType::Claude, 60, 100),
        ];
        let pick = |all: &[Arc<Account>], key: &str| {
            select_account_for_key(all, &Demand::new(Protocol::Anthropic, None), &[], 0, key)
                .unwrap()
                .id
                .clone()
        };
        let keys: Vec<String> = (0..8000)
            .map(|i| format!("k1:anthropic:{i:016x}"))
            .collect();
        let first: Vec<String> = keys.iter().map(|k| pick(&all, k)).collect();
        // The same key, the same account, every time.
        for (k, p) in keys.iter().zip(&first).take(200) {
            assert_eq!(&pick(&all, k), p);
        }
        // As often as the weights say (3 : 1 : 4 of 8000), never below the best tier.
        let count = |id: &str| first.iter().filter(|p| *p == id).count();
        assert!((2700..3300).contains(&count("a")), "a: {}", count("a"));
        assert!((800..1200).contains(&count("b")), "b: {}", count("b"));
        assert!((3700..4300).contains(&count("c")), "c: {}", count("c"));
        assert_eq!(count("low"), 0);
        // Without `b`, only b's keys move.
        let without_b = [all[0].clone(), all[2].clone(), all[3].clone()];
        for (k, p) in keys.iter().zip(&first) {
            let now = pick(&without_b, k);
            if p != "b" {
                assert_eq!(&now, p, "{k} moved off {p}");
            }
        }
        // Excluded accounts are skipped, as with every pick.
        let k = &keys[0];
        let excluded = [first[0].clone()];
        let other = select_account_for_key(
            &all,
            &Demand::new(Protocol::Anthropic, None),
            &excluded,
            0,
            k,
        )
        .unwrap();
        assert_ne!(other.id, first[0]);
    }

    #[test]
    fn weighted_spreads_by_weight() {
        let rr = AtomicU64::new(0);
        let all = vec![
            account("a", AccountType::Claude, 50, 3),
            account("b", AccountType::Claude, 50, 1),
        ];
        let mut a = 0;
        for _ in 0..4000 {
            if select_account(
                &all,
                &Demand::new(Protocol::Anthropic, None),
                &[],
                PickStrategy::Weighted,
                0,
                &rr,
            )
            .unwrap()
            .id == "a"
            {
                a += 1;
            }
        }
        assert!((2700..3300).contains(&a), "a picked {a} of 4000");
    }

    #[test]
    fn concurrency_cap_and_models() {
        let rr = AtomicU64::new(0);
        let mut acc = Arc::try_unwrap(account("a", AccountType::Claude, 50, 1)).unwrap();
        acc.max_concurrency = Some(1);
        acc.models = vec!["claude-sonnet-4-5".into()];
        let acc = Arc::new(acc);
        let all = vec![acc.clone()];
        assert!(select_account(
            &all,
            &Demand::new(Protocol::Anthropic, Some("claude-opus-4-1")),
            &[],
            PickStrategy::Weighted,
            0,
            &rr
        )
        .is_none());
        let lease = InflightLease::try_acquire(&acc).unwrap();
        assert!(select_account(
            &all,
            &Demand::new(Protocol::Anthropic, Some("claude-sonnet-4-5")),
            &[],
            PickStrategy::Weighted,
            0,
            &rr
        )
        .is_none());
        drop(lease);
        assert!(select_account(
            &all,
            &Demand::new(Protocol::Anthropic, Some("claude-sonnet-4-5")),
            &[],
            PickStrategy::Weighted,
            0,
            &rr
        )
        .is_some());
    }

    #[test]
    fn an_account_whose_token_expired_serves_only_when_no_other_can() {
        let with_expiry = |id: &str, priority: i64, at: Option<i64>| {
            let a = account(id, AccountType::ClaudeOfficial, priority, 1);
            let Ok(mut a) = Arc::try_unwrap(a) else {
                panic!("fresh account");
            };
            a.token_expires_ms = at;
            Arc::new(a)
        };
        let now = 1_000_000;
        let rr = AtomicU64::new(0);
        let pick = |all: &[Arc<Account>]| {
            select_account(
                all,
                &Demand::new(Protocol::Anthropic, None),
                &[],
                PickStrategy::Weighted,
                now,
                &rr,
            )
            .map(|a| a.id.clone())
        };
        // Expired at the preferred priority: the next tier serves instead.
        let all = [
            with_expiry("expired", 10, Some(now - 1)),
            with_expiry("fresh", 50, Some(now + 60_000)),
        ];
        for _ in 0..20 {
            assert_eq!(pick(&all).as_deref(), Some("fresh"));
        }
        // Nothing else: the expired one still serves (its expiry may be wrong).
        let only = [
            with_expiry("old", 50, Some(now - 1)),
            with_expiry("older", 60, Some(now - 5)),
        ];
        assert_eq!(pick(&only).as_deref(), Some("old"));
        // Unknown expiry counts as not expired.
        let unknown = [
            with_expiry("unknown", 10, None),
            with_expiry("fresh", 50, Some(now + 1)),
        ];
        assert_eq!(pick(&unknown).as_deref(), Some("unknown"));
    }

    #[test]
    fn a_chatgpt_token_account_takes_streamed_responses_calls_only() {
        let with_credential = |id: &str, t: AccountType, secret: &str| {
            let Ok(mut a) = Arc::try_unwrap(account(id, t, 50, 1)) else {
                panic!("fresh account");
            };
            a.credential = Credential::new(secret.into());
            Arc::new(a)
        };
        let chatgpt = with_credential("chatgpt", AccountType::OpenaiResponses, "eyJhbGciOi.x.y");
        let api_key = with_credential("api", AccountType::OpenaiResponses, "sk-proj-1");
        // A JWT on an `openai` account is some compatible provider's key, not ChatGPT's.
        let compatible = with_credential("compat", AccountType::Openai, "eyJhbGciOi.x.y");
        assert!(chatgpt.has_chatgpt_token());
        assert!(!api_key.has_chatgpt_token() && !compatible.has_chatgpt_token());
        let streamed = Demand::new(Protocol::OpenaiResponses, Some("gpt-5"));
        let unstreamed = Demand {
            unstreamed_response: true,
            ..streamed
        };
        for a in [&chatgpt, &api_key, &compatible] {
            assert!(a.serves(&streamed), "{}", a.id);
            assert!(a.serves_model(Protocol::OpenaiResponses, Some("gpt-5")));
        }
        assert!(!chatgpt.serves(&unstreamed));
        assert!(api_key.serves(&unstreamed) && compatible.serves(&unstreamed));
        let rr = AtomicU64::new(0);
        for _ in 0..20 {
            let all = [chatgpt.clone(), api_key.clone()];
            let s = select_account(&all, &unstreamed, &[], PickStrategy::Weighted, 0, &rr);
            assert_eq!(s.unwrap().id, "api");
        }
        let only = [chatgpt.clone()];
        assert!(select_account(&only, &unstreamed, &[], PickStrategy::Weighted, 0, &rr).is_none());
    }

    #[test]
    fn round_robin_and_least_inflight() {
        let rr = AtomicU64::new(0);
        let all = vec![
            account("a", AccountType::Gemini, 50, 1),
            account("b", AccountType::Gemini, 50, 1),
        ];
        let ids: Vec<String> = (0..4)
            .map(|_| {
                select_account(
                    &all,
                    &Demand::new(Protocol::Gemini, None),
                    &[],
                    PickStrategy::RoundRobin,
                    0,
                    &rr,
                )
                .unwrap()
                .id
                .clone()
            })
            .collect();
        assert_eq!(ids, ["a", "b", "a", "b"]);
        let _l = InflightLease::try_acquire(&all[0]).unwrap();
        let s = select_account(
            &all,
            &Demand::new(Protocol::Gemini, None),
            &[],
            PickStrategy::LeastInflight,
            0,
            &rr,
        );
        assert_eq!(s.unwrap().id, "b");
    }

    #[test]
    fn concurrency_cap_is_atomic_under_contention() {
        let mut acc = Arc::try_unwrap(account("a", AccountType::Claude, 50, 1)).unwrap();
        acc.max_concurrency = Some(5);
        let acc = Arc::new(acc);
        let leases: Vec<Option<InflightLease>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..32)
                .map(|_| s.spawn(|| InflightLease::try_acquire(&acc)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(leases.iter().filter(|l| l.is_some()).count(), 5);
        assert_eq!(acc.state.inflight.load(Ordering::Relaxed), 5);
        drop(leases);
        assert_eq!(acc.state.inflight.load(Ordering::Relaxed), 0);
    }
}
