//! Every Prometheus metric of the relay, defined in one place (DESIGN §12). Labels are bounded:
//! protocol, account name, a model from the price table or `other`, status class — never keys,
//! paths or session keys.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec,
};
use relay_filters::types::Protocol;

/// All metrics, registered in the default registry on first use.
pub struct Metrics {
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_ttfb: HistogramVec,
    pub overhead: HistogramVec,
    pub tokens: IntCounterVec,
    pub cost: IntCounterVec,
    pub sticky: IntCounterVec,
    pub failovers: IntCounterVec,
    pub inflight: IntGaugeVec,
    pub account_state: IntGaugeVec,
    pub account_cooldowns: IntCounterVec,
    pub usage_queue_depth: IntGauge,
    pub usage_spilled: IntCounter,
    pub usage_written: IntCounter,
    pub usage_spool_failures: IntCounter,
    pub usage_held: IntGauge,
    pub usage_set_aside: IntCounter,
    pub usage_database_down: IntGauge,
    pub usage_pruned: IntCounter,
    pub unpriced: IntCounterVec,
    pub estimated: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub oauth_refreshes: IntCounterVec,
    pub session_store_fallback: IntCounter,
    pub limit_refusals: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

const OVERHEAD_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

fn build() -> Result<Metrics, prometheus::Error> {
    Ok(Metrics {
        requests: register_int_counter_vec!(
            "relay_requests_total",
            "Requests handled by the proxy",
            &["protocol", "account", "model", "status"]
        )?,
        request_duration: register_histogram_vec!(
            "relay_request_duration_seconds",
            "Time from request arrival to the end of the response",
            &["protocol", "stream"],
            LATENCY_BUCKETS.to_vec()
        )?,
        upstream_ttfb: register_histogram_vec!(
            "relay_upstream_ttfb_seconds",
            "Time from sending the request upstream to its response head",
            &["protocol", "account"],
            LATENCY_BUCKETS.to_vec()
        )?,
        overhead: register_histogram_vec!(
            "relay_overhead_seconds",
            "Time the relay itself spent on a request, upstream time excluded",
            &["protocol"],
            OVERHEAD_BUCKETS.to_vec()
        )?,
        tokens: register_int_counter_vec!(
            "relay_tokens_total",
            "Tokens metered, by kind",
            &["protocol", "model", "kind"]
        )?,
        cost: register_int_counter_vec!(
            "relay_cost_micro_usd_total",
            "Billed cost in micro-USD",
            &["protocol", "model"]
        )?,
        sticky: register_int_counter_vec!(
            "relay_sticky_total",
            "Session binding lookups",
            &["result"]
        )?,
        failovers: register_int_counter_vec!(
            "relay_failovers_total",
            "Attempts moved to another account",
            &["reason"]
        )?,
        inflight: register_int_gauge_vec!(
            "relay_inflight_requests",
            "Requests in flight",
            &["protocol"]
        )?,
        account_state: register_int_gauge_vec!(
            "relay_account_state",
            "Accounts by platform and state",
            &["platform", "state"]
        )?,
        account_cooldowns: register_int_counter_vec!(
            "relay_account_cooldowns_total",
            "Account cooldowns started",
            &["reason"]
        )?,
        usage_queue_depth: register_int_gauge!(
            "relay_usage_queue_depth",
            "Usage records waiting for the writer"
        )?,
        usage_spilled: register_int_counter!(
            "relay_usage_records_spilled_total",
            "Usage records written to the spool because the database was unreachable"
        )?,
        usage_written: register_int_counter!(
            "relay_usage_records_written_total",
            "Usage records committed to the database"
        )?,
        usage_spool_failures: register_int_counter!(
            "relay_usage_spool_failures_total",
            "Spool writes that failed (their records are kept in memory and retried)"
        )?,
        usage_held: register_int_gauge!(
            "relay_usage_records_held",
            "Usage records neither the database nor the spool took yet, kept in memory and retried (the queue waits meanwhile)"
        )?,
        usage_pruned: register_int_counter!(
            "relay_usage_records_pruned_total",
            "Usage records removed past the retention period (their daily totals are kept)"
        )?,
        usage_set_aside: register_int_counter!(
            "relay_usage_records_set_aside_total",
            "Spooled usage records the database refused for their data, set aside in a .rejected file"
        )?,
        usage_database_down: register_int_gauge!(
            "relay_usage_database_down",
            "1 while the usage writer takes the database for down and spools every batch at once"
        )?,
        unpriced: register_int_counter_vec!(
            "relay_unpriced_requests_total",
            "Requests for a model without a price (billed 0)",
            &["protocol"]
        )?,
        estimated: register_int_counter_vec!(
            "relay_estimated_requests_total",
            "Requests booked with counts that may not be the upstream's (a cut or unfinished answer, one without usage, a client gone with abort)",
            &["protocol"]
        )?,
        health_checks: register_int_counter_vec!(
            "relay_health_checks_total",
            "Account health checks",
            &["result"]
        )?,
        oauth_refreshes: register_int_counter_vec!(
            "relay_oauth_refreshes_total",
            "OAuth access token refreshes by result (refreshed, refused, failed)",
            &["result"]
        )?,
        session_store_fallback: register_int_counter!(
            "relay_session_store_fallback_total",
            "Session store operations served from memory because Redis failed"
        )?,
        limit_refusals: register_int_counter_vec!(
            "relay_limit_refusals_total",
            "Requests refused by a limit of their API key or its user: limit (rpm, concurrency, \
             daily_cost, monthly_cost, total_cost; unpriced_model: a model without a price under \
             a cost limit), whose (key, user), status (402: spent; 403: unpriced model; 429: \
             rate, slots or cost held by requests in flight)",
            &["limit", "whose", "status"]
        )?,
    })
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| match build() {
    Ok(m) => m,
    // Registration fails only on a duplicate name, a programming error caught by every test.
    Err(e) => panic!("metric registration failed: {e}"),
});

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The series of one protocol whose only other label is bounded and known (`stream`), resolved
/// once: a request updates them without a label lookup. Every protocol's series is exported from
/// the first request on, at zero until used.
pub struct ProtocolSeries {
    pub inflight: IntGauge,
    pub overhead: Histogram,
    /// `relay_request_duration_seconds` with `stream` false, then true.
    pub duration: [Histogram; 2],
}

const PROTOCOLS: [Protocol; 4] = [
    Protocol::Anthropic,
    Protocol::OpenaiChat,
    Protocol::OpenaiResponses,
    Protocol::Gemini,
];

static PROTOCOL_SERIES: LazyLock<[ProtocolSeries; 4]> = LazyLock::new(|| {
    let m = metrics();
    PROTOCOLS.map(|p| {
        let name = p.as_str();
        ProtocolSeries {
            inflight: m.inflight.with_label_values(&[name]),
            overhead: m.overhead.with_label_values(&[name]),
            duration: [
                m.request_duration.with_label_values(&[name, "false"]),
                m.request_duration.with_label_values(&[name, "true"]),
            ],
        }
    })
});

/// The resolved series of `protocol`.
pub fn protocol_series(protocol: Protocol) -> &'static ProtocolSeries {
    let i = match protocol {
        Protocol::Anthropic => 0,
        Protocol::OpenaiChat => 1,
        Protocol::OpenaiResponses => 2,
        Protocol::Gemini => 3,
    };
    &PROTOCOL_SERIES[i]
}

