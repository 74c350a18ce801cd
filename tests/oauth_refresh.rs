//! OAuth token refresh against a mock token endpoint speaking the providers' wire format:
//! the rounds refresh a token close to its expiry and the proxy uses the new one at once,
//! refresh tokens rotate, a refusal stops the rounds until an operator sets new tokens, a
//! failing endpoint is tried again and changes nothing, ChatGPT tokens go to OpenAI's endpoint,
//! refreshes by hand, type changes that would take a refresh token to another provider, the
//! same refresh token saved again while a refresh of it runs, and which refresh puts an
//! account in error back.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::mock_upstream::MockUpstream;
use common::{messages_body, Db, PgDb, Relay, RelayOptions, ADMIN_TOKEN};
use reqwest::Method;
use serde_json::{json, Value};

const CLAUDE_CLIENT: &str = "9d1c250a-e61b-44d9-88ed-5944d1962f5e";
const OPENAI_CLIENT: &str = "app_EMoamEEZ73f0CkXaXp7hrann";

/// The relay's settings for the token endpoints of `tokens`, rounds every second (or none).
fn oauth_env(tokens: &MockUpstream, rounds: bool) -> Vec<(String, String)> {
    vec![
        ("RELAY_OAUTH__REFRESH_ENABLED".into(), rounds.to_string()),
        (
            "RELAY_OAUTH__CLAUDE_TOKEN_URL".into(),
            format!("{}/v1/oauth/token", tokens.url()),
        ),
        (
            "RELAY_OAUTH__OPENAI_TOKEN_URL".into(),
            format!("{}/oauth/token", tokens.url()),
        ),
        ("RELAY_OAUTH__REFRESH_INTERVAL".into(), "1s".into()),
    ]
}

async fn start(env: Vec<(String, String)>) -> Relay {
    Relay::start_with(RelayOptions {
        env,
        ..RelayOptions::default()
    })
    .await
}

/// A relay whose token endpoints are `tokens`' and whose rounds run every second.
async fn relay(tokens: &MockUpstream) -> Relay {
    start(oauth_env(tokens, true)).await
}

