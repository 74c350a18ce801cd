//! Usage records (one per served request) and their daily rollups per user, key, account,
//! model and user × model, written in idempotent batches by the usage writer.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use relay_filters::cost::ServiceTier;
use relay_filters::UsageRecord;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use sqlx::Row;

use super::{get_bool, Page, Param, Result, SqlParts, SqlStore, StoreError};

/// Columns of `request_logs`, in insert order.
const RECORD_COLUMNS: [&str; 32] = [
    "id",
    "request_id",
    "created_at",
    "user_id",
    "api_key_id",
    "account_id",
    "session_key",
    "protocol",
    "requested_model",
    "upstream_model",
    "stream",
    "status",
    "input_tokens",
    "output_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
    "reasoning_tokens",
    "web_search_requests",
    "base_cost",
    "billed_cost",
    "price_rate",
    "latency_ms",
    "ttfb_ms",
    "failover_count",
    "error_type",
    "unpriced",
    "estimated",
    "service_tier",
    "upstream_request_id",
    "response_id",
    "passes",
];

/// Columns of `usage_daily`, in insert order.
const DAILY_COLUMNS: [&str; 10] = [
    "day",
    "dim",
    "dim_id",
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "base_cost",
    "billed_cost",
];

/// Records per INSERT statement: 32 × 256 parameters stays far under SQLite's 32 766.
pub(super) const RECORDS_PER_STATEMENT: usize = 256;
/// Rollup rows per upsert statement (10 parameters each).
const ROLLUPS_PER_STATEMENT: usize = 512;

/// What a daily rollup row is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageDim {
    /// Per user id.
    User,
    /// Per API key id.
    Key,
    /// Per account id.
    Account,
    /// Per model (upstream model, else requested model).
    Model,
}

impl UsageDim {
    /// The name stored in `usage_daily.dim`.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageDim::User => "user",
            UsageDim::Key => "key",
            UsageDim::Account => "account",
            UsageDim::Model => "model",
        }
    }
}

/// A row of `request_logs`, flat, booleans as bool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct UsageRow {
    /// Record id (unique).
    pub id: String,
    /// The client's own `x-request-id` when it sent one, the record id otherwise.
    pub request_id: String,
    /// Epoch ms when the request arrived.
    pub created_at: i64,
    /// User, when authenticated.
    pub user_id: Option<String>,
    /// API key, when authenticated.
    pub api_key_id: Option<String>,
    /// Account that served it (the last one tried).
    pub account_id: Option<String>,
    /// Session key used for stickiness.
    pub session_key: Option<String>,
    /// `Protocol::as_str()`.
    pub protocol: String,
    /// Model the client asked for.
    pub requested_model: Option<String>,
    /// Model sent upstream.
    pub upstream_model: Option<String>,
    /// Streaming request.
    pub stream: bool,
    /// HTTP status sent to the client.
    pub status: i64,
    /// Uncached input tokens.
    pub input_tokens: i64,
    /// Output tokens (reasoning included).
    pub output_tokens: i64,
    /// Cache writes, 5-minute TTL.
    pub cache_write_5m_tokens: i64,
    /// Cache writes, 1-hour TTL.
    pub cache_write_1h_tokens: i64,
    /// Cache reads.
    pub cache_read_tokens: i64,
    /// Reasoning tokens (already in output).
    pub reasoning_tokens: i64,
    /// Web searches the provider ran (billed per search, in the costs).
    pub web_search_requests: i64,
    /// Micro-USD before the price rate.
    pub base_cost: i64,
    /// Micro-USD charged to the user.
    pub billed_cost: i64,
    /// Price rate in ten-thousandths at the time.
    pub price_rate: i64,
    /// Total duration.
    pub latency_ms: i64,
    /// Time to the first byte sent to the client.
    pub ttfb_ms: Option<i64>,
    /// Accounts tried before the one that answered.
    pub failover_count: i64,
    /// Stable error type of a failed request.
    pub error_type: Option<String>,
    /// No price for the model: cost 0.
    pub unpriced: bool,
    /// Token counts incomplete.
    pub estimated: bool,
    /// The service tier the provider served it at (`priority`, `flex`, `standard`), or for an
    /// answer cut before it named one, the tier the request asked for; `null` when neither.
    pub service_tier: Option<String>,
    /// The provider's id of the request, from its answer's head (Anthropic `request-id`,
    /// OpenAI `x-request-id`).
    pub upstream_request_id: Option<String>,
    /// The id of the answer, from its body (`msg_…`, `chatcmpl-…`, `resp_…`, Gemini's
    /// `responseId`).
    pub response_id: Option<String>,
    /// The passes it ran on other models (an advisor's): `[{"model", "input_tokens",
    /// "output_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
    /// "cache_read_tokens"}]`, their tokens in the costs, not in the token columns; `null`:
    /// none.
    #[schema(value_type = Option<Vec<Object>>)]
    pub passes: Option<serde_json::Value>,
}

/// Which records to list; every set field narrows the list. Times are epoch ms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    /// Only this user's records.
    pub user_id: Option<String>,
    /// Only this key's records.
    pub api_key_id: Option<String>,
    /// Only this account's records.
    pub account_id: Option<String>,
    /// Created at or after (inclusive).
    pub from: Option<i64>,
    /// Created before (exclusive).
    pub to: Option<i64>,
}

