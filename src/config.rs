//! Configuration: `conf/relay.toml` (optional) under `RELAY_*` environment variables, parsed
//! into a file model and validated into the runtime settings.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use relay_filters::accounts::PickStrategy;
use relay_filters::chain::FilterConfig;
use relay_filters::session_hash::SessionStrategy;
use serde::Deserialize;

/// A configuration value that must never be printed (passwords, tokens).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The whole configuration, as read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Proxy listener.
    pub proxy_addr: String,
    /// Admin API, UI and metrics listener.
    pub admin_addr: String,
    /// Where the SQLite file, generated secrets and the usage spool live.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; empty = `sqlite://{data_dir}/relay.db`.
    pub database_url: String,
    /// Redis for sessions, cooldowns and counters across nodes; unset = in-memory.
    pub redis_url: Option<String>,
    /// Longest one Redis operation may take; past it the node serves from memory and tries
    /// Redis again a second later.
    #[serde(with = "humantime_serde")]
    pub redis_op_timeout: Duration,
    /// Password of the first admin (instead of a random one).
    pub admin_password: Option<Secret>,
    /// Static bearer token the admin API accepts (automation); unset = none.
    pub admin_token: Option<Secret>,
    /// Bearer token `/metrics` asks for (the admin token is taken too); unset: `/metrics` is
    /// open to whoever reaches the admin address.
    pub metrics_token: Option<Secret>,
    /// AES-256-GCM key for credentials at rest, 64 hex chars; unset = generated file in data_dir.
    pub encryption_key: Option<Secret>,
    /// Server secret mixed into API key hashes, 64 hex chars; unset = generated file in data_dir.
    pub key_pepper: Option<Secret>,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// A client connection kept alive is closed after this long without a new request, and a
    /// client that sends nothing of a request head or body for this long is dropped (at least
    /// one second).
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// A price list to use instead of the shipped one (admins override per model in the
    /// database). Unset: `conf/pricing.toml` when the working directory has one, else the list
    /// built into the binary.
    pub pricing_file: Option<PathBuf>,
    /// Keys one user may own.
    pub max_keys_per_user: u32,
    /// PEM certificate chain for TLS on the proxy listener (with `proxy_tls_key`); unset: the
    /// proxy speaks plain HTTP, for a TLS-terminating load balancer in front.
    pub proxy_tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `proxy_tls_cert`.
    pub proxy_tls_key: Option<PathBuf>,
    /// Marks the admin session cookie `Secure` (sent over HTTPS only): for an admin service
    /// reached through a TLS-terminating proxy.
    pub admin_secure_cookie: bool,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Whether idle proxy threads steal queued work from busy ones (Pingora's default). Off,
    /// each connection runs on one thread picked when it is accepted.
    pub work_stealing: bool,
    /// `text` or `json`.
    pub log_format: String,
    /// A concurrency slot or cost hold in Redis expires after this when its node never gives
    /// it back (renewed while its request runs).
    #[serde(with = "humantime_serde")]
    pub concurrency_lease_ttl: Duration,
    /// How often each node polls the database for admin changes.
    #[serde(with = "humantime_serde")]
    pub cache_refresh_interval: Duration,
    /// How often each node raises its cost-limit counters to the spend stored by all nodes.
    #[serde(with = "humantime_serde")]
    pub spend_refresh_interval: Duration,
    pub upstream: UpstreamConfig,
    pub session: SessionConfig,
    pub scheduler: SchedulerConfig,
    pub usage: UsageConfig,
    pub shutdown: ShutdownConfig,
    pub oauth: OAuthConfig,
    /// The filter chain, in order; empty = the default chain.
    pub filters: Vec<FilterConfig>,
}

