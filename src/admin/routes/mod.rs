//! The admin API routes, one file per resource.

mod accounts;
mod api_keys;
mod session;
mod system;
mod usage;
mod users;

use axum::routing::{get, patch, post};
use axum::Router;
use serde::Deserialize;

use super::AdminState;

/// Page and size of a list request (`?page=1&per_page=50`, at most 500 per page).
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub page: Option<i64>,
    pub per_page: Option<i64>,
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

pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .route("/api/auth/login", post(session::login))
        .route("/api/auth/logout", post(session::logout))
        .route("/api/auth/me", get(session::me))
        .route("/api/admin/users", get(users::list).post(users::create))
        .route(
            "/api/admin/api-keys",
            get(api_keys::list).post(api_keys::create),
        )
        .route("/api/admin/api-keys/{id}", patch(api_keys::update))
        .route(
            "/api/admin/accounts",
            get(accounts::list).post(accounts::create),
        )
        .route("/api/admin/accounts/{id}", patch(accounts::update))
        .route("/api/admin/usage/records", get(usage::records))
}

/// Deserializes a field that may be absent (`None`), `null` (`Some(None)`) or a value.
pub fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}