/// A row of `usage_daily`: one entity's totals over one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageDailyRow {
    /// UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// `user`, `key`, `account`, `model`, or `user_model:{user_id}` (that user's models).
    pub dim: String,
    /// Id (or model name) of the entity.
    pub dim_id: String,
    /// Records counted.
    pub requests: i64,
    /// Uncached input tokens.
    pub input_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// Cache write tokens (5 m + 1 h).
    pub cache_write_tokens: i64,
    /// Cache read tokens.
    pub cache_read_tokens: i64,
    /// Micro-USD before price rates.
    pub base_cost: i64,
    /// Micro-USD charged.
    pub billed_cost: i64,
}

/// Sums of daily rollups over a range of days.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UsageTotals {
    /// Records counted.
    pub requests: i64,
    /// Uncached input tokens.
    pub input_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// Cache write tokens (5 m + 1 h).
    pub cache_write_tokens: i64,
    /// Cache read tokens.
    pub cache_read_tokens: i64,
    /// Micro-USD before price rates.
    pub base_cost: i64,
    /// Micro-USD charged.
    pub billed_cost: i64,
}

impl UsageTotals {
    /// Adds one record's figures.
    fn add_record(&mut self, r: &UsageRecord) {
        let u = &r.usage;
        self.add(&UsageTotals {
            requests: 1,
            input_tokens: int(u.input_tokens),
            output_tokens: int(u.output_tokens),
            cache_write_tokens: int(u
                .cache_write_5m_tokens
                .saturating_add(u.cache_write_1h_tokens)),
            cache_read_tokens: int(u.cache_read_tokens),
            base_cost: r.base_cost,
            billed_cost: r.billed_cost,
        });
    }

    /// Adds another sum's figures.
    fn add(&mut self, o: &UsageTotals) {
        self.requests = self.requests.saturating_add(o.requests);
        self.input_tokens = self.input_tokens.saturating_add(o.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(o.output_tokens);
        self.cache_write_tokens = self.cache_write_tokens.saturating_add(o.cache_write_tokens);
        self.cache_read_tokens = self.cache_read_tokens.saturating_add(o.cache_read_tokens);
        self.base_cost = self.base_cost.saturating_add(o.base_cost);
        self.billed_cost = self.billed_cost.saturating_add(o.billed_cost);
    }
}

/// Token counts are u64 in memory and BIGINT in the database; saturate rather than wrap.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub use relay_filters::key_limits::utc_day;

/// Rejects day bounds that are not `YYYY-MM-DD` (they compare as text).
fn check_day(day: &str) -> Result<()> {
    let b = day.as_bytes();
    let ok = b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    if !ok {
        return Err(StoreError::Invalid(format!(
            "day {day:?} is not in YYYY-MM-DD form"
        )));
    }
    Ok(())
}

/// `CAST(COALESCE(SUM(expr), 0) AS BIGINT)`: SUM of BIGINT is NUMERIC on PostgreSQL, which the
/// Any driver cannot decode.
fn sum(expr: &str) -> String {
    format!("CAST(COALESCE(SUM({expr}), 0) AS BIGINT)")
}

/// The seven sums of `usage_daily` columns, in [`totals_from_row`] order.
fn daily_sums() -> String {
    [
        "requests",
        "input_tokens",
        "output_tokens",
        "cache_write_tokens",
        "cache_read_tokens",
        "base_cost",
        "billed_cost",
    ]
    .map(sum)
    .join(", ")
}

/// Reads seven sums starting at column `base`.
fn totals_from_row(row: &AnyRow, base: usize) -> Result<UsageTotals> {
    Ok(UsageTotals {
        requests: row.try_get(base)?,
        input_tokens: row.try_get(base + 1)?,
        output_tokens: row.try_get(base + 2)?,
        cache_write_tokens: row.try_get(base + 3)?,
        cache_read_tokens: row.try_get(base + 4)?,
        base_cost: row.try_get(base + 5)?,
        billed_cost: row.try_get(base + 6)?,
    })
}

/// The `dim` of one user's per-model rollups (their `dim_id` is the model). The user is in
/// `dim` rather than in `dim_id` so that "this user's models over these days" is an equality
/// on the leading column of the `(dim, dim_id, day)` index, whatever the database collation.
fn user_model_dim(user_id: &str) -> String {
    format!("user_model:{user_id}")
}

/// Ids per `IN (...)` list, far under SQLite's parameter limit.
pub(super) const IDS_PER_STATEMENT: usize = 512;

/// Splits a batch into runs for multi-row statements: runs of `max`, then the rest in powers of
/// two, largest first. Run lengths come from a small fixed set (nine for 256), so each
/// statement's text recurs and the driver reuses its prepared form from the connection's
/// statement cache. With a run per batch remainder, a loaded relay wrote a new length nearly
/// every batch, and parsing a multi-row statement costs SQLite about as much as running it.
pub(super) fn statement_runs<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = if rest.len() >= max {
            max
        } else {
            1 << rest.len().ilog2()
        };
        let (run, tail) = rest.split_at(len);
        rest = tail;
        Some(run)
    })
}

/// The multi-row statements of a usage batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum BatchStatement {
    /// Which of the ids given are stored already.
    ExistingIds,
    InsertRecords,
    AddRollups,
}

