//! Usage statistics and records. Every caller sees its own usage under `/api/usage/...`, with
//! the billed cost only (never the base cost, price rate or accounts: DESIGN §9); admins also
//! see any user's summary, any key's records and every record, with both costs.

use std::collections::HashMap;

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::days::{self, DayRange};
use super::PageQuery;
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult, ErrorBody};
use crate::admin::extract::{Json, Path, Query};
use crate::admin::AdminState;
use crate::store::{Page, RecordFilter, Role, UsageDailyRow, UsageDim, UsageRow, UsageTotals};

/// Totals as a user sees them: billed cost only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct BilledTotals {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_write_tokens: i64,
    pub cache_read_tokens: i64,
    /// Micro-USD charged.
    pub billed_cost: i64,
}

impl From<UsageTotals> for BilledTotals {
    fn from(t: UsageTotals) -> Self {
        BilledTotals {
            requests: t.requests,
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
            cache_write_tokens: t.cache_write_tokens,
            cache_read_tokens: t.cache_read_tokens,
            billed_cost: t.billed_cost,
        }
    }
}

impl From<&UsageDailyRow> for UsageTotals {
    fn from(r: &UsageDailyRow) -> Self {
        UsageTotals {
            requests: r.requests,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cache_write_tokens: r.cache_write_tokens,
            cache_read_tokens: r.cache_read_tokens,
            base_cost: r.base_cost,
            billed_cost: r.billed_cost,
        }
    }
}

/// One day's totals.
#[derive(Debug, Serialize, ToSchema)]
pub struct DayUsage<T> {
    pub day: String,
    #[serde(flatten)]
    pub totals: T,
}

/// A usage record as its user sees it: no base cost, price rate, account or session.
#[derive(Debug, Serialize, ToSchema)]
pub struct OwnRecord {
    pub id: String,
    /// The client's own `x-request-id` when it sent one, else the record id.
    pub request_id: String,
    pub created_at: i64,
    pub api_key_id: Option<String>,
    /// The key's name now; `null` once the key is deleted.
    pub api_key_name: Option<String>,
    pub protocol: String,
    pub requested_model: Option<String>,
    pub upstream_model: Option<String>,
    pub stream: bool,
    pub status: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_write_5m_tokens: i64,
    pub cache_write_1h_tokens: i64,
    pub cache_read_tokens: i64,
    pub reasoning_tokens: i64,
    pub web_search_requests: i64,
    pub billed_cost: i64,
    pub latency_ms: i64,
    pub ttfb_ms: Option<i64>,
    pub error_type: Option<String>,
    pub unpriced: bool,
    pub estimated: bool,
    /// The service tier the provider served it at (for an answer cut before it named one, the
    /// tier asked for); `null` when neither.
    pub service_tier: Option<String>,
    /// The provider's id of the request (Anthropic `request-id`, OpenAI `x-request-id`), as
    /// the answer's head gave it to the client too.
    pub upstream_request_id: Option<String>,
    /// The id of the answer (`msg_…`, `chatcmpl-…`, `resp_…`, Gemini's `responseId`).
    pub response_id: Option<String>,
    /// The passes it ran on other models (an advisor's), whose tokens are in the billed cost
    /// and not in the token counts above; `null`: none.
    #[schema(value_type = Option<Vec<Object>>)]
    pub passes: Option<serde_json::Value>,
}

impl OwnRecord {
    /// The record as its user sees it, with its key's name (`None`: deleted or no key).
    fn new(r: UsageRow, api_key_name: Option<String>) -> Self {
        OwnRecord {
            id: r.id,
            request_id: r.request_id,
            created_at: r.created_at,
            api_key_id: r.api_key_id,
            api_key_name,
            protocol: r.protocol,
            requested_model: r.requested_model,
            upstream_model: r.upstream_model,
            stream: r.stream,
            status: r.status,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cache_write_5m_tokens: r.cache_write_5m_tokens,
            cache_write_1h_tokens: r.cache_write_1h_tokens,
            cache_read_tokens: r.cache_read_tokens,
            reasoning_tokens: r.reasoning_tokens,
            web_search_requests: r.web_search_requests,
            billed_cost: r.billed_cost,
            latency_ms: r.latency_ms,
            ttfb_ms: r.ttfb_ms,
            error_type: r.error_type,
            unpriced: r.unpriced,
            estimated: r.estimated,
            service_tier: r.service_tier,
            upstream_request_id: r.upstream_request_id,
            response_id: r.response_id,
            passes: r.passes,
        }
    }
}

