//! Model prices (admins only): the shipped price list with the database overrides on top.
//! A change holds on this node for the next priced request once the call has answered; other
//! nodes reload prices within a few seconds.

use std::collections::BTreeMap;

use axum::extract::State;
use relay_filters::cost::PriceSource;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{audit, Deleted};
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult, ErrorBody};
use crate::admin::extract::{Json, Path};
use crate::admin::AdminState;
use crate::store::{ModelPrice, ModelPriceRow};

/// Longest model name accepted.
const MAX_MODEL_LEN: usize = 200;

/// One model's prices in micro-USD per million tokens, and `web_search` in micro-USD per
/// search; unset cache prices default to 1.25×, 2× and 0.1× input (DESIGN §9), an unset search
/// price bills searches nothing.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriceView {
    pub model: String,
    pub input: i64,
    pub output: i64,
    pub cache_write_5m: Option<i64>,
    pub cache_write_1h: Option<i64>,
    pub cache_read: Option<i64>,
    pub web_search: Option<i64>,
    /// Whether an admin override sets this price (else it is the shipped one).
    #[serde(rename = "override")]
    pub is_override: bool,
    /// Epoch ms of the override's last change.
    pub updated_at: Option<i64>,
}

impl From<ModelPriceRow> for PriceView {
    fn from(r: ModelPriceRow) -> Self {
        PriceView {
            model: r.model,
            input: r.input,
            output: r.output,
            cache_write_5m: r.cache_write_5m,
            cache_write_1h: r.cache_write_1h,
            cache_read: r.cache_read,
            web_search: r.web_search,
            is_override: true,
            updated_at: Some(r.updated_at),
        }
    }
}

/// The merged table.
#[derive(Debug, Serialize, ToSchema)]
pub struct PriceList {
    /// By model name.
    pub items: Vec<PriceView>,
    pub total: usize,
}

/// `GET /api/admin/pricing`: every priced model by name, overrides marked. The list is the
/// size of the shipped price file plus the overrides, so it comes whole.
#[utoipa::path(get, path = "/api/admin/pricing", tag = "pricing",
    responses((status = 200, description = "Every priced model", body = PriceList)))]
pub async fn list(State(state): State<AdminState>, caller: Caller) -> AppResult<Json<PriceList>> {
    caller.require_admin()?;
    let overrides = state.store.list_prices().await?;
    let table = state.prices.table();
    let mut merged: BTreeMap<String, PriceView> = table
        .models()
        .map(|(model, p)| {
            (
                model.to_string(),
                PriceView {
                    model: model.to_string(),
                    input: p.input,
                    output: p.output,
                    cache_write_5m: p.cache_write_5m,
                    cache_write_1h: p.cache_write_1h,
                    cache_read: p.cache_read,
                    web_search: p.web_search,
                    is_override: false,
                    updated_at: None,
                },
            )
        })
        .collect();
    // The database is the truth about overrides; the cache may trail it by a reload.
    for row in overrides {
        let mut view: PriceView = row.into();
        view.web_search = view
            .web_search
            .or_else(|| state.prices.shipped_web_search(&view.model));
        merged.insert(view.model.clone(), view);
    }
    let items: Vec<PriceView> = merged.into_values().collect();
    Ok(Json(PriceList {
        total: items.len(),
        items,
    }))
}

/// A model's price override, in micro-USD per million tokens (`web_search`: per search).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceOverride {
    model: String,
    input: i64,
    output: i64,
    #[serde(default)]
    cache_write_5m: Option<i64>,
    #[serde(default)]
    cache_write_1h: Option<i64>,
    #[serde(default)]
    cache_read: Option<i64>,
    #[serde(default)]
    web_search: Option<i64>,
}

/// `POST /api/admin/pricing` `{"model", "input", "output", "cache_write_5m"?,
/// "cache_write_1h"?, "cache_read"?, "web_search"?}` (micro-USD per million tokens;
/// `web_search` per search): creates or replaces the override of a model. The model is matched
/// as the upstream reports it; a dated id falls back to its undated name. Without `web_search`
/// the model's shipped search price, if any, still applies (`0` makes searches free).
#[utoipa::path(post, path = "/api/admin/pricing", tag = "pricing", request_body = PriceOverride,
    responses(
        (status = 200, description = "The override as stored", body = PriceView),
        (status = 400, description = "Bad model name or body", body = ErrorBody),
    ))]
pub async fn upsert(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<PriceOverride>,
) -> AppResult<Json<PriceView>> {
    caller.require_admin()?;
    let model = body.model.trim();
    if model.is_empty() || model.len() > MAX_MODEL_LEN {
        return Err(AppError::BadRequest(format!(
            "model must be 1 to {MAX_MODEL_LEN} characters"
        )));
    }
    let price = ModelPrice {
        input: body.input,
        output: body.output,
        cache_write_5m: body.cache_write_5m,
        cache_write_1h: body.cache_write_1h,
        cache_read: body.cache_read,
        web_search: body.web_search,
    };
    let row = state.store.upsert_price(model, &price).await?;
    audit(
        &state,
        &caller,
        "price.upsert",
        model,
        serde_json::to_value(price).map_err(|e| AppError::Internal(e.to_string()))?,
    )
    .await;
    state.prices_changed().await;
    let mut view: PriceView = row.into();
    view.web_search = view
        .web_search
        .or_else(|| state.prices.shipped_web_search(&view.model));
    Ok(Json(view))
}

/// `DELETE /api/admin/pricing/{model}`: removes an override; the shipped price (if any)
/// applies again.
#[utoipa::path(delete, path = "/api/admin/pricing/{model}", tag = "pricing",
    params(("model" = String, Path, description = "Model name; may contain `/`")),
    responses(
        (status = 200, description = "Override removed", body = Deleted),
        (status = 404, description = "No override for this model", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AdminState>,
    caller: Caller,
    Path(model): Path<String>,
) -> AppResult<Json<Deleted>> {
    caller.require_admin()?;
    state.store.delete_price(&model).await?;
    audit(
        &state,
        &caller,
        "price.delete",
        &model,
        serde_json::json!({}),
    )
    .await;
    state.prices_changed().await;
    Ok(Json(Deleted { deleted: model }))
}