impl BatchStatement {
    fn build(self, rows: usize, postgres: bool) -> String {
        match self {
            BatchStatement::ExistingIds => format!(
                "SELECT id FROM request_logs WHERE id IN {}",
                values_placeholders(1, rows, postgres)
            ),
            BatchStatement::InsertRecords => format!(
                "INSERT INTO request_logs ({}) VALUES {} ON CONFLICT (id) DO NOTHING",
                RECORD_COLUMNS.join(", "),
                values_placeholders(rows, RECORD_COLUMNS.len(), postgres)
            ),
            BatchStatement::AddRollups => format!(
                "INSERT INTO usage_daily ({}) VALUES {} ON CONFLICT (day, dim, dim_id) DO UPDATE \
                 SET requests = usage_daily.requests + excluded.requests, \
                 input_tokens = usage_daily.input_tokens + excluded.input_tokens, \
                 output_tokens = usage_daily.output_tokens + excluded.output_tokens, \
                 cache_write_tokens = usage_daily.cache_write_tokens + excluded.cache_write_tokens, \
                 cache_read_tokens = usage_daily.cache_read_tokens + excluded.cache_read_tokens, \
                 base_cost = usage_daily.base_cost + excluded.base_cost, \
                 billed_cost = usage_daily.billed_cost + excluded.billed_cost",
                DAILY_COLUMNS.join(", "),
                values_placeholders(rows, DAILY_COLUMNS.len(), postgres)
            ),
        }
    }

    /// The statement's text for `rows` rows, built once. Runs come in a few fixed lengths
    /// ([`statement_runs`]), so this holds a few dozen texts at most; building one anew for
    /// every run cost about as much per row as binding the row.
    pub(super) fn text(self, rows: usize, postgres: bool) -> Arc<str> {
        type Texts = Mutex<HashMap<(BatchStatement, usize, bool), Arc<str>>>;
        static TEXTS: OnceLock<Texts> = OnceLock::new();
        let mut texts = TEXTS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        texts
            .entry((self, rows, postgres))
            .or_insert_with(|| Arc::from(self.build(rows, postgres)))
            .clone()
    }
}

/// Builds a [`UsageRow`] from a `request_logs` row.
fn usage_from_row(row: &AnyRow) -> Result<UsageRow> {
    let id: String = row.try_get("id")?;
    let request_id: Option<String> = row.try_get("request_id")?;
    Ok(UsageRow {
        request_id: request_id.unwrap_or_else(|| id.clone()),
        id,
        created_at: row.try_get("created_at")?,
        user_id: row.try_get("user_id")?,
        api_key_id: row.try_get("api_key_id")?,
        account_id: row.try_get("account_id")?,
        session_key: row.try_get("session_key")?,
        protocol: row.try_get("protocol")?,
        requested_model: row.try_get("requested_model")?,
        upstream_model: row.try_get("upstream_model")?,
        stream: get_bool(row, "stream")?,
        status: row.try_get("status")?,
        input_tokens: row.try_get("input_tokens")?,
        output_tokens: row.try_get("output_tokens")?,
        cache_write_5m_tokens: row.try_get("cache_write_5m_tokens")?,
        cache_write_1h_tokens: row.try_get("cache_write_1h_tokens")?,
        cache_read_tokens: row.try_get("cache_read_tokens")?,
        reasoning_tokens: row.try_get("reasoning_tokens")?,
        web_search_requests: row.try_get("web_search_requests")?,
        base_cost: row.try_get("base_cost")?,
        billed_cost: row.try_get("billed_cost")?,
        price_rate: row.try_get("price_rate")?,
        latency_ms: row.try_get("latency_ms")?,
        ttfb_ms: row.try_get("ttfb_ms")?,
        failover_count: row.try_get("failover_count")?,
        error_type: row.try_get("error_type")?,
        unpriced: get_bool(row, "unpriced")?,
        estimated: get_bool(row, "estimated")?,
        service_tier: row.try_get("service_tier")?,
        upstream_request_id: row.try_get("upstream_request_id")?,
        response_id: row.try_get("response_id")?,
        // Written by the relay as JSON; anything else reads as none.
        passes: row
            .try_get::<Option<String>, _>("passes")?
            .and_then(|text| serde_json::from_str(&text).ok())
            .filter(serde_json::Value::is_array),
    })
}

/// A value of a usage batch's rows, borrowed from the batch: what both drivers bind (the
/// borrowed sibling of [`super::Param`], which dynamic statements own).
#[derive(Debug, Clone, Copy)]
pub(super) enum RowValue<'a> {
    /// TEXT (or NULL).
    Text(Option<&'a str>),
    /// BIGINT (or NULL).
    Int(Option<i64>),
}

/// A record's `request_logs` values, in [`RECORD_COLUMNS`] order.
pub(super) fn record_values(r: &UsageRecord) -> [RowValue<'_>; RECORD_COLUMNS.len()] {
    use RowValue::{Int, Text};
    let u = &r.usage;
    [
        Text(Some(r.id.as_str())),
        Text(r.request_id.as_deref()),
        Int(Some(r.created_at)),
        Text(r.user_id.as_deref()),
        Text(r.api_key_id.as_deref()),
        Text(r.account_id.as_deref()),
        Text(r.session_key.as_deref()),
        Text(Some(r.protocol.as_ref())),
        Text(r.requested_model.as_deref()),
        Text(r.upstream_model.as_deref()),
        Int(Some(i64::from(r.stream))),
        Int(Some(i64::from(r.status))),
        Int(Some(int(u.input_tokens))),
        Int(Some(int(u.output_tokens))),
        Int(Some(int(u.cache_write_5m_tokens))),
        Int(Some(int(u.cache_write_1h_tokens))),
        Int(Some(int(u.cache_read_tokens))),
        Int(Some(int(u.reasoning_tokens))),
        Int(Some(int(u.web_search_requests))),
        Int(Some(r.base_cost)),
        Int(Some(r.billed_cost)),
        Int(Some(r.price_rate)),
        Int(Some(r.latency_ms)),
        Int(r.ttfb_ms),
        Int(Some(i64::from(r.failover_count))),
        Text(r.error_type.as_deref()),
        Int(Some(i64::from(r.unpriced))),
        Int(Some(i64::from(r.estimated))),
        Text(r.service_tier.map(ServiceTier::as_str)),
        Text(r.upstream_request_id.as_deref()),
        Text(r.response_id.as_deref()),
        Text(r.passes.as_deref()),
    ]
}

