//! Usage records as CSV, for a billing period or a reconciliation: every record a filter
//! matches, oldest first, read and sent in batches, so an export of any size holds one batch in
//! memory. Admins get every column; a user gets the columns of their own records (billed cost
//! only: DESIGN §9).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use utoipa::IntoParams;

use super::usage::{own_filter, RecordNames, RecordQuery};
use crate::admin::auth::Caller;
use crate::admin::error::{AppResult, ErrorBody};
use crate::admin::extract::Query;
use crate::admin::AdminState;
use crate::store::{RecordFilter, UsageRow};

/// Records read per query.
const BATCH: i64 = 1000;

/// A record with the names of its user, key and account.
struct Named<'a> {
    r: &'a UsageRow,
    user: Option<&'a str>,
    key: Option<&'a str>,
    account: Option<&'a str>,
}

/// One field of a row.
enum Cell<'a> {
    Text(Option<&'a str>),
    Int(i64),
    OptInt(Option<i64>),
    Bool(bool),
    /// Epoch ms, written as UTC RFC 3339 with milliseconds.
    Time(i64),
    /// Micro-USD, written as exact USD with six decimals.
    Usd(i64),
    /// JSON, written compact as text.
    Json(Option<&'a serde_json::Value>),
}

/// A column: its name, whether only admins see it, and its field.
type Column = (&'static str, bool, for<'a> fn(&Named<'a>) -> Cell<'a>);

/// The columns, in order; `true`: admins only.
const COLUMNS: &[Column] = &[
    ("created_at", false, |n| Cell::Time(n.r.created_at)),
    ("id", false, |n| Cell::Text(Some(&n.r.id))),
    ("request_id", false, |n| Cell::Text(Some(&n.r.request_id))),
    ("user_id", true, |n| Cell::Text(n.r.user_id.as_deref())),
    ("user_name", true, |n| Cell::Text(n.user)),
    ("api_key_id", false, |n| {
        Cell::Text(n.r.api_key_id.as_deref())
    }),
    ("api_key_name", false, |n| Cell::Text(n.key)),
    ("account_id", true, |n| {
        Cell::Text(n.r.account_id.as_deref())
    }),
    ("account_name", true, |n| Cell::Text(n.account)),
    ("protocol", false, |n| Cell::Text(Some(&n.r.protocol))),
    ("requested_model", false, |n| {
        Cell::Text(n.r.requested_model.as_deref())
    }),
    ("upstream_model", false, |n| {
        Cell::Text(n.r.upstream_model.as_deref())
    }),
    ("stream", false, |n| Cell::Bool(n.r.stream)),
    ("status", false, |n| Cell::Int(n.r.status)),
    ("input_tokens", false, |n| Cell::Int(n.r.input_tokens)),
    ("output_tokens", false, |n| Cell::Int(n.r.output_tokens)),
    ("cache_write_5m_tokens", false, |n| {
        Cell::Int(n.r.cache_write_5m_tokens)
    }),
    ("cache_write_1h_tokens", false, |n| {
        Cell::Int(n.r.cache_write_1h_tokens)
    }),
    ("cache_read_tokens", false, |n| {
        Cell::Int(n.r.cache_read_tokens)
    }),
    ("reasoning_tokens", false, |n| {
        Cell::Int(n.r.reasoning_tokens)
    }),
    ("web_search_requests", false, |n| {
        Cell::Int(n.r.web_search_requests)
    }),
    ("service_tier", false, |n| {
        Cell::Text(n.r.service_tier.as_deref())
    }),
    ("base_cost_micro_usd", true, |n| Cell::Int(n.r.base_cost)),
    ("price_rate", true, |n| Cell::Int(n.r.price_rate)),
    ("billed_cost_micro_usd", false, |n| {
        Cell::Int(n.r.billed_cost)
    }),
    ("billed_cost_usd", false, |n| Cell::Usd(n.r.billed_cost)),
    ("latency_ms", false, |n| Cell::Int(n.r.latency_ms)),
    ("ttfb_ms", false, |n| Cell::OptInt(n.r.ttfb_ms)),
    ("failover_count", true, |n| Cell::Int(n.r.failover_count)),
    ("error_type", false, |n| {
        Cell::Text(n.r.error_type.as_deref())
    }),
    ("unpriced", false, |n| Cell::Bool(n.r.unpriced)),
    ("estimated", false, |n| Cell::Bool(n.r.estimated)),
    ("upstream_request_id", false, |n| {
        Cell::Text(n.r.upstream_request_id.as_deref())
    }),
    ("response_id", false, |n| {
        Cell::Text(n.r.response_id.as_deref())
    }),
    ("passes", false, |n| Cell::Json(n.r.passes.as_ref())),
];

/// The columns one kind of caller sees.
fn columns(admin: bool) -> impl Iterator<Item = &'static Column> {
    COLUMNS.iter().filter(move |c| admin || !c.1)
}

/// The header line.
fn header_line(admin: bool) -> String {
    let mut line = columns(admin).map(|c| c.0).collect::<Vec<_>>().join(",");
    line.push_str("\r\n");
    line
}

/// Appends `text` as one CSV field: quoted when it holds a separator, a quote or a line break;
/// a leading `'` when a spreadsheet would read it as a formula (names are chosen by users).
fn push_text(out: &mut String, text: &str) {
    let formula = text.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quoted = formula || text.contains([',', '"', '\n', '\r']);
    if quoted {
        out.push('"');
    }
    if formula {
        out.push('\'');
    }
    for c in text.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quoted {
        out.push('"');
    }
}

/// Epoch ms as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn push_time(out: &mut String, ms: i64) {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let formatted = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(format).ok());
    match formatted {
        Some(t) => out.push_str(&t),
        // Outside the calendar the format knows: the number itself, never a lost field.
        None => out.push_str(&ms.to_string()),
    }
}