/// The refresh tokens the token endpoint received, in order.
fn sent(tokens: &MockUpstream) -> Vec<String> {
    tokens
        .requests()
        .iter()
        .map(|r| {
            r.json()["refresh_token"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

async fn account(relay: &Relay, id: &str) -> Value {
    relay.admin_get(&format!("/api/admin/accounts/{id}")).await
}

/// Waits (at most 10 s) until the account satisfies `done`; returns it.
async fn wait_account(relay: &Relay, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = account(relay, id).await;
        if done(&a) {
            return a;
        }
        assert!(Instant::now() < deadline, "{what}: {a}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn refresh_now(relay: &Relay, id: &str) -> (u16, Value) {
    relay
        .admin_json(
            Method::POST,
            &format!("/api/admin/accounts/{id}/refresh-token"),
            None,
        )
        .await
}

/// Sends a request through the proxy (waiting for the account cache to take new accounts) and
/// returns the `authorization` the upstream got.
async fn upstream_auth(relay: &Relay, api: &MockUpstream, key: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = api.count();
        let r = relay
            .post_json(
                "/v1/messages",
                key,
                &messages_body(
                    "claude-sonnet-4-5",
                    false,
                    json!([{"role": "user", "content": "hi"}]),
                ),
            )
            .await;
        if r.status() == 200 {
            assert_eq!(api.count(), before + 1);
            return api
                .requests()
                .last()
                .unwrap()
                .header("authorization")
                .unwrap()
                .to_string();
        }
        assert!(
            Instant::now() < deadline,
            "proxy never served: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most 10 s) until the proxy sends a credential starting with `expected`: the node
/// that stored new tokens reloads its accounts right after, and the others within the cache
/// refresh.
async fn wait_upstream_auth(relay: &Relay, api: &MockUpstream, key: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let auth = upstream_auth(relay, api, key).await;
        if auth.starts_with(expected) {
            return;
        }
        assert!(Instant::now() < deadline, "the proxy still sends {auth}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_ms() -> i64 {
    relay_filters::now_ms()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

async fn metric(relay: &Relay, line_start: &str) -> f64 {
    relay
        .metrics_text()
        .await
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_near_its_expiry_is_refreshed_rotated_and_used_at_once() {
    let tokens = MockUpstream::start().await;
    let api = MockUpstream::start().await;
    let relay = relay(&tokens).await;
    let key = relay.active_key("alice").await;
    let expires_soon = now_ms() + 60_000;
    let id = relay
        .create_account_with(json!({
            "name": "max-plan", "type": "claude-official", "base_url": api.url(),
            "credential": "sk-ant-oat01-original-access-token",
            "refresh_token": "sk-ant-ort01-original-refresh-token",
            "token_expires_at": expires_soon,
        }))
        .await;

    // The round finds it inside the 15-minute margin and refreshes it.
    let a = wait_account(&relay, &id, "refreshed by a round", |a| {
        a["token_refreshed_at"].is_i64()
    })
    .await;
    let first = tokens.requests()[0].clone();
    assert_eq!(
        (first.method.as_str(), first.path.as_str()),
        ("POST", "/v1/oauth/token")
    );
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert_eq!(
        first.json(),
        json!({"grant_type": "refresh_token", "refresh_token": "sk-ant-ort01-original-refresh-token", "client_id": CLAUDE_CLIENT})
    );
    let expires = a["token_expires_at"].as_i64().unwrap();
    let expected = now_ms() + 28_800_000;
    assert!((expected - 15_000..=expected).contains(&expires), "{a}");
    assert_eq!(a["token_refresh_error"], Value::Null);
    assert_eq!(a["token_refresh_refused"], false);
    assert_eq!(a["has_refresh_token"], true);

    // The proxy sends the new token from now on; neither token is stored in clear.
    wait_upstream_auth(&relay, &api, &key, "Bearer sk-ant-oat01-refreshed-1").await;
    let disk = relay.stored_bytes();
    for secret in [
        "sk-ant-oat01-refreshed-1",
        "sk-ant-ort01-rotated-1",
        "original-refresh-token",
    ] {
        assert!(!contains(&disk, secret), "{secret} stored in clear");
    }

    // Eight hours left: the next rounds leave it alone.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(tokens.count(), 1);

    // By hand: the rotated refresh token is the one sent, and its successor is used.
    let (status, report) = refresh_now(&relay, &id).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "refreshed");
    assert_eq!(tokens.count(), 2);
    assert_eq!(
        tokens.requests()[1].json()["refresh_token"],
        "sk-ant-ort01-rotated-1"
    );
    wait_upstream_auth(&relay, &api, &key, "Bearer sk-ant-oat01-refreshed-2").await;

    let audit = relay.admin_get("/api/admin/audit?per_page=100").await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "account.token_refresh"),
        "{audit}"
    );
    assert!(metric(&relay, "relay_oauth_refreshes_total{result=\"refreshed\"}").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_token_stops_the_rounds_until_an_operator_sets_new_tokens() {
    let tokens = MockUpstream::start().await;
    tokens.set(|b| {
        b.status = 400;
        b.error_body = r#"{"error":"invalid_grant","error_description":"Refresh token not found or invalid: sk-ant-ort01-dead-refresh-token"}"#.into();
    });
    let api = MockUpstream::start().await;
    let relay = relay(&tokens).await;
    let key = relay.active_key("alice").await;
    // No expiry given: refreshed at once.
    let id = relay
        .create_account_with(json!({
            "name": "max-plan", "type": "claude-official", "base_url": api.url(),
            "credential": "sk-ant-oat01-still-working-token",
            "refresh_token": "sk-ant-ort01-dead-refresh-token",
        }))
        .await;
    let a = wait_account(&relay, &id, "refusal stored", |a| {
        a["token_refresh_refused"] == true
    })
    .await;
    let error = a["token_refresh_error"].as_str().unwrap();
    assert!(
        error.starts_with("HTTP 400") && error.contains("invalid_grant"),
        "{error}"
    );
    assert!(
        !error.contains("dead-refresh-token"),
        "the refresh token is masked: {error}"
    );
    // Nothing else changed: the account serves with the token it has.
    assert_eq!(a["status"], "valid");
    assert_eq!(
        upstream_auth(&relay, &api, &key).await,
        "Bearer sk-ant-oat01-still-working-token"
    );

    // The rounds do not send a refused token again.
    let asked = tokens.count();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(tokens.count(), asked);
    // By hand it is tried, and refused again.
    let (status, report) = refresh_now(&relay, &id).await;
    assert_eq!(
        (status, report["result"].as_str()),
        (200, Some("refused")),
        "{report}"
    );
    assert!(metric(&relay, "relay_oauth_refreshes_total{result=\"refused\"}").await >= 2.0);

    // The operator stores a new refresh token: the refusal clears and the rounds take it.
    tokens.set(|b| b.status = 200);
    let (status, v) = relay
        .patch_account(
            &id,
            json!({"refresh_token": "sk-ant-ort01-operator-refresh-token"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            v["token_refresh_refused"].as_bool(),
            &v["token_refresh_error"]
        ),
        (Some(false), &Value::Null)
    );
    wait_account(&relay, &id, "refreshed after new tokens", |a| {
        a["token_refreshed_at"].is_i64()
    })
    .await;
    assert_eq!(
        tokens.requests().last().unwrap().json()["refresh_token"],
        "sk-ant-ort01-operator-refresh-token"
    );
    wait_upstream_auth(&relay, &api, &key, "Bearer sk-ant-oat01-refreshed-").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_endpoint_is_tried_again_and_changes_nothing() {
    let tokens = MockUpstream::start().await;
    tokens.set(|b| {
        b.status = 503;
        b.error_body = r#"{"error":"temporarily_unavailable"}"#.into();
    });
    let api = MockUpstream::start().await;
    let relay = relay(&tokens).await;
    let key = relay.active_key("alice").await;
    let id = relay
        .create_account_with(json!({
            "name": "max-plan", "type": "claude-official", "base_url": api.url(),
            "credential": "sk-ant-oat01-current-access-token",
            "refresh_token": "sk-ant-ort01-current-refresh-token",
            "token_expires_at": now_ms() + 120_000,
        }))
        .await;
    let a = wait_account(&relay, &id, "failure stored", |a| {
        a["token_refresh_error"].is_string()
    })
    .await;
    assert!(
        a["token_refresh_error"]
            .as_str()
            .unwrap()
            .starts_with("HTTP 503"),
        "{a}"
    );
    assert_eq!(a["token_refresh_refused"], false);
    assert_eq!(a["token_refreshed_at"], Value::Null);
    // Tried again by the next rounds, with the same refresh token.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokens.count() < 2 {
        assert!(Instant::now() < deadline, "not tried again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tokens
        .requests()
        .iter()
        .all(|r| r.json()["refresh_token"] == "sk-ant-ort01-current-refresh-token"));
    assert_eq!(
        upstream_auth(&relay, &api, &key).await,
        "Bearer sk-ant-oat01-current-access-token"
    );

    // The endpoint comes back: the next round refreshes and the error clears.
    tokens.set(|b| b.status = 200);
    let a = wait_account(&relay, &id, "refreshed once the endpoint works", |a| {
        a["token_refreshed_at"].is_i64()
    })
    .await;
    assert_eq!(a["token_refresh_error"], Value::Null);
    assert!(metric(&relay, "relay_oauth_refreshes_total{result=\"failed\"}").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_authentication_errors_took_out_gets_a_new_token_and_comes_back() {
    let tokens = MockUpstream::start().await;
    let api = MockUpstream::start().await;
    // The rounds are off: only the errors can start this refresh.
    let mut env = oauth_env(&tokens, false);
    env.push((
        "RELAY_SCHEDULER__ACCOUNT_ERROR_THRESHOLD".into(),
        "2".into(),
    ));
    let relay = start(env).await;
    let key = relay.active_key("alice").await;
    let id = relay
        .create_account_with(json!({
            "name": "max-plan", "type": "claude-official", "base_url": api.url(),
            "credential": "sk-ant-oat01-revoked-access-token",
            "refresh_token": "sk-ant-ort01-good-refresh-token",
            "token_expires_at": now_ms() + 6 * 3_600_000,
        }))
        .await;
    // The provider refuses the access token long before its stated expiry.
    api.set(|b| {
        b.status = 401;
        b.error_body = r#"{"type":"error","error":{"type":"authentication_error","message":"OAuth token has been revoked."}}"#.into();
    });
    relay.wait_accounts_loaded(1).await;
    let body = messages_body(
        "claude-sonnet-4-5",
        false,
        json!([{"role": "user", "content": "hi"}]),
    );
    for _ in 0..2 {
        let r = relay.post_json("/v1/messages", &key, &body).await;
        // The account's credential refused: an upstream error to the client, not its own 401.
        assert_eq!(r.status(), 502);
    }
    // Taken out at the threshold, then refreshed, and back with the new token.
    let a = wait_account(&relay, &id, "refreshed after the errors", |a| {
        a["token_refreshed_at"].is_i64() && a["status"] == "valid"
    })
    .await;
    assert_eq!(a["consecutive_error_count"], 0);
    assert_eq!(
        tokens.requests()[0].json()["refresh_token"],
        "sk-ant-ort01-good-refresh-token"
    );
    api.set(|b| b.status = 200);
    wait_upstream_auth(&relay, &api, &key, "Bearer sk-ant-oat01-refreshed-1").await;
    // The new token failing too does not refresh again at once (no loop).
    api.set(|b| b.status = 401);
    for _ in 0..2 {
        let r = relay.post_json("/v1/messages", &key, &body).await;
        assert_eq!(r.status(), 502);
    }
    wait_account(&relay, &id, "out again", |a| a["status"] == "error").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(tokens.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chatgpt_tokens_are_refreshed_at_openais_endpoint_by_their_own_expiry() {
    let tokens = MockUpstream::start().await;
    let relay = relay(&tokens).await;
    let claims = |exp: i64| {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"exp": exp, "sub": "user-1"}).to_string());
        format!("eyJhbGciOiJSUzI1NiJ9.{payload}.signature")
    };
    // A token valid for a week more is left alone; one expiring in five minutes is refreshed.
    let far = now_ms() / 1000 + 7 * 86_400;
    let soon = now_ms() / 1000 + 300;
    let mut ids = Vec::new();
    for (name, exp) in [("codex-far", far), ("codex-soon", soon)] {
        ids.push(
            relay
                .create_account_with(json!({
                    "name": name, "type": "openai-responses", "base_url": "http://127.0.0.1:9/backend-api/codex",
                    "credential": claims(exp), "refresh_token": format!("rt-{name}"),
                    "chatgpt_account_id": "acct-1",
                }))
                .await,
        );
    }
    let far_account = account(&relay, &ids[0]).await;
    assert_eq!(
        far_account["token_expires_at"],
        far * 1000,
        "read from the token"
    );
    wait_account(&relay, &ids[1], "refreshed", |a| {
        a["token_refreshed_at"].is_i64()
    })
    .await;
    let sent = tokens.requests();
    assert_eq!(sent.len(), 1, "only the expiring one");
    assert_eq!(sent[0].path, "/oauth/token");
    assert_eq!(
        sent[0].json(),
        json!({"grant_type": "refresh_token", "refresh_token": "rt-codex-soon", "client_id": OPENAI_CLIENT, "scope": "openid profile email"})
    );
    assert_eq!(
        account(&relay, &ids[0]).await["token_refreshed_at"],
        Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_oauth_accounts_with_a_refresh_token_are_refreshed_by_hand() {
    let tokens = MockUpstream::start().await;
    let relay = start(oauth_env(&tokens, false)).await;
    let api_key = relay
        .create_account("api", "claude", "http://127.0.0.1:9", "sk-ant-api03-key")
        .await;
    let bare = relay
        .create_account(
            "oauth-bare",
            "claude-official",
            "http://127.0.0.1:9",
            "sk-ant-oat01-x",
        )
        .await;
    for id in [&api_key, &bare] {
        let (status, v) = refresh_now(&relay, id).await;
        assert_eq!(status, 400, "{v}");
    }
    let (status, _) = refresh_now(&relay, "0199aaaa-0000-7000-8000-000000000000").await;
    assert_eq!(status, 404);
    // An empty refresh token is refused; null removes it.
    let (status, v) = relay
        .patch_account(&bare, json!({"refresh_token": " "}))
        .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = relay
        .patch_account(&bare, json!({"refresh_token": "rt-1"}))
        .await;
    assert_eq!(
        (status, &v["has_refresh_token"]),
        (200, &json!(true)),
        "{v}"
    );
    let (status, v) = relay
        .patch_account(&bare, json!({"refresh_token": null}))
        .await;
    assert_eq!(
        (status, &v["has_refresh_token"]),
        (200, &json!(false)),
        "{v}"
    );
    assert_eq!(tokens.count(), 0, "nothing was sent");
}

// ---------------------------------------------------------------------------------------------
// Slow token endpoints: a refresh the provider answered is never lost, one refresh token is
// sent once.
// ---------------------------------------------------------------------------------------------

/// A token endpoint that sends its answer's head after `head` and its body `body` later.
async fn slow_tokens(head: Duration, body: Duration) -> MockUpstream {
    let tokens = MockUpstream::start().await;
    tokens.set(|b| {
        b.head_delay = head;
        b.body_delay = body;
    });
    tokens
}

async fn oauth_account(relay: &Relay, expires_at: Option<i64>) -> String {
    let mut body = json!({
        "name": "max-plan", "type": "claude-official", "base_url": "http://127.0.0.1:9",
        "credential": "sk-ant-oat01-original-access-token",
        "refresh_token": "sk-ant-ort01-original-refresh-token",
        "enabled": true,
    });
    if let Some(at) = expires_at {
        body["token_expires_at"] = at.into();
    }
    relay.create_account_with(body).await
}

/// An admin whose connection closes while the provider answers: the refresh goes on and is
/// stored (the provider has rotated the refresh token by then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_refresh_whose_caller_hangs_up_keeps_the_rotated_token() {
    let tokens = slow_tokens(Duration::from_millis(1500), Duration::ZERO).await;
    let relay = start(oauth_env(&tokens, false)).await;
    let id = oauth_account(&relay, Some(now_ms() + 3_600_000)).await;
    let call = tokio::spawn(
        relay
            .http
            .post(format!(
                "{}/api/admin/accounts/{id}/refresh-token",
                relay.admin
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send(),
    );
    // The client gives up once the refresh is at the provider (which answers 1.5 s later).
    tokens.wait_count(1).await;
    call.abort();
    assert!(
        call.await.is_err_and(|e| e.is_cancelled()),
        "the client gave up before the answer"
    );
    wait_account(&relay, &id, "the provider's answer stored", |a| {
        a["token_refreshed_at"].is_i64()
    })
    .await;
    assert_eq!(tokens.count(), 1);
    // The refresh is in the audit log though its caller had gone (written once it is stored).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit = relay.admin_get("/api/admin/audit?per_page=100").await;
        let found = audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "account.token_refresh");
        if found {
            break;
        }
        assert!(Instant::now() < deadline, "no audit record: {audit}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A shutdown while a round waits for the provider: the answer is stored before the node stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_cut_by_shutdown_keeps_the_rotated_token() {
    let tokens = slow_tokens(Duration::from_millis(600), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with(RelayOptions {
        env: oauth_env(&tokens, true),
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .await;
    let id = oauth_account(&relay, None).await;
    while tokens.count() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.terminate();
    drop(relay);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let relay = Relay::start_with(RelayOptions {
        env: oauth_env(&tokens, false),
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .await;
    let a = account(&relay, &id).await;
    assert!(
        a["token_refreshed_at"].is_i64(),
        "the rotated refresh token was dropped at shutdown: {a}"
    );
}

/// An answer without `expires_in` for an opaque token: refreshed once, then hourly, not every
/// round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_an_expiry_is_not_refreshed_every_round() {
    let tokens = MockUpstream::start().await;
    tokens.set(|b| b.token_expires_in = None);
    let relay = relay(&tokens).await;
    let id = oauth_account(&relay, None).await;
    wait_account(&relay, &id, "refreshed once", |a| {
        a["token_refreshed_at"].is_i64()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let n = tokens.count();
    assert_eq!(n, 1, "refreshed {n} times in 4.5 s of 1 s rounds");
}

/// Head and body each within `oauth.timeout`, but not both: the answer is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_complete_answer_is_kept() {
    let tokens = slow_tokens(Duration::from_millis(1200), Duration::from_millis(1200)).await;
    let mut env = oauth_env(&tokens, false);
    env.push(("RELAY_OAUTH__TIMEOUT".into(), "2s".into()));
    let relay = start(env).await;
    let id = oauth_account(&relay, None).await;
    let (status, report) = refresh_now(&relay, &id).await;
    assert_eq!(status, 200);
    assert_eq!(report["result"], "refreshed", "{report}");
}

/// Two nodes on `pg`, refreshing at `tokens` only when asked.
async fn two_nodes(pg: &PgDb, tokens: &MockUpstream) -> (Relay, Relay) {
    let mut shared = oauth_env(tokens, false);
    shared.extend(common::shared_node_secrets());
    let node = || {
        Relay::start_with(RelayOptions {
            db: Db::Postgres(pg.url.clone()),
            env: shared.clone(),
            ..Default::default()
        })
    };
    (node().await, node().await)
}

/// Two nodes refreshing one account at once: the refresh token goes to the provider once (the
/// database lease), the other node answers 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_never_send_one_refresh_token_twice() {
    let pg = PgDb::create().await;
    let tokens = slow_tokens(Duration::from_millis(2000), Duration::ZERO).await;
    let (a, b) = two_nodes(&pg, &tokens).await;
    let id = oauth_account(&a, Some(now_ms() + 3_600_000)).await;
    let (ra, rb) = tokio::join!(refresh_now(&a, &id), refresh_now(&b, &id));
    // The invariant: no refresh token went out twice (the second node either found the lease,
    // 409, or came after the first had stored and refreshed with the rotated token).
    let sent = sent(&tokens);
    let mut unique = sent.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        sent.len(),
        "one refresh token sent twice: {sent:?}\n{ra:?}\n{rb:?}"
    );
    let refreshed = |r: &(u16, Value)| r.0 == 200 && r.1["result"] == "refreshed";
    assert!(refreshed(&ra) || refreshed(&rb), "{ra:?}\n{rb:?}");
    assert!(
        [&ra, &rb].iter().all(|r| r.0 == 409 || refreshed(r)),
        "{ra:?}\n{rb:?}"
    );
}

/// A body that comes slowly, within the budget but after `oauth.timeout`: kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_within_the_budget_is_kept() {
    let tokens = slow_tokens(Duration::ZERO, Duration::from_millis(1300)).await;
    let mut env = oauth_env(&tokens, false);
    env.push(("RELAY_OAUTH__TIMEOUT".into(), "1s".into()));
    let relay = start(env).await;
    let id = oauth_account(&relay, None).await;
    let (status, report) = refresh_now(&relay, &id).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "refreshed", "{report}");
}

/// An operator who stores a new refresh token while a refresh of the old one waits: the new
/// one can be refreshed at once (the old refresh's lease does not hold it back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tokens_from_an_operator_are_not_held_back_by_a_refresh_of_the_old_ones() {
    let tokens = slow_tokens(Duration::from_millis(1500), Duration::ZERO).await;
    let relay = start(oauth_env(&tokens, false)).await;
    let id = oauth_account(&relay, Some(now_ms() + 3_600_000)).await;
    let patch = async {
        // Once the old refresh token is at the provider.
        tokens.wait_count(1).await;
        relay
            .patch_account(
                &id,
                json!({"refresh_token": "sk-ant-ort01-operator-new-token"}),
            )
            .await
    };
    let (first, patched) = tokio::join!(refresh_now(&relay, &id), patch);
    assert_eq!(patched.0, 200, "{patched:?}");
    assert_eq!(first.1["result"], "superseded", "{first:?}");
    tokens.set(|b| b.head_delay = Duration::ZERO);
    let (status, report) = refresh_now(&relay, &id).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "refreshed", "{report}");
    assert_eq!(
        sent(&tokens),
        [
            "sk-ant-ort01-original-refresh-token",
            "sk-ant-ort01-operator-new-token"
        ]
    );
}

/// A Claude refresh token never goes to OpenAI's endpoint (nor stays on a type that is not
/// refreshed): changing the type of an account with a refresh token needs `refresh_token`
/// too, and a type without OAuth refresh takes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_change_never_takes_a_refresh_token_to_another_provider() {
    let tokens = MockUpstream::start().await;
    let relay = start(oauth_env(&tokens, false)).await;
    let id = oauth_account(&relay, Some(now_ms() + 3_600_000)).await;
    let before = account(&relay, &id).await;
    for t in ["openai-responses", "claude", "openai", "gemini"] {
        let (status, v) = relay.patch_account(&id, json!({"type": t})).await;
        assert_eq!(status, 400, "{t}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("refresh_token"), "{message}");
        assert!(!message.contains("original-refresh-token"), "{message}");
    }
    assert_eq!(
        account(&relay, &id).await,
        before,
        "refused changes change nothing"
    );

    // With a refresh token of the new provider, it is that one the refresh sends, there.
    let (status, v) = relay
        .patch_account(
            &id,
            json!({"type": "openai-responses", "refresh_token": "rt-chatgpt-operator"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, report) = refresh_now(&relay, &id).await;
    assert_eq!(
        (status, &report["result"]),
        (200, &json!("refreshed")),
        "{report}"
    );
    let sent = tokens.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].path.as_str(), &sent[0].json()["refresh_token"]),
        ("/oauth/token", &json!("rt-chatgpt-operator"))
    );

    // To an API key type: only with the refresh token removed; none can be added there.
    let (status, v) = relay
        .patch_account(&id, json!({"type": "openai", "refresh_token": null}))
        .await;
    assert_eq!(
        (status, &v["has_refresh_token"]),
        (200, &json!(false)),
        "{v}"
    );
    let (status, v) = relay
        .patch_account(&id, json!({"refresh_token": "rt-other"}))
        .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = relay
        .admin_post(
            "/api/admin/accounts",
            json!({"name": "api", "type": "claude", "credential": "sk-ant-api03-x", "refresh_token": "rt-x"}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(tokens.count(), 1);
}

/// An operator who saves the refresh token the account already has, while a refresh of it is
/// at the provider: nothing changes, so the refresh keeps its lease and no other node sends
/// that refresh token a second time (OpenAI revokes the whole chain on reuse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_the_same_refresh_token_again_keeps_a_refresh_in_flight_alone() {
    let pg = PgDb::create().await;
    let tokens = slow_tokens(Duration::from_millis(1500), Duration::ZERO).await;
    let (a, b) = two_nodes(&pg, &tokens).await;
    let id = oauth_account(&a, Some(now_ms() + 3_600_000)).await;
    let second = async {
        // Once the refresh token is at the provider.
        tokens.wait_count(1).await;
        let saved = b
            .patch_account(
                &id,
                json!({"refresh_token": " sk-ant-ort01-original-refresh-token "}),
            )
            .await;
        (saved, refresh_now(&b, &id).await)
    };
    let (first, (saved, second)) = tokio::join!(refresh_now(&a, &id), second);
    assert_eq!(saved.0, 200, "{saved:?}");
    assert_eq!(second.0, 409, "the lease still holds: {second:?}");
    assert_eq!(first.1["result"], "refreshed", "{first:?}");
    assert_eq!(sent(&tokens), ["sk-ant-ort01-original-refresh-token"]);
}

/// A provider that does not rotate refresh tokens, and an operator who stores another refresh
/// token and then the first one again while a refresh of it is at the provider: the refresh
/// says "refreshed" only when its tokens are stored (the refresh token stored then is the one
/// it sent, but that does not tell its own write went through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_reports_refreshed_only_when_its_tokens_are_stored() {
    let tokens = slow_tokens(Duration::from_millis(1500), Duration::ZERO).await;
    tokens.set(|b| b.token_rotates = false);
    let relay = start(oauth_env(&tokens, false)).await;
    let id = oauth_account(&relay, Some(now_ms() + 3_600_000)).await;
    let patches = async {
        tokens.wait_count(1).await;
        for t in [
            "sk-ant-ort01-operator-other-token",
            "sk-ant-ort01-original-refresh-token",
        ] {
            let (status, v) = relay.patch_account(&id, json!({"refresh_token": t})).await;
            assert_eq!(status, 200, "{v}");
        }
    };
    let ((status, report), ()) = tokio::join!(refresh_now(&relay, &id), patches);
    assert_eq!(status, 200, "{report}");
    let a = account(&relay, &id).await;
    assert_eq!(report["result"], "refreshed", "{report}\n{a}");
    assert!(
        a["token_refreshed_at"].is_i64(),
        "reported refreshed, not stored: {a}"
    );
    assert_eq!(a["credential_masked"], "sk-a…ed-1", "{a}");
    assert_eq!(a["has_refresh_token"], true);
}

/// An account an operator took out (`error`) stays out after a refresh by hand: only the
/// refresh that authentication errors started puts an account back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_by_hand_leaves_an_account_an_operator_took_out_alone() {
    let tokens = MockUpstream::start().await;
    let relay = start(oauth_env(&tokens, false)).await;
    let id = oauth_account(&relay, Some(now_ms() + 3_600_000)).await;
    let (status, v) = relay.patch_account(&id, json!({"status": "error"})).await;
    assert_eq!((status, &v["status"]), (200, &json!("error")), "{v}");
    let (status, report) = refresh_now(&relay, &id).await;
    assert_eq!(
        (status, &report["result"]),
        (200, &json!("refreshed")),
        "{report}"
    );
    let a = account(&relay, &id).await;
    assert!(a["token_refreshed_at"].is_i64(), "{a}");
    assert_eq!(a["status"], "error", "{a}");
}
