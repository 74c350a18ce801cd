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
use crate::admin::extract::{Json, Path, Query};
use crate::admin::AdminState;
use crate::store::{
    override_at, overrides_by_model, CardChoice, CardChoices, LongContextPrice, ModelPrice,
    ModelPriceRow, TierPrice,
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
    /// No price in effect now: the model is priced only from its first change (its prices
    /// above are 0).
    pub unpriced: bool,
    /// Overrides an admin scheduled that have not begun, in date order (each also in
    /// `changes`, as it applies); cancelled with `DELETE /api/admin/pricing/{model}?from=`.
    pub scheduled: Vec<ScheduledOverride>,
    /// Whether an admin override sets this price (else it is the shipped one).
    #[serde(rename = "override")]
    pub is_override: bool,
    /// Epoch ms of the override's last change.
    pub updated_at: Option<i64>,
}

/// An override scheduled ahead, as the list shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduledOverride {
    /// When it takes effect, epoch ms.
    pub from_ms: i64,
    pub input: i64,
    pub output: i64,
    /// Epoch ms of its last change.
    pub updated_at: i64,
}

impl PriceView {
    /// The prices of `model` in effect at `now` (epoch ms), with the changes its schedule
    /// holds after then; `rows` are its overrides (standing and scheduled).
    fn new(
        model: &str,
        schedule: &PriceSchedule,
        prices: &crate::cache::PriceCache,
        rows: &[&ModelPriceRow],
        now: i64,
    ) -> PriceView {
        let p = schedule.at(now).copied().unwrap_or_default();
        let shipped = prices.shipped_at(model, now);
        let current = override_at(rows, now);
        let mut scheduled: Vec<ScheduledOverride> = rows
            .iter()
            .filter(|r| r.from_ms.is_some_and(|from| from > now))
            .map(|r| ScheduledOverride {
                from_ms: r.from_ms.unwrap_or_default(),
                input: r.input,
                output: r.output,
                updated_at: r.updated_at,
            })
            .collect();
        scheduled.sort_by_key(|o| o.from_ms);
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
            unpriced: schedule.at(now).is_none(),
            scheduled,
            is_override: current.is_some(),
            updated_at: current.map(|r| r.updated_at),
        }
    }

    /// A model with overrides (`rows`: standing and scheduled) as the relay applies them;
    /// `None` when it has no price at all.
    fn of_overrides(
        model: &str,
        rows: &[&ModelPriceRow],
        prices: &crate::cache::PriceCache,
        now: i64,
    ) -> Option<PriceView> {
        let schedule = prices.schedule_with(model, rows)?;
        Some(PriceView::new(model, &schedule, prices, rows, now))
    }
}

/// The view of one model after a change: from the database's overrides.
async fn view_of(state: &AdminState, model: &str) -> AppResult<PriceView> {
    let rows = state.store.list_price_overrides().await?;
    let mine: Vec<&ModelPriceRow> = rows.iter().filter(|r| r.model == model).collect();
    PriceView::of_overrides(model, &mine, &state.prices, now_ms())
        .ok_or_else(|| AppError::Internal(format!("{model} has no price after its change")))
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
    let rows = state.store.list_price_overrides().await?;
    let table = state.prices.table();
    let now = now_ms();
    let mut merged: BTreeMap<String, PriceView> = table
        .schedules()
        .map(|(model, schedule)| {
            let view = PriceView::new(model, schedule, &state.prices, &[], now);
            (model.to_owned(), view)
        })
        .collect();
    // The database is the truth about overrides; the cache may trail it by a reload.
    for (model, mine) in overrides_by_model(&rows) {
        if let Some(view) = PriceView::of_overrides(model, &mine, &state.prices, now) {
            merged.insert(model.to_owned(), view);
        }
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
    /// Schedules the override ahead instead of setting it now: `YYYY-MM-DD` (midnight UTC) or
    /// `YYYY-MM-DDTHH:MM:SSZ`, in the future. Until then the model keeps the price it has (a
    /// model without one stays unpriced); from then on this override applies (a later one
    /// scheduled takes over at its time).
    #[serde(default)]
    from: Option<String>,
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
    let from_ms = match body.from.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(scheduled_time(text)?),
    };
    match from_ms {
        None => state.store.upsert_price(model, &price, cards).await?,
        Some(from_ms) => {
            state
                .store
                .upsert_price_change(model, from_ms, &price, cards)
                .await?
        }
    };
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
    if let Some(from_ms) = from_ms {
        detail["from_ms"] = serde_json::json!(from_ms);
    }
    let action = if from_ms.is_some() {
        "price.schedule"
    } else {
        "price.upsert"
    };
    audit(&state, &caller, action, model, detail).await;
    state.prices_changed().await;
    Ok(Json(view_of(&state, model).await?))
}

/// When a scheduled override takes effect: `text` read as the price list reads dates, in the
/// future. A model without a price until then is not priced until then.
fn scheduled_time(text: &str) -> AppResult<i64> {
    let from_ms = relay_filters::cost::parse_from(text).ok_or_else(|| {
        AppError::BadRequest(
            "from must be YYYY-MM-DD (midnight UTC) or YYYY-MM-DDTHH:MM:SSZ".into(),
        )
    })?;
    if from_ms <= now_ms() {
        return Err(AppError::BadRequest(
            "from must be in the future; without it the override applies at once".into(),
        ));
    }
    Ok(from_ms)
}

/// Which scheduled override `DELETE` cancels.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// The scheduled override's time (epoch ms, as the list gives it, or a date as it was
    /// set); absent: the standing override.
    from: Option<String>,
}

/// `DELETE /api/admin/pricing/{model}?from=`: removes the standing override (the shipped price,
/// if any, applies again), or with `from` cancels the override scheduled at that time.
#[utoipa::path(delete, path = "/api/admin/pricing/{model}", tag = "pricing",
    params(("model" = String, Path, description = "Model name; may contain `/`"), DeleteQuery),
    responses(
        (status = 200, description = "Override removed", body = Deleted),
        (status = 400, description = "Bad time", body = ErrorBody),
        (status = 404, description = "No such override of this model", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AdminState>,
    caller: Caller,
    Path(model): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> AppResult<Json<Deleted>> {
    caller.require_admin()?;
    let from_ms = match q.from.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(
            text.parse::<i64>()
                .ok()
                .or_else(|| relay_filters::cost::parse_from(text))
                .ok_or_else(|| {
                    AppError::BadRequest(
                        "from must be epoch ms, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ".into(),
                    )
                })?,
        ),
    };
    let detail = match from_ms {
        None => {
            let begun = state.store.delete_price(&model).await?;
            if begun > 0 {
                serde_json::json!({ "scheduled_removed": begun })
            } else {
                serde_json::json!({})
            }
        }
        Some(from_ms) => {
            state.store.delete_price_change(&model, from_ms).await?;
            serde_json::json!({ "from_ms": from_ms })
        }
    };
    audit(&state, &caller, "price.delete", &model, detail).await;
    state.prices_changed().await;
    Ok(Json(Deleted { deleted: model }))
}
