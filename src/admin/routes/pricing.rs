//! Model prices (admins only): the shipped price list with the database overrides on top.
//! A change holds on this node for the next priced request once the call has answered; other
//! nodes reload prices within a few seconds.

use std::collections::BTreeMap;

use axum::extract::State;
use relay_filters::cost::{PriceChange, PriceSchedule, PriceSource};
use relay_filters::types::now_ms;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{audit, Deleted};
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult, ErrorBody};
use crate::admin::extract::{Json, Path};
use crate::admin::AdminState;
use crate::store::{
    CardChoice, CardChoices, LongContextPrice, ModelPrice, ModelPriceRow, TierPrice,
};

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
    /// Micro-USD once per request that ran any search (Gemini 2.5's per grounded prompt),
    /// from the shipped price list; an override naming `web_search` drops it.
    pub web_search_request: Option<i64>,
    /// The rate card of prompts longer than its `above_tokens` (uncached input, cache reads and
    /// writes together): `{"above_tokens", "input", "output", "cache_write_5m"?,
    /// "cache_write_1h"?, "cache_read"?, "priority"?, "flex"?, "fast"?}`, its unset cache
    /// prices derived from its own input, and its own cards for long prompts served at a tier
    /// (each like `priority` below; absent: the long card at that tier too); `null`: one price
    /// at every length.
    #[schema(value_type = Option<Object>)]
    pub long_context: Option<LongContextPrice>,
    /// The shipped price list's long-context card of this model in effect now, which an
    /// override keeps unless it sets `long_context`.
    #[schema(value_type = Option<Object>)]
    pub shipped_long_context: Option<LongContextPrice>,
    /// The rate card of requests the provider served at its priority tier (OpenAI
    /// `service_tier: "priority"`): `{"input", "output", "cache_write_5m"?, "cache_write_1h"?,
    /// "cache_read"?}`; `null`: those at the standard prices.
    #[schema(value_type = Option<Object>)]
    pub priority: Option<TierPrice>,
    /// The rate card of requests served at the flex tier; `null`: the standard prices.
    #[schema(value_type = Option<Object>)]
    pub flex: Option<TierPrice>,
    /// The rate card of requests run in Anthropic's fast mode (`usage.speed: "fast"`);
    /// `null`: the standard prices.
    #[schema(value_type = Option<Object>)]
    pub fast: Option<TierPrice>,
    /// The shipped price list's cards of the three tiers in effect now, which an override
    /// keeps unless it sets `priority`, `flex` or `fast`.
    #[schema(value_type = Option<Object>)]
    pub shipped_priority: Option<TierPrice>,
    #[schema(value_type = Option<Object>)]
    pub shipped_flex: Option<TierPrice>,
    #[schema(value_type = Option<Object>)]
    pub shipped_fast: Option<TierPrice>,
    /// Price changes scheduled after now, in date order: `[{"from_ms", "price": {...}}]`,
    /// each the model's whole prices (as `input`, `output`, ... above) from `from_ms` (epoch
    /// ms) on. The shipped list announces them; an override's own prices do not change, the
    /// shipped cards and search prices it keeps do.
    #[schema(value_type = Vec<Object>)]
    pub changes: Vec<PriceChange>,
    /// Whether an admin override sets this price (else it is the shipped one).
    #[serde(rename = "override")]
    pub is_override: bool,
    /// Epoch ms of the override's last change.
    pub updated_at: Option<i64>,
}

impl PriceView {
    /// The prices of `model` in effect at `now` (epoch ms), with the changes its schedule
    /// holds after then; `row` is its override, if it has one.
    fn new(
        model: &str,
        schedule: &PriceSchedule,
        prices: &crate::cache::PriceCache,
        row: Option<&ModelPriceRow>,
        now: i64,
    ) -> PriceView {
        let p = schedule.at(now);
        let shipped = prices.shipped_at(model, now);
        PriceView {
            model: model.to_owned(),
            input: p.input,
            output: p.output,
            cache_write_5m: p.cache_write_5m,
            cache_write_1h: p.cache_write_1h,
            cache_read: p.cache_read,
            web_search: p.web_search,
            web_search_request: p.web_search_request,
            long_context: p.long_context,
            shipped_long_context: shipped.and_then(|s| s.long_context),
            priority: p.priority,
            flex: p.flex,
            fast: p.fast,
            shipped_priority: shipped.and_then(|s| s.priority),
            shipped_flex: shipped.and_then(|s| s.flex),
            shipped_fast: shipped.and_then(|s| s.fast),
            changes: schedule.upcoming(now).to_vec(),
            is_override: row.is_some(),
            updated_at: row.map(|r| r.updated_at),
        }
    }

