//! Usage records (paginated, newest first). Admins see every record with base and billed cost;
//! users see their own, billed cost only.

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::PageQuery;
use crate::admin::auth::Caller;
use crate::admin::error::AppResult;
use crate::admin::AdminState;
use crate::store::RecordFilter;

#[derive(Deserialize)]
pub struct RecordQuery {
    page: Option<i64>,
    per_page: Option<i64>,
    user_id: Option<String>,
    api_key_id: Option<String>,
    account_id: Option<String>,
    from: Option<i64>,
    to: Option<i64>,
}

pub async fn records(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<RecordQuery>,
) -> AppResult<Json<serde_json::Value>> {
    let admin = caller.require_admin().is_ok();
    let (page, per_page) = PageQuery {
        page: q.page,
        per_page: q.per_page,
    }
    .get();
    let filter = RecordFilter {
        user_id: if admin {
            q.user_id
        } else {
            caller.user_id.clone()
        },
        api_key_id: q.api_key_id,
        account_id: if admin { q.account_id } else { None },
        from: q.from,
        to: q.to,
    };
    let page = state
        .store
        .list_usage_records(&filter, page, per_page)
        .await?;
    let mut value = serde_json::to_value(&page)
        .map_err(|e| crate::admin::error::AppError::Internal(e.to_string()))?;
    if !admin {
        if let Some(items) = value.get_mut("items").and_then(|v| v.as_array_mut()) {
            for item in items {
                if let Some(obj) = item.as_object_mut() {
                    obj.remove("base_cost");
                    obj.remove("price_rate");
                    obj.remove("account_id");
                }
            }
        }
    }
    Ok(Json(value))
}