/// Status class labels, by [`status_class_index`].
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// `relay_tokens_total` kinds, in the order [`count_record`] takes the counts.
const TOKEN_KINDS: [&str; 4] = ["input", "output", "cache_write", "cache_read"];

/// The series a record of one protocol, account and model adds to, each resolved on its first
/// use (a series is exported from then on, as `with_label_values` makes it).
struct RecordSeries {
    protocol: Protocol,
    account: Box<str>,
    model: Box<str>,
    /// `relay_requests_total` by status class.
    requests: [Option<IntCounter>; 5],
    /// `relay_tokens_total` by [`TOKEN_KINDS`].
    tokens: [Option<IntCounter>; 4],
    cost: Option<IntCounter>,
}

/// Record series a thread keeps; past this many it starts over (accounts or models renamed).
const RECORD_SERIES_KEPT: usize = 64;

thread_local! {
    /// A looked-up label set hashes every label value and takes the vector's lock: five such
    /// lookups were about 2 500 instructions a request. A thread keeps the handles it used.
    static RECORD_SERIES: std::cell::RefCell<Vec<RecordSeries>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Counts one request's record: `relay_requests_total`, `relay_tokens_total` for each kind
/// with tokens ([`TOKEN_KINDS`] order) and `relay_cost_micro_usd_total` when it was charged.
pub fn count_record(
    protocol: Protocol,
    account: &str,
    model: &str,
    status: u16,
    tokens: [u64; 4],
    cost: i64,
) {
    RECORD_SERIES.with_borrow_mut(|kept| {
        let found = kept
            .iter()
            .position(|s| s.protocol == protocol && *s.account == *account && *s.model == *model);
        let at = found.unwrap_or_else(|| {
            if kept.len() >= RECORD_SERIES_KEPT {
                kept.clear();
            }
            kept.push(RecordSeries {
                protocol,
                account: account.into(),
                model: model.into(),
                requests: Default::default(),
                tokens: Default::default(),
                cost: None,
            });
            kept.len() - 1
        });
        let s = &mut kept[at];
        let (m, p) = (metrics(), protocol.as_str());
        let class = status_class_index(status);
        s.requests[class]
            .get_or_insert_with(|| {
                m.requests
                    .with_label_values(&[p, account, model, STATUS_CLASSES[class]])
            })
            .inc();
        for ((series, kind), n) in s.tokens.iter_mut().zip(TOKEN_KINDS).zip(tokens) {
            if n > 0 {
                series
                    .get_or_insert_with(|| m.tokens.with_label_values(&[p, model, kind]))
                    .inc_by(n);
            }
        }
        if cost > 0 {
            s.cost
                .get_or_insert_with(|| m.cost.with_label_values(&[p, model]))
                .inc_by(cost as u64);
        }
    });
}

/// Prometheus text exposition of every registered metric.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    let _ = encoder.encode(&prometheus::gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    /// The label sets of `family` whose `account` or `model` label is `value`.
    fn series_naming(family: &str, value: &str) -> Vec<Vec<(String, String)>> {
        prometheus::gather()
            .iter()
            .filter(|f| f.name() == family)
            .flat_map(|f| f.get_metric().iter())
            .map(|m| {
                m.get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect::<Vec<_>>()
            })
            .filter(|labels| labels.iter().any(|(_, v)| v == value))
            .collect()
    }

    #[test]
    fn records_count_on_their_series_kept_per_thread() {
        let m = metrics();
        let tokens = |model: &str, kind: &str| m.tokens.with_label_values(&["gemini", model, kind]);
        for round in 1..=3u64 {
            count_record(
                Protocol::Gemini,
                "acct-metrics-test",
                "model-metrics-test",
                200,
                [5, 7, 0, 1],
                30,
            );
            count_record(
                Protocol::Gemini,
                "acct-metrics-test",
                "model-metrics-test",
                503,
                [0; 4],
                0,
            );
            let requests = |class: &str| {
                m.requests
                    .with_label_values(&[
                        "gemini",
                        "acct-metrics-test",
                        "model-metrics-test",
                        class,
                    ])
                    .get()
            };
            assert_eq!((requests("2xx"), requests("5xx")), (round, round));
            assert_eq!(tokens("model-metrics-test", "input").get(), 5 * round);
            assert_eq!(tokens("model-metrics-test", "output").get(), 7 * round);
            assert_eq!(tokens("model-metrics-test", "cache_read").get(), round);
            assert_eq!(
                m.cost
                    .with_label_values(&["gemini", "model-metrics-test"])
                    .get(),
                30 * round
            );
        }
        // A kind never counted has no series, nor does a status class never seen.
        let kinds: Vec<String> = series_naming("relay_tokens_total", "model-metrics-test")
            .into_iter()
            .flat_map(|labels| {
                labels
                    .into_iter()
                    .filter(|(k, _)| k == "kind")
                    .map(|(_, v)| v)
            })
            .collect();
        assert_eq!(kinds.len(), 3, "{kinds:?}");
        assert!(!kinds.contains(&"cache_write".to_string()));
        assert_eq!(
            series_naming("relay_requests_total", "acct-metrics-test").len(),
            2
        );

        // More models than a thread keeps: every record still lands on its own series.
        for round in 1..=2u64 {
            for i in 0..(RECORD_SERIES_KEPT + 6) {
                let model = format!("model-metrics-many-{i}");
                count_record(
                    Protocol::Gemini,
                    "acct-metrics-many",
                    &model,
                    200,
                    [1, 0, 0, 0],
                    0,
                );
                assert_eq!(tokens(&model, "input").get(), round, "{model}");
            }
        }
    }
}
