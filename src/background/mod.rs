//! Background work of a relay node, run as one Pingora background service with its own
//! runtime: the usage writer, account state persistence, cache refresh and the admin service.

pub mod account_events;
pub mod cache_refresh;
pub mod health;
pub mod oauth_refresh;
pub mod priority;
pub mod retention;
pub mod usage_writer;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::admin::{self, AdminState};
use crate::cache::{AccountCache, KeyCache, PriceCache};
use crate::secrets::SecretBox;
use crate::store::{RedisCooldowns, SqlStore};
use account_events::AccountEvent;
use usage_writer::{StoreSlot, UsageWriter, WriterSettings};

/// Everything the control plane starts with.
pub struct ControlPlane {
    pub database_url: String,
    /// The admin service's socket, bound (non-blocking) before the node starts.
    pub admin_listener: Mutex<Option<std::net::TcpListener>>,
    pub admin_token: Option<String>,
    /// What `/metrics` asks for, when set.
    pub metrics_token: Option<String>,
    pub max_keys_per_user: u32,
    pub admin_secure_cookie: bool,
    pub refresh_interval: std::time::Duration,
    pub writer_settings: WriterSettings,
    /// SQLite's worker threads at idle CPU priority while the usage queue is short (see
    /// [`priority`]).
    pub sqlite_idle_priority: bool,
    pub usage_backlog: usage_writer::Backlog,
    pub secrets: Arc<SecretBox>,
    pub pepper: Arc<Vec<u8>>,
    pub keys: Arc<KeyCache>,
    pub accounts: Arc<AccountCache>,
    pub prices: Arc<PriceCache>,
    pub redis: Option<std::sync::Arc<crate::store::RedisLink>>,
    pub writer: Mutex<Option<UsageWriter>>,
    pub account_events: Mutex<Option<mpsc::UnboundedReceiver<AccountEvent>>>,
    /// Cooldowns shared through Redis, when configured.
    pub cooldowns: Option<Arc<RedisCooldowns>>,
    /// This node's cost-limit counters, raised to the stored spend every `spend_refresh`.
    pub memory_limits: Arc<relay_filters::key_limits::MemoryLimits>,
    pub spend_refresh: std::time::Duration,
    /// How answers and health checks change accounts (the error threshold).
    pub state_rules: relay_filters::account_state::StateRules,
    /// The session bindings, for the admin sessions view.
    pub sessions: Arc<crate::admin::BindingsAdmin>,
    /// OAuth token refresh.
    pub oauth: oauth_refresh::RefreshSettings,
    /// Usage records kept this many days (`None`: all), looked at every `retention_interval`.
    pub retention_days: Option<u32>,
    pub retention_interval: std::time::Duration,
}

/// Ids with work running on them on this node (a health check, a token refresh): one piece of
/// work per id at a time.
#[derive(Default)]
pub struct InFlight(Mutex<std::collections::HashSet<String>>);

/// An id's place in [`InFlight`], given back when dropped, however the work ends.
pub struct InFlightGuard<'a>(&'a InFlight, String);

impl InFlight {
    /// The id's place, or `None` while other work on it runs.
    pub fn enter(&self, id: &str) -> Option<InFlightGuard<'_>> {
        relay_filters::lock(&self.0)
            .insert(id.to_string())
            .then(|| InFlightGuard(self, id.to_string()))
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        relay_filters::lock(&self.0 .0).remove(&self.1);
    }
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    match slot.lock() {
        Ok(mut g) => g.take(),
        Err(p) => p.into_inner().take(),
    }
}

