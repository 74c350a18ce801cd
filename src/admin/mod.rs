//! The admin service (Axum): JSON API for accounts, users, keys and usage, login sessions,
//! `/metrics`, `/healthz` and `/readyz`. Runs on its own port inside the relay process.

pub mod auth;
pub mod error;
mod extract;
mod routes;
mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::background::cache_refresh as reload;
use crate::cache::{AccountCache, KeyCache, PriceCache};
use crate::secrets::SecretBox;
use crate::store::SqlStore;

/// What every admin handler can reach.
#[derive(Clone)]
pub struct AdminState {
    pub store: SqlStore,
    pub secrets: Arc<SecretBox>,
    pub pepper: Arc<Vec<u8>>,
    pub admin_token: Option<String>,
    pub max_keys_per_user: u32,
    pub keys: Arc<KeyCache>,
    pub accounts: Arc<AccountCache>,
    pub prices: Arc<PriceCache>,
    /// Failed logins per user name and address, for throttling.
    pub login_failures: moka::sync::Cache<String, u32>,
    /// Whether Redis is configured (for `/readyz`).
    pub redis: Option<std::sync::Arc<crate::store::RedisLink>>,
    /// Account cooldowns shared through Redis, when configured.
    pub cooldowns: Option<Arc<crate::store::RedisCooldowns>>,
    /// Wakes the cache refresher after a change made on this node.
    pub refresh: Arc<tokio::sync::Notify>,
    /// Account health checks (and the periodic job's wake-up).
    pub health: Arc<crate::background::health::Health>,
    /// Session bindings, for the sessions view.
    pub sessions: Arc<BindingsAdmin>,
    /// OAuth token refresh by hand.
    pub tokens: Arc<crate::background::oauth_refresh::TokenRefresh>,
    /// The session cookie is marked `Secure` (config `admin_secure_cookie`).
    pub secure_cookie: bool,
    /// The bearer token `/metrics` asks for (config `metrics_token`); none: open.
    pub metrics_token: Option<String>,
}

/// Where operators see and end session bindings: Redis itself when configured (so a Redis
/// failure is an error here, never this node's memory passed off as the whole), else this
/// node's memory store.
pub struct BindingsAdmin {
    pub store: Arc<dyn relay_filters::session_store::SessionStore>,
    /// With Redis: this node's memory copies, dropped with an ended binding.
    pub mirror: Option<Arc<relay_filters::session_store::MemorySessionStore>>,
}

impl BindingsAdmin {
    /// Whether the bindings are Redis's (shared by every node).
    pub fn shared(&self) -> bool {
        self.mirror.is_some()
    }
}

impl AdminState {
    /// Builds the state; login failures are remembered for 15 minutes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: SqlStore,
        secrets: Arc<SecretBox>,
        pepper: Arc<Vec<u8>>,
        admin_token: Option<String>,
        max_keys_per_user: u32,
        keys: Arc<KeyCache>,
        accounts: Arc<AccountCache>,
        prices: Arc<PriceCache>,
        redis: Option<std::sync::Arc<crate::store::RedisLink>>,
        cooldowns: Option<Arc<crate::store::RedisCooldowns>>,
        refresh: Arc<tokio::sync::Notify>,
        health: Arc<crate::background::health::Health>,
        sessions: Arc<BindingsAdmin>,
        tokens: Arc<crate::background::oauth_refresh::TokenRefresh>,
    ) -> Self {
        AdminState {
            store,
            secrets,
            pepper,
            admin_token,
            max_keys_per_user,
            keys,
            accounts,
            prices,
            login_failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(15 * 60))
                .build(),
            redis,
            cooldowns,
            refresh,
            health,
            sessions,
            tokens,
            secure_cookie: false,
            metrics_token: None,
        }
    }

    /// Reloads this node's key cache (keys with their owners' state and price rates), so a
    /// change holds for the next proxied request once the admin call has answered, and wakes
    /// the refresher. Other nodes follow through the change marker they poll.
    pub async fn keys_changed(&self) {
        if let Err(e) = reload::reload_keys(&self.store, &self.keys).await {
            tracing::warn!(error = %e, "key cache reload after an admin change failed");
        }
        self.refresh.notify_one();
    }

    /// Reloads this node's account cache (live account state is kept) and wakes the refresher.
    pub async fn accounts_changed(&self) {
        reload::reload_and_publish_accounts(
            &self.store,
            &self.accounts,
            &self.secrets,
            "an admin change",
        )
        .await;
        self.refresh.notify_one();
    }

    /// Reloads this node's price table (shipped prices + overrides) and wakes the refresher.
    pub async fn prices_changed(&self) {
        if let Err(e) = reload::reload_prices(&self.store, &self.prices).await {
            tracing::warn!(error = %e, "price reload after an admin change failed");
        }
        self.refresh.notify_one();
    }
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    routes::router().fallback(ui::serve).with_state(state)
}