/// Talking to upstream accounts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed until the response head arrives.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Longest silence between two body chunks.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long an idle pooled connection is kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Attempts per request, failovers included.
    pub max_attempts: u32,
    /// Upstream statuses that trigger failover (before any byte reached the client).
    pub failover_statuses: Vec<u16>,
    /// `drain` (read the upstream to its end for exact usage) or `abort`.
    pub on_client_disconnect: String,
    /// Upper bound for draining after the client left.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// Session identity and bindings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub strategy: SessionStrategy,
    /// Messages hashed after the system prompt when no explicit session id exists.
    pub message_count: usize,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub responses_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub renew_threshold: Duration,
    /// Bindings held by the in-memory store.
    pub memory_capacity: u64,
}

/// Account selection and account state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    pub strategy: PickStrategy,
    /// After a 429 without reset information.
    #[serde(with = "humantime_serde")]
    pub cooldown_429: Duration,
    /// The longest cooldown a 429's reset information may ask for.
    #[serde(with = "humantime_serde")]
    pub cooldown_429_max: Duration,
    #[serde(with = "humantime_serde")]
    pub cooldown_529: Duration,
    #[serde(with = "humantime_serde")]
    pub cooldown_5xx: Duration,
    /// Server errors in a row before the 5xx cooldown.
    pub server_error_threshold: u32,
    /// 401/403 answers in a row before the account is disabled.
    pub account_error_threshold: u32,
}

/// Shortest usage record retention accepted, in days.
pub const MIN_RETENTION_DAYS: u32 = 7;

/// Longest usage record retention accepted, in days (a hundred years).
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// The usage record writer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    pub queue_capacity: usize,
    pub batch_size: usize,
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// With SQLite: its worker threads yield the CPU to the proxy (Linux `SCHED_IDLE`) while the
    /// usage queue is short.
    pub idle_priority: bool,
    /// How long a stopping node waits for the usage records still held to be spooled (the
    /// spool retried while it fails) before it exits with status 1.
    #[serde(with = "humantime_serde")]
    pub exit_timeout: Duration,
    /// Usage records older than this many days are removed (their daily totals, which the
    /// summaries, key costs and cost limits read, are kept); unset keeps every record.
    pub retention_days: Option<u32>,
    /// How often records past the retention period are looked for.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
}

