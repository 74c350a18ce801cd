//! The admin API routes, one file per resource. `/api/admin/...` is for admins only;
//! `/api/keys` and `/api/usage/...` are every logged-in user's own keys and usage.

mod accounts;
mod api_keys;
mod audit;
mod days;
mod openapi;
mod pricing;
mod records_csv;
mod session;
mod sessions;
mod settings;
mod system;
mod usage;
mod users;

use axum::routing::{get, patch, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::AdminState;

/// Page and size of a list request (`?page=1&per_page=50`, at most 500 per page).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1-based page number (default 1).
    pub page: Option<i64>,
    /// Rows per page (default 50, at most 500).
    pub per_page: Option<i64>,
}

/// Answer of a delete: the id (or model) removed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub deleted: String,
}

/// Answer of a bulk change: how many rows it changed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Updated {
    pub updated: u64,
}

impl PageQuery {
    /// Validated (page, per_page).
    pub fn get(&self) -> (i64, i64) {
        (
            self.page.unwrap_or(1).max(1),
            self.per_page.unwrap_or(50).clamp(1, 500),
        )
    }
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Writes a state-changing call to the audit log. The change is already committed when this
/// runs, so a failed write is logged rather than turned into an error for the caller.
pub async fn audit(
    state: &AdminState,
    caller: &Caller,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) {
    if let Err(e) = state
        .store
        .append_audit(&caller.name, action, target, &detail)
        .await
    {
        tracing::error!(error = %e, action, target, "audit log write failed");
    }
}

pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .route("/api/openapi.json", get(openapi::document))
        // Login sessions.
        .route("/api/auth/login", post(session::login))
        .route("/api/auth/logout", post(session::logout))
        .route("/api/auth/me", get(session::me))
        // Every user: own keys and usage.
        .route(
            "/api/keys",
            get(api_keys::own_list).post(api_keys::own_create),
        )
        .route(
            "/api/keys/{id}",
            patch(api_keys::own_update).delete(api_keys::own_delete),
        )
        .route("/api/usage/summary", get(usage::summary))
        .route("/api/usage/daily", get(usage::daily))
        .route("/api/usage/monthly", get(usage::monthly))
        .route("/api/usage/stats", get(usage::stats))
        .route("/api/usage/records", get(usage::own_records))
        .route("/api/usage/records.csv", get(records_csv::own_records_csv))
        .route("/api/usage/models", get(usage::models))
        // Admins.
        .route("/api/admin/users", get(users::list).post(users::create))
        .route(
            "/api/admin/users/batch-price-rate",
            post(users::batch_price_rate),
        )
        .route(
            "/api/admin/users/all-price-rate",
            post(users::all_price_rate),
        )
        .route(
            "/api/admin/users/{id}",
            get(users::get).patch(users::update).delete(users::delete),
        )
        .route(
            "/api/admin/users/{id}/usage/summary",
            get(usage::user_summary),
        )
        .route(
            "/api/admin/api-keys",
            get(api_keys::list).post(api_keys::create),
        )
        .route(
            "/api/admin/api-keys/{id}",
            patch(api_keys::update).delete(api_keys::delete),
        )
        .route("/api/admin/api-keys/{id}/logs", get(usage::key_logs))
        .route(
            "/api/admin/accounts",
            get(accounts::list).post(accounts::create),
        )
        .route(
            "/api/admin/accounts/health-check",
            post(accounts::health_check_all),
        )
        .route(
            "/api/admin/accounts/{id}/health-check",
            post(accounts::health_check),
        )
        .route(
            "/api/admin/accounts/{id}/refresh-token",
            post(accounts::refresh_token_now),
        )
        .route("/api/admin/sessions", get(sessions::list))
        // `*`: a session key is the relay's own, but nothing promises it holds no `/`.
        .route(
            "/api/admin/sessions/{*session_key}",
            axum::routing::delete(sessions::delete),
        )
        .route(
            "/api/admin/settings",
            get(settings::get).patch(settings::update),
        )
        .route(
            "/api/admin/accounts/{id}",
            get(accounts::get)
                .patch(accounts::update)
                .delete(accounts::delete),
        )
        .route(
            "/api/admin/pricing",
            get(pricing::list).post(pricing::upsert),
        )
        // `*`: model ids may hold a `/` (`models/gemini-...`).
        .route(
            "/api/admin/pricing/{*model}",
            axum::routing::delete(pricing::delete),
        )
        .route("/api/admin/usage/records", get(usage::records))
        .route(
            "/api/admin/usage/records.csv",
            get(records_csv::records_csv),
        )
        .route("/api/admin/usage/summary", get(usage::admin_summary))
        .route("/api/admin/usage/breakdown", get(usage::breakdown))
        .route("/api/admin/audit", get(audit::list))
}

/// Deserializes a field that may be absent (`None`), `null` (`Some(None)`) or a value.
pub fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}