#[async_trait]
impl BackgroundService for ControlPlane {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut tasks = tokio::task::JoinSet::new();
        // The usage writer runs before the database is reached: until it is, batches go to the
        // spool, so the queue never fills behind a database that is down as the node starts.
        let usage_store = StoreSlot::default();
        if let Some(writer) = take(&self.writer) {
            tasks.spawn(writer.run(
                usage_store.clone(),
                self.writer_settings.clone(),
                shutdown.clone(),
            ));
        }
        let store = loop {
            match SqlStore::connect(&self.database_url, 8).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::error!(error = %e, "database unreachable, retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        };
        // On a SQLite file the store writes usage batches through a connection of its own
        // (`store::sqlite_usage`): through the shared pool they went round the connections,
        // each of which found its page cache stale and read pages again.
        let _ = usage_store.set(store.clone());
        let tokens = Arc::new(oauth_refresh::TokenRefresh::new(
            crate::proxy::oauth::TokenClient::new(
                self.oauth.timeout,
                self.oauth.claude.clone(),
                self.oauth.openai.clone(),
            ),
            store.clone(),
            self.accounts.clone(),
            self.secrets.clone(),
            self.oauth.margin,
        ));
        let refresh = Arc::new(tokio::sync::Notify::new());
        if let Some(rx) = take(&self.account_events) {
            tasks.spawn(account_events::persist(
                store.clone(),
                rx,
                self.cooldowns.clone(),
                tokens.clone(),
                self.accounts.clone(),
                refresh.clone(),
            ));
        }
        if self.sqlite_idle_priority && !store.is_postgres() {
            tasks.spawn(priority::keep_sqlite_workers_idle(
                self.usage_backlog.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(cache_refresh::raise_spend(
            store.clone(),
            self.memory_limits.clone(),
            self.spend_refresh,
            shutdown.clone(),
        ));
        tasks.spawn(cache_refresh::run(
            store.clone(),
            self.keys.clone(),
            self.accounts.clone(),
            self.prices.clone(),
            self.secrets.clone(),
            self.refresh_interval,
            refresh.clone(),
            self.cooldowns.clone(),
            shutdown.clone(),
        ));
        if let Some(days) = self.retention_days {
            tasks.spawn(retention::run(
                store.clone(),
                days,
                self.retention_interval,
                shutdown.clone(),
            ));
        }
        let health = Arc::new(health::Health::new(
            crate::proxy::health::HealthChecker::new(health::CHECK_TIMEOUT),
            store.clone(),
            self.accounts.clone(),
            self.secrets.clone(),
            self.state_rules.clone(),
        ));
        tasks.spawn(health::run(health.clone(), shutdown.clone()));
        if self.oauth.enabled {
            tasks.spawn(oauth_refresh::run(
                tokens.clone(),
                self.oauth.interval,
                shutdown.clone(),
            ));
        }
        let mut state = AdminState::new(
            store.clone(),
            self.secrets.clone(),
            self.pepper.clone(),
            self.admin_token.clone(),
            self.max_keys_per_user,
            self.keys.clone(),
            self.accounts.clone(),
            self.prices.clone(),
            self.redis.clone(),
            self.cooldowns.clone(),
            refresh,
            health,
            self.sessions.clone(),
            tokens,
        );
        state.secure_cookie = self.admin_secure_cookie;
        state.metrics_token = self.metrics_token.clone();
        let app = admin::router(state).into_make_service_with_connect_info::<SocketAddr>();
        match take(&self.admin_listener).map(tokio::net::TcpListener::from_std) {
            Some(Ok(listener)) => {
                if let Ok(addr) = listener.local_addr() {
                    tracing::info!(%addr, "admin service listening");
                }
                let mut stop = shutdown.clone();
                tasks.spawn(async move {
                    let served = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop.wait_for(|s| *s).await;
                        })
                        .await;
                    if let Err(e) = served {
                        tracing::error!(error = %e, "admin service failed");
                    }
                });
            }
            Some(Err(e)) => tracing::error!(error = %e, "admin service cannot listen"),
            None => tracing::error!("admin service started twice"),
        }
        while tasks.join_next().await.is_some() {}
        crate::log_sink::flush_global();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_filters::UsageRecord;

    /// The usage writer runs while the control plane still cannot reach the database: records
    /// booked meanwhile are spooled, not left in the queue (where the queue filled up, and they
    /// were lost had the node stopped before the database answered).
    #[tokio::test]
    async fn usage_records_are_spooled_while_the_database_cannot_be_reached() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let (queue, writer, _drain) = usage_writer::usage_channel(10, spool.clone());
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let control = ControlPlane {
            database_url: format!("postgres://relay@127.0.0.1:{port}/relay"),
            admin_listener: Mutex::new(None),
            admin_token: None,
            metrics_token: None,
            max_keys_per_user: 10,
            admin_secure_cookie: false,
            refresh_interval: std::time::Duration::from_secs(1),
            writer_settings: WriterSettings {
                batch_size: 10,
                flush_interval: std::time::Duration::from_millis(10),
            },
            sqlite_idle_priority: false,
            usage_backlog: queue.backlog(),
            secrets: Arc::new(SecretBox::new("test".into(), [7; 32])),
            pepper: Arc::new(vec![1; 32]),
            keys: Arc::new(KeyCache::new(vec![1; 32])),
            accounts: Arc::default(),
            prices: Arc::new(PriceCache::new(Default::default())),
            redis: None,
            writer: Mutex::new(Some(writer)),
            account_events: Mutex::new(None),
            cooldowns: None,
            memory_limits: Arc::default(),
            spend_refresh: std::time::Duration::from_secs(60),
            state_rules: Default::default(),
            sessions: Arc::new(crate::admin::BindingsAdmin {
                store: relay_filters::session_store::MemorySessionStore::new(16),
                mirror: None,
            }),
            oauth: oauth_refresh::RefreshSettings::from_config(&Default::default()).unwrap(),
            retention_days: None,
            retention_interval: std::time::Duration::from_secs(3600),
        };
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(async move { control.start(shutdown).await });
        queue
            .push(UsageRecord {
                id: "booked".into(),
                ..Default::default()
            })
            .await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let spooled: String = std::fs::read_dir(&spool)
                .map(|d| {
                    d.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                        .collect()
                })
                .unwrap_or_default();
            if spooled.contains("\"booked\"") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the record was not spooled"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        running.abort();
    }
}
