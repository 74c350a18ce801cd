//! The audit log of state-changing admin calls (admins only), newest first.

use axum::extract::State;

use super::PageQuery;
use crate::admin::auth::Caller;
use crate::admin::error::{AppResult, ErrorBody};
use crate::admin::extract::{Json, Query};
use crate::admin::AdminState;
use crate::store::{AuditEntry, Page};

/// `GET /api/admin/audit?page=&per_page=`.
#[utoipa::path(get, path = "/api/admin/audit", tag = "audit", params(PageQuery),
    responses(
        (status = 200, description = "A page of audit entries, newest first", body = super::openapi::ListPage),
        (status = 400, description = "Bad query", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> AppResult<Json<Page<AuditEntry>>> {
    caller.require_admin()?;
    let (page, per_page) = q.get();
    Ok(Json(state.store.list_audit(page, per_page).await?))
}
