//! The ops assets under `deploy/` against the relay itself: the Grafana dashboard and the
//! Prometheus alerting rules may only read metrics, labels and label values a running relay
//! exports, read them the way their type allows (counters through `rate()`, histograms through
//! their `_bucket` series), and be well formed (datasource variable, unique panel ids, a
//! severity and a summary on every rule).

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod common;
#[path = "ops_assets/promql.rs"]
mod promql;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mock_upstream::MockUpstream;
use common::{chat_body, chat_conversation, conversation, gemini_body, messages_body, Relay};
use promql::{Catalog, Checker, Shape};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard_text() -> String {
    std::fs::read_to_string(repo().join("deploy/grafana/llm-relay.json")).unwrap()
}

fn rules_text() -> String {
    std::fs::read_to_string(repo().join("deploy/prometheus/llm-relay-alerts.yml")).unwrap()
}

/// A Prometheus rule file, as `promtool check rules` reads it (unknown fields refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    interval: Option<String>,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    pending: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn rules() -> RuleFile {
    serde_yaml::from_str(&rules_text()).unwrap()
}

/// Every query panel of the dashboard (rows hold none).
fn query_panels(dashboard: &Value) -> Vec<&Value> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect()
}

/// The names between `{{` and `}}` of a legend format.
fn legend_labels(format: &str) -> Vec<String> {
    format
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}"))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}

/// The labels an alert template reads as `$labels.name`.
fn template_labels(text: &str) -> Vec<String> {
    text.split("$labels.")
        .skip(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// The relay's sources, for label values no test request produced: a value the dashboard or a
/// rule selects must at least be a string literal the relay could put in a label.
fn relay_sources() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = String::new();
    walk(&repo().join("src"), &mut out);
    walk(&repo().join("filters/src"), &mut out);
    out
}

/// Checks the dashboard's queries, variables and legends; the checker holds what it found.
fn check_dashboard(checker: &mut Checker, dashboard: &Value) {
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let query = match &var["query"] {
            Value::String(q) => q.clone(),
            q => q["query"].as_str().unwrap_or_default().to_string(),
        };
        let name = var["name"].as_str().unwrap_or_default();
        checker.check_label_values(&format!("variable {name}"), &query);
    }
    for panel in query_panels(dashboard) {
        for target in panel["targets"].as_array().unwrap() {
            let context = format!(
                "panel {:?} target {}",
                panel["title"].as_str().unwrap_or_default(),
                target["refId"].as_str().unwrap_or_default()
            );
            let shape = checker.check(&context, target["expr"].as_str().unwrap_or_default());
            let legend = legend_labels(target["legendFormat"].as_str().unwrap_or_default());
            checker.require(&shape, &legend, "the legend");
        }
    }
}

/// Checks the alerting rules' expressions and the labels their templates read.
fn check_rules(checker: &mut Checker, file: &RuleFile) {
    for rule in file.groups.iter().flat_map(|g| &g.rules) {
        let context = format!("alert {}", rule.alert);
        let shape = checker.check(&context, &rule.expr);
        if matches!(shape, Shape::Scalar | Shape::Str(_)) {
            checker
                .problems
                .push(format!("{context}: a scalar expression never alerts"));
        }
        let read: BTreeSet<String> = rule
            .annotations
            .values()
            .flat_map(|t| template_labels(t))
            .filter(|l| !rule.labels.contains_key(l))
            .collect();
        checker.require(&shape, &Vec::from_iter(read), "an annotation");
    }
}

// ---------------------------------------------------------------------------------------------
// Against a running relay
// ---------------------------------------------------------------------------------------------