/// A rollup row's `usage_daily` values, in [`DAILY_COLUMNS`] order.
pub(super) fn rollup_values<'a>(
    (day, dim, id): &'a RollupKey<'_>,
    t: &UsageTotals,
) -> [RowValue<'a>; DAILY_COLUMNS.len()] {
    use RowValue::{Int, Text};
    [
        Text(Some(day)),
        Text(Some(dim)),
        Text(Some(id)),
        Int(Some(t.requests)),
        Int(Some(t.input_tokens)),
        Int(Some(t.output_tokens)),
        Int(Some(t.cache_write_tokens)),
        Int(Some(t.cache_read_tokens)),
        Int(Some(t.base_cost)),
        Int(Some(t.billed_cost)),
    ]
}

/// Moves the last use of a key or account (`table`) forward: `$1` and `$3` the time, `$2` the id.
pub(super) fn last_used_sql(table: &str) -> String {
    format!(
        "UPDATE {table} SET last_used_at = $1 WHERE id = $2 \
         AND (last_used_at IS NULL OR last_used_at < $3)"
    )
}

/// Binds `values` to a sqlx query, in order.
fn bind_values<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    values: impl IntoIterator<Item = RowValue<'q>>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for v in values {
        query = match v {
            RowValue::Text(t) => query.bind(t),
            RowValue::Int(i) => query.bind(i),
        };
    }
    query
}

