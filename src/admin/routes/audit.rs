//! The audit log of state-changing admin calls (admins only), newest first.

use axum::extract::State;

use super::PageQuery;
use crate::admin::auth::Caller;
use crate::admin::error::AppResult;
use crate::admin::extract::{Json, Query};
use crate::admin::AdminState;
use crate::store::{AuditEntry, Page};

/// `GET /api/admin/audit?page=&per_page=`.
pub async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> AppResult<Json<Page<AuditEntry>>> {
    caller.require_admin()?;
    let (page, per_page) = q.get();
    Ok(Json(state.store.list_audit(page, per_page).await?))
}