/// A usage record as admins see it: every stored field, and what its user, key and account
/// are called now (`null` once deleted, or where the record has no such id: a request refused
/// before it had a key or an account).
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminRecord {
    #[serde(flatten)]
    pub record: UsageRow,
    pub user_name: Option<String>,
    pub api_key_name: Option<String>,
    pub account_name: Option<String>,
}

/// The names of a page of records' users, keys and accounts: looked up for that page's ids
/// only, one query per kind of entity (a page holds at most 500 records).
#[derive(Default)]
pub(super) struct RecordNames {
    users: HashMap<String, String>,
    keys: HashMap<String, String>,
    accounts: HashMap<String, String>,
}

impl RecordNames {
    /// Key names only: what a user's own records show.
    pub(super) async fn keys_of(state: &AdminState, rows: &[UsageRow]) -> AppResult<Self> {
        Ok(RecordNames {
            keys: state
                .store
                .key_names(&distinct(rows, |r| &r.api_key_id))
                .await?,
            ..RecordNames::default()
        })
    }

    /// User, key and account names: what admins see.
    pub(super) async fn all_of(state: &AdminState, rows: &[UsageRow]) -> AppResult<Self> {
        Ok(RecordNames {
            users: state
                .store
                .names_of(UsageDim::User, &distinct(rows, |r| &r.user_id))
                .await?,
            accounts: state
                .store
                .names_of(UsageDim::Account, &distinct(rows, |r| &r.account_id))
                .await?,
            ..RecordNames::keys_of(state, rows).await?
        })
    }

    fn name(names: &HashMap<String, String>, id: &Option<String>) -> Option<String> {
        id.as_ref().and_then(|id| names.get(id).cloned())
    }

    /// The names of a record's user, key and account (`None` where unknown or not looked up).
    pub(super) fn of<'a>(
        &'a self,
        r: &UsageRow,
    ) -> (Option<&'a str>, Option<&'a str>, Option<&'a str>) {
        let get = |names: &'a HashMap<String, String>, id: &Option<String>| {
            id.as_ref().and_then(|id| names.get(id)).map(String::as_str)
        };
        (
            get(&self.users, &r.user_id),
            get(&self.keys, &r.api_key_id),
            get(&self.accounts, &r.account_id),
        )
    }

    fn own(&self, r: UsageRow) -> OwnRecord {
        let key = Self::name(&self.keys, &r.api_key_id);
        OwnRecord::new(r, key)
    }

    fn admin(&self, r: UsageRow) -> AdminRecord {
        AdminRecord {
            user_name: Self::name(&self.users, &r.user_id),
            api_key_name: Self::name(&self.keys, &r.api_key_id),
            account_name: Self::name(&self.accounts, &r.account_id),
            record: r,
        }
    }
}

