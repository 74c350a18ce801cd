//! Liveness, readiness and the Prometheus endpoint.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use crate::admin::AdminState;

/// Liveness: answers `ok` while the process runs.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, description = "Alive", body = String, content_type = "text/plain")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the database (and Redis, when configured) answers.
#[utoipa::path(get, path = "/readyz", tag = "system",
    responses(
        (status = 200, description = "Ready: `{\"database\": true, \"redis\": true|null}`", body = serde_json::Value),
        (status = 503, description = "The database or Redis does not answer", body = serde_json::Value),
    ))]
pub async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let db = state.store.ping().await.is_ok();
    // Through the node's own link: its timeouts bound the probe when Redis hangs.
    let redis = match &state.redis {
        None => None,
        Some(link) => Some(
            link.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
                .await
                .is_ok(),
        ),
    };
    let ok = db && redis.unwrap_or(true);
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "database": db, "redis": redis })),
    )
}

/// Prometheus metrics in the text exposition format. With `metrics_token` set, only for a
/// bearer of it (or of the admin token): the metrics name accounts and show all traffic and
/// revenue, which tenants reaching the admin address for the UI must not see.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "Metrics", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "`metrics_token` is set and was not sent"),
    ))]
pub async fn metrics(
    State(state): State<AdminState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    if let Some(wanted) = &state.metrics_token {
        let sent = crate::admin::auth::bearer(&headers).unwrap_or("");
        let fits =
            |token: &str| crate::admin::auth::constant_time_eq(token.as_bytes(), sent.as_bytes());
        if !(fits(wanted) || state.admin_token.as_deref().is_some_and(fits)) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "metrics need the metrics token\n",
            )
                .into_response();
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}