/// Refreshing the access tokens of OAuth accounts (`claude-official`, and `openai-responses`
/// with a ChatGPT token) from their refresh tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    /// Whether the relay refreshes tokens by itself (an admin can always refresh by hand).
    pub refresh_enabled: bool,
    /// How often the accounts are looked at.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// A token is refreshed this long before it expires; one whose expiry is unknown at once.
    #[serde(with = "humantime_serde")]
    pub refresh_margin: Duration,
    /// Longest wait for the provider's answer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub claude_token_url: String,
    pub claude_client_id: String,
    pub openai_token_url: String,
    pub openai_client_id: String,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        OAuthConfig {
            refresh_enabled: true,
            refresh_interval: Duration::from_secs(60),
            refresh_margin: Duration::from_secs(15 * 60),
            // Token endpoints answer in well under a second; a refresh may take three times
            // this, which a shutdown's grace period should cover.
            timeout: Duration::from_secs(10),
            // Claude Code's own client and endpoint.
            claude_token_url: "https://console.anthropic.com/v1/oauth/token".into(),
            claude_client_id: "9d1c250a-e61b-44d9-88ed-5944d1962f5e".into(),
            // The Codex CLI's.
            openai_token_url: "https://auth.openai.com/oauth/token".into(),
            openai_client_id: "app_EMoamEEZ73f0CkXaXp7hrann".into(),
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Time between the signal and closing listeners.
    pub grace_period_seconds: u64,
    /// Time in-flight requests get to finish after that.
    pub graceful_shutdown_timeout_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            proxy_addr: "0.0.0.0:8080".into(),
            admin_addr: "127.0.0.1:8081".into(),
            data_dir: PathBuf::from("./data"),
            database_url: String::new(),
            redis_url: None,
            redis_op_timeout: Duration::from_millis(250),
            admin_password: None,
            admin_token: None,
            metrics_token: None,
            encryption_key: None,
            key_pepper: None,
            max_body_bytes: 32 * 1024 * 1024,
            client_idle_timeout: Duration::from_secs(60),
            pricing_file: None,
            max_keys_per_user: 10,
            proxy_tls_cert: None,
            proxy_tls_key: None,
            admin_secure_cookie: false,
            threads: 2,
            work_stealing: true,
            log_format: "text".into(),
            concurrency_lease_ttl: Duration::from_secs(60),
            cache_refresh_interval: Duration::from_millis(500),
            spend_refresh_interval: Duration::from_secs(60),
            upstream: UpstreamConfig::default(),
            session: SessionConfig::default(),
            scheduler: SchedulerConfig::default(),
            usage: UsageConfig::default(),
            shutdown: ShutdownConfig::default(),
            oauth: OAuthConfig::default(),
            filters: Vec::new(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(300),
            pool_idle_timeout: Duration::from_secs(90),
            max_attempts: 3,
            failover_statuses: vec![429, 529, 500, 502, 503, 504],
            on_client_disconnect: "drain".into(),
            drain_timeout: Duration::from_secs(120),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            strategy: SessionStrategy::Content,
            message_count: 1,
            ttl: Duration::from_secs(3600),
            responses_ttl: Duration::from_secs(1800),
            renew_threshold: Duration::from_secs(300),
            memory_capacity: 10_000,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            strategy: PickStrategy::Weighted,
            cooldown_429: Duration::from_secs(60),
            cooldown_429_max: relay_filters::account_state::DEFAULT_COOLDOWN_429_MAX,
            cooldown_529: Duration::from_secs(120),
            cooldown_5xx: Duration::from_secs(300),
            server_error_threshold: 3,
            account_error_threshold: 5,
        }
    }
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            queue_capacity: 10_000,
            // A batch fills for up to 100 ms: 2000 records hold 20 000 requests/s in one
            // transaction. At 500, 16 000 requests/s took four, and the SQLite writer's CPU per
            // record was 16 % higher (per-commit pages, rollup rows, checkpoints).
            batch_size: 2000,
            flush_interval: Duration::from_secs(1),
            idle_priority: true,
            exit_timeout: Duration::from_secs(30),
            retention_days: None,
            retention_interval: Duration::from_secs(3600),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace_period_seconds: 5,
            graceful_shutdown_timeout_seconds: 30,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path` (if it exists, or must exist when given explicitly) under `RELAY_*`
    /// variables (`RELAY_SESSION__TTL` reaches `[session] ttl`).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::new();
        match path {
            Some(p) => {
                if !p.exists() {
                    return Err(ConfigError::Invalid(format!(
                        "config file {} does not exist",
                        p.display()
                    )));
                }
                fig = fig.merge(Toml::file(p));
            }
            None => fig = fig.merge(Toml::file("conf/relay.toml")),
        }
        // RELAY_LOG (log filter), RELAY_NEW_PASSWORD (CLI) and RELAY_TEST_* are not options.
        let env = Env::prefixed("RELAY_")
            .filter(|k| {
                let k = k.as_str().to_ascii_lowercase();
                k != "log" && k != "new_password" && !k.starts_with("test_")
            })
            .split("__");
        fig = fig.merge(env);
        let config: Config = fig.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.proxy_addr.parse::<SocketAddr>().is_err() {
            return bad(format!("proxy_addr is not an address: {}", self.proxy_addr));
        }
        if self.admin_addr.parse::<SocketAddr>().is_err() {
            return bad(format!("admin_addr is not an address: {}", self.admin_addr));
        }
        if self.proxy_tls_cert.is_some() != self.proxy_tls_key.is_some() {
            return bad("proxy_tls_cert and proxy_tls_key are set together or not at all".into());
        }
        let url = self.database_url();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return bad("database_url must be sqlite:... or postgres://...".into());
        }
        if let Some(r) = &self.redis_url {
            if !(r.starts_with("redis://") || r.starts_with("rediss://")) {
                return bad("redis_url must start with redis:// or rediss://".into());
            }
        }
        // Past a few seconds a Redis that accepts connections but does not answer would hold
        // every request that meets it that long, where memory could serve them.
        if self.redis_op_timeout.is_zero() || self.redis_op_timeout > Duration::from_secs(10) {
            return bad("redis_op_timeout must be more than 0 and at most 10s".into());
        }
        if self.client_idle_timeout < Duration::from_secs(1) {
            return bad("client_idle_timeout must be at least 1s".into());
        }
        if self.spend_refresh_interval < Duration::from_millis(100) {
            return bad("spend_refresh_interval must be at least 100ms".into());
        }
        FilterConfig::check_chain(&self.filter_chain()).map_err(ConfigError::Invalid)?;
        // A static token opens the whole admin API (or the metrics): an empty or short one (a
        // placeholder left in a file) would be as good as none.
        for (name, token, unset) in [
            ("admin_token", &self.admin_token, "to use logins only"),
            ("metrics_token", &self.metrics_token, "for open metrics"),
        ] {
            if token
                .as_ref()
                .is_some_and(|t| t.expose().trim().len() < MIN_ADMIN_TOKEN_LEN)
            {
                return bad(format!(
                    "{name} must have at least {MIN_ADMIN_TOKEN_LEN} characters (leave it unset {unset})"
                ));
            }
        }
        if self.max_body_bytes == 0 {
            return bad("max_body_bytes must be positive".into());
        }
        if self.scheduler.cooldown_429_max < Duration::from_secs(1) {
            return bad("scheduler.cooldown_429_max must be at least 1s".into());
        }
        if self.upstream.max_attempts == 0 {
            return bad("upstream.max_attempts must be at least 1".into());
        }
        if !matches!(
            self.upstream.on_client_disconnect.as_str(),
            "drain" | "abort"
        ) {
            return bad("upstream.on_client_disconnect must be drain or abort".into());
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad("log_format must be text or json".into());
        }
        if let Some(days) = self.usage.retention_days {
            // A week at least: a record replayed from the spool after a long outage must find
            // its first copy still there, or its daily totals would count it twice.
            if !(MIN_RETENTION_DAYS..=MAX_RETENTION_DAYS).contains(&days) {
                return bad(format!(
                    "usage.retention_days must be {MIN_RETENTION_DAYS} to {MAX_RETENTION_DAYS} \
                     (unset: keep every record)"
                ));
            }
        }
        if self.usage.retention_interval < Duration::from_millis(100) {
            return bad("usage.retention_interval must be at least 100ms".into());
        }
        if self.threads == 0 || self.usage.batch_size == 0 || self.usage.queue_capacity == 0 {
            return bad(
                "threads, usage.batch_size and usage.queue_capacity must be positive".into(),
            );
        }
        for url in [&self.oauth.claude_token_url, &self.oauth.openai_token_url] {
            if let Err(e) = relay_filters::accounts::BaseUrl::parse(url) {
                return bad(format!("oauth token URL: {e}"));
            }
        }
        if self.oauth.refresh_interval < Duration::from_secs(1) {
            return bad("oauth.refresh_interval must be at least 1s".into());
        }
        if self.oauth.timeout < Duration::from_secs(1) {
            return bad("oauth.timeout must be at least 1s".into());
        }
        for key in [&self.encryption_key, &self.key_pepper]
            .into_iter()
            .flatten()
        {
            if parse_hex_key(key.expose()).is_none() {
                return bad("encryption_key and key_pepper must be 64 hex characters".into());
            }
        }
        Ok(())
    }

    /// The database URL, defaulting to a SQLite file in the data directory.
    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("relay.db").display())
        } else {
            self.database_url.clone()
        }
    }

    /// The filter chain to build.
    pub fn filter_chain(&self) -> Vec<FilterConfig> {
        if self.filters.is_empty() {
            FilterConfig::default_chain()
        } else {
            self.filters.clone()
        }
    }
}

/// The shortest static admin token accepted.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Parses a 32-byte key written as 64 hex characters.
pub fn parse_hex_key(s: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(s.trim()).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_is_valid_and_complete() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/relay.example.toml");
        let text = std::fs::read_to_string(&path).expect("example config");
        let parsed: Config = Figment::new()
            .merge(Toml::string(&text))
            .extract()
            .expect("example parses");
        parsed.validate().expect("example validates");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<Config, _> = Figment::new()
            .merge(Toml::string("proxy_adr = \"x\""))
            .extract();
        assert!(r.is_err());
        let r: Result<Config, _> = Figment::new()
            .merge(Toml::string(
                "[[filters]]\nkind = \"api_key_auth\"\nextra = 1",
            ))
            .extract();
        assert!(r.is_err());
    }

    #[test]
    fn filter_chains_that_would_book_wrong_are_refused() {
        let chain = |kinds: &[&str]| {
            let toml: String = kinds
                .iter()
                .map(|k| format!("[[filters]]\nkind = \"{k}\"\n"))
                .collect();
            let c: Config = Figment::new()
                .merge(Toml::string(&toml))
                .extract()
                .expect("parses");
            c.validate().map_err(|e| e.to_string())
        };
        let whole = [
            "api_key_auth",
            "key_limits",
            "session_hash",
            "sticky_upstream",
            "header_rewrite",
            "sse_usage",
            "cost",
        ];
        assert_eq!(chain(&whole), Ok(()));
        // Optional filters may go.
        assert_eq!(
            chain(&[
                "api_key_auth",
                "sticky_upstream",
                "header_rewrite",
                "sse_usage",
                "cost"
            ]),
            Ok(())
        );
        let err = chain(&[
            "api_key_auth",
            "sticky_upstream",
            "header_rewrite",
            "cost",
            "sse_usage",
        ])
        .unwrap_err();
        assert!(err.contains("sse_usage must come before cost"), "{err}");
        let err = chain(&["sticky_upstream", "header_rewrite", "sse_usage", "cost"]).unwrap_err();
        assert!(err.contains("needs api_key_auth"), "{err}");
        let err = chain(&[
            "api_key_auth",
            "sticky_upstream",
            "header_rewrite",
            "sse_usage",
            "sse_usage",
            "cost",
        ])
        .unwrap_err();
        assert!(err.contains("sse_usage is listed twice"), "{err}");
        let err = chain(&[
            "api_key_auth",
            "sticky_upstream",
            "session_hash",
            "header_rewrite",
            "sse_usage",
            "cost",
        ])
        .unwrap_err();
        assert!(
            err.contains("session_hash must come before sticky_upstream"),
            "{err}"
        );
    }

    #[test]
    fn a_short_admin_token_is_refused() {
        for (token, ok) in [
            ("", false),
            ("   ", false),
            ("short-token", false),
            ("a-token-of-16-ch", true),
        ] {
            let c = Config {
                admin_token: Some(Secret(token.into())),
                ..Default::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{token:?}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config {
            admin_password: Some(Secret("hunter2".into())),
            ..Default::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn validation() {
        let c = Config {
            database_url: "mysql://x".into(),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        assert!(Config::default().validate().is_ok());
        assert_eq!(Config::default().database_url(), "sqlite://./data/relay.db");
        let c = Config {
            scheduler: SchedulerConfig {
                cooldown_429_max: Duration::ZERO,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(c.validate().is_err(), "a zero cap on hinted cooldowns");
    }

    #[test]
    fn redis_op_timeout_is_read_and_bounded() {
        let read = |text: &str| -> Config {
            Figment::new()
                .merge(Toml::string(text))
                .extract()
                .expect("parses")
        };
        let c = read("redis_op_timeout = \"2s\"");
        assert_eq!(c.redis_op_timeout, Duration::from_secs(2));
        assert!(c.validate().is_ok());
        assert_eq!(
            Config::default().redis_op_timeout,
            Duration::from_millis(250)
        );
        for refused in ["0s", "11s"] {
            let c = read(&format!("redis_op_timeout = \"{refused}\""));
            assert!(c.validate().is_err(), "{refused} was accepted");
        }
    }
}