/// The distinct ids one column of `rows` holds.
fn distinct(rows: &[UsageRow], id: fn(&UsageRow) -> &Option<String>) -> Vec<String> {
    let mut ids: Vec<String> = rows.iter().filter_map(|r| id(r).clone()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One page of records with the names admins see.
async fn admin_records_page(
    state: &AdminState,
    filter: &RecordFilter,
    page: i64,
    per_page: i64,
) -> AppResult<Page<AdminRecord>> {
    let rows = state
        .store
        .list_usage_records(filter, page, per_page)
        .await?;
    let names = RecordNames::all_of(state, &rows.items).await?;
    Ok(page_map(rows, |r| names.admin(r)))
}

fn page_map<T, U>(page: Page<T>, f: impl FnMut(T) -> U) -> Page<U> {
    Page {
        items: page.items.into_iter().map(f).collect(),
        total: page.total,
        page: page.page,
        per_page: page.per_page,
    }
}

/// Billed micro-USD of some ids of a dim today and this month (UTC), from the daily rollups:
/// what their daily and monthly cost limits are measured against.
pub struct BilledRecently {
    today: HashMap<String, UsageTotals>,
    month: HashMap<String, UsageTotals>,
}

impl BilledRecently {
    pub fn today(&self, id: &str) -> i64 {
        self.today.get(id).map_or(0, |t| t.billed_cost)
    }

    pub fn month(&self, id: &str) -> i64 {
        self.month.get(id).map_or(0, |t| t.billed_cost)
    }
}

/// [`BilledRecently`] of `ids`, in two queries.
pub async fn billed_recently(
    state: &AdminState,
    dim: UsageDim,
    ids: &[String],
) -> AppResult<BilledRecently> {
    // The day and month as the summaries name them (`summary_over`).
    let day = days::format_day(days::today());
    let month_start = DayRange::month(None)?.first_day();
    Ok(BilledRecently {
        today: state
            .store
            .usage_totals_by_ids(dim, ids, Some(&day), Some(&day))
            .await?,
        month: state
            .store
            .usage_totals_by_ids(dim, ids, Some(&month_start), Some(&day))
            .await?,
    })
}

/// Today, this month and all time.
#[derive(Debug, Serialize, ToSchema)]
pub struct Summary<T> {
    /// Today (UTC), `YYYY-MM-DD`.
    pub day: String,
    /// This month (UTC), `YYYY-MM`.
    pub month: String,
    pub today: T,
    pub this_month: T,
    pub all_time: T,
}

async fn summary_of(state: &AdminState, user_id: &str) -> AppResult<Summary<UsageTotals>> {
    summary_over(state, UsageDim::User, Some(user_id)).await
}

/// Today, this month and all time of one entity (or, with `None`, of all entities) of a dim.
async fn summary_over(
    state: &AdminState,
    dim: UsageDim,
    dim_id: Option<&str>,
) -> AppResult<Summary<UsageTotals>> {
    let today = days::today();
    let day = days::format_day(today);
    let month = DayRange::month(None)?;
    let totals = |from: Option<String>, to: Option<String>| async move {
        state
            .store
            .usage_totals(dim, dim_id, from.as_deref(), to.as_deref())
            .await
    };
    Ok(Summary {
        today: totals(Some(day.clone()), Some(day.clone())).await?,
        this_month: totals(Some(month.first_day()), Some(month.last_day())).await?,
        all_time: totals(None, None).await?,
        day,
        month: days::format_month(today),
    })
}

/// A user's own summary, with the cost limits an admin set over all its keys (billed
/// micro-USD; `null`: none), measured against `today`, `this_month` and `all_time`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OwnSummary {
    #[serde(flatten)]
    pub summary: Summary<BilledTotals>,
    pub daily_cost_limit: Option<i64>,
    pub monthly_cost_limit: Option<i64>,
    pub total_cost_limit: Option<i64>,
}

/// `GET /api/usage/summary`: the caller's requests, tokens and billed cost today, this month
/// and over all time, and the caller's cost limits.
#[utoipa::path(get, path = "/api/usage/summary", tag = "own",
    responses(
        (status = 200, description = "The caller's totals and cost limits", body = OwnSummary),
        (status = 400, description = "The static admin token (no user)", body = ErrorBody),
    ))]
pub async fn summary(
    State(state): State<AdminState>,
    caller: Caller,
) -> AppResult<Json<OwnSummary>> {
    let user_id = caller.own_user_id()?;
    let s = summary_of(&state, user_id).await?;
    let user = state
        .store
        .user_by_id(user_id)
        .await?
        .ok_or(AppError::NotFound)?;
    Ok(Json(OwnSummary {
        summary: Summary {
            day: s.day,
            month: s.month,
            today: s.today.into(),
            this_month: s.this_month.into(),
            all_time: s.all_time.into(),
        },
        daily_cost_limit: user.daily_cost_limit,
        monthly_cost_limit: user.monthly_cost_limit,
        total_cost_limit: user.total_cost_limit,
    }))
}