/// Micro-USD as exact USD: `18000` → `0.018000`.
fn push_usd(out: &mut String, micro: i64) {
    use std::fmt::Write as _;
    let sign = if micro < 0 { "-" } else { "" };
    let abs = micro.unsigned_abs();
    let _ = write!(out, "{sign}{}.{:06}", abs / 1_000_000, abs % 1_000_000);
}

/// Appends one record's line.
fn push_row(out: &mut String, admin: bool, n: &Named<'_>) {
    for (i, (_, _, field)) in columns(admin).enumerate() {
        if i > 0 {
            out.push(',');
        }
        match field(n) {
            Cell::Text(None) | Cell::OptInt(None) | Cell::Json(None) => {}
            Cell::Json(Some(v)) => push_text(out, &v.to_string()),
            Cell::Text(Some(t)) => push_text(out, t),
            Cell::Int(v) | Cell::OptInt(Some(v)) => out.push_str(&v.to_string()),
            Cell::Bool(b) => out.push_str(if b { "true" } else { "false" }),
            Cell::Time(ms) => push_time(out, ms),
            Cell::Usd(micro) => push_usd(out, micro),
        }
    }
    out.push_str("\r\n");
}

/// Where an export stands between batches.
struct Cursor {
    state: AdminState,
    filter: RecordFilter,
    admin: bool,
    /// The last record sent (its arrival and id); `None` before the first batch.
    after: Option<(i64, String)>,
}

impl Cursor {
    /// The next batch as CSV lines, and the cursor after it (`None`: that was the last).
    async fn next(mut self) -> AppResult<(Bytes, Option<Cursor>)> {
        let after = self.after.as_ref().map(|(at, id)| (*at, id.as_str()));
        let rows = self
            .state
            .store
            .usage_records_after(&self.filter, after, BATCH)
            .await?;
        let names = if self.admin {
            RecordNames::all_of(&self.state, &rows).await?
        } else {
            RecordNames::keys_of(&self.state, &rows).await?
        };
        let mut out = String::with_capacity(rows.len() * 400);
        for r in &rows {
            let (user, key, account) = names.of(r);
            push_row(
                &mut out,
                self.admin,
                &Named {
                    r,
                    user,
                    key,
                    account,
                },
            );
        }
        let last = i64::try_from(rows.len()).unwrap_or(i64::MAX) < BATCH;
        self.after = rows.last().map(|r| (r.created_at, r.id.clone()));
        Ok((Bytes::from(out), (!last).then_some(self)))
    }
}

/// How the CSV is written, beside the record filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CsvOptions {
    /// `true`: the file starts with a UTF-8 byte order mark, for spreadsheets (Excel) that
    /// otherwise read it in a legacy code page and garble names outside ASCII.
    bom: Option<bool>,
}

