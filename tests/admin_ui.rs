//! The admin UI in a real browser: headless Chromium driven by Playwright
//! (`admin-ui/e2e/admin.mjs`) against the real relay and a mock upstream. The browser logs in,
//! creates and edits an account, a user, a key and a price, sends a request with the key it
//! made, finds its record, and logs in as the tenant; this test then checks through the API
//! and the mock what the clicks did. Screenshots are kept in `admin-ui/test-results/`.
//!
//! Needs the UI built and its test dependencies installed (`make ui`, which `make test` runs)
//! and Chromium (`/usr/bin/chromium`, or `CHROMIUM`).

mod common;

use std::path::PathBuf;

use common::mock_upstream::MockUpstream;
use common::{Relay, RelayOptions};

fn ui_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("admin-ui")
}

#[tokio::test]
async fn an_admin_runs_the_relay_from_the_browser() {
    let ui = ui_dir();
    for (path, what) in [
        (ui.join("dist/index.html"), "the built UI"),
        (
            ui.join("node_modules/playwright-core"),
            "the UI's test dependencies",
        ),
    ] {
        assert!(
            path.exists(),
            "{what} is missing ({}): run `make ui` (part of `make test`)",
            path.display()
        );
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "Chromium is missing at {chromium}: `make test` installs Debian's chromium"
    );

    let mock = MockUpstream::start().await;
    // The mock is also the OAuth token endpoint; refreshes only by hand, as the run clicks.
    let relay = Relay::start_with(RelayOptions {
        env: vec![
            (
                "RELAY_OAUTH__CLAUDE_TOKEN_URL".into(),
                format!("{}/v1/oauth/token", mock.url()),
            ),
            ("RELAY_OAUTH__REFRESH_ENABLED".into(), "false".into()),
        ],
        ..RelayOptions::default()
    })
    .await;
    let shots = ui.join("test-results");
    let run = tokio::process::Command::new("node")
        .arg(ui.join("e2e/admin.mjs"))
        .env("ADMIN_URL", &relay.admin)
        .env("PROXY_URL", &relay.proxy)
        .env("UPSTREAM_URL", mock.url())
        .env("ADMIN_PASSWORD", "admin-password-1")
        .env("ADMIN_TOKEN", common::ADMIN_TOKEN)
        .env("SCREENSHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(300), run)
        .await
        .expect("the browser run took over 5 minutes")
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser run failed ({}; screenshots in {}):\n{stdout}\n{stderr}\nrelay log:\n{}",
        out.status,
        shots.display(),
        relay.log()
    );
    let result: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no result line from the browser run:\n{stdout}"));
    let credential = result["credential"].as_str().unwrap();

    // The account as the form left it: edited priority, disabled at the end, credential
    // stored encrypted and working upstream.
    let accounts = relay.admin_get("/api/admin/accounts").await;
    let account = accounts["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "ui-claude")
        .unwrap_or_else(|| panic!("no ui-claude account: {accounts}"));
    assert_eq!(account["priority"], 3);
    assert_eq!(account["enabled"], false);
    assert_eq!(account["base_url"], mock.url());
    assert_eq!(
        account["models"],
        serde_json::json!(["claude-sonnet-4-5", "claude-haiku-4-5"])
    );
    // The check by hand, then the request with the key, both with the credential typed in.
    let sent = mock.requests();
    let paths: Vec<(&str, &str)> = sent
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    assert_eq!(
        paths,
        [
            ("GET", "/v1/models"),
            ("POST", "/v1/messages"),
            ("POST", "/v1/oauth/token")
        ]
    );
    assert!(sent[..2]
        .iter()
        .all(|r| r.header("x-api-key") == Some(credential)));
    // The refresh by hand sent the refresh token typed in, and stored the new token's expiry.
    assert_eq!(
        sent[2].json()["refresh_token"],
        result["refresh_token"],
        "{:?}",
        sent[2]
    );
    let oauth = accounts["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "ui-oauth")
        .unwrap_or_else(|| panic!("no ui-oauth account: {accounts}"));
    // The refreshed token stored (its mask), then the type changed with the refresh token
    // removed.
    assert!(
        oauth["credential_masked"]
            .as_str()
            .unwrap()
            .starts_with("sk-a…ed-"),
        "{oauth}"
    );
    assert_eq!(
        (&oauth["account_type"], &oauth["has_refresh_token"]),
        (&serde_json::json!("claude"), &serde_json::json!(false)),
        "{oauth}"
    );
    assert!(
        oauth["token_expires_at"].as_i64().unwrap() < relay_filters::now_ms() + 8 * 3_600_000,
        "{oauth}"
    );
    // Neither the credential nor the OAuth tokens are on disk in the clear (database and log).
    let stored = relay.stored_bytes();
    for secret in [
        credential,
        result["refresh_token"].as_str().unwrap(),
        "sk-ant-ort01-rotated-",
        "sk-ant-oat01-refreshed-",
    ] {
        assert!(
            !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} is in the database files in the clear"
        );
    }

    // The user at 1.5 × list price, and the request billed at that rate.
    let users = relay.admin_get("/api/admin/users").await;
    let tenant = users["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == "ui-tenant")
        .unwrap_or_else(|| panic!("no ui-tenant: {users}"));
    assert_eq!(tenant["price_rate"], 15000);
    assert_eq!(tenant["monthly_cost_limit"], 300_000_000);
    // The request the key served (beside the one a key deleted since was refused).
    let records = relay.wait_records(2).await;
    let served = records
        .iter()
        .find(|r| r["status"] == 200)
        .unwrap_or_else(|| panic!("no served record: {records:?}"));
    assert_eq!(served["user_id"], tenant["id"]);
    assert_eq!(served["price_rate"], 15000);
    let base = served["base_cost"].as_i64().unwrap();
    assert!(base > 0, "{served}");
    assert_eq!(served["billed_cost"].as_i64().unwrap(), base * 3 / 2);

    // The key's daily limit in micro-USD, and the price override per million tokens.
    let keys = relay.admin_get("/api/admin/api-keys").await;
    let key = &keys["items"][0];
    assert_eq!(key["name"], "ui-key");
    assert_eq!(key["daily_cost_limit"], 5_000_000);
    assert_eq!(key["monthly_cost_limit"], 50_000_000);
    assert_eq!(key["rpm_limit"], 120);
    let prices = relay.admin_get("/api/admin/pricing").await;
    let price = prices["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["model"] == "ui-model-1")
        .unwrap_or_else(|| panic!("no ui-model-1 price: {prices}"));
    let sessions = relay.admin_get("/api/admin/sessions").await;
    assert_eq!(
        sessions["items"],
        serde_json::json!([]),
        "the binding was ended"
    );
    let audit = relay.admin_get("/api/admin/audit?per_page=100").await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "session.unbind"),
        "{audit}"
    );
    let settings = relay.admin_get("/api/admin/settings").await;
    assert_eq!(settings["account_health_check_enabled"], true, "{settings}");
    assert_eq!(
        settings["account_health_check_interval"], 10.0,
        "{settings}"
    );
    assert_eq!(
        (price["input"].as_i64(), price["output"].as_i64()),
        (Some(3_000_000), Some(15_000_000))
    );
    // $10 per 1 000 searches is 10 000 micro-USD a search.
    assert_eq!(price["web_search"], 10_000, "{price}");
    // Prompts over 200 000 tokens at $6 / $22.50, the cache prices left to their defaults,
    // and at $12 / $45 when served at priority.
    assert_eq!(
        price["long_context"],
        serde_json::json!({"above_tokens": 200_000, "input": 6_000_000, "output": 22_500_000,
            "priority": {"input": 12_000_000, "output": 45_000_000}}),
        "{price}"
    );
    // The tier cards as the form left them: priority its own, flex (set through the API and
    // kept by the first save) dropped by the second, fast never set.
    assert_eq!(
        (&price["priority"], &price["flex"], &price["fast"]),
        (
            &serde_json::json!({"input": 6_000_000, "output": 30_000_000}),
            &serde_json::Value::Null,
            &serde_json::Value::Null
        ),
        "{price}"
    );
}

/// The UI's page and files come with headers that keep them in their own origin; the API's
/// unknown paths stay JSON errors and are never answered with the page.
#[tokio::test]
async fn the_page_is_served_with_its_policy_and_api_paths_stay_api() {
    let relay = Relay::start().await;
    let page = relay
        .http
        .get(format!("{}/", relay.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-cache");
    let html = page.text().await.unwrap();
    let script = html
        .split('"')
        .find(|s| s.starts_with("/assets/") && s.ends_with(".js"))
        .unwrap_or_else(|| panic!("no script in the page (is the UI built?): {html}"));
    let asset = relay
        .http
        .get(format!("{}{script}", relay.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(asset.status(), 200);
    assert!(asset.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("javascript"));
    assert_eq!(
        asset.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );

    let missing = relay
        .http
        .get(format!("{}/api/admin/no-such-thing", relay.admin))
        .bearer_auth(common::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    let post = relay
        .http
        .post(format!("{}/index.html", relay.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);
    let nothing = relay
        .http
        .get(format!("{}/assets/no-such-file.js", relay.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(nothing.status(), 404);
}