/// A user's summary for admins: with base cost and the user's current price rate.
#[derive(Debug, Serialize)]
pub struct UserSummary {
    pub user_id: String,
    pub username: String,
    pub role: Role,
    pub price_rate: i64,
    #[serde(flatten)]
    pub summary: Summary<UsageTotals>,
}

/// `GET /api/admin/users/{id}/usage/summary`.
#[utoipa::path(get, path = "/api/admin/users/{id}/usage/summary", tag = "users",
    params(("id" = String, Path, description = "User id")),
    responses(
        (status = 200, description = "The user's totals with base and billed cost, role and price rate", body = serde_json::Value),
        (status = 404, description = "No such user", body = ErrorBody),
    ))]
pub async fn user_summary(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<UserSummary>> {
    caller.require_admin()?;
    let user = state
        .store
        .user_by_id(&id)
        .await?
        .ok_or(AppError::NotFound)?;
    Ok(Json(UserSummary {
        summary: summary_of(&state, &user.id).await?,
        user_id: user.id,
        username: user.username,
        role: user.role,
        price_rate: user.price_rate,
    }))
}

/// `GET /api/admin/usage/summary`: all traffic the accounts served, today, this month and over
/// all time, with base and billed cost. Requests refused before an account was picked (wrong
/// key, limits) cost nothing and are not counted here; the records list them.
#[utoipa::path(get, path = "/api/admin/usage/summary", tag = "usage",
    responses(
        (status = 200, description = "Totals of all traffic, base and billed cost", body = serde_json::Value),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ))]
pub async fn admin_summary(
    State(state): State<AdminState>,
    caller: Caller,
) -> AppResult<Json<Summary<UsageTotals>>> {
    caller.require_admin()?;
    Ok(Json(summary_over(&state, UsageDim::Account, None).await?))
}

/// Most rows a breakdown answers.
const MAX_BREAKDOWN: i64 = 500;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BreakdownQuery {
    /// `account`, `user`, `key` or `model`.
    by: String,
    /// First day, `YYYY-MM-DD` (UTC); default 29 days before `to`.
    from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC), inclusive; default today.
    to: Option<String>,
    /// Rows (most billed first), default 50, at most 500.
    limit: Option<i64>,
}

/// One entity's totals in a breakdown.
#[derive(Debug, Serialize)]
pub struct BreakdownRow {
    pub id: String,
    /// Account or user name, key name with its owner, or the model; `null` once deleted.
    pub name: Option<String>,
    #[serde(flatten)]
    pub totals: UsageTotals,
}

/// Usage per account, user, key or model over a range of days.
#[derive(Debug, Serialize)]
pub struct Breakdown {
    pub by: UsageDim,
    pub from: String,
    pub to: String,
    /// Most billed first.
    pub rows: Vec<BreakdownRow>,
}

/// `GET /api/admin/usage/breakdown?by=account|user|key|model&from=&to=&limit=`: who or what
/// the traffic went to over a range of days (the last 30 by default), most billed first.
#[utoipa::path(get, path = "/api/admin/usage/breakdown", tag = "usage", params(BreakdownQuery),
    responses(
        (status = 200, description = "Totals per entity, most billed first", body = serde_json::Value),
        (status = 400, description = "Unknown `by`, bad range or limit", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ))]
