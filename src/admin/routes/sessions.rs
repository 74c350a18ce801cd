//! Active session bindings (admins only): which conversation is kept on which account
//! (DESIGN §7, §10), and unbinding one so its next request is scheduled afresh.

use axum::extract::State;
use relay_filters::accounts::AccountDirectory;
use relay_filters::session_store::SessionStore as _;
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use super::{audit, Deleted};
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult, ErrorBody};
use crate::admin::extract::{Json, Path, Query};
use crate::admin::AdminState;
use crate::store::UsageDim;

/// Redis unreachable (memory stores never fail): 503, so nobody takes this node's memory for
/// the whole, nor an unbind for done.
fn unavailable(e: relay_filters::session_store::StoreUnavailable) -> AppError {
    tracing::warn!(error = %e.0, "session bindings unavailable to the admin view");
    AppError::Unavailable(
        "session bindings cannot be read or changed now: Redis is unreachable".into(),
    )
}

/// Bindings per page at most.
const MAX_PER_PAGE: usize = 500;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionQuery {
    /// `next_cursor` of the page before; absent for the first page.
    cursor: Option<String>,
    /// Bindings per page (default 100, at most 500; from Redis a page may hold up to twice as
    /// many, or fewer, even none with more to come: follow `next_cursor`).
    limit: Option<usize>,
}

/// One binding as operators see it.
#[derive(Debug, Serialize)]
pub struct SessionView {
    /// The session key (a hash; never the conversation itself).
    pub session_key: String,
    pub account_id: String,
    /// `null` once the account is deleted (its sessions move on their next request).
    pub account_name: Option<String>,
    pub platform: String,
    pub model: Option<String>,
    pub user_id: String,
    pub username: Option<String>,
    pub api_key_id: String,
    pub key_name: Option<String>,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms of the last renewal.
    pub last_used_at: i64,
    pub request_count: u64,
    /// Milliseconds until the binding ends unless used again.
    pub expires_in_ms: u64,
}

/// A page of bindings.
#[derive(Debug, Serialize)]
pub struct SessionPage {
    pub items: Vec<SessionView>,
    /// Pass as `cursor` for the next page; `null` after the last.
    pub next_cursor: Option<String>,
    /// Where bindings live: `redis` (shared by every node) or `memory` (this node's).
    pub store: &'static str,
}

/// `GET /api/admin/sessions?cursor=&limit=`: active session bindings, page by page: from Redis
/// when configured (503 while it is unreachable), else from this node's memory.
#[utoipa::path(get, path = "/api/admin/sessions", tag = "sessions", params(SessionQuery),
    responses(
        (status = 200, description = "A page of bindings and the cursor of the next", body = serde_json::Value),
        (status = 400, description = "Bad cursor or limit", body = ErrorBody),
        (status = 503, description = "Redis is configured and unreachable", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<SessionQuery>,
) -> AppResult<Json<SessionPage>> {
    caller.require_admin()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PER_PAGE).contains(&limit) {
        return Err(AppError::BadRequest(format!(
            "limit must be 1 to {MAX_PER_PAGE}"
        )));
    }
    let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
    if state.sessions.shared() && cursor.is_some_and(|c| c.parse::<u64>().is_err()) {
        return Err(AppError::BadRequest("not a page cursor".into()));
    }
    let page = state
        .sessions
        .store
        .list(cursor, limit)
        .await
        .map_err(unavailable)?;
    let distinct = |f: fn(&relay_filters::session_store::Binding) -> &String| {
        let mut ids: Vec<String> = page
            .items
            .iter()
            .map(|(_, b)| f(&b.binding).clone())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    let users = state
        .store
        .names_of(UsageDim::User, &distinct(|b| &b.user_id))
        .await?;
    let keys = state
        .store
        .names_of(UsageDim::Key, &distinct(|b| &b.api_key_id))
        .await?;
    let items = page
        .items
        .into_iter()
        .map(|(session_key, stored)| {
            let b = &stored.binding;
            SessionView {
                account_name: state.accounts.get(&b.account_id).map(|a| a.name.clone()),
                username: users.get(&b.user_id).cloned(),
                key_name: keys.get(&b.api_key_id).cloned(),
                session_key,
                account_id: b.account_id.clone(),
                platform: b.platform.clone(),
                model: b.model.clone(),
                user_id: b.user_id.clone(),
                api_key_id: b.api_key_id.clone(),
                created_at: b.created_at,
                last_used_at: b.last_used_at,
                request_count: b.request_count,
                expires_in_ms: u64::try_from(stored.remaining.as_millis()).unwrap_or(u64::MAX),
            }
        })
        .collect();
    Ok(Json(SessionPage {
        items,
        next_cursor: page.next,
        store: if state.sessions.shared() {
            "redis"
        } else {
            "memory"
        },
    }))
}

/// `DELETE /api/admin/sessions/{session_key}`: ends a binding; the conversation's next request
/// is scheduled afresh (and is likely to miss the provider's prompt cache once).
#[utoipa::path(delete, path = "/api/admin/sessions/{session_key}", tag = "sessions",
    params(("session_key" = String, Path, description = "Session key")),
    responses(
        (status = 200, description = "Unbound", body = Deleted),
        (status = 404, description = "No such binding", body = ErrorBody),
        (status = 503, description = "Redis is configured and unreachable", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AdminState>,
    caller: Caller,
    Path(key): Path<String>,
) -> AppResult<Json<Deleted>> {
    caller.require_admin()?;
    let bindings = &state.sessions;
    let found = bindings.store.get(&key).await.map_err(unavailable)?;
    let Some(found) = found else {
        return Err(AppError::NotFound);
    };
    bindings.store.delete(&key).await.map_err(unavailable)?;
    if let Some(mirror) = &bindings.mirror {
        let _ = mirror.delete(&key).await;
    }
    audit(
        &state,
        &caller,
        "session.unbind",
        &key,
        serde_json::json!({ "account_id": found.binding.account_id }),
    )
    .await;
    Ok(Json(Deleted { deleted: key }))
}