/// The UTF-8 byte order mark.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// The CSV answer: the header line and the first batch, read before answering (a failure
/// there is an error answer), then the other batches as they are read. A failure after that
/// ends the transfer unfinished: the client sees a broken download, never a short file that
/// looks whole.
async fn csv_response(
    state: AdminState,
    filter: RecordFilter,
    admin: bool,
    options: CsvOptions,
) -> AppResult<Response> {
    let (first, rest) = Cursor {
        state,
        filter,
        admin,
        after: None,
    }
    .next()
    .await?;
    let mut head = Vec::new();
    if options.bom == Some(true) {
        head.extend_from_slice(UTF8_BOM);
    }
    head.extend_from_slice(header_line(admin).as_bytes());
    head.extend_from_slice(&first);
    let head = futures::stream::once(std::future::ready(Ok::<_, std::io::Error>(Bytes::from(
        head,
    ))));
    let rows = futures::stream::unfold(rest, |cursor| async move {
        match cursor?.next().await {
            Ok((bytes, next)) => Some((Ok(bytes), next)),
            Err(e) => {
                tracing::warn!(error = %e, "a usage export stopped");
                Some((
                    Err(std::io::Error::other("the export could not be read")),
                    None,
                ))
            }
        }
    });
    let mut response = Response::new(Body::from_stream(futures::StreamExt::chain(head, rows)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"usage-records.csv\""),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// `GET /api/admin/usage/records.csv?user_id=&api_key_id=&account_id=&from=&to=`: every record
/// the filters match, oldest first, as CSV with the names of its user, key and account and both
/// costs (micro-USD, and the billed cost in USD). Callers that are not admins get their own
/// records, as `/api/usage/records.csv` gives them. Records of requests still running, or not
/// yet written, are not in it: export a period that has ended.
#[utoipa::path(get, path = "/api/admin/usage/records.csv", tag = "usage", params(RecordQuery, CsvOptions),
    responses(
        (status = 200, description = "CSV (`text/csv`), a header line then one line per record", content_type = "text/csv", body = String),
        (status = 400, description = "Bad filter", body = ErrorBody),
    ))]
pub async fn records_csv(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<RecordQuery>,
    Query(options): Query<CsvOptions>,
) -> AppResult<Response> {
    if caller.is_admin() {
        let filter = q.filter()?;
        csv_response(state, filter, true, options).await
    } else {
        own_records_csv(State(state), caller, Query(q), Query(options)).await
    }
}

/// `GET /api/usage/records.csv?api_key_id=&from=&to=`: the caller's records, oldest first, as
/// CSV with each key's name and the billed cost (micro-USD and USD).
#[utoipa::path(get, path = "/api/usage/records.csv", tag = "own", params(RecordQuery, CsvOptions),
    responses(
        (status = 200, description = "CSV (`text/csv`), a header line then one line per record", content_type = "text/csv", body = String),
        (status = 400, description = "Bad filter, or the static admin token (no user)", body = ErrorBody),
    ))]
pub async fn own_records_csv(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<RecordQuery>,
    Query(options): Query<CsvOptions>,
) -> AppResult<Response> {
    let filter = own_filter(&caller, &q)?;
    csv_response(state, filter, false, options).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(f: impl Fn(&mut String)) -> String {
        let mut s = String::new();
        f(&mut s);
        s
    }

    #[test]
    fn text_fields_are_quoted_and_defused() {
        let text = |t: &str| line(|s| push_text(s, t));
        assert_eq!(text("claude-sonnet-4-5"), "claude-sonnet-4-5");
        assert_eq!(text("a,b"), "\"a,b\"");
        assert_eq!(text("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(text("two\nlines"), "\"two\nlines\"");
        // What a spreadsheet would run as a formula is text.
        assert_eq!(text("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        for lead in ["+1", "-1", "@SUM(A1)", "\tx"] {
            assert!(text(lead).starts_with("\"'"), "{lead:?}");
        }
        assert_eq!(text(""), "");
    }

    #[test]
    fn times_and_dollars_are_exact() {
        assert_eq!(
            line(|s| push_time(s, 1_798_761_600_123)),
            "2027-01-01T00:00:00.123Z"
        );
        assert_eq!(line(|s| push_time(s, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(line(|s| push_time(s, i64::MAX)), i64::MAX.to_string());
        assert_eq!(line(|s| push_usd(s, 18_000)), "0.018000");
        assert_eq!(line(|s| push_usd(s, 6_009_000)), "6.009000");
        assert_eq!(line(|s| push_usd(s, 0)), "0.000000");
        assert_eq!(line(|s| push_usd(s, -1)), "-0.000001");
        assert_eq!(line(|s| push_usd(s, i64::MIN)), "-9223372036854.775808");
    }

    #[test]
    fn users_see_no_admin_columns() {
        let own = header_line(false);
        for hidden in [
            "user_id",
            "account_id",
            "account_name",
            "base_cost_micro_usd",
            "price_rate",
            "failover_count",
        ] {
            assert!(!own.split(',').any(|c| c.trim() == hidden), "{hidden}");
            assert!(header_line(true).split(',').any(|c| c.trim() == hidden));
        }
        assert!(own.starts_with("created_at,id,request_id,api_key_id,api_key_name,"));
        assert!(own.ends_with("upstream_request_id,response_id,passes\r\n"));
    }
}