pub async fn breakdown(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<BreakdownQuery>,
) -> AppResult<Json<Breakdown>> {
    caller.require_admin()?;
    let dim = match q.by.as_str() {
        "account" => UsageDim::Account,
        "user" => UsageDim::User,
        "key" => UsageDim::Key,
        "model" => UsageDim::Model,
        other => {
            return Err(AppError::BadRequest(format!(
                "unknown breakdown {other:?}: use account, user, key or model"
            )))
        }
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_BREAKDOWN).contains(&limit) {
        return Err(AppError::BadRequest(format!(
            "limit must be 1 to {MAX_BREAKDOWN}"
        )));
    }
    let range = DayRange::from_query(q.from.as_deref(), q.to.as_deref(), None)?;
    let totals = state
        .store
        .usage_breakdown(
            dim,
            Some(&range.first_day()),
            Some(&range.last_day()),
            limit,
        )
        .await?;
    let ids: Vec<String> = totals.iter().map(|(id, _)| id.clone()).collect();
    let mut names = state.store.names_of(dim, &ids).await?;
    Ok(Json(Breakdown {
        by: dim,
        from: range.first_day(),
        to: range.last_day(),
        rows: totals
            .into_iter()
            .map(|(id, totals)| BreakdownRow {
                name: names.remove(&id),
                id,
                totals,
            })
            .collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeQuery {
    /// First day, `YYYY-MM-DD` (UTC).
    from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC), inclusive.
    to: Option<String>,
}

/// Per-day usage over a range, with its totals.
#[derive(Debug, Serialize, ToSchema)]
pub struct DailyUsage {
    pub from: String,
    pub to: String,
    pub totals: BilledTotals,
    /// Every day of the range, days without usage as zeros.
    pub days: Vec<DayUsage<BilledTotals>>,
}

async fn daily_of(state: &AdminState, user_id: &str, range: DayRange) -> AppResult<DailyUsage> {
    let rows = state
        .store
        .usage_daily(
            UsageDim::User,
            Some(user_id),
            &range.first_day(),
            &range.last_day(),
        )
        .await?;
    let by_day: HashMap<&str, &UsageDailyRow> = rows.iter().map(|r| (r.day.as_str(), r)).collect();
    let mut totals = BilledTotals::default();
    let days = range
        .days()
        .map(|d| {
            let day = days::format_day(d);
            let t: BilledTotals = by_day
                .get(day.as_str())
                .map(|r| UsageTotals::from(*r).into())
                .unwrap_or_default();
            totals.requests += t.requests;
            totals.input_tokens += t.input_tokens;
            totals.output_tokens += t.output_tokens;
            totals.cache_write_tokens += t.cache_write_tokens;
            totals.cache_read_tokens += t.cache_read_tokens;
            totals.billed_cost += t.billed_cost;
            DayUsage { day, totals: t }
        })
        .collect();
    Ok(DailyUsage {
        from: range.first_day(),
        to: range.last_day(),
        totals,
        days,
    })
}

/// `GET /api/usage/daily?from=YYYY-MM-DD&to=YYYY-MM-DD`: the caller's usage per UTC day (the
/// last 30 days by default, at most 366).
#[utoipa::path(get, path = "/api/usage/daily", tag = "own", params(RangeQuery),
    responses(
        (status = 200, description = "The caller's usage per day", body = DailyUsage),
        (status = 400, description = "Bad range, or the static admin token (no user)", body = ErrorBody),
    ))]
pub async fn daily(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<RangeQuery>,
) -> AppResult<Json<DailyUsage>> {
    let range = DayRange::from_query(
        q.from.as_deref(),
        q.to.as_deref(),
        Some(days::MAX_LISTED_DAYS),
    )?;
    Ok(Json(daily_of(&state, caller.own_user_id()?, range).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MonthQuery {
    /// `YYYY-MM` (UTC); this month by default.
    month: Option<String>,
}

/// One month's usage.
#[derive(Debug, Serialize, ToSchema)]
pub struct MonthlyUsage {
    pub month: String,
    #[serde(flatten)]
    pub usage: DailyUsage,
}

/// `GET /api/usage/monthly?month=YYYY-MM`: the caller's usage over a month (this one by
/// default), per day.
#[utoipa::path(get, path = "/api/usage/monthly", tag = "own", params(MonthQuery),
    responses(
        (status = 200, description = "The caller's usage over the month, per day", body = MonthlyUsage),
        (status = 400, description = "Bad month, or the static admin token (no user)", body = ErrorBody),
    ))]
pub async fn monthly(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<MonthQuery>,
) -> AppResult<Json<MonthlyUsage>> {
    let range = DayRange::month(q.month.as_deref())?;
    Ok(Json(MonthlyUsage {
        month: days::format_month(range.from),
        usage: daily_of(&state, caller.own_user_id()?, range).await?,
    }))
}

/// One of the caller's keys with its usage over the range.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyUsage {
    pub api_key_id: String,
    pub name: String,
    pub key_prefix: String,
    pub enabled: bool,
    #[serde(flatten)]
    pub totals: BilledTotals,
}

/// Totals over a range, and per key.
#[derive(Debug, Serialize, ToSchema)]
pub struct RangeStats {
    pub from: String,
    pub to: String,
    /// Every request of the caller (keys deleted since included).
    pub totals: BilledTotals,
    /// The caller's current keys, newest first.
    pub by_key: Vec<KeyUsage>,
}

/// `GET /api/usage/stats?from=&to=`: the caller's totals over a range of days (the last 30 by
/// default) and the same per key.
#[utoipa::path(get, path = "/api/usage/stats", tag = "own", params(RangeQuery),
    responses(
        (status = 200, description = "The caller's totals and per-key totals", body = RangeStats),
        (status = 400, description = "Bad range, or the static admin token (no user)", body = ErrorBody),
    ))]