    /// An override as the relay applies it: over the shipped search prices and cards where
    /// the override names none, and their scheduled changes.
    fn of_override(row: &ModelPriceRow, prices: &crate::cache::PriceCache, now: i64) -> PriceView {
        let schedule = prices.applied(row);
        PriceView::new(&row.model, &schedule, prices, Some(row), now)
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
    let now = now_ms();
    let mut merged: BTreeMap<String, PriceView> = table
        .schedules()
        .map(|(model, schedule)| {
            let view = PriceView::new(model, schedule, &state.prices, None, now);
            (model.to_owned(), view)
        })
        .collect();
    // The database is the truth about overrides; the cache may trail it by a reload.
    for row in overrides {
        let view = PriceView::of_override(&row, &state.prices, now);
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
    /// The rate card of long prompts: absent keeps the shipped one, `null` prices every length
    /// alike.
    #[serde(default, deserialize_with = "super::nullable")]
    #[schema(value_type = Option<Object>)]
    long_context: Option<Option<LongContextPrice>>,
    /// The priority tier's card: absent keeps the shipped one, `null` bills that tier at the
    /// standard prices.
    #[serde(default, deserialize_with = "super::nullable")]
    #[schema(value_type = Option<Object>)]
    priority: Option<Option<TierPrice>>,
    /// The flex tier's card, likewise.
    #[serde(default, deserialize_with = "super::nullable")]
    #[schema(value_type = Option<Object>)]
    flex: Option<Option<TierPrice>>,
    /// The fast mode's card, likewise.
    #[serde(default, deserialize_with = "super::nullable")]
    #[schema(value_type = Option<Object>)]
    fast: Option<Option<TierPrice>>,
}

/// What a body's optional card says: absent (the shipped card), `null` (none), a card.
fn choice<T>(sent: Option<Option<T>>) -> CardChoice<T> {
    match sent {
        None => CardChoice::Shipped,
        Some(None) => CardChoice::None,
        Some(Some(card)) => CardChoice::Card(card),
    }
}

/// Highest `above_tokens` a long-context card may name (no prompt comes near it).
const MAX_LONG_CONTEXT_THRESHOLD: u64 = relay_filters::types::MAX_TOKENS;

/// `POST /api/admin/pricing` `{"model", "input", "output", "cache_write_5m"?,
/// "cache_write_1h"?, "cache_read"?, "web_search"?, "long_context"?, "priority"?, "flex"?,
/// "fast"?}`
/// (micro-USD per million
/// tokens; `web_search` per search): creates or replaces the override of a model. The model is
/// matched as the upstream reports it; a dated id falls back to its undated name. Without
/// `web_search` the model's shipped search price, if any, still applies (`0` makes searches
/// free); without `long_context` the shipped long-prompt card, if any, still applies (`null`
/// prices every prompt length alike), and so for the `priority` and `flex` tiers' and the
/// `fast` mode's cards (`null`: those requests at the override's standard prices).
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
    if let Some(Some(card)) = &body.long_context {
        if card.above_tokens == 0 || card.above_tokens > MAX_LONG_CONTEXT_THRESHOLD {
            return Err(AppError::BadRequest(format!(
                "long_context.above_tokens must be 1 to {MAX_LONG_CONTEXT_THRESHOLD}"
            )));
        }
    }
    let cards = CardChoices {
        long_context: choice(body.long_context),
        priority: choice(body.priority),
        flex: choice(body.flex),
        fast: choice(body.fast),
    };
    let price = ModelPrice {
        input: body.input,
        output: body.output,
        cache_write_5m: body.cache_write_5m,
        cache_write_1h: body.cache_write_1h,
        cache_read: body.cache_read,
        web_search: body.web_search,
        ..ModelPrice::default()
    };
    let price = cards.apply(price, None);
    let row = state.store.upsert_price(model, &price, cards).await?;
    // The audit names each card the override sets, and `null` for one it drops; a card it
    // leaves to the shipped list is not named.
    let mut detail = serde_json::to_value(price).map_err(|e| AppError::Internal(e.to_string()))?;
    for (name, dropped) in [
        ("long_context", cards.long_context == CardChoice::None),
        ("priority", cards.priority == CardChoice::None),
        ("flex", cards.flex == CardChoice::None),
        ("fast", cards.fast == CardChoice::None),
    ] {
        if dropped {
            detail[name] = serde_json::Value::Null;
        }
    }
    audit(&state, &caller, "price.upsert", model, detail).await;
    state.prices_changed().await;
    Ok(Json(PriceView::of_override(&row, &state.prices, now_ms())))
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