/// Series that exist only once something used them (labelled vectors): the traffic of
/// [`relay_with_traffic`] makes every one.
const LABELLED_SERIES: [&str; 16] = [
    "relay_requests_total",
    "relay_request_duration_seconds_bucket",
    "relay_upstream_ttfb_seconds_bucket",
    "relay_overhead_seconds_bucket",
    "relay_tokens_total",
    "relay_cost_micro_usd_total",
    "relay_sticky_total",
    "relay_failovers_total",
    "relay_inflight_requests",
    "relay_account_state",
    "relay_account_cooldowns_total",
    "relay_unpriced_requests_total",
    "relay_estimated_requests_total",
    "relay_health_checks_total",
    "relay_oauth_refreshes_total",
    "relay_limit_refusals_total",
];

/// A model no price table holds.
const UNPRICED: &str = "gpt-unpriced-ops-test";

/// A relay with accounts of every protocol that has served a request of each (a stream among
/// them, a failover, a cut stream, an unpriced model, an upstream error), checked an account's
/// health and refreshed its token: every labelled series the ops assets read exists.
async fn relay_with_traffic() -> Relay {
    let tokens = MockUpstream::start().await;
    let relay = Relay::start_with(common::RelayOptions {
        env: vec![
            ("RELAY_OAUTH__REFRESH_ENABLED".into(), "false".into()),
            (
                "RELAY_OAUTH__CLAUDE_TOKEN_URL".into(),
                format!("{}/v1/oauth/token", tokens.url()),
            ),
        ],
        ..common::RelayOptions::default()
    })
    .await;
    let overloaded = MockUpstream::start().await;
    overloaded.set(|b| {
        b.status = 529;
        b.error_body =
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#.into();
    });
    let anthropic = MockUpstream::start().await;
    let openai = MockUpstream::start().await;
    let gemini = MockUpstream::start().await;
    relay
        .create_account_with(json!({"name": "claude-overloaded", "type": "claude", "base_url": overloaded.url(), "credential": "sk-ant-overloaded", "priority": 1}))
        .await;
    relay
        .create_account("claude-a", "claude", &anthropic.url(), "sk-ant-a")
        .await;
    relay
        .create_account(
            "openai-a",
            "openai",
            &format!("{}/v1", openai.url()),
            "sk-openai-a",
        )
        .await;
    relay
        .create_account("gemini-a", "gemini", &gemini.url(), "AIza-gemini-a")
        .await;
    let oauth = relay
        .create_account_with(json!({
            "name": "oauth-a", "type": "claude-official", "base_url": anthropic.url(),
            "credential": "sk-ant-oat01-ops-access-token",
            "refresh_token": "sk-ant-ort01-ops-refresh-token",
            "priority": 100,
        }))
        .await;
    let key = relay.active_key("ops").await;
    relay.wait_accounts_loaded(5).await;

    // Anthropic: the preferred account answers 529, the request fails over; then a stream of
    // the same conversation.
    let r = relay
        .post_json(
            "/v1/messages",
            &key,
            &messages_body("claude-sonnet-4-5", false, conversation("ops", 1)),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let r = relay
        .post_json(
            "/v1/messages",
            &key,
            &messages_body("claude-sonnet-4-5", true, conversation("ops", 2)),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();

    // OpenAI Chat and Responses, for a model without a price.
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .json(&chat_body(UNPRICED, false, chat_conversation("ops", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let r = relay
        .post_bare("/v1/responses")
        .bearer_auth(&key)
        .json(&json!({"model": UNPRICED, "input": "ops", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();

    // Gemini: an answer, then a stream the upstream cuts (booked as estimated).
    let r = relay
        .post_bare("/v1beta/models/gemini-2.5-flash:generateContent")
        .header("x-goog-api-key", &key)
        .json(&gemini_body("ops", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    gemini.set(|b| {
        b.deltas = 6;
        b.cut_after = Some(2);
    });
    let r = relay
        .post_bare("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
        .header("x-goog-api-key", &key)
        .json(&gemini_body("ops cut", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();

    // A failing one: the only OpenAI account answers 500.
    openai.set(|b| {
        b.status = 500;
        b.error_body = r#"{"error":{"message":"boom","type":"server_error"}}"#.into();
    });
    let r = relay
        .post_bare("/v1/chat/completions")
        .bearer_auth(&key)
        .json(&chat_body(
            "gpt-4.1",
            false,
            chat_conversation("ops failing", 1),
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());

    // A key allowing one request a minute: its second is refused.
    let limited_user = relay.create_user("ops-limited", 10_000).await;
    let (_, limited) = relay
        .create_key(&limited_user, json!({"rpm_limit": 1}))
        .await;
    relay.wait_key_active(&limited).await;
    let mut statuses = Vec::new();
    for i in 0..2 {
        let r = relay
            .post_json(
                "/v1/messages",
                &limited,
                &messages_body(
                    "claude-sonnet-4-5",
                    false,
                    conversation(&format!("rpm {i}"), 1),
                ),
            )
            .await;
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 429]);

    // A health check and a token refresh, by hand.
    let (status, v) = relay
        .admin_json(
            Method::POST,
            &format!("/api/admin/accounts/{oauth}/health-check"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = relay
        .admin_json(
            Method::POST,
            &format!("/api/admin/accounts/{oauth}/refresh-token"),
            None,
        )
        .await;
    assert_eq!(
        (status, v["result"].as_str()),
        (200, Some("refreshed")),
        "{v}"
    );

    // Streams are counted when they end, after the client has read them: wait for every one.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = relay.metrics_text().await;
        let catalog = Catalog::parse(&text);
        let requests = relay_requests(&text);
        let missing: Vec<&str> = LABELLED_SERIES
            .iter()
            .copied()
            .filter(|f| catalog.series.get(*f).is_none_or(|s| s.labels.is_empty()))
            .collect();
        if missing.is_empty() && requests >= 9 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "series never exported: {missing:?}, {requests} of 9 requests counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay
}

/// The requests `relay_requests_total` counted, all series together.
fn relay_requests(text: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("relay_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

#[tokio::test]
async fn dashboard_and_alert_rules_read_only_what_the_relay_exports() {
    let relay = relay_with_traffic().await;
    let catalog = Catalog::parse(&relay.metrics_text().await);
    let sources = relay_sources();
    let known = |v: &str| sources.contains(&format!("\"{v}\""));
    let dashboard: Value = serde_json::from_str(&dashboard_text()).unwrap();

    let mut checker = Checker::new(&catalog, &known);
    check_dashboard(&mut checker, &dashboard);
    let on_dashboard: BTreeSet<String> = checker
        .used
        .iter()
        .map(|s| catalog.series[s].family.clone())
        .collect();
    check_rules(&mut checker, &rules());
    assert!(
        checker.problems.is_empty(),
        "the ops assets read what the relay does not export:\n{}",
        checker.problems.join("\n")
    );

    // Every metric the relay exports has its place on the dashboard.
    let exported = catalog.families("relay_");
    let missing: Vec<&String> = exported.difference(&on_dashboard).collect();
    assert!(missing.is_empty(), "metrics on no panel: {missing:?}");

    // The checks see a renamed metric: the dashboard with one metric's name changed fails.
    for (from, to) in [
        ("relay_sticky_total", "relay_stickiness_total"),
        ("relay_overhead_seconds_bucket", "relay_overhead_seconds"),
    ] {
        let renamed: Value = serde_json::from_str(&dashboard_text().replace(from, to)).unwrap();
        let mut checker = Checker::new(&catalog, &known);
        check_dashboard(&mut checker, &renamed);
        assert!(
            checker.problems.iter().any(|p| p.contains(to)),
            "{from} renamed {to} went unnoticed: {:?}",
            checker.problems
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Structure, and the checker on expressions it must refuse
// ---------------------------------------------------------------------------------------------

#[test]
fn dashboard_is_importable_and_every_panel_queries_the_chosen_datasource() {
    let d: Value = serde_json::from_str(&dashboard_text()).unwrap();
    assert!(d["schemaVersion"].as_i64().unwrap() >= 36, "schemaVersion");
    assert!(d["id"].is_null(), "an imported dashboard gets its own id");
    assert!(d["uid"]
        .as_str()
        .is_some_and(|u| !u.is_empty() && u.len() <= 40));
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));

    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("datasource").expect("a datasource variable");
    assert_eq!(
        (ds["type"].as_str(), ds["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    let instance = var("instance").expect("an instance variable");
    assert_eq!(instance["type"], "query");
    assert_eq!(instance["datasource"]["uid"], "${datasource}");

    let mut ids = BTreeSet::new();
    for panel in d["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        let id = panel["id"]
            .as_i64()
            .unwrap_or_else(|| panel_fail(title, "no id"));
        assert!(ids.insert(id), "panel id {id} twice ({title})");
        let pos = &panel["gridPos"];
        let (x, w) = (pos["x"].as_i64().unwrap(), pos["w"].as_i64().unwrap());
        assert!(
            x >= 0 && w > 0 && x + w <= 24 && pos["h"].as_i64().unwrap() > 0,
            "{title}: gridPos {pos}"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: datasource"
        );
        assert_eq!(
            panel["datasource"]["type"], "prometheus",
            "{title}: datasource"
        );
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panel_fail(title, "no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title}: target datasource"
            );
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: no expr"
            );
            assert!(
                refs.insert(t["refId"].as_str().unwrap().to_string()),
                "{title}: refId twice"
            );
        }
        assert!(
            panel["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title}: no description"
        );
    }

    // No two panels overlap.
    let boxes: Vec<(i64, i64, i64, i64, &str)> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            let n = |k: &str| g[k].as_i64().unwrap();
            (n("x"), n("y"), n("w"), n("h"), p["title"].as_str().unwrap())
        })
        .collect();
    for (i, a) in boxes.iter().enumerate() {
        for b in &boxes[i + 1..] {
            let apart =
                a.0 + a.2 <= b.0 || b.0 + b.2 <= a.0 || a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1;
            assert!(apart, "panels {:?} and {:?} overlap", a.4, b.4);
        }
    }
}

fn panel_fail(title: &str, what: &str) -> ! {
    panic!("panel {title:?}: {what}")
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_duration() {
    let file = rules();
    assert!(!file.groups.is_empty());
    let mut names = BTreeSet::new();
    let mut groups = BTreeSet::new();
    for group in &file.groups {
        assert!(
            groups.insert(group.name.clone()),
            "group {} twice",
            group.name
        );
        assert!(!group.rules.is_empty(), "group {} is empty", group.name);
        if let Some(i) = &group.interval {
            assert!(promql::is_duration(i), "group {}: interval {i}", group.name);
        }
        for rule in &group.rules {
            let name = &rule.alert;
            assert!(names.insert(name.clone()), "alert {name} twice");
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "alert name {name:?}"
            );
            assert!(
                promql::is_duration(&rule.pending),
                "{name}: for {:?}",
                rule.pending
            );
            assert!(
                matches!(
                    rule.labels.get("severity").map(String::as_str),
                    Some("critical" | "warning")
                ),
                "{name}: severity {:?}",
                rule.labels.get("severity")
            );
            for annotation in ["summary", "description"] {
                assert!(
                    rule.annotations
                        .get(annotation)
                        .is_some_and(|s| !s.trim().is_empty()),
                    "{name}: no {annotation}"
                );
            }
            // Template braces balance (a broken template makes Prometheus refuse the file).
            for text in rule.annotations.values() {
                assert_eq!(
                    text.matches("{{").count(),
                    text.matches("}}").count(),
                    "{name}: {text}"
                );
            }
        }
    }
}

/// A piece of `/metrics` as the relay serves it, for the checker's own cases.
const SAMPLE_METRICS: &str = r#"# HELP relay_requests_total Requests handled by the proxy
# TYPE relay_requests_total counter
relay_requests_total{account="a",model="m",protocol="anthropic",status="2xx"} 3
# TYPE relay_overhead_seconds histogram
relay_overhead_seconds_bucket{protocol="anthropic",le="0.001"} 1
relay_overhead_seconds_bucket{protocol="anthropic",le="+Inf"} 1
relay_overhead_seconds_sum{protocol="anthropic"} 0.0002
relay_overhead_seconds_count{protocol="anthropic"} 1
# TYPE relay_account_state gauge
relay_account_state{platform="claude",state="available"} 2
# TYPE relay_sticky_total counter
relay_sticky_total{result="hit"} 1
"#;

#[test]
fn the_checker_refuses_what_the_relay_does_not_export() {
    let catalog = Catalog::parse(SAMPLE_METRICS);
    let known = |v: &str| v == "miss";
    let problems = |expr: &str| {
        let mut c = Checker::new(&catalog, &known);
        c.check("case", expr);
        c.problems
    };
    let ok = [
        r#"sum by (protocol, status) (rate(relay_requests_total{job=~"$job", instance=~"$instance"}[$__rate_interval]))"#,
        "histogram_quantile(0.99, sum by (le, protocol) (rate(relay_overhead_seconds_bucket[5m])))",
        "sum by (result) (rate(relay_sticky_total[5m])) / ignoring (result) group_left sum(rate(relay_sticky_total[5m]))",
        r#"max by (job, instance) (relay_account_state{state="available"}) == 0 and on (job, instance) sum by (job, instance) (relay_account_state) > 0"#,
        r#"(sum(rate(relay_sticky_total{result=~"hit|miss"}[5m])) or vector(0)) / sum(rate(relay_requests_total[5m]))"#,
        "sum(rate(relay_overhead_seconds_sum[5m])) / sum(rate(relay_overhead_seconds_count[5m])) * 1e3",
    ];
    for expr in ok {
        assert_eq!(problems(expr), Vec::<String>::new(), "{expr}");
    }
    let refused = [
        ("sum(rate(relay_request_total[5m]))", "relay_request_total"),
        ("rate(relay_overhead_seconds[5m])", "histogram"),
        ("sum by (provider) (relay_account_state)", "provider"),
        ("sum(relay_requests_total)", "without rate"),
        ("rate(relay_account_state[5m])", "gauge"),
        ("rate(relay_requests_total)", "lacks a range"),
        ("histogram_quantile(0.9, sum by (protocol) (rate(relay_overhead_seconds_bucket[5m])))", "`le`"),
        ("sum by (protocol) (rate(relay_requests_total[5m])) / sum(rate(relay_requests_total[5m]))", "would ever match"),
        (r#"rate(relay_sticky_total{result="hti"}[5m])"#, "\"hti\""),
        (r#"rate(relay_sticky_total{reslt="hit"}[5m])"#, "reslt"),
        ("rate(relay_sticky_total[5m]) / on (state) rate(relay_sticky_total[5m])", "lacks (state)"),
        ("histogram_quantil(0.9, rate(relay_overhead_seconds_bucket[5m]))", "unknown function"),
        ("up == 0", "not one of the relay's metrics"),
        ("sum(rate(relay_requests_total[5m])", "does not parse"),
    ];
    for (expr, expected) in refused {
        let found = problems(expr);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "{expr}: {found:?}"
        );
    }

    // Legends and label lookups read the labels of the result, not of the metric.
    let mut c = Checker::new(&catalog, &known);
    let shape = c.check("case", "sum by (protocol) (rate(relay_requests_total[5m]))");
    c.require(&shape, &["account".to_string()], "the legend");
    c.check_label_values("variable", "label_values(relay_account_state, instance)");
    c.check_label_values("variable", "label_values(relay_account_state, node)");
    assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
    assert!(c.problems[0].contains("`account`") && c.problems[1].contains("`node`"));
}