pub async fn stats(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<RangeQuery>,
) -> AppResult<Json<RangeStats>> {
    let user_id = caller.own_user_id()?;
    let range = DayRange::from_query(q.from.as_deref(), q.to.as_deref(), None)?;
    let (from, to) = (range.first_day(), range.last_day());
    let totals = state
        .store
        .usage_totals(UsageDim::User, Some(user_id), Some(&from), Some(&to))
        .await?;
    // A user owns at most `max_keys_per_user` keys: one page holds them all.
    let keys = state
        .store
        .list_api_keys(Some(user_id), 1, crate::store::MAX_PER_PAGE)
        .await?
        .items;
    let ids: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
    let mut per_key = state
        .store
        .usage_totals_by_ids(UsageDim::Key, &ids, Some(&from), Some(&to))
        .await?;
    let by_key = keys
        .into_iter()
        .map(|k| KeyUsage {
            totals: per_key.remove(&k.id).unwrap_or_default().into(),
            api_key_id: k.id,
            name: k.name,
            key_prefix: k.key_prefix,
            enabled: k.enabled,
        })
        .collect();
    Ok(Json(RangeStats {
        from,
        to,
        totals: totals.into(),
        by_key,
    }))
}

/// One model's usage.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelUsage {
    pub model: String,
    #[serde(flatten)]
    pub totals: BilledTotals,
}

/// Usage per model over a range.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelsUsage {
    pub from: String,
    pub to: String,
    /// Most billed first.
    pub models: Vec<ModelUsage>,
}

/// `GET /api/usage/models?from=&to=`: the caller's usage per model over a range of days (the
/// last 30 by default).
#[utoipa::path(get, path = "/api/usage/models", tag = "own", params(RangeQuery),
    responses(
        (status = 200, description = "The caller's usage per model", body = ModelsUsage),
        (status = 400, description = "Bad range, or the static admin token (no user)", body = ErrorBody),
    ))]
