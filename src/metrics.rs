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
    pub unpriced: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub oauth_refreshes: IntCounterVec,
    pub session_store_fallback: IntCounter,
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
            "Accounts by state",
            &["state"]
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
        unpriced: register_int_counter_vec!(
            "relay_unpriced_requests_total",
            "Requests for a model without a price (billed 0)",
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

/// Status class label: `2xx`, `4xx`, ...
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Prometheus text exposition of every registered metric.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    let _ = encoder.encode(&prometheus::gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