/// Inserts `records` (ids not stored yet are written, others skipped) and tells whether every
/// one was written.
async fn insert_records(
    conn: &mut AnyConnection,
    records: &[&UsageRecord],
    postgres: bool,
) -> Result<bool> {
    for chunk in statement_runs(records, RECORDS_PER_STATEMENT) {
        let sql = BatchStatement::InsertRecords.text(chunk.len(), postgres);
        let mut query = sqlx::query(&sql);
        for r in chunk {
            query = bind_values(query, record_values(r));
        }
        if query.execute(&mut *conn).await?.rows_affected() != chunk.len() as u64 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `($n, $n+1, ...), (...)` for `rows` rows of `cols` placeholders each.
///
/// SQLite gets anonymous `?` placeholders: numbered ones are bound by name there, one lookup per
/// parameter over all parameters, which made a 200-row insert quadratic.
fn values_placeholders(rows: usize, cols: usize, postgres: bool) -> String {
    (0..rows)
        .map(|r| {
            let row = (1..=cols)
                .map(|c| {
                    if postgres {
                        format!("${}", r * cols + c)
                    } else {
                        "?".to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            format!("({row})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The filter as a WHERE clause (or nothing) and its parameters.
fn record_where(filter: &RecordFilter) -> SqlParts {
    let mut parts = SqlParts::default();
    for (column, value) in [
        ("user_id", &filter.user_id),
        ("api_key_id", &filter.api_key_id),
        ("account_id", &filter.account_id),
    ] {
        if let Some(value) = value {
            parts.push(
                &format!("{column} = ?"),
                vec![Param::Text(Some(value.clone()))],
            );
        }
    }
    if let Some(from) = filter.from {
        parts.push("created_at >= ?", vec![Param::Int(Some(from))]);
    }
    if let Some(to) = filter.to {
        parts.push("created_at < ?", vec![Param::Int(Some(to))]);
    }
    parts
}

/// `WHERE a AND b` for non-empty parts, else nothing.
fn where_sql(parts: &SqlParts) -> String {
    if parts.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", parts.joined(" AND "))
    }
}

/// The daily-rollup WHERE clause for one dim, an optional entity and an optional day range.
fn daily_where(
    dim: UsageDim,
    dim_id: Option<&str>,
    from_day: Option<&str>,
    to_day: Option<&str>,
) -> Result<SqlParts> {
    let mut parts = SqlParts::default();
    parts.push("dim = ?", vec![Param::Text(Some(dim.as_str().to_owned()))]);
    if let Some(dim_id) = dim_id {
        parts.push("dim_id = ?", vec![Param::Text(Some(dim_id.to_owned()))]);
    }
    if let Some(from_day) = from_day {
        check_day(from_day)?;
        parts.push("day >= ?", vec![Param::Text(Some(from_day.to_owned()))]);
    }
    if let Some(to_day) = to_day {
        check_day(to_day)?;
        parts.push("day <= ?", vec![Param::Text(Some(to_day.to_owned()))]);
    }
    Ok(parts)
}

/// A batch's records, each id once: one id twice in a batch would be inserted once but
/// counted twice, so the first is kept.
pub(super) fn unique_records(records: &[UsageRecord]) -> Vec<&UsageRecord> {
    let mut seen = HashSet::with_capacity(records.len());
    records
        .iter()
        .filter(|r| seen.insert(r.id.as_str()))
        .collect()
}

/// A daily rollup row's key: (day, dim, dim_id).
pub(super) type RollupKey<'a> = (Arc<str>, Cow<'a, str>, &'a str);

/// What a batch's new records add besides themselves.
pub(super) struct BatchSums<'a> {
    /// Daily rollup rows, keyed (day, dim, dim_id), sorted.
    pub rollups: Vec<(RollupKey<'a>, UsageTotals)>,
    /// Latest use per API key id.
    pub key_used: BTreeMap<&'a str, i64>,
    /// Latest use per account id.
    pub account_used: BTreeMap<&'a str, i64>,
}

/// What the records of one group share: the day number and the user, key, account and model
/// they are counted under.
type Group<'a> = (
    i64,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

/// Sums the records stored by a batch into its rollup rows and last uses.
pub(super) fn batch_sums<'a>(fresh: &[&'a UsageRecord]) -> BatchSums<'a> {
    // Records come in long runs of one user, key, account, model and day: they are summed per
    // such group first (one map lookup per record at most, none while the group stays the
    // same), and each group then adds to its five rollup rows.
    let mut groups: Vec<(Group<'a>, UsageTotals, i64)> = Vec::new();
    let mut index: BTreeMap<Group<'a>, usize> = BTreeMap::new();
    let mut last = usize::MAX;
    for &r in fresh {
        let group = (
            r.created_at.div_euclid(86_400_000),
            r.user_id.as_deref(),
            r.api_key_id.as_deref(),
            r.account_id.as_deref(),
            r.upstream_model.as_deref().or(r.requested_model.as_deref()),
        );
        if groups.get(last).is_none_or(|(g, ..)| *g != group) {
            last = *index.entry(group).or_insert_with(|| {
                groups.push((group, UsageTotals::default(), r.created_at));
                groups.len() - 1
            });
        }
        let (_, totals, latest) = &mut groups[last];
        totals.add_record(r);
        *latest = (*latest).max(r.created_at);
    }

    // Sorted maps: every node touches rollup and key rows in the same order, so concurrent
    // writers on PostgreSQL queue instead of deadlocking.
    // Keyed (day, dim, dim_id), borrowing from the records: a batch's records nearly all
    // fall on one day, whose text is made once.
    let mut rollups: BTreeMap<RollupKey<'a>, UsageTotals> = BTreeMap::new();
    let mut key_used: BTreeMap<&'a str, i64> = BTreeMap::new();
    let mut account_used: BTreeMap<&'a str, i64> = BTreeMap::new();
    let mut last_day: Option<(i64, Arc<str>)> = None;
    for ((day_number, user, key, account, model), totals, latest) in &groups {
        let day = match &last_day {
            Some((n, text)) if n == day_number => text.clone(),
            _ => {
                let text: Arc<str> = Arc::from(utc_day(*latest));
                last_day = Some((*day_number, text.clone()));
                text
            }
        };
        let user_model = user.map(user_model_dim);
        for (dim, id) in [
            (Some(Cow::Borrowed(UsageDim::User.as_str())), *user),
            (Some(Cow::Borrowed(UsageDim::Key.as_str())), *key),
            (Some(Cow::Borrowed(UsageDim::Account.as_str())), *account),
            (Some(Cow::Borrowed(UsageDim::Model.as_str())), *model),
            (user_model.map(Cow::Owned), *model),
        ] {
            if let (Some(dim), Some(id)) = (dim, id) {
                rollups
                    .entry((day.clone(), dim, id))
                    .or_default()
                    .add(totals);
            }
        }
        for (used, id) in [(&mut key_used, *key), (&mut account_used, *account)] {
            if let Some(id) = id {
                let at = used.entry(id).or_insert(*latest);
                *at = (*at).max(*latest);
            }
        }
    }

    BatchSums {
        rollups: rollups.into_iter().collect(),
        key_used,
        account_used,
    }
}

impl SqlStore {
    /// Stores a batch of records and adds them to the daily rollups, in one transaction.
    ///
    /// Idempotent: a record whose id is already stored (a replayed batch, a spool file read
    /// twice) is skipped and not counted again. Also moves `last_used_at` of the keys and
    /// accounts named, without touching their `updated_at` (so caches are not invalidated).
    pub async fn insert_usage_batch(&self, records: &[UsageRecord]) -> Result<()> {
        match &self.sqlite_usage {
            Some(writer) => writer.write(records.into()).await,
            None => self.insert_usage_sql(records).await,
        }
    }

    /// [`SqlStore::insert_usage_batch`] for a batch the caller shares: on a SQLite file the
    /// usage thread reads it as it is, without a copy of every record's texts.
    pub async fn insert_usage_shared(&self, records: &Arc<[UsageRecord]>) -> Result<()> {
        match &self.sqlite_usage {
            Some(writer) => writer.write(records.clone()).await,
            None => self.insert_usage_sql(records).await,
        }
    }

    /// A batch through sqlx (PostgreSQL, in-memory SQLite).
    async fn insert_usage_sql(&self, records: &[UsageRecord]) -> Result<()> {
        let unique = unique_records(records);
        if unique.is_empty() {
            return Ok(());
        }

        let postgres = self.is_postgres();
        let mut tx = self.pool.begin().await?;
        // Nearly always every record is new: they are inserted without looking for them first.
        let fresh = if insert_records(&mut tx, &unique, postgres).await? {
            unique
        } else {
            // Some were stored already (a spooled batch replayed after its first write did
            // commit): start over and insert only the others, so none is counted twice.
            tx.rollback().await?;
            tx = self.pool.begin().await?;
            let mut existing: HashSet<String> = HashSet::new();
            for chunk in statement_runs(&unique, IDS_PER_STATEMENT) {
                let sql = BatchStatement::ExistingIds.text(chunk.len(), postgres);
                let mut query = sqlx::query(&sql);
                for r in chunk {
                    query = query.bind(r.id.as_str());
                }
                for row in query.fetch_all(&mut *tx).await? {
                    existing.insert(row.try_get(0)?);
                }
            }
            let fresh: Vec<&UsageRecord> = unique
                .into_iter()
                .filter(|r| !existing.contains(&r.id))
                .collect();
            // Fewer rows again: another writer stored one of these ids since the check
            // (PostgreSQL). The transaction is dropped and the batch retried.
            if !insert_records(&mut tx, &fresh, postgres).await? {
                return Err(StoreError::Conflict(
                    "usage records of this batch were stored meanwhile".into(),
                ));
            }
            fresh
        };

        let sums = batch_sums(&fresh);
        for chunk in statement_runs(&sums.rollups, ROLLUPS_PER_STATEMENT) {
            let sql = BatchStatement::AddRollups.text(chunk.len(), self.is_postgres());
            let mut query = sqlx::query(&sql);
            for (key, totals) in chunk {
                query = bind_values(query, rollup_values(key, totals));
            }
            query.execute(&mut *tx).await?;
        }

        for (table, used) in [
            ("api_keys", &sums.key_used),
            ("accounts", &sums.account_used),
        ] {
            let sql = last_used_sql(table);
            for (id, at) in used {
                sqlx::query(&sql)
                    .bind(*at)
                    .bind(*id)
                    .bind(*at)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// One page of records matching `filter`, newest first.
    pub async fn list_usage_records(
        &self,
        filter: &RecordFilter,
        page: i64,
        per_page: i64,
    ) -> Result<Page<UsageRow>> {
        let parts = record_where(filter);
        let where_sql = where_sql(&parts);
        let select = format!(
            "SELECT {} FROM request_logs {where_sql} ORDER BY created_at DESC, id DESC",
            RECORD_COLUMNS.join(", ")
        );
        let count = format!("SELECT COUNT(*) FROM request_logs {where_sql}");
        self.fetch_page(&select, &count, &parts, page, per_page, usage_from_row)
            .await
    }

    /// Up to `limit` records matching `filter`, oldest first (by arrival, then id), after the
    /// record `after` (its `created_at` and id) when given: an export's next batch, however
    /// many records there are, each read once.
    pub async fn usage_records_after(
        &self,
        filter: &RecordFilter,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<UsageRow>> {
        let mut parts = record_where(filter);
        if let Some((created_at, id)) = after {
            parts.push(
                // A range on the indexed arrival time, the tie broken by id.
                "created_at >= ? AND (created_at > ? OR id > ?)",
                vec![
                    Param::Int(Some(created_at)),
                    Param::Int(Some(created_at)),
                    Param::Text(Some(id.to_owned())),
                ],
            );
        }
        let sql = format!(
            "SELECT {} FROM request_logs {} ORDER BY created_at, id LIMIT ${}",
            RECORD_COLUMNS.join(", "),
            where_sql(&parts),
            parts.param_count() + 1
        );
        let rows = parts
            .bind(sqlx::query(&sql))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(usage_from_row).collect()
    }

    /// Removes up to `limit` records that arrived before `before_ms` (epoch ms), the oldest
    /// first; their daily totals stay. The number removed: fewer than `limit` when no older
    /// ones are left.
    pub async fn prune_usage_records(&self, before_ms: i64, limit: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM request_logs WHERE id IN (SELECT id FROM request_logs \
             WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
        )
        .bind(before_ms)
        .bind(limit)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Number of stored records.
    pub async fn count_records(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM request_logs")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Daily rollups of one dim from `from_day` to `to_day` (inclusive, `YYYY-MM-DD`), for one
    /// entity (`Some`) or all of them (`None`), by day then entity.
    pub async fn usage_daily(
        &self,
        dim: UsageDim,
        dim_id: Option<&str>,
        from_day: &str,
        to_day: &str,
    ) -> Result<Vec<UsageDailyRow>> {
        let parts = daily_where(dim, dim_id, Some(from_day), Some(to_day))?;
        let sql = format!(
            "SELECT {} FROM usage_daily {} ORDER BY day, dim_id",
            DAILY_COLUMNS.join(", "),
            where_sql(&parts)
        );
        let rows = parts.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(UsageDailyRow {
                    day: row.try_get("day")?,
                    dim: row.try_get("dim")?,
                    dim_id: row.try_get("dim_id")?,
                    requests: row.try_get("requests")?,
                    input_tokens: row.try_get("input_tokens")?,
                    output_tokens: row.try_get("output_tokens")?,
                    cache_write_tokens: row.try_get("cache_write_tokens")?,
                    cache_read_tokens: row.try_get("cache_read_tokens")?,
                    base_cost: row.try_get("base_cost")?,
                    billed_cost: row.try_get("billed_cost")?,
                })
            })
            .collect()
    }

    /// Sums of the daily rollups of one dim over a day range (either bound open with `None`),
    /// for one entity or all; e.g. a key's billed cost today and over its life.
    pub async fn usage_totals(
        &self,
        dim: UsageDim,
        dim_id: Option<&str>,
        from_day: Option<&str>,
        to_day: Option<&str>,
    ) -> Result<UsageTotals> {
        let parts = daily_where(dim, dim_id, from_day, to_day)?;
        let sql = format!(
            "SELECT {} FROM usage_daily {}",
            daily_sums(),
            where_sql(&parts)
        );
        let row = parts.bind(sqlx::query(&sql)).fetch_one(&self.pool).await?;
        totals_from_row(&row, 0)
    }

    /// Sums of the daily rollups of one dim over a day range (either bound open with `None`),
    /// for each of `ids`, in one indexed query per 500 ids; ids without usage are absent from
    /// the map. For a page of keys with their request counts and costs.
    pub async fn usage_totals_by_ids(
        &self,
        dim: UsageDim,
        ids: &[String],
        from_day: Option<&str>,
        to_day: Option<&str>,
    ) -> Result<HashMap<String, UsageTotals>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let mut parts = daily_where(dim, None, from_day, to_day)?;
            let marks = vec!["?"; chunk.len()].join(", ");
            parts.push(
                &format!("dim_id IN ({marks})"),
                chunk
                    .iter()
                    .map(|id| Param::Text(Some(id.clone())))
                    .collect(),
            );
            let sql = format!(
                "SELECT dim_id, {} FROM usage_daily {} GROUP BY dim_id",
                daily_sums(),
                where_sql(&parts)
            );
            for row in parts.bind(sqlx::query(&sql)).fetch_all(&self.pool).await? {
                out.insert(row.try_get(0)?, totals_from_row(&row, 1)?);
            }
        }
        Ok(out)
    }

    /// One user's totals per model over a day range (either bound open with `None`), most
    /// billed first, from the user's per-model rollups (one index range, whatever the traffic).
    pub async fn usage_by_model_for_user(
        &self,
        user_id: &str,
        from_day: Option<&str>,
        to_day: Option<&str>,
    ) -> Result<Vec<(String, UsageTotals)>> {
        let mut parts = SqlParts::default();
        parts.push("dim = ?", vec![Param::Text(Some(user_model_dim(user_id)))]);
        for (bound, day) in [("day >= ?", from_day), ("day <= ?", to_day)] {
            if let Some(day) = day {
                check_day(day)?;
                parts.push(bound, vec![Param::Text(Some(day.to_owned()))]);
            }
        }
        self.totals_per_entity(&parts, None).await
    }

    /// Totals per entity of one dim (every account, user, key or model) over a day range
    /// (either bound open with `None`), most billed first, at most `limit` of them.
    pub async fn usage_breakdown(
        &self,
        dim: UsageDim,
        from_day: Option<&str>,
        to_day: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(String, UsageTotals)>> {
        let parts = daily_where(dim, None, from_day, to_day)?;
        self.totals_per_entity(&parts, Some(limit)).await
    }

    /// `dim_id` and its sums over the rollup rows `parts` selects, most billed first.
    async fn totals_per_entity(
        &self,
        parts: &SqlParts,
        limit: Option<i64>,
    ) -> Result<Vec<(String, UsageTotals)>> {
        let limit = limit.map(|n| format!(" LIMIT {n}")).unwrap_or_default();
        let sql = format!(
            "SELECT dim_id, {} FROM usage_daily {} GROUP BY dim_id ORDER BY 8 DESC, 1{limit}",
            daily_sums(),
            where_sql(parts)
        );
        let rows = parts.bind(sqlx::query(&sql)).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, totals_from_row(row, 1)?)))
            .collect()
    }

    /// What operators call the entities of a dim, by id: account names, user names, key names
    /// with their owner's name. Ids no longer stored (deleted) are absent; models are their own
    /// names.
    pub async fn names_of(&self, dim: UsageDim, ids: &[String]) -> Result<HashMap<String, String>> {
        let (select, column) = match dim {
            UsageDim::Account => ("SELECT id, name FROM accounts", "id"),
            UsageDim::User => ("SELECT id, username FROM users", "id"),
            UsageDim::Key => (
                "SELECT k.id, k.name || ' (' || COALESCE(u.username, '?') || ')' \
                 FROM api_keys k LEFT JOIN users u ON u.id = k.user_id",
                "k.id",
            ),
            UsageDim::Model => return Ok(ids.iter().map(|m| (m.clone(), m.clone())).collect()),
        };
        self.names_by_id(select, column, ids).await
    }

    /// Keys' own names by id, without their owner's (a record shows its user apart). Ids no
    /// longer stored (deleted) are absent.
    pub async fn key_names(&self, ids: &[String]) -> Result<HashMap<String, String>> {
        self.names_by_id("SELECT id, name FROM api_keys", "id", ids)
            .await
    }

    /// The second column of `select` by its first, for the rows whose `column` is one of `ids`,
    /// in one statement per 512 ids (none for no ids).
    async fn names_by_id(
        &self,
        select: &str,
        column: &str,
        ids: &[String],
    ) -> Result<HashMap<String, String>> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_STATEMENT) {
            let mut parts = SqlParts::default();
            parts.push(
                &format!("{column} IN ({})", vec!["?"; chunk.len()].join(", ")),
                chunk
                    .iter()
                    .map(|id| Param::Text(Some(id.clone())))
                    .collect(),
            );
            let sql = format!("{select} {}", where_sql(&parts));
            for row in parts.bind(sqlx::query(&sql)).fetch_all(&self.pool).await? {
                out.insert(row.try_get(0)?, row.try_get(1)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    #[test]
    fn utc_days() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(-1), "1969-12-31");
        // 2026-11-22T23:59:59.999Z and one millisecond later.
        assert_eq!(utc_day(1_795_391_999_999), "2026-11-22");
        assert_eq!(utc_day(1_795_392_000_000), "2026-11-23");
        assert_eq!(utc_day(i64::MAX).len(), 10, "out of range counts on today");
    }

    #[test]
    fn day_bounds_are_checked() {
        assert!(check_day("2026-11-22").is_ok());
        for bad in ["2026-1-22", "20261122", "2026/11/22", "", "2026-11-22 "] {
            assert!(check_day(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn placeholders_run_across_rows() {
        assert_eq!(
            values_placeholders(2, 3, true),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(values_placeholders(2, 2, false), "(?, ?), (?, ?)");
    }

    #[test]
    fn statement_runs_cover_the_batch_with_few_distinct_lengths() {
        let mut lengths = HashSet::new();
        for n in 0..=1100usize {
            let items: Vec<usize> = (0..n).collect();
            let runs: Vec<&[usize]> = statement_runs(&items, 256).collect();
            assert_eq!(runs.concat(), items, "in order, each item once ({n})");
            // At most one run per bit of the remainder after the full runs.
            assert!(
                runs.len() <= n / 256 + (n % 256).count_ones() as usize,
                "{n}"
            );
            lengths.extend(runs.iter().map(|r| r.len()));
        }
        let mut lengths: Vec<usize> = lengths.into_iter().collect();
        lengths.sort_unstable();
        assert_eq!(lengths, [1, 2, 4, 8, 16, 32, 64, 128, 256]);
    }

    /// Batch sums, grouped by records' shared fields, equal the sums of every record on its own
    /// over a mixed batch: runs and interleaving, two days, missing user, key, account or model.
    #[test]
    fn batch_sums_equal_record_by_record_sums() {
        let pick =
            |i: usize, n: usize, of: &[&str]| of.get((i / n) % of.len()).map(|s| s.to_string());
        let records: Vec<UsageRecord> = (0..500usize)
            .map(|i| {
                let mut r = UsageRecord {
                    id: format!("r{i}"),
                    // Around midnight of 2026-11-22: two days.
                    created_at: 1_795_391_999_000 + (i as i64 * 7919) % 2_000,
                    user_id: pick(i, 3, &["u1", "u2", "u3"]).filter(|_| i % 11 != 0),
                    api_key_id: pick(i, 5, &["k1", "k2"]).filter(|_| i % 13 != 0),
                    account_id: pick(i, 2, &["a1", "a2", "a3"]).filter(|_| i % 17 != 0),
                    requested_model: pick(i, 7, &["m1", "m2"]).filter(|_| i % 19 != 0),
                    upstream_model: pick(i, 4, &["m2", "m3"]).filter(|_| i % 3 == 0),
                    base_cost: i as i64,
                    billed_cost: 2 * i as i64,
                    ..Default::default()
                };
                r.usage.input_tokens = i as u64;
                r.usage.output_tokens = 3;
                r.usage.cache_write_5m_tokens = (i % 4) as u64;
                r.usage.cache_write_1h_tokens = 1;
                r.usage.cache_read_tokens = (i % 9) as u64;
                r
            })
            .collect();
        let refs: Vec<&UsageRecord> = records.iter().collect();
        let sums = batch_sums(&refs);

        let mut rollups: BTreeMap<(String, String, String), UsageTotals> = BTreeMap::new();
        let mut key_used: BTreeMap<&str, i64> = BTreeMap::new();
        let mut account_used: BTreeMap<&str, i64> = BTreeMap::new();
        for r in &records {
            let day = utc_day(r.created_at);
            let model = r.upstream_model.as_deref().or(r.requested_model.as_deref());
            let dims = [
                ("user".to_string(), r.user_id.as_deref()),
                ("key".to_string(), r.api_key_id.as_deref()),
                ("account".to_string(), r.account_id.as_deref()),
                ("model".to_string(), model),
            ];
            let user_model = r.user_id.as_deref().map(|u| (user_model_dim(u), model));
            for (dim, id) in dims.into_iter().chain(user_model) {
                if let Some(id) = id {
                    let key = (day.clone(), dim, id.to_string());
                    rollups.entry(key).or_default().add_record(r);
                }
            }
            for (used, id) in [
                (&mut key_used, &r.api_key_id),
                (&mut account_used, &r.account_id),
            ] {
                if let Some(id) = id {
                    let at = used.entry(id.as_str()).or_insert(r.created_at);
                    *at = (*at).max(r.created_at);
                }
            }
        }
        let got: BTreeMap<(String, String, String), UsageTotals> = sums
            .rollups
            .iter()
            .map(|((day, dim, id), t)| ((day.to_string(), dim.to_string(), id.to_string()), *t))
            .collect();
        assert_eq!(got.len(), sums.rollups.len(), "each rollup row once");
        assert_eq!(got, rollups);
        assert!(got.keys().any(|(day, ..)| day == "2026-11-22"));
        assert!(got.keys().any(|(day, ..)| day == "2026-11-23"));
        assert_eq!(sums.key_used, key_used);
        assert_eq!(sums.account_used, account_used);
    }
}