pub async fn models(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<RangeQuery>,
) -> AppResult<Json<ModelsUsage>> {
    let range = DayRange::from_query(q.from.as_deref(), q.to.as_deref(), None)?;
    let models = state
        .store
        .usage_by_model_for_user(
            caller.own_user_id()?,
            Some(&range.first_day()),
            Some(&range.last_day()),
        )
        .await?
        .into_iter()
        .map(|(model, t)| ModelUsage {
            model,
            totals: t.into(),
        })
        .collect();
    Ok(Json(ModelsUsage {
        from: range.first_day(),
        to: range.last_day(),
        models,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RecordQuery {
    /// 1-based page number (default 1).
    page: Option<i64>,
    /// Rows per page (default 50, at most 500).
    per_page: Option<i64>,
    /// Admins only.
    user_id: Option<String>,
    api_key_id: Option<String>,
    /// Admins only.
    account_id: Option<String>,
    /// Epoch ms or `YYYY-MM-DD`, inclusive.
    from: Option<String>,
    /// Epoch ms (exclusive) or `YYYY-MM-DD` (inclusive).
    to: Option<String>,
}

impl RecordQuery {
    fn page(&self) -> (i64, i64) {
        PageQuery {
            page: self.page,
            per_page: self.per_page,
        }
        .get()
    }

    pub(super) fn filter(&self) -> AppResult<RecordFilter> {
        Ok(RecordFilter {
            user_id: self.user_id.clone(),
            api_key_id: self.api_key_id.clone(),
            account_id: self.account_id.clone(),
            from: self
                .from
                .as_deref()
                .map(|s| days::parse_bound("from", s, false))
                .transpose()?,
            to: self
                .to
                .as_deref()
                .map(|s| days::parse_bound("to", s, true))
                .transpose()?,
        })
    }
}

/// The filter of the caller's own records: the query's, on the caller's user.
pub(super) fn own_filter(caller: &Caller, q: &RecordQuery) -> AppResult<RecordFilter> {
    if q.user_id.is_some() || q.account_id.is_some() {
        return Err(AppError::BadRequest(
            "user_id and account_id are not filters of your own records".into(),
        ));
    }
    Ok(RecordFilter {
        user_id: Some(caller.own_user_id()?.to_string()),
        ..q.filter()?
    })
}

async fn own_records_page(
    state: &AdminState,
    caller: &Caller,
    q: &RecordQuery,
) -> AppResult<Page<OwnRecord>> {
    let filter = own_filter(caller, q)?;
    let (page, per_page) = q.page();
    let rows = state
        .store
        .list_usage_records(&filter, page, per_page)
        .await?;
    let names = RecordNames::keys_of(state, &rows.items).await?;
    Ok(page_map(rows, |r| names.own(r)))
}

/// `GET /api/usage/records?page=&per_page=&from=&to=&api_key_id=`: the caller's records,
/// newest first, each with its key's name.
#[utoipa::path(get, path = "/api/usage/records", tag = "own", params(RecordQuery),
    responses(
        (status = 200, description = "A page of the caller's records with their key's name (`OwnRecord` items)", body = super::openapi::ListPage),
        (status = 400, description = "Bad filter, or the static admin token (no user)", body = ErrorBody),
    ))]
pub async fn own_records(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<RecordQuery>,
) -> AppResult<Json<Page<OwnRecord>>> {
    Ok(Json(own_records_page(&state, &caller, &q).await?))
}

/// `GET /api/admin/usage/records?user_id=&api_key_id=&account_id=&from=&to=&page=&per_page=`:
/// every record with both costs and the names of its user, key and account, newest first;
/// filters are by id. Callers that are not admins get their own records, as
/// `/api/usage/records` gives them.
#[utoipa::path(get, path = "/api/admin/usage/records", tag = "usage", params(RecordQuery),
    responses(
        (status = 200, description = "A page of records with both costs and the names of their user, key and account (`AdminRecord` items); own records (`OwnRecord` items) for non-admins", body = super::openapi::ListPage),
        (status = 400, description = "Bad filter", body = ErrorBody),
    ))]
pub async fn records(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<RecordQuery>,
) -> AppResult<Json<serde_json::Value>> {
    let value = if caller.is_admin() {
        let (page, per_page) = q.page();
        serde_json::to_value(admin_records_page(&state, &q.filter()?, page, per_page).await?)
    } else {
        serde_json::to_value(own_records_page(&state, &caller, &q).await?)
    };
    Ok(Json(value.map_err(|e| AppError::Internal(e.to_string()))?))
}

/// `GET /api/admin/api-keys/{id}/logs?from=&to=&page=&per_page=`: one key's records, newest
/// first, with names as `/api/admin/usage/records` gives them (the key may have been deleted
/// since).
#[utoipa::path(get, path = "/api/admin/api-keys/{id}/logs", tag = "api-keys",
    params(("id" = String, Path, description = "API key id"), RecordQuery),
    responses(
        (status = 200, description = "A page of the key's records with the names of their user, key and account (`AdminRecord` items)", body = super::openapi::ListPage),
        (status = 400, description = "Bad filter", body = ErrorBody),
    ))]
pub async fn key_logs(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<RecordQuery>,
) -> AppResult<Json<Page<AdminRecord>>> {
    caller.require_admin()?;
    let filter = RecordFilter {
        api_key_id: Some(id),
        user_id: None,
        account_id: None,
        ..q.filter()?
    };
    let (page, per_page) = q.page();
    Ok(Json(
        admin_records_page(&state, &filter, page, per_page).await?,
    ))
}
