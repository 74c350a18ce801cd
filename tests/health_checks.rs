//! Account health checks (DESIGN §11) against a mock provider: what each check sends, how
//! failures take an account out of scheduling at the error threshold and a pass puts it back,
//! checks started by hand, and the periodic job switched on and off through the settings.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod common;

use std::time::{Duration, Instant};

use common::mock_upstream::MockUpstream;
use common::{messages_body, Relay, RelayOptions};
use reqwest::Method;
use serde_json::{json, Value};

const OAUTH_TOKEN: &str = "sk-ant-oat01-health-check-token";

/// A relay that takes an account out after two failures in a row.
async fn relay() -> Relay {
    Relay::start_with(RelayOptions {
        env: vec![(
            "RELAY_SCHEDULER__ACCOUNT_ERROR_THRESHOLD".into(),
            "2".into(),
        )],
        ..RelayOptions::default()
    })
    .await
}

/// An admin's health check of one account: the status and the answer.
async fn try_check(relay: &Relay, id: &str) -> (u16, Value) {
    relay
        .admin_json(
            Method::POST,
            &format!("/api/admin/accounts/{id}/health-check"),
            None,
        )
        .await
}

async fn check(relay: &Relay, id: &str) -> Value {
    let (status, v) = try_check(relay, id).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn account(relay: &Relay, id: &str) -> Value {
    relay.admin_get(&format!("/api/admin/accounts/{id}")).await
}

async fn proxied(relay: &Relay, key: &str) -> u16 {
    relay
        .post_json(
            "/v1/messages",
            key,
            &messages_body(
                "claude-sonnet-4-5",
                false,
                common::conversation("health", 1),
            ),
        )
        .await
        .status()
        .as_u16()
}

/// A `claude-official` account named `name` with the test's OAuth token, on `mock`; its id.
async fn oauth_account(relay: &Relay, mock: &MockUpstream, name: &str) -> String {
    relay
        .create_account_with(json!({
            "name": name, "type": "claude-official", "base_url": mock.url(),
            "credential": OAUTH_TOKEN,
        }))
        .await
}

#[tokio::test]
async fn failed_checks_take_an_account_out_and_a_passing_one_puts_it_back() {
    let mock = MockUpstream::start().await;
    let relay = relay().await;
    let id = oauth_account(&relay, &mock, "oauth-a").await;
    let key = relay.active_key("tenant").await;

    // A pass: the OAuth usage endpoint, with the token and the OAuth beta flag.
    let v = check(&relay, &id).await;
    assert_eq!(
        (v["passed"].clone(), v["http_status"].clone()),
        (json!(true), json!(200)),
        "{v}"
    );
    assert_eq!(v["status"], "valid");
    let sent = mock.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].method.as_str(), sent[0].path.as_str()),
        ("GET", "/api/oauth/usage")
    );
    assert_eq!(
        sent[0].header("authorization"),
        Some(format!("Bearer {OAUTH_TOKEN}").as_str())
    );
    assert_eq!(sent[0].header("anthropic-beta"), Some("oauth-2025-04-20"));

    // The token stops working: one failure counts, the second takes the account out.
    mock.set(|b| {
        b.status = 401;
        b.error_body =
            r#"{"type":"error","error":{"type":"authentication_error","message":"invalid token"}}"#
                .into();
    });
    let v = check(&relay, &id).await;
    assert_eq!(
        (v["passed"].clone(), v["status"].clone()),
        (json!(false), json!("valid")),
        "{v}"
    );
    assert_eq!(v["consecutive_error_count"], 1);
    assert_eq!(v["result"], "fail");
    assert!(v["detail"].as_str().unwrap().contains("HTTP 401: "), "{v}");
    assert!(!v["detail"].as_str().unwrap().contains(OAUTH_TOKEN));
    let v = check(&relay, &id).await;
    assert_eq!(
        (v["status"].clone(), v["consecutive_error_count"].clone()),
        (json!("error"), json!(2)),
        "{v}"
    );
    let stored = account(&relay, &id).await;
    assert_eq!(
        (
            stored["status"].clone(),
            stored["consecutive_error_count"].clone()
        ),
        (json!("error"), json!(2)),
        "{stored}"
    );
    let before = mock.count();
    assert_eq!(
        proxied(&relay, &key).await,
        503,
        "an account out of scheduling serves nothing"
    );
    assert_eq!(mock.count(), before);

    // An operator clears the error: counting starts again from nothing, on every node.
    let (status, v) = relay.patch_account(&id, json!({ "status": "valid" })).await;
    assert_eq!(status, 200, "{v}");
    let v = check(&relay, &id).await;
    assert_eq!(
        (v["status"].clone(), v["consecutive_error_count"].clone()),
        (json!("valid"), json!(1)),
        "{v}"
    );

    // It works again: one pass puts it back, for the next request.
    mock.set(|b| b.status = 200);
    let v = check(&relay, &id).await;
    assert_eq!(
        (
            v["passed"].clone(),
            v["status"].clone(),
            v["consecutive_error_count"].clone()
        ),
        (json!(true), json!("valid"), json!(0)),
        "{v}"
    );
    let stored = account(&relay, &id).await;
    assert_eq!(
        (
            stored["status"].clone(),
            stored["consecutive_error_count"].clone()
        ),
        (json!("valid"), json!(0)),
        "{stored}"
    );
    assert_eq!(proxied(&relay, &key).await, 200);

    // A 429 is a pass: the token works, only its rate is spent. An overloaded provider says
    // nothing about the token: reported, not counted.
    mock.set(|b| b.status = 429);
    assert_eq!(check(&relay, &id).await["passed"], true);
    mock.set(|b| b.status = 529);
    for _ in 0..3 {
        let v = check(&relay, &id).await;
        assert_eq!(
            (
                v["result"].clone(),
                v["status"].clone(),
                v["consecutive_error_count"].clone()
            ),
            (json!("inconclusive"), json!("valid"), json!(0)),
            "{v}"
        );
    }
    mock.set(|b| b.status = 200);

    // Checking every account: each type where it belongs, a disabled one left out.
    let gemini = relay
        .create_account_with(json!({
            "name": "gemini-a", "type": "gemini", "base_url": format!("{}/g", mock.url()),
            "credential": "gemini-key-1",
        }))
        .await;
    let api_key = relay
        .create_account_with(json!({
            "name": "claude-a", "type": "claude", "base_url": mock.url(),
            "credential": "sk-ant-api03-key", "enabled": false,
        }))
        .await;
    let before = mock.count();
    let (status, all) = relay
        .admin_json(Method::POST, "/api/admin/accounts/health-check", None)
        .await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        (all["checked"].clone(), all["failed"].clone()),
        (json!(2), json!(0)),
        "{all}"
    );
    let names: Vec<&str> = all["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gemini-a", "oauth-a"]);
    let sent = &mock.requests()[before..];
    let to_gemini = sent.iter().find(|r| r.path == "/g/v1beta/models").unwrap();
    assert_eq!(to_gemini.header("x-goog-api-key"), Some("gemini-key-1"));
    // A disabled account is not checked, not even by hand.
    let (status, v) = try_check(&relay, &api_key).await;
    assert_eq!(status, 409, "{v}");
    let (status, _) = try_check(&relay, "no-such-account").await;
    assert_eq!(status, 404);
    // An unreachable provider says nothing about the credential: reported, not counted.
    let (status, _) = relay
        .patch_account(&gemini, json!({ "base_url": "http://127.0.0.1:9" }))
        .await;
    assert_eq!(status, 200);
    let v = check(&relay, &gemini).await;
    assert_eq!(
        (
            v["passed"].clone(),
            v["result"].clone(),
            v["http_status"].clone()
        ),
        (json!(false), json!("inconclusive"), Value::Null),
        "{v}"
    );
    assert!(v["detail"].as_str().unwrap().contains("connect"), "{v}");
    assert_eq!(v["consecutive_error_count"], 0);

    let audit = relay.admin_get("/api/admin/audit?per_page=100").await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"account.health_check"), "{actions:?}");
    assert!(actions.contains(&"account.health_check_all"), "{actions:?}");
}

/// Waits until the mock has seen `n` requests to `path`.
async fn wait_checks(mock: &MockUpstream, path: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = mock.requests().iter().filter(|r| r.path == path).count();
        if seen >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{seen} of {n} checks to {path}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_periodic_job_runs_while_the_settings_say_so() {
    let mock = MockUpstream::start().await;
    let relay = relay().await;
    let (status, settings) = relay
        .admin_json(Method::GET, "/api/admin/settings", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        settings,
        json!({
            "account_health_check_enabled": false,
            "account_health_check_interval": 5.0,
            "account_error_threshold": 2,
        })
    );
    let id = oauth_account(&relay, &mock, "oauth-b").await;
    // A plain API-key account is not checked by the job (its provider manages it).
    relay
        .create_account_with(json!({
            "name": "claude-b", "type": "claude", "base_url": mock.url(),
            "credential": "sk-ant-api03-key",
        }))
        .await;
    mock.set(|b| b.status = 401);

    for bad in [
        json!({ "account_health_check_interval": 0 }),
        json!({ "account_health_check_interval": 2000 }),
        json!({ "account_health_check_enabled": "yes" }),
        json!({ "health": true }),
    ] {
        let (status, v) = relay
            .admin_json(Method::PATCH, "/api/admin/settings", Some(bad.clone()))
            .await;
        assert_eq!(status, 400, "{bad}: {v}");
    }
    // Every 3 s: a round at once, the next one 3 s later takes the account out.
    let (status, v) = relay.admin_json(Method::PATCH,
        "/api/admin/settings",
        Some(
            json!({ "account_health_check_enabled": true, "account_health_check_interval": 0.05 }),
        ),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["account_health_check_enabled"], true);
    wait_checks(&mock, "/api/oauth/usage", 2).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while account(&relay, &id).await["status"] != "error" {
        assert!(Instant::now() < deadline, "{}", account(&relay, &id).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        mock.requests().iter().all(|r| r.path != "/v1/models"),
        "the API-key account was checked"
    );

    // Recovered at the provider: the next round puts it back.
    mock.set(|b| b.status = 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    while account(&relay, &id).await["status"] != "valid" {
        assert!(Instant::now() < deadline, "{}", account(&relay, &id).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Switched off: no more rounds.
    let (status, _) = relay
        .admin_json(
            Method::PATCH,
            "/api/admin/settings",
            Some(json!({ "account_health_check_enabled": false })),
        )
        .await;
    assert_eq!(status, 200);
    // A round that had begun before may still be finishing: it ends within a quiet second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = mock.count();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if mock.count() == seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "checks went on after switching off"
        );
    }
    let after_off = mock.count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(mock.count(), after_off, "a round ran while switched off");
    let (_, settings) = relay
        .admin_json(Method::GET, "/api/admin/settings", None)
        .await;
    assert_eq!(settings["account_health_check_interval"], 0.05);
}

/// A check waits for the provider for a while: what an operator stores meanwhile wins over
/// what the check decided on the state it began with.
#[tokio::test]
async fn a_status_set_while_a_check_runs_is_kept() {
    let mock = MockUpstream::start().await;
    let relay = relay().await;
    let id = oauth_account(&relay, &mock, "oauth-c").await;
    // One refusal counted already: the next one would take the account out.
    mock.set(|b| b.status = 401);
    assert_eq!(check(&relay, &id).await["consecutive_error_count"], 1);
    mock.set(|b| b.head_delay = Duration::from_millis(1500));
    let path = format!("/api/admin/accounts/{id}/health-check");
    let checks_before = mock.count();
    let running = {
        let http = relay.http.clone();
        let url = format!("{}{path}", relay.admin);
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(common::ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    // Once that check waits for the provider's answer (1.5 s away),
    mock.wait_count(checks_before + 1).await;
    // a second check of the same account is refused, not counted twice.
    let (status, v) = relay.admin_json(Method::POST, &path, None).await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = relay
        .patch_account(&id, json!({ "status": "blocked" }))
        .await;
    assert_eq!(status, 200, "{v}");
    let v = running.await.unwrap();
    assert_eq!(
        (v["result"].clone(), v["status"].clone()),
        (json!("fail"), json!("blocked")),
        "{v}"
    );
    assert_eq!(account(&relay, &id).await["status"], "blocked");
}

/// Two nodes on one database: a pass on one clears the count the other had made, and that
/// node counts again from there; a credential the provider echoes is masked even where the
/// detail's excerpt cuts it.
#[tokio::test]
async fn a_pass_on_one_node_clears_the_count_made_on_another() {
    let pg = common::PgDb::create().await;
    let shared = vec![(
        "RELAY_SCHEDULER__ACCOUNT_ERROR_THRESHOLD".to_string(),
        "3".to_string(),
    )]
    .into_iter()
    .chain(common::shared_node_secrets())
    .collect::<Vec<_>>();
    let node = || {
        Relay::start_with(RelayOptions {
            db: common::Db::Postgres(pg.url.clone()),
            env: shared.clone(),
            ..RelayOptions::default()
        })
    };
    let (a, b) = (node().await, node().await);
    let mock = MockUpstream::start().await;
    let id = oauth_account(&a, &mock, "oauth-d").await;
    b.wait_accounts_loaded(1).await;
    mock.set(|m| {
        m.status = 401;
        m.error_body = format!(r#"{{"error":"{}{OAUTH_TOKEN}"}}"#, "x".repeat(185));
    });
    for n in 1..=2 {
        let v = check(&a, &id).await;
        assert_eq!(v["consecutive_error_count"], n, "{v}");
        let detail = v["detail"].as_str().unwrap();
        assert!(!detail.contains("sk-ant-oat01"), "{detail}");
    }
    mock.set(|m| m.status = 200);
    assert_eq!(check(&b, &id).await["consecutive_error_count"], 0);
    // Node A learns of the reset with its next reload of the accounts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        mock.set(|m| m.status = 401);
        let v = check(&a, &id).await;
        if v["consecutive_error_count"] == 1 {
            assert_eq!(v["status"], "valid", "{v}");
            break;
        }
        // Not reloaded yet: undo this refusal on B and try again.
        mock.set(|m| m.status = 200);
        assert_eq!(check(&b, &id).await["consecutive_error_count"], 0);
        assert!(Instant::now() < deadline, "node A never saw the reset: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_setup_token_without_the_profile_scope_stays_valid_and_a_bad_gemini_key_fails() {
    let mock = MockUpstream::start().await;
    let relay = relay().await;
    let oauth = oauth_account(&relay, &mock, "setup-token").await;
    // `claude setup-token` grants user:inference only; the usage endpoint wants user:profile.
    mock.set(|b| {
        b.status = 403;
        b.error_body = r#"{"type":"error","error":{"type":"permission_error","message":"OAuth token does not meet scope requirement user:profile"},"request_id":"req_011CScope"}"#.into();
    });
    // Past the threshold (2): never counted, never taken out.
    for _ in 0..4 {
        let v = check(&relay, &oauth).await;
        assert_eq!(
            (
                v["result"].clone(),
                v["status"].clone(),
                v["consecutive_error_count"].clone()
            ),
            (json!("inconclusive"), json!("valid"), json!(0)),
            "{v}"
        );
    }
    assert_eq!(account(&relay, &oauth).await["status"], "valid");

    // Gemini's answer to a key not valid is a 400: a failed check, not an inconclusive one.
    let gemini = relay
        .create_account_with(json!({
            "name": "gemini-bad", "type": "gemini", "base_url": mock.url(),
            "credential": "AIza-health-bad",
        }))
        .await;
    mock.set(|b| {
        b.status = 400;
        b.error_body = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#.into();
    });
    let v = check(&relay, &gemini).await;
    assert_eq!(
        (v["result"].clone(), v["consecutive_error_count"].clone()),
        (json!("fail"), json!(1)),
        "{v}"
    );
    // Any other 400 says nothing about the key.
    mock.set(|b| {
        b.error_body =
            r#"{"error":{"code":400,"message":"Bad request","status":"INVALID_ARGUMENT"}}"#.into();
    });
    let v = check(&relay, &gemini).await;
    assert_eq!(v["result"], "inconclusive", "{v}");
}
