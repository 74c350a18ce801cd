//! End to end on the admin API: a real relay process, login sessions (cookie + CSRF), the
//! static token, what users may see, credentials that never come back, the audit log, and
//! price changes that reach the next proxied request (through a mock Anthropic upstream).

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod common;

use common::mock_upstream::{MockUpstream, MockUsage};
use common::{
    conversation, messages_body, sum, Db, LoginSession, PgDb, Relay, RelayOptions, ADMIN_PASSWORD,
    ADMIN_TOKEN,
};
use reqwest::Method;
use serde_json::{json, Value};

const MODEL: &str = "claude-sonnet-4-5";
/// The model id the mock upstream reports (and the relay prices).
const UPSTREAM_MODEL: &str = "claude-sonnet-4-5-20250929";

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// GET with a login session; asserts 200 and returns the raw text.
async fn session_get(relay: &Relay, s: &LoginSession, path: &str) -> String {
    let (status, text) = relay.session_call(s, Method::GET, path, None, false).await;
    assert_eq!(status, 200, "GET {path}: {text}");
    text
}

/// A call with the static token; the status and the raw text.
async fn token(relay: &Relay, method: Method, path: &str, body: Option<Value>) -> (u16, String) {
    relay
        .token_call(Some(ADMIN_TOKEN), method, path, body)
        .await
}

/// Sends one non-streaming request through the proxy and returns its usage record (found by
/// the `x-relay-request-id` the relay answers with) once the usage writer has stored it.
async fn proxied_record(relay: &Relay, key: &str, topic: &str) -> Value {
    let r = relay
        .post("/v1/messages", key)
        .json(&messages_body(MODEL, false, conversation(topic, 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-relay-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = r.bytes().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let page = relay
            .admin_get("/api/admin/usage/records?per_page=500")
            .await;
        if let Some(rec) = page["items"]
            .as_array()
            .and_then(|items| items.iter().find(|r| r["id"] == id.as_str()))
        {
            return rec.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "record {id} never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn audit_actions(audit: &Value) -> Vec<String> {
    audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn login_cookie_is_strict_and_changes_need_the_csrf_token() {
    let relay = Relay::start().await;
    let s = relay.login("admin", ADMIN_PASSWORD).await;
    let attrs: Vec<String> = s
        .set_cookie
        .split(';')
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    assert!(s.cookie.starts_with("relay_session="), "{}", s.set_cookie);
    assert!(attrs.contains(&"httponly".to_string()), "{}", s.set_cookie);
    assert!(
        attrs.contains(&"samesite=strict".to_string()),
        "{}",
        s.set_cookie
    );
    assert!(!s.csrf.is_empty());
    assert_eq!(s.body["user"]["role"], "admin");
    assert!(s.body["user"].get("price_rate").is_none(), "{}", s.body);
    // Not Secure unless configured: the admin service itself speaks plain HTTP.
    assert!(!attrs.contains(&"secure".to_string()), "{}", s.set_cookie);

    // Reading needs no CSRF token.
    let me = parse(&session_get(&relay, &s, "/api/auth/me").await);
    assert_eq!(me["name"], "admin");
    // A page reloaded in the browser gets its session's token back, never from a cache.
    assert_eq!(me["csrf_token"], s.csrf.as_str());
    let r = relay
        .http
        .get(format!("{}/api/auth/me", relay.admin))
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["cache-control"], "no-store");

    let new_user = json!({"username": "dora", "password": "password-123"});
    let (status, text) = relay
        .session_call(
            &s,
            Method::POST,
            "/api/admin/users",
            Some(new_user.clone()),
            false,
        )
        .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("CSRF"), "{text}");
    let wrong = LoginSession {
        csrf: "not-the-token".into(),
        ..s.clone()
    };
    let (status, _) = relay
        .session_call(
            &wrong,
            Method::POST,
            "/api/admin/users",
            Some(new_user.clone()),
            true,
        )
        .await;
    assert_eq!(status, 403);
    let (status, text) = relay
        .session_call(&s, Method::POST, "/api/admin/users", Some(new_user), true)
        .await;
    assert_eq!(status, 201, "{text}");

    // The static token works; a wrong one or none at all does not.
    let (status, text) = token(&relay, Method::GET, "/api/admin/users", None).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(parse(&text)["total"], 2);
    let (status, text) = relay
        .token_call(Some("wrong-token"), Method::GET, "/api/admin/users", None)
        .await;
    assert_eq!(status, 401, "{text}");
    assert_eq!(parse(&text)["error"]["code"], "unauthorized");
    let (status, _) = relay
        .token_call(None, Method::GET, "/api/admin/users", None)
        .await;
    assert_eq!(status, 401);

    // The token belongs to no user: "my usage" is refused with a hint.
    let (status, text) = token(&relay, Method::GET, "/api/usage/summary", None).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("log in as a user"), "{text}");
    // The admin's own usage, through its login.
    let mine = parse(&session_get(&relay, &s, "/api/usage/summary").await);
    assert_eq!(mine["all_time"]["requests"], 0, "{mine}");

    // After logout the cookie is worthless.
    let (status, _) = relay
        .session_call(&s, Method::POST, "/api/auth/logout", None, true)
        .await;
    assert_eq!(status, 200);
    let (status, _) = relay
        .session_call(&s, Method::GET, "/api/auth/me", None, false)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn five_wrong_passwords_block_logins() {
    let relay = Relay::start().await;
    for _ in 0..5 {
        let r = relay.login_raw("admin", "not-the-password").await;
        assert_eq!(r.status(), 401);
    }
    let r = relay.login_raw("admin", ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_requests", "{v}");
    // The token is not throttled.
    let (status, _) = token(&relay, Method::GET, "/api/auth/me", None).await;
    assert_eq!(status, 200);
}

/// Guessing across user names from one address meets a limit of its own: after 30 failures,
/// whatever the names, the address is refused, the right password included; the token is not.
#[tokio::test]
async fn wrong_guesses_across_names_block_the_address() {
    let relay = Relay::start().await;
    // Eight names, each tried fewer than five times: under the limit per name.
    for i in 0..30 {
        let r = relay
            .login_raw(&format!("user-{}", i % 8), "not-the-password")
            .await;
        assert_eq!(r.status(), 401, "guess {i}");
    }
    let r = relay.login_raw("admin", ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 429);
    let (status, _) = token(&relay, Method::GET, "/api/auth/me", None).await;
    assert_eq!(status, 200);
}

/// Only failures count against the address: logins that succeed never block it, however many.
#[tokio::test]
async fn logins_that_succeed_do_not_count_against_the_address() {
    let relay = Relay::start().await;
    for i in 0..32 {
        let r = relay.login_raw("admin", ADMIN_PASSWORD).await;
        assert_eq!(r.status(), 200, "login {i}");
    }
}

/// Attempts made at the same time are counted as they come, not after their checks: of 30
/// wrong passwords sent at once, at most five are checked.
#[tokio::test]
async fn concurrent_wrong_passwords_are_throttled_too() {
    let relay = Relay::start().await;
    let tries = (0..30).map(|i| {
        let relay = &relay;
        async move {
            relay
                .login_raw("admin", &format!("guess-{i}"))
                .await
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(tries).await;
    let refused = statuses.iter().filter(|s| **s == 429).count();
    let checked = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(refused + checked, 30, "{statuses:?}");
    assert!(
        checked <= 5,
        "more than five guesses were checked: {statuses:?}"
    );
    // A guess that waited too long for its check (a loaded machine) gave its count back:
    // guesses one at a time fill the window, then even the right password is refused.
    for _ in 0..5 {
        if relay.login_raw("admin", "one-more-guess").await.status() == 429 {
            break;
        }
    }
    let r = relay.login_raw("admin", ADMIN_PASSWORD).await;
    assert_eq!(r.status(), 429);

    // A user name longer than any user's is refused without a check.
    let r = relay.login_raw(&"a".repeat(100_000), "x").await;
    assert_eq!(r.status(), 401);
}

/// `POST /api/auth/logout` with the session's cookie and CSRF token, after `Cookie` headers
/// of other cookies (`before`).
async fn logout(relay: &Relay, s: &LoginSession, before: &[&str]) -> reqwest::Response {
    let mut req = relay.http.post(format!("{}/api/auth/logout", relay.admin));
    for cookie in before {
        req = req.header("cookie", *cookie);
    }
    req.header("cookie", &s.cookie)
        .header("x-csrf-token", &s.csrf)
        .send()
        .await
        .unwrap()
}

/// Logout ends the session whichever `Cookie` header carries it.
#[tokio::test]
async fn logout_finds_the_session_in_any_cookie_header() {
    let relay = Relay::start().await;
    let s = relay.login("admin", ADMIN_PASSWORD).await;
    let r = logout(&relay, &s, &["theme=dark"]).await;
    assert_eq!(r.status(), 200);
    let (status, _) = relay
        .session_call(&s, Method::GET, "/api/auth/me", None, false)
        .await;
    assert_eq!(status, 401, "the session outlived its logout");
}

async fn start(db: Db) -> Relay {
    Relay::start_with(RelayOptions {
        db,
        ..RelayOptions::default()
    })
    .await
}

#[tokio::test]
async fn users_see_only_their_own_keys_and_usage_sqlite() {
    users_see_only_their_own_keys_and_usage(Db::Sqlite).await;
}

#[tokio::test]
async fn users_see_only_their_own_keys_and_usage_postgres() {
    let pg = PgDb::create().await;
    users_see_only_their_own_keys_and_usage(Db::Postgres(pg.url.clone())).await;
}

async fn users_see_only_their_own_keys_and_usage(db: Db) {
    let mock = MockUpstream::start().await;
    mock.set(|b| {
        b.usage = MockUsage {
            input: 1000,
            output: 500,
            cache_write_5m: 200,
            cache_write_1h: 0,
            cache_read: 300,
        }
    });
    let relay = start(db).await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-upstream-a")
        .await;
    let bob = relay.create_user("bob", 15_000).await;
    let carol = relay.create_user("carol", 10_000).await;
    let (carol_key_id, carol_key) = relay.create_key(&carol, json!({"name": "key-carol"})).await;
    let s = relay.login("bob", "password-123").await;
    assert_eq!(s.body["user"]["role"], "user");
    assert!(!s.body.to_string().contains("price_rate"), "{}", s.body);

    // Admin calls are refused.
    for path in [
        "/api/admin/users",
        "/api/admin/api-keys",
        "/api/admin/audit",
        "/api/admin/accounts",
        "/api/admin/pricing",
    ] {
        let (status, text) = relay.session_call(&s, Method::GET, path, None, false).await;
        assert_eq!(status, 403, "{path}: {text}");
    }
    let (status, _) = relay
        .session_call(
            &s,
            Method::PATCH,
            &format!("/api/admin/api-keys/{carol_key_id}"),
            Some(json!({"rpm_limit": null})),
            true,
        )
        .await;
    assert_eq!(status, 403);

    // Own keys: create, list, rename, disable and enable; somebody else's is not found.
    let (status, text) = relay
        .session_call(
            &s,
            Method::POST,
            "/api/keys",
            Some(json!({"name": "bob-1"})),
            true,
        )
        .await;
    assert_eq!(status, 201, "{text}");
    let created = parse(&text);
    let bob_key_id = created["id"].as_str().unwrap().to_string();
    let bob_key = created["key"].as_str().unwrap().to_string();
    assert!(bob_key.starts_with("sk-relay-"));
    let (status, _) = relay
        .session_call(
            &s,
            Method::PATCH,
            &format!("/api/keys/{carol_key_id}"),
            Some(json!({"enabled": false})),
            true,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = relay
        .session_call(
            &s,
            Method::PATCH,
            &format!("/api/keys/{bob_key_id}"),
            Some(json!({"rpm_limit": 1})),
            true,
        )
        .await;
    assert_eq!(status, 400, "users change only name and enabled");
    for body in [
        json!({"name": "bob-main"}),
        json!({"enabled": false}),
        json!({"enabled": true}),
    ] {
        let (status, text) = relay
            .session_call(
                &s,
                Method::PATCH,
                &format!("/api/keys/{bob_key_id}"),
                Some(body.clone()),
                true,
            )
            .await;
        assert_eq!(status, 200, "{body}: {text}");
    }
    // A key an admin disabled stays disabled: its owner cannot enable it, only an admin.
    let (status, v) = relay
        .admin_patch(
            &format!("/api/admin/api-keys/{bob_key_id}"),
            json!({"enabled": false}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["disabled_by_admin"], true, "{v}");
    let (status, text) = relay
        .session_call(
            &s,
            Method::PATCH,
            &format!("/api/keys/{bob_key_id}"),
            Some(json!({"enabled": true})),
            true,
        )
        .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("administrator"), "{text}");
    let (status, text) = relay
        .session_call(
            &s,
            Method::PATCH,
            &format!("/api/keys/{bob_key_id}"),
            Some(json!({"name": "bob-main"})),
            true,
        )
        .await;
    assert_eq!(status, 200, "renaming stays allowed: {text}");
    assert_eq!(parse(&text)["enabled"], false, "{text}");
    let (status, v) = relay
        .admin_patch(
            &format!("/api/admin/api-keys/{bob_key_id}"),
            json!({"enabled": true}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["disabled_by_admin"], false, "{v}");
    // The owner's own disabling leaves the owner free to enable it again.
    for enabled in [false, true] {
        let (status, text) = relay
            .session_call(
                &s,
                Method::PATCH,
                &format!("/api/keys/{bob_key_id}"),
                Some(json!({"enabled": enabled})),
                true,
            )
            .await;
        assert_eq!(status, 200, "{enabled}: {text}");
        assert_eq!(parse(&text)["disabled_by_admin"], false, "{text}");
    }
    let keys = parse(&session_get(&relay, &s, "/api/keys").await);
    assert_eq!(keys["total"], 1, "{keys}");
    assert_eq!(keys["items"][0]["id"], bob_key_id.as_str());
    assert_eq!(keys["items"][0]["name"], "bob-main");
    assert_eq!(keys["items"][0]["enabled"], true);

    // Traffic: two requests of bob, one of carol.
    relay.wait_key_active(&bob_key).await;
    relay.wait_key_active(&carol_key).await;
    let mut bob_records = Vec::new();
    for topic in ["bob one", "bob two"] {
        bob_records.push(proxied_record(&relay, &bob_key, topic).await);
    }
    let carol_record = proxied_record(&relay, &carol_key, "carol").await;
    // sonnet 4.5: 1000×3 + 500×15 + 200×3.75 + 300×0.3 = 11340 micro-USD; ×1.5 = 17010.
    for r in &bob_records {
        assert_eq!(r["base_cost"], 11340, "{r}");
        assert_eq!(r["billed_cost"], 17010, "{r}");
    }
    assert_eq!(carol_record["billed_cost"], 11340);
    // Admins see each record's user, key and account by name beside its ids.
    for (r, user, key) in [
        (&bob_records[0], "bob", "bob-main"),
        (&bob_records[1], "bob", "bob-main"),
        (&carol_record, "carol", "key-carol"),
    ] {
        assert_eq!(
            (&r["user_name"], &r["api_key_name"], &r["account_name"]),
            (&json!(user), &json!(key), &json!("claude-a")),
            "{r}"
        );
    }

    // Records: only bob's, without base cost, price rate or account.
    let text = session_get(&relay, &s, "/api/usage/records").await;
    for hidden in ["base_cost", "price_rate", "account_id", "session_key"] {
        assert!(!text.contains(hidden), "{hidden} shown to a user: {text}");
    }
    let records = parse(&text);
    assert_eq!(records["total"], 2, "{records}");
    for r in records["items"].as_array().unwrap() {
        assert_eq!(r["api_key_id"], bob_key_id.as_str(), "{r}");
        assert_eq!(r["api_key_name"], "bob-main", "{r}");
        assert!(
            r.get("user_name").is_none() && r.get("account_name").is_none(),
            "{r}"
        );
        assert_eq!(r["billed_cost"], 17010, "{r}");
        // Users see their web searches too (billed inside the cost).
        assert_eq!(r["web_search_requests"], 0, "{r}");
        // And the provider's ids of the request and its answer, which its support asks for.
        assert!(
            r["upstream_request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("req_mock_")),
            "{r}"
        );
        assert_eq!(r["response_id"], "msg_mock_1", "{r}");
    }
    // The admin path gives a user the same view.
    let text = session_get(&relay, &s, "/api/admin/usage/records").await;
    assert!(!text.contains("base_cost"), "{text}");
    assert_eq!(parse(&text)["total"], 2);

    // Summary, daily, monthly, stats and models add up to bob's records.
    let billed = sum(&bob_records, "billed_cost");
    let input = sum(&bob_records, "input_tokens");
    // The admin's user list: what bob was billed today, this month and in all.
    let users = relay.admin_get("/api/admin/users").await;
    let listed = users["items"]
        .as_array()
        .and_then(|items| items.iter().find(|u| u["id"] == bob.as_str()))
        .cloned()
        .unwrap_or_default();
    // Today and this month as the list saw them: the records of the day (and month) it ran on.
    let day = relay_filters::key_limits::utc_day(relay_filters::now_ms());
    let billed_since = |from: &str| -> i64 {
        bob_records
            .iter()
            .filter(|r| {
                let created = relay_filters::key_limits::utc_day(r["created_at"].as_i64().unwrap());
                created.as_str() >= from && created <= day
            })
            .map(|r| r["billed_cost"].as_i64().unwrap())
            .sum()
    };
    let month_start = relay_filters::key_limits::month_start(&day);
    assert_eq!(listed["billed_cost"], billed, "{users}");
    assert_eq!(listed["billed_cost_today"], billed_since(&day), "{users}");
    assert_eq!(
        listed["billed_cost_month"],
        billed_since(&month_start),
        "{users}"
    );
    assert!(listed.get("password_hash").is_none(), "{listed}");
    let text = session_get(&relay, &s, "/api/usage/summary").await;
    assert!(!text.contains("base_cost"), "{text}");
    let summary = parse(&text);
    assert_eq!(summary["daily_cost_limit"], Value::Null, "{summary}");
    // The cost limits an admin sets over all of bob's keys, shown to bob beside his spend.
    let (status, v) = relay
        .patch_user(
            &bob,
            json!({"daily_cost_limit": 5_000_000, "monthly_cost_limit": 40_000_000, "total_cost_limit": 90_000_000}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let limited = parse(&session_get(&relay, &s, "/api/usage/summary").await);
    assert_eq!(limited["daily_cost_limit"], 5_000_000, "{limited}");
    assert_eq!(limited["monthly_cost_limit"], 40_000_000, "{limited}");
    assert_eq!(limited["total_cost_limit"], 90_000_000, "{limited}");
    for period in ["today", "this_month", "all_time"] {
        assert_eq!(summary[period]["requests"], 2, "{summary}");
        assert_eq!(summary[period]["billed_cost"], billed, "{summary}");
        assert_eq!(summary[period]["input_tokens"], input, "{summary}");
        assert_eq!(summary[period]["cache_write_tokens"], 400, "{summary}");
        assert_eq!(summary[period]["cache_read_tokens"], 600, "{summary}");
    }
    let today = summary["day"].as_str().unwrap().to_string();
    let daily = parse(&session_get(&relay, &s, "/api/usage/daily").await);
    assert_eq!(daily["days"].as_array().unwrap().len(), 30, "{daily}");
    assert_eq!(daily["to"], today.as_str());
    let row = daily["days"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["day"] == today.as_str())
        .unwrap();
    assert_eq!(row["requests"], 2, "{daily}");
    assert_eq!(row["billed_cost"], billed, "{daily}");
    assert_eq!(daily["totals"]["billed_cost"], billed, "{daily}");
    let daily = parse(
        &session_get(
            &relay,
            &s,
            &format!("/api/usage/daily?from={today}&to={today}"),
        )
        .await,
    );
    assert_eq!(daily["days"].as_array().unwrap().len(), 1, "{daily}");
    assert_eq!(daily["totals"]["requests"], 2, "{daily}");
    let monthly = parse(
        &session_get(
            &relay,
            &s,
            &format!("/api/usage/monthly?month={}", &today[..7]),
        )
        .await,
    );
    assert_eq!(monthly["totals"]["billed_cost"], billed, "{monthly}");
    let stats = parse(&session_get(&relay, &s, "/api/usage/stats").await);
    assert_eq!(stats["totals"]["requests"], 2, "{stats}");
    assert_eq!(stats["by_key"].as_array().unwrap().len(), 1, "{stats}");
    assert_eq!(stats["by_key"][0]["api_key_id"], bob_key_id.as_str());
    assert_eq!(stats["by_key"][0]["billed_cost"], billed, "{stats}");
    let models = parse(&session_get(&relay, &s, "/api/usage/models").await);
    assert_eq!(models["models"][0]["model"], UPSTREAM_MODEL, "{models}");
    assert_eq!(models["models"][0]["requests"], 2, "{models}");
    assert_eq!(models["models"][0]["billed_cost"], billed, "{models}");
    let keys = parse(&session_get(&relay, &s, "/api/keys").await);
    assert_eq!(keys["items"][0]["requests"], 2, "{keys}");
    assert_eq!(keys["items"][0]["billed_cost"], billed, "{keys}");
    assert_eq!(keys["items"][0]["billed_cost_today"], billed, "{keys}");
    assert!(keys["items"][0].get("base_cost").is_none(), "{keys}");
    let (status, text) = relay
        .session_call(
            &s,
            Method::GET,
            "/api/usage/daily?from=2024-13-01",
            None,
            false,
        )
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("YYYY-MM-DD"), "{text}");

    // Admins see the same with base cost.
    let (status, text) = token(
        &relay,
        Method::GET,
        &format!("/api/admin/users/{bob}/usage/summary"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let admin_view = parse(&text);
    assert_eq!(admin_view["price_rate"], 15_000);
    assert_eq!(admin_view["today"]["billed_cost"], billed);
    assert_eq!(
        admin_view["all_time"]["base_cost"],
        sum(&bob_records, "base_cost")
    );

    // All traffic for admins: the three requests, then per user and per key, most billed
    // first, with names; bob's two requests at 1.5 × outweigh carol's one.
    let (status, text) = token(&relay, Method::GET, "/api/admin/usage/summary", None).await;
    assert_eq!(status, 200, "{text}");
    let all = parse(&text);
    let everyone = [&bob_records[0], &bob_records[1], &carol_record].map(|r| (*r).clone());
    for period in ["today", "this_month", "all_time"] {
        assert_eq!(all[period]["requests"], 3, "{all}");
        assert_eq!(
            all[period]["billed_cost"],
            sum(&everyone, "billed_cost"),
            "{all}"
        );
        assert_eq!(
            all[period]["base_cost"],
            sum(&everyone, "base_cost"),
            "{all}"
        );
    }
    let (status, text) = token(
        &relay,
        Method::GET,
        "/api/admin/usage/breakdown?by=user",
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let per_user = parse(&text);
    let rows = per_user["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{per_user}");
    assert_eq!(
        (&rows[0]["id"], &rows[0]["name"]),
        (&json!(bob), &json!("bob"))
    );
    assert_eq!(rows[0]["requests"], 2);
    assert_eq!(rows[0]["billed_cost"], billed);
    assert_eq!(
        (&rows[1]["name"], &rows[1]["billed_cost"]),
        (&json!("carol"), &carol_record["billed_cost"])
    );
    let (_, text) = token(
        &relay,
        Method::GET,
        "/api/admin/usage/breakdown?by=key&limit=1",
        None,
    )
    .await;
    let per_key = parse(&text);
    assert_eq!(per_key["rows"].as_array().unwrap().len(), 1, "{per_key}");
    assert_eq!(per_key["rows"][0]["id"], bob_key_id.as_str());
    assert_eq!(per_key["rows"][0]["name"], "bob-main (bob)");
    let (_, text) = token(
        &relay,
        Method::GET,
        "/api/admin/usage/breakdown?by=account",
        None,
    )
    .await;
    assert_eq!(parse(&text)["rows"][0]["name"], "claude-a", "{text}");
    assert_eq!(parse(&text)["rows"][0]["requests"], 3, "{text}");
    for bad in ["by=tenant", "by=user&limit=0", "by=user&from=2024-13-01"] {
        let (status, text) = token(
            &relay,
            Method::GET,
            &format!("/api/admin/usage/breakdown?{bad}"),
            None,
        )
        .await;
        assert_eq!(status, 400, "{bad}: {text}");
    }
    for path in [
        "/api/admin/usage/summary",
        "/api/admin/usage/breakdown?by=user",
    ] {
        let (status, _) = relay.session_call(&s, Method::GET, path, None, false).await;
        assert_eq!(status, 403, "{path}");
    }

    // The key cap: bob holds 1 key; 9 more pass, the 11th is refused with a clear message.
    for i in 2..=10 {
        let (status, text) = relay
            .session_call(
                &s,
                Method::POST,
                "/api/keys",
                Some(json!({"name": format!("bob-{i}")})),
                true,
            )
            .await;
        assert_eq!(status, 201, "key {i}: {text}");
    }
    let (status, text) = relay
        .session_call(
            &s,
            Method::POST,
            "/api/keys",
            Some(json!({"name": "bob-11"})),
            true,
        )
        .await;
    assert!(status == 400 || status == 409, "{status} {text}");
    let message = parse(&text)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("maximum is 10"), "{message}");
    let keys = parse(&session_get(&relay, &s, "/api/keys?per_page=100").await);
    assert_eq!(keys["total"], 10);

    // Once carol (with her key) and the account are deleted, the records keep their ids and
    // show no names for them.
    for path in [
        format!("/api/admin/users/{carol}"),
        format!(
            "/api/admin/accounts/{}",
            carol_record["account_id"].as_str().unwrap()
        ),
    ] {
        let (status, v) = relay.admin_delete(&path).await;
        assert_eq!(status, 200, "{path}: {v}");
    }
    let records = relay
        .admin_get("/api/admin/usage/records?per_page=500")
        .await;
    let items = records["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{records}");
    for r in items {
        assert_eq!(r["account_name"], Value::Null, "{r}");
        assert!(r["account_id"].is_string(), "{r}");
        if r["id"] == carol_record["id"] {
            assert_eq!(
                (&r["user_id"], &r["api_key_id"]),
                (&json!(carol), &json!(carol_key_id)),
                "{r}"
            );
            assert_eq!(
                (&r["user_name"], &r["api_key_name"]),
                (&Value::Null, &Value::Null),
                "{r}"
            );
        } else {
            assert_eq!(
                (&r["user_name"], &r["api_key_name"]),
                (&json!("bob"), &json!("bob-main")),
                "{r}"
            );
        }
    }
}

#[tokio::test]
async fn account_credentials_never_come_back() {
    let relay = Relay::start().await;
    let secret = "sk-ant-api03-very-secret-credential-0123456789abcdef";
    let secret2 = "sk-ant-api03-another-secret-credential-9876543210";
    let assert_hidden = |what: &str, text: &str| {
        for s in [secret, secret2] {
            assert!(!text.contains(s), "{what} shows the credential: {text}");
        }
    };
    let (status, text) = token(
        &relay,
        Method::POST,
        "/api/admin/accounts",
        Some(json!({"name": "acct", "type": "claude", "credential": secret})),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    assert_hidden("create", &text);
    let id = parse(&text)["id"].as_str().unwrap().to_string();
    assert_eq!(parse(&text)["credential_masked"], "sk-a…cdef");

    let (status, text) = token(&relay, Method::GET, "/api/admin/accounts", None).await;
    assert_eq!(status, 200);
    assert_hidden("list", &text);
    assert_eq!(parse(&text)["total"], 1);
    let path = format!("/api/admin/accounts/{id}");
    let (status, text) = token(&relay, Method::GET, &path, None).await;
    assert_eq!(status, 200, "{text}");
    assert_hidden("get", &text);
    assert_eq!(parse(&text)["name"], "acct");
    let (status, text) = token(
        &relay,
        Method::PATCH,
        &path,
        Some(json!({"credential": secret2, "priority": 10})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_hidden("update", &text);
    assert_eq!(parse(&text)["priority"], 10);
    let (_, text) = token(&relay, Method::GET, &path, None).await;
    assert_hidden("get after update", &text);
    assert_eq!(parse(&text)["credential_masked"], "sk-a…3210");
    // A weight below 1 is refused on a change as on creation.
    let (status, text) = token(&relay, Method::PATCH, &path, Some(json!({"weight": 0}))).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("weight must be at least 1"), "{text}");
    let (status, text) = token(&relay, Method::GET, "/api/admin/audit?per_page=500", None).await;
    assert_eq!(status, 200);
    assert_hidden("audit", &text);

    // Deletes are audited; a deleted account is gone.
    let user = relay.create_user("erin", 10_000).await;
    let (key_id, _) = relay.create_key(&user, json!({})).await;
    let (status, v) = relay
        .admin_delete(&format!("/api/admin/api-keys/{key_id}"))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = relay
        .admin_delete(&format!("/api/admin/api-keys/{key_id}"))
        .await;
    assert_eq!(status, 404);
    let (status, v) = relay.admin_delete(&path).await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = token(&relay, Method::GET, &path, None).await;
    assert_eq!(status, 404);
    let audit = relay.admin_get("/api/admin/audit?per_page=500").await;
    let actions = audit_actions(&audit);
    for action in [
        "account.create",
        "account.update",
        "account.delete",
        "user.create",
        "api_key.create",
        "api_key.delete",
    ] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} missing: {actions:?}"
        );
    }
    let entry = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "account.delete")
        .unwrap();
    assert_eq!(entry["target"], id.as_str());
    assert_eq!(entry["actor"], "admin-token");
}

#[tokio::test]
async fn price_rates_and_overrides_change_the_next_request_sqlite() {
    price_rates_and_overrides_change_the_next_request(Db::Sqlite).await;
}

#[tokio::test]
async fn price_rates_and_overrides_change_the_next_request_postgres() {
    let pg = PgDb::create().await;
    price_rates_and_overrides_change_the_next_request(Db::Postgres(pg.url.clone())).await;
}

/// A price list that schedules changes: the one in effect bills, the admin list shows what is
/// coming, and an override keeps its own prices through them.
#[tokio::test]
async fn scheduled_price_changes_bill_from_their_date_and_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pricing.toml");
    std::fs::write(
        &file,
        format!(
            "[models.\"{MODEL}\"]\ninput = 1000000\noutput = 2000000\n\n\
             [models.\"{MODEL}\".from.\"2020-01-01\"]\ninput = 3000000\noutput = 15000000\n\
             web_search = 10000\n\n\
             [models.\"{MODEL}\".from.\"2100-01-01\"]\ninput = 5000000\noutput = 25000000\n\
             web_search = 10000\n\
             [models.\"{MODEL}\".from.\"2100-01-01\".priority]\ninput = 10000000\n\
             output = 50000000\n"
        ),
    )
    .unwrap();
    let mock = MockUpstream::start().await;
    mock.set(|b| b.usage = MockUsage::io(1000, 1000));
    let relay = Relay::start_with(RelayOptions {
        env: vec![("RELAY_PRICING_FILE".into(), file.display().to_string())],
        ..RelayOptions::default()
    })
    .await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-upstream-a")
        .await;
    let user = relay.create_user("sam", 10_000).await;
    let (_, key) = relay.create_key(&user, json!({})).await;
    relay.wait_key_active(&key).await;

    // The 2020 prices: 1000×3 + 1000×15 = 18 000 (the dated id the mock reports finds them).
    let r = proxied_record(&relay, &key, "scheduled").await;
    assert_eq!(r["base_cost"], 18_000, "{r}");
    let listed = |prices: &Value| {
        prices["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["model"] == MODEL)
            .cloned()
            .unwrap()
    };
    let view = listed(&relay.admin_get("/api/admin/pricing").await);
    assert_eq!(
        (&view["input"], &view["output"]),
        (&json!(3_000_000), &json!(15_000_000)),
        "{view}"
    );
    assert_eq!(view["priority"], Value::Null, "{view}");
    // Only the change still to come, with the whole prices it brings.
    let changes = view["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{view}");
    assert_eq!(changes[0]["from_ms"], 4_102_444_800_000_i64, "{view}");
    assert_eq!(changes[0]["price"]["input"], 5_000_000, "{view}");
    assert_eq!(
        changes[0]["price"]["priority"]["input"], 10_000_000,
        "{view}"
    );

    // An override: its own prices hold through the change; the priority card it keeps from
    // the list still arrives with it.
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": MODEL, "input": 1_000_000, "output": 2_000_000}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["changes"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["changes"][0]["price"]["input"], 1_000_000, "{v}");
    assert_eq!(
        v["changes"][0]["price"]["priority"]["input"], 10_000_000,
        "{v}"
    );
    let r = proxied_record(&relay, &key, "overridden").await;
    assert_eq!(r["base_cost"], 3_000, "{r}");
    // Dropping the priority card leaves the change nothing to change: not listed.
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": MODEL, "input": 1_000_000, "output": 2_000_000, "priority": null}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["changes"], json!([]), "{v}");
    let view = listed(&relay.admin_get("/api/admin/pricing").await);
    assert_eq!(view["changes"], json!([]), "{view}");
}

#[tokio::test]
async fn scheduled_price_overrides_take_over_at_their_time_sqlite() {
    scheduled_price_overrides_take_over_at_their_time(Db::Sqlite).await;
}

#[tokio::test]
async fn scheduled_price_overrides_take_over_at_their_time_postgres() {
    let pg = PgDb::create().await;
    scheduled_price_overrides_take_over_at_their_time(Db::Postgres(pg.url.clone())).await;
}

/// An admin schedules an override ahead: the model keeps its price until then, the list shows
/// what is coming, a request after the time is billed at it; scheduled changes are cancelled
/// one by one, and refused without a future time or a price to change from.
async fn scheduled_price_overrides_take_over_at_their_time(db: Db) {
    let (_mock, relay) = priced_relay(db).await;
    let user = relay.create_user("sched", 10_000).await;
    let (_, key) = relay.create_key(&user, json!({})).await;
    relay.wait_key_active(&key).await;
    let view = |prices: &Value, model: &str| {
        prices["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["model"] == model)
            .cloned()
            .unwrap()
    };
    // A far one and a near one (whole seconds, a few ahead).
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": MODEL, "input": 9_000_000, "output": 9_000_000, "from": "2100-01-01"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["input"], 3_000_000, "the shipped price until then: {v}");
    assert_eq!(v["override"], false, "{v}");
    assert_eq!(v["scheduled"][0]["from_ms"], 4_102_444_800_000_i64, "{v}");
    assert_eq!(v["changes"][0]["price"]["input"], 9_000_000, "{v}");
    // Whole seconds a few ahead: (epoch s, as the API takes it).
    let near_time = |ahead_s: i64| {
        let at = relay_filters::now_ms() / 1_000 + ahead_s;
        let text = time::OffsetDateTime::from_unix_timestamp(at)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        (at, text)
    };
    let (near_s, near) = near_time(3);
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": MODEL, "input": 1_000_000, "output": 2_000_000, "from": near}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let scheduled: Vec<i64> = v["scheduled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["from_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(scheduled, [near_s * 1_000, 4_102_444_800_000]);
    // Before the near time: the shipped $3 / $15 (on a machine so slow that the request came
    // after it, the override's $1 / $2: the price of its time all the same).
    let r = proxied_record(&relay, &key, "before").await;
    let expected = if r["created_at"].as_i64().unwrap() < near_s * 1_000 {
        18_000
    } else {
        3_000
    };
    assert_eq!(r["base_cost"], expected, "{r}");
    // After it: $1 / $2, with no reload needed.
    while relay_filters::now_ms() < near_s * 1_000 + 100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = proxied_record(&relay, &key, "after").await;
    assert_eq!(r["base_cost"], 3_000, "{r}");
    let listed = view(&relay.admin_get("/api/admin/pricing").await, MODEL);
    assert_eq!(
        (&listed["input"], &listed["override"]),
        (&json!(1_000_000), &json!(true)),
        "{listed}"
    );
    assert_eq!(
        listed["scheduled"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );

    // Cancelling the far one; a time with nothing scheduled is not found.
    let path = format!("/api/admin/pricing/{MODEL}?from=4102444800000");
    let (status, v) = relay.admin_delete(&path).await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = relay.admin_delete(&path).await;
    assert_eq!(status, 404);
    let listed = view(&relay.admin_get("/api/admin/pricing").await, MODEL);
    assert_eq!(listed["scheduled"], json!([]), "{listed}");
    assert_eq!(listed["changes"], json!([]), "{listed}");

    // Setting the override now folds the scheduled one that has begun: the new one holds.
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": MODEL, "input": 2_000_000, "output": 2_000_000}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["input"], 2_000_000, "{v}");
    let r = proxied_record(&relay, &key, "standing").await;
    assert_eq!(r["base_cost"], 4_000, "{r}");

    // Removing the override in effect removes the scheduled one that has begun with it: the
    // shipped price applies again.
    let (begun_s, begun) = near_time(3);
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": MODEL, "input": 5_000_000, "output": 5_000_000, "from": begun}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    while relay_filters::now_ms() < begun_s * 1_000 + 100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let listed = view(&relay.admin_get("/api/admin/pricing").await, MODEL);
    assert_eq!(listed["input"], 5_000_000, "{listed}");
    let (status, v) = relay
        .admin_delete(&format!("/api/admin/pricing/{MODEL}"))
        .await;
    assert_eq!(status, 200, "{v}");
    let listed = view(&relay.admin_get("/api/admin/pricing").await, MODEL);
    assert_eq!(
        (&listed["input"], &listed["override"]),
        (&json!(3_000_000), &json!(false)),
        "{listed}"
    );
    let r = proxied_record(&relay, &key, "removed").await;
    assert_eq!(r["base_cost"], 18_000, "{r}");

    // A model the list does not price, scheduled: unpriced until its time.
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": "announced-model", "input": 1, "output": 1, "from": "2100-01-01"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["unpriced"], &v["input"]),
        (&json!(true), &json!(0)),
        "{v}"
    );
    assert_eq!(v["changes"][0]["price"]["input"], 1, "{v}");
    // Nor is such a model offered in the model list until then, as priced ones are.
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": "claude-announced-9", "input": 1, "output": 1, "from": "2100-01-01"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let listed: Value = relay
        .http
        .get(format!("{}/v1/models?limit=1000", relay.proxy))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(ids.contains(&MODEL), "{ids:?}");
    assert!(!ids.contains(&"claude-announced-9"), "{ids:?}");

    // Refused: a time gone by, and not a time.
    for (body, why) in [
        (
            json!({"model": MODEL, "input": 1, "output": 1, "from": "2020-01-01"}),
            "past",
        ),
        (
            json!({"model": MODEL, "input": 1, "output": 1, "from": "next week"}),
            "format",
        ),
    ] {
        let (status, v) = relay.admin_post("/api/admin/pricing", body).await;
        assert_eq!(status, 400, "{why}: {v}");
    }
    let audit = relay.admin_get("/api/admin/audit?per_page=100").await;
    assert!(
        audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "price.schedule"),
        "{audit}"
    );
}

/// A CSV text's rows, its quoted fields unquoted (RFC 4180).
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let (mut row, mut field) = (Vec::new(), String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(field.is_empty() && row.is_empty(), "the last line is ended");
    rows
}

/// Records exported as CSV: oldest first, every column an admin needs for a statement, names
/// made safe for a spreadsheet, filters applied; a user's own export without what only admins
/// see.
#[tokio::test]
async fn usage_records_export_as_csv() {
    let (_mock, relay) = priced_relay(Db::Sqlite).await;
    let frank = relay.create_user("frank", 15_000).await;
    let gina = relay.create_user("gina", 10_000).await;
    let (frank_key_id, frank_key) = relay
        .create_key(&frank, json!({"name": "=HYPERLINK(\"x\"), \"ops\""}))
        .await;
    let (_, gina_key) = relay.create_key(&gina, json!({})).await;
    relay.wait_key_active(&frank_key).await;
    relay.wait_key_active(&gina_key).await;
    let mut ids = Vec::new();
    for (key, topic) in [
        (&frank_key, "one"),
        (&gina_key, "two"),
        (&frank_key, "three"),
    ] {
        ids.push(
            proxied_record(&relay, key, topic).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }

    let export = |query: &str| {
        relay
            .http
            .get(format!(
                "{}/api/admin/usage/records.csv{query}",
                relay.admin
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    let r = export("").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    let text = r.text().await.unwrap();
    assert!(
        text.starts_with("created_at,"),
        "no byte order mark unless asked"
    );
    // For Excel: the same file after a UTF-8 byte order mark; a bad value is a 400.
    let bom = export("?bom=true").await.unwrap();
    assert_eq!(bom.status(), 200);
    let with_bom = bom.bytes().await.unwrap();
    assert_eq!(&with_bom[..3], b"\xEF\xBB\xBF");
    assert_eq!(&with_bom[3..], text.as_bytes());
    let bad = export("?bom=yes").await.unwrap();
    assert_eq!(bad.status(), 400);
    let refusal = bad.text().await.unwrap();
    assert!(refusal.contains("bom"), "{refusal}");
    let rows = csv_rows(&text);
    let header = &rows[0];
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    assert_eq!(rows.len(), 4, "{rows:?}");
    // Oldest first, every line as long as the header.
    let exported: Vec<&str> = rows[1..].iter().map(|r| r[col("id")].as_str()).collect();
    assert_eq!(exported, ids);
    assert!(rows.iter().all(|r| r.len() == header.len()));
    let first = &rows[1];
    assert_eq!(first[col("user_name")], "frank");
    assert_eq!(first[col("api_key_id")], frank_key_id);
    // The key's name, a formula once unquoted, is text for a spreadsheet.
    assert_eq!(first[col("api_key_name")], "'=HYPERLINK(\"x\"), \"ops\"");
    assert_eq!(first[col("account_name")], "claude-a");
    assert_eq!(first[col("upstream_model")], UPSTREAM_MODEL);
    // $3 / $15 on 1 000 in and out: 18 000 micro-USD, billed at frank's 1.5.
    assert_eq!(first[col("base_cost_micro_usd")], "18000");
    assert_eq!(first[col("price_rate")], "15000");
    assert_eq!(first[col("billed_cost_micro_usd")], "27000");
    assert_eq!(first[col("billed_cost_usd")], "0.027000");
    assert_eq!(first[col("input_tokens")], "1000");
    assert_eq!(first[col("stream")], "false");
    assert_eq!(first[col("status")], "200");
    let created = &first[col("created_at")];
    assert!(created.len() == 24 && created.ends_with('Z'), "{created}");
    assert_eq!(rows[2][col("user_name")], "gina");

    // Filters as the JSON list takes them.
    let (status, text) = relay
        .token_call(
            Some(ADMIN_TOKEN),
            Method::GET,
            &format!("/api/admin/usage/records.csv?user_id={gina}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let gina_rows = csv_rows(&text);
    assert_eq!(gina_rows.len(), 2);
    assert_eq!(gina_rows[1][col("id")], ids[1]);
    let (status, text) = relay
        .token_call(
            Some(ADMIN_TOKEN),
            Method::GET,
            "/api/admin/usage/records.csv?from=2100-01-01",
            None,
        )
        .await;
    assert_eq!(
        (status, csv_rows(&text).len()),
        (200, 1),
        "the header alone"
    );
    let (status, text) = relay
        .token_call(
            Some(ADMIN_TOKEN),
            Method::GET,
            "/api/admin/usage/records.csv?from=soon",
            None,
        )
        .await;
    assert_eq!(status, 400, "{text}");

    // A user's own export: their records, without the admins' columns.
    let session = relay.login("frank", "password-123").await;
    for path in ["/api/usage/records.csv", "/api/admin/usage/records.csv"] {
        let (status, text) = relay
            .session_call(&session, Method::GET, path, None, false)
            .await;
        assert_eq!(status, 200, "{path}: {text}");
        let own = csv_rows(&text);
        let own_col = |name: &str| own[0].iter().position(|h| h == name);
        for hidden in [
            "user_id",
            "account_name",
            "base_cost_micro_usd",
            "price_rate",
        ] {
            assert_eq!(own_col(hidden), None, "{path}: {hidden}");
        }
        let exported: Vec<&str> = own[1..]
            .iter()
            .map(|r| r[own_col("id").unwrap()].as_str())
            .collect();
        assert_eq!(exported, [ids[0].as_str(), ids[2].as_str()], "{path}");
        assert_eq!(own[1][own_col("billed_cost_usd").unwrap()], "0.027000");
    }
    let (status, _) = relay
        .session_call(
            &session,
            Method::GET,
            &format!("/api/usage/records.csv?user_id={gina}"),
            None,
            false,
        )
        .await;
    assert_eq!(
        status, 400,
        "another user's records are no filter of one's own"
    );

    // Past one batch (1 000 records): 2 400 records of one user, 1 200 at a time arriving in
    // the same millisecond, each exported once, in order.
    let url = format!("sqlite://{}", relay.data_dir.join("relay.db").display());
    let store = llm_relay::store::SqlStore::connect(&url, 2).await.unwrap();
    let bulk: Vec<_> = (0..2_400_i64)
        .map(|i| relay_filters::UsageRecord {
            id: format!("bulk-{i:05}"),
            created_at: 1_790_000_000_000 + (i / 1_200) * 60_000,
            user_id: Some("bulk-user".into()),
            protocol: "anthropic".into(),
            status: 200,
            billed_cost: i,
            ..Default::default()
        })
        .collect();
    for chunk in bulk.chunks(500) {
        store.insert_usage_batch(chunk).await.unwrap();
    }
    let (status, text) = relay
        .token_call(
            Some(ADMIN_TOKEN),
            Method::GET,
            "/api/admin/usage/records.csv?user_id=bulk-user",
            None,
        )
        .await;
    assert_eq!(status, 200);
    let rows = csv_rows(&text);
    let exported: Vec<&str> = rows[1..].iter().map(|r| r[col("id")].as_str()).collect();
    let expected: Vec<String> = (0..2_400).map(|i| format!("bulk-{i:05}")).collect();
    assert_eq!(exported, expected);
    assert_eq!(rows[2_400][col("billed_cost_micro_usd")], "2399");
}

/// A mock answering 1000 input and 1000 output tokens, and a relay with one account on it.
async fn priced_relay(db: Db) -> (MockUpstream, Relay) {
    let mock = MockUpstream::start().await;
    mock.set(|b| {
        b.usage = MockUsage::io(1000, 1000);
    });
    let relay = start(db).await;
    relay
        .create_account("claude-a", "claude", &mock.url(), "sk-ant-upstream-a")
        .await;
    (mock, relay)
}

async fn price_rates_and_overrides_change_the_next_request(db: Db) {
    let (_mock, relay) = priced_relay(db).await;
    let user = relay.create_user("frank", 10_000).await;
    let other = relay.create_user("gina", 10_000).await;
    let (key_id, key) = relay.create_key(&user, json!({})).await;
    relay.wait_key_active(&key).await;
    let mut records = Vec::new();

    // sonnet 4.5 at $3 / $15: 1000×3 + 1000×15 = 18000 micro-USD.
    let r = proxied_record(&relay, &key, "rate 1.0").await;
    assert_eq!(
        (r["base_cost"].as_i64(), r["billed_cost"].as_i64()),
        (Some(18_000), Some(18_000))
    );
    records.push(r);

    let (status, v) = relay
        .admin_post(
            "/api/admin/users/batch-price-rate",
            json!({"user_ids": [user, other], "price_rate": 15_000}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["updated"], 2);
    let r = proxied_record(&relay, &key, "rate 1.5").await;
    assert_eq!(r["base_cost"], 18_000, "{r}");
    assert_eq!(r["billed_cost"], 27_000, "{r}");
    assert_eq!(r["price_rate"], 15_000, "{r}");
    records.push(r);

    let (status, v) = relay
        .admin_post(
            "/api/admin/users/all-price-rate",
            json!({"price_rate": 20_000}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["updated"], 3, "admin, frank and gina");
    let (status, _) = relay
        .admin_post("/api/admin/users/all-price-rate", json!({"price_rate": -1}))
        .await;
    assert_eq!(status, 400);
    let r = proxied_record(&relay, &key, "rate 2.0").await;
    assert_eq!(r["billed_cost"], 36_000, "{r}");
    records.push(r);

    // An override of the reported model: $1 / $2 → 3000 base, 6000 billed at 2.0.
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": UPSTREAM_MODEL, "input": 1_000_000, "output": 2_000_000,
                   "cache_write_5m": null, "cache_write_1h": null, "cache_read": 100_000,
                   "web_search": 20_000}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["override"], true);
    assert_eq!(v["web_search"], 20_000, "{v}");
    let r = proxied_record(&relay, &key, "override").await;
    assert_eq!(r["base_cost"], 3_000, "{r}");
    assert_eq!(r["billed_cost"], 6_000, "{r}");
    records.push(r);

    let prices = relay.admin_get("/api/admin/pricing").await;
    let items = prices["items"].as_array().unwrap();
    let find = |m: &str| items.iter().find(|p| p["model"] == m).cloned();
    let over = find(UPSTREAM_MODEL).expect("override listed");
    assert_eq!(over["override"], true, "{over}");
    assert_eq!(over["input"], 1_000_000);
    assert_eq!(over["cache_read"], 100_000);
    assert_eq!(over["web_search"], 20_000);
    let shipped = find(MODEL).expect("shipped price listed");
    assert_eq!(shipped["override"], false, "{shipped}");
    assert_eq!(shipped["input"], 3_000_000);
    assert_eq!(shipped["web_search"], 10_000, "{shipped}");
    let gpt = find("gpt-5").expect("shipped price listed");
    assert_eq!(gpt["web_search"], Value::Null, "{gpt}");
    // An override naming token prices only keeps the model's shipped search price; 0 makes
    // the searches free.
    for (body, searches) in [
        (
            json!({"model": MODEL, "input": 3_000_000, "output": 15_000_000}),
            10_000,
        ),
        (
            json!({"model": MODEL, "input": 3_000_000, "output": 15_000_000, "web_search": 0}),
            0,
        ),
    ] {
        let (status, v) = relay.admin_post("/api/admin/pricing", body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["web_search"], searches, "{v}");
        let prices = relay.admin_get("/api/admin/pricing").await;
        let listed = prices["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["model"] == MODEL)
            .cloned()
            .expect("listed");
        assert_eq!(listed["web_search"], searches, "{listed}");
    }
    let (status, v) = relay
        .admin_delete(&format!("/api/admin/pricing/{MODEL}"))
        .await;
    assert_eq!(status, 200, "{v}");
    // Gemini 2.5 bills grounding once per grounded prompt: an override keeps that price unless
    // it names `web_search`, which then prices the searches alone.
    const GEMINI: &str = "gemini-2.5-pro";
    let listed_gemini = |prices: &Value| {
        prices["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["model"] == GEMINI)
            .cloned()
            .expect("listed")
    };
    let shipped = listed_gemini(&relay.admin_get("/api/admin/pricing").await);
    assert_eq!(
        (&shipped["web_search"], &shipped["web_search_request"]),
        (&Value::Null, &json!(35_000)),
        "{shipped}"
    );
    for (body, searches) in [
        (
            json!({"model": GEMINI, "input": 1_250_000, "output": 10_000_000}),
            (Value::Null, json!(35_000)),
        ),
        (
            json!({"model": GEMINI, "input": 1_250_000, "output": 10_000_000, "web_search": 14_000}),
            (json!(14_000), Value::Null),
        ),
    ] {
        let (status, v) = relay.admin_post("/api/admin/pricing", body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            (&v["web_search"], &v["web_search_request"]),
            (&searches.0, &searches.1),
            "{v}"
        );
        let listed = listed_gemini(&relay.admin_get("/api/admin/pricing").await);
        assert_eq!(
            (&listed["web_search"], &listed["web_search_request"]),
            (&searches.0, &searches.1),
            "{listed}"
        );
    }
    let (status, v) = relay
        .admin_delete(&format!("/api/admin/pricing/{GEMINI}"))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": "m", "input": -1, "output": 1}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": "m", "input": 1, "output": 1, "web_search": -1}),
        )
        .await;
    assert_eq!(status, 400);

    // Removing the override brings the shipped price back.
    let (status, v) = relay
        .admin_delete(&format!("/api/admin/pricing/{UPSTREAM_MODEL}"))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = relay
        .admin_delete(&format!("/api/admin/pricing/{UPSTREAM_MODEL}"))
        .await;
    assert_eq!(status, 404);
    let r = proxied_record(&relay, &key, "override removed").await;
    assert_eq!(r["base_cost"], 18_000, "{r}");
    assert_eq!(r["billed_cost"], 36_000, "{r}");
    records.push(r);

    // Keys with owner, request count and cost; the key's logs; the user's summary.
    let billed = sum(&records, "billed_cost");
    let base = sum(&records, "base_cost");
    let keys = relay.admin_get("/api/admin/api-keys").await;
    let entry = keys["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key_id.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["username"], "frank", "{entry}");
    assert_eq!(entry["requests"], 5, "{entry}");
    assert_eq!(entry["billed_cost"], billed, "{entry}");
    assert_eq!(entry["billed_cost_today"], billed, "{entry}");
    assert_eq!(entry["base_cost"], base, "{entry}");
    let logs = relay
        .admin_get(&format!("/api/admin/api-keys/{key_id}/logs?per_page=2"))
        .await;
    assert_eq!(logs["total"], 5, "{logs}");
    assert_eq!(logs["items"].as_array().unwrap().len(), 2);
    assert!(
        logs["items"][0].get("base_cost").is_some(),
        "admins see base cost"
    );
    for r in logs["items"].as_array().unwrap() {
        assert_eq!(
            (&r["user_name"], &r["api_key_name"]),
            (&json!("frank"), &entry["name"]),
            "{r}"
        );
        assert!(r["account_name"].is_string(), "{r}");
    }
    let summary = relay
        .admin_get(&format!("/api/admin/users/{user}/usage/summary"))
        .await;
    assert_eq!(summary["today"]["requests"], 5, "{summary}");
    assert_eq!(summary["today"]["billed_cost"], billed, "{summary}");
    assert_eq!(summary["all_time"]["base_cost"], base, "{summary}");
    assert_eq!(summary["price_rate"], 20_000);

    let audit = relay.admin_get("/api/admin/audit?per_page=500").await;
    let actions = audit_actions(&audit);
    for action in ["user.price_rate", "price.upsert", "price.delete"] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} missing: {actions:?}"
        );
    }
    assert_eq!(
        actions.iter().filter(|a| *a == "user.price_rate").count(),
        2,
        "the refused change is not audited: {actions:?}"
    );
}

#[tokio::test]
async fn a_request_id_the_client_repeats_is_booked_every_time() {
    let (_mock, relay) = priced_relay(Db::Sqlite).await;
    let user = relay.create_user("hugo", 10_000).await;
    let (key_id, key) = relay.create_key(&user, json!({})).await;
    relay.wait_key_active(&key).await;
    // A client (or a gateway before the relay) that sends the same x-request-id each time: every
    // request is served upstream and must be booked, the id echoed as sent, and each answer
    // names its own record.
    let mut relay_ids = Vec::new();
    for topic in ["one", "two", "three"] {
        let r = relay
            .post("/v1/messages", &key)
            .header("x-request-id", "fixed-id")
            .json(&messages_body(MODEL, false, conversation(topic, 1)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-request-id"], "fixed-id");
        relay_ids.push(
            r.headers()["x-relay-request-id"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        let _ = r.bytes().await.unwrap();
    }
    let records = relay.wait_records(3).await;
    assert_eq!(records.len(), 3, "{records:?}");
    let mut ids: Vec<&str> = records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        3,
        "each record has an id of its own: {records:?}"
    );
    assert!(!ids.contains(&"fixed-id"));
    relay_ids.sort_unstable();
    assert_eq!(ids, relay_ids);
    for r in &records {
        assert_eq!(r["request_id"], "fixed-id", "{r}");
        assert_eq!(r["billed_cost"], 18_000, "{r}");
    }
    let summary = relay
        .admin_get(&format!("/api/admin/users/{user}/usage/summary"))
        .await;
    assert_eq!(summary["today"]["requests"], 3, "{summary}");
    assert_eq!(summary["today"]["billed_cost"], 54_000, "{summary}");
    let logs = relay
        .admin_get(&format!("/api/admin/api-keys/{key_id}/logs"))
        .await;
    assert_eq!(logs["total"], 3, "{logs}");
    // An id that is not a plain token (it would forge fields of the access log line) is not
    // taken: the relay uses its own.
    let forged = r#"a account="other" status=200 cost=0"#;
    let r = relay
        .post("/v1/messages", &key)
        .header("x-request-id", forged)
        .json(&messages_body(MODEL, false, conversation("four", 1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let own = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(own, forged);
    assert!(
        own.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
        "{own}"
    );
}

#[tokio::test]
async fn operators_see_session_bindings_and_end_one() {
    let mock = MockUpstream::start().await;
    let relay = Relay::start().await;
    relay
        .create_account("claude-s", "claude", &mock.url(), "sk-ant-upstream-s")
        .await;
    let user = relay.create_user("sam", 10_000).await;
    let (key_id, key) = relay.create_key(&user, json!({"name": "sam-cli"})).await;
    relay.wait_key_active(&key).await;
    for topic in ["first", "second"] {
        proxied_record(&relay, &key, topic).await;
    }
    let page = relay.admin_get("/api/admin/sessions").await;
    assert_eq!(page["store"], "memory", "{page}");
    assert_eq!(page["next_cursor"], Value::Null);
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{page}");
    for s in items {
        assert_eq!(s["account_name"], "claude-s");
        assert_eq!(s["username"], "sam");
        assert_eq!(s["key_name"], "sam-cli (sam)");
        assert_eq!(s["api_key_id"], key_id.as_str());
        assert_eq!(s["request_count"], 1);
        assert!(s["expires_in_ms"].as_u64().unwrap() > 60_000, "{s}");
    }
    // Two pages of one.
    let first = relay.admin_get("/api/admin/sessions?limit=1").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    let second = relay
        .admin_get(&format!("/api/admin/sessions?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(second["next_cursor"], Value::Null);
    assert_ne!(
        first["items"][0]["session_key"],
        second["items"][0]["session_key"]
    );

    // Unbound: gone from the list, audited, and the conversation is scheduled afresh.
    let session_key = items[0]["session_key"].as_str().unwrap().to_string();
    let (status, v) = relay
        .admin_delete(&format!("/api/admin/sessions/{session_key}"))
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = relay
        .admin_delete(&format!("/api/admin/sessions/{session_key}"))
        .await;
    assert_eq!(status, 404);
    let page = relay.admin_get("/api/admin/sessions").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    let audit = relay.admin_get("/api/admin/audit?per_page=100").await;
    assert!(audit_actions(&audit).contains(&"session.unbind".to_string()));
    for bad in ["limit=0", "limit=501"] {
        let (status, text) = token(
            &relay,
            Method::GET,
            &format!("/api/admin/sessions?{bad}"),
            None,
        )
        .await;
        assert_eq!(status, 400, "{bad}: {text}");
    }
}

/// An rpm limit past what the limiter paces (one request a millisecond) is refused, when a key
/// is created and when it is changed.
#[tokio::test]
async fn rpm_limits_past_the_limiters_pace_are_refused() {
    let relay = Relay::start().await;
    let user_id = relay.create_user("dora", 10_000).await;
    let create = |rpm: i64| {
        let body = json!({"user_id": user_id, "name": "k", "rpm_limit": rpm});
        token(&relay, Method::POST, "/api/admin/api-keys", Some(body))
    };
    let (status, text) = create(60_001).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("rpm_limit is at most 60000"), "{text}");
    let (status, text) = create(60_000).await;
    assert_eq!(status, 201, "{text}");
    let id = parse(&text)["id"].as_str().unwrap().to_string();
    let path = format!("/api/admin/api-keys/{id}");
    let change = |rpm: Value| {
        token(
            &relay,
            Method::PATCH,
            &path,
            Some(json!({"rpm_limit": rpm})),
        )
    };
    let (status, text) = change(json!(120_000)).await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = change(Value::Null).await;
    assert_eq!(status, 200, "{text}");
    // 0 is neither "no limit" nor "blocked": refused, for the rate and the concurrency alike.
    let (status, text) = create(0).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("rpm_limit is at least 1"), "{text}");
    let (status, text) = change(json!(0)).await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = token(
        &relay,
        Method::PATCH,
        &path,
        Some(json!({"max_concurrency": 0})),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("max_concurrency is at least 1"), "{text}");
    let body = json!({"user_id": user_id, "name": "k0", "max_concurrency": 0});
    let (status, text) = token(&relay, Method::POST, "/api/admin/api-keys", Some(body)).await;
    assert_eq!(status, 400, "{text}");
    // A key that expired before it was made could never be used.
    let body = json!({"user_id": user_id, "name": "old", "expires_at": 1_577_836_800_000_i64});
    let (status, text) = token(&relay, Method::POST, "/api/admin/api-keys", Some(body)).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("expires_at is in the past"), "{text}");
}

/// A key's name and model patterns are bounded: every request is matched against the patterns
/// before any limit applies, and a tenant makes keys of its own.
#[tokio::test]
async fn key_names_and_model_patterns_are_bounded() {
    let relay = Relay::start().await;
    let user_id = relay.create_user("fay", 10_000).await;
    let create = |extra: Value| {
        let mut body = json!({"user_id": user_id, "name": "k"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        token(&relay, Method::POST, "/api/admin/api-keys", Some(body))
    };
    let many: Vec<String> = (0..65).map(|i| format!("model-{i}-*")).collect();
    let (status, text) = create(json!({"allowed_models": many})).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("at most 64"), "{text}");
    let (status, text) =
        create(json!({"allowed_models": [format!("*{}b", "a".repeat(128))]})).await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = create(json!({"allowed_models": [" "]})).await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = create(json!({"name": "n".repeat(129)})).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("at most 128 characters"), "{text}");
    let fits: Vec<String> = (0..64).map(|i| format!("claude-{i}-*")).collect();
    let (status, text) = create(json!({"name": "é".repeat(128), "allowed_models": fits})).await;
    assert_eq!(status, 201, "{text}");
    let id = parse(&text)["id"].as_str().unwrap().to_string();
    let (status, text) = token(
        &relay,
        Method::PATCH,
        &format!("/api/admin/api-keys/{id}"),
        Some(json!({"allowed_models": many})),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    // A tenant's own keys alike.
    let session = relay.login("fay", "password-123").await;
    let (status, text) = relay
        .session_call(
            &session,
            Method::POST,
            "/api/keys",
            Some(json!({"name": "mine", "allowed_models": many})),
            true,
        )
        .await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = relay
        .session_call(
            &session,
            Method::PATCH,
            &format!("/api/keys/{id}"),
            Some(json!({"name": "x".repeat(200)})),
            true,
        )
        .await;
    assert_eq!(status, 400, "{text}");
}

/// A user's cost limits over all its keys: set at creation or later, refused negative,
/// removed with `null`, audited.
#[tokio::test]
async fn user_cost_limits_are_set_checked_and_cleared() {
    let relay = Relay::start().await;
    let body = json!({"username": "erin", "password": "password-123", "daily_cost_limit": -1});
    let (status, text) = token(&relay, Method::POST, "/api/admin/users", Some(body)).await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("daily_cost_limit must not be negative"),
        "{text}"
    );
    let body =
        json!({"username": "erin", "password": "password-123", "daily_cost_limit": 5_000_000});
    let (status, text) = token(&relay, Method::POST, "/api/admin/users", Some(body)).await;
    assert_eq!(status, 201, "{text}");
    let user = parse(&text);
    assert_eq!(user["daily_cost_limit"], 5_000_000, "{user}");
    assert_eq!(user["total_cost_limit"], Value::Null, "{user}");
    let path = format!("/api/admin/users/{}", user["id"].as_str().unwrap());
    let (status, text) = token(
        &relay,
        Method::PATCH,
        &path,
        Some(json!({"total_cost_limit": -5, "enabled": false})),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    // Nothing of a refused change was written.
    let (_, text) = token(&relay, Method::GET, &path, None).await;
    assert_eq!(parse(&text)["enabled"], true, "{text}");
    let (status, text) = token(
        &relay,
        Method::PATCH,
        &path,
        Some(json!({"total_cost_limit": 20_000_000})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let changed = parse(&text);
    assert_eq!(
        changed["daily_cost_limit"], 5_000_000,
        "absent stays: {changed}"
    );
    assert_eq!(changed["total_cost_limit"], 20_000_000, "{changed}");
    let (status, text) = token(
        &relay,
        Method::PATCH,
        &path,
        Some(json!({"daily_cost_limit": null})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let changed = parse(&text);
    assert_eq!(changed["daily_cost_limit"], Value::Null, "{changed}");
    assert_eq!(changed["total_cost_limit"], 20_000_000, "{changed}");
    let audit = last_audit(&relay, "user.update").await;
    let detail = &audit;
    assert_eq!(detail["daily_cost_limit"], Value::Null, "{audit}");
    assert!(
        detail.get("daily_cost_limit").is_some() && detail.get("total_cost_limit").is_none(),
        "only the removed limit is named: {audit}"
    );
    // The monthly limit alike: refused negative, set, audited alone.
    let (status, text) = token(
        &relay,
        Method::PATCH,
        &path,
        Some(json!({"monthly_cost_limit": -1})),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("monthly_cost_limit must not be negative"),
        "{text}"
    );
    let (status, text) = token(
        &relay,
        Method::PATCH,
        &path,
        Some(json!({"monthly_cost_limit": 7_000_000})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let changed = parse(&text);
    assert_eq!(changed["monthly_cost_limit"], 7_000_000, "{changed}");
    assert_eq!(changed["total_cost_limit"], 20_000_000, "{changed}");
    let audit = last_audit(&relay, "user.update").await;
    assert_eq!(audit["monthly_cost_limit"], 7_000_000, "{audit}");
    assert!(audit.get("total_cost_limit").is_none(), "{audit}");
    let body = json!({"username": "fay", "password": "password-123", "monthly_cost_limit": 3});
    let (status, text) = token(&relay, Method::POST, "/api/admin/users", Some(body)).await;
    assert_eq!(status, 201, "{text}");
    assert_eq!(parse(&text)["monthly_cost_limit"], 3, "{text}");
}

/// Behind a TLS-terminating proxy the session cookie can be kept to HTTPS, on login and on the
/// logout that clears it.
#[tokio::test]
async fn the_session_cookie_is_secure_when_configured() {
    let relay = Relay::start_with(RelayOptions {
        env: vec![("RELAY_ADMIN_SECURE_COOKIE".into(), "true".into())],
        ..RelayOptions::default()
    })
    .await;
    let s = relay.login("admin", ADMIN_PASSWORD).await;
    let secure = |set_cookie: &str| {
        set_cookie
            .split(';')
            .any(|a| a.trim().eq_ignore_ascii_case("secure"))
    };
    assert!(secure(&s.set_cookie), "{}", s.set_cookie);
    let r = logout(&relay, &s, &[]).await;
    assert_eq!(r.status(), 200);
    let cleared = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cleared.contains("Max-Age=0") && secure(&cleared),
        "{cleared}"
    );
}

/// An account's fields are checked alike on creation and on change; a refused change leaves
/// the account as it was.
#[tokio::test]
async fn account_fields_are_checked_on_create_and_on_change() {
    let relay = Relay::start().await;
    let create = |extra: Value| {
        let mut body = json!({"name": "acct", "type": "claude", "credential": "sk-ant-api03-x"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        relay.admin_post("/api/admin/accounts", body)
    };
    let refused = [
        (
            json!({"max_concurrency": 0}),
            "max_concurrency is 1 to 100000",
        ),
        (
            json!({"max_concurrency": 4_294_967_296_i64}),
            "max_concurrency is 1 to 100000",
        ),
        (
            json!({"max_concurrency": 100_001}),
            "max_concurrency is 1 to 100000",
        ),
        (
            json!({"weight": 4_294_967_296_i64}),
            "weight is at most 10000",
        ),
        (json!({"weight": 10_001}), "weight is at most 10000"),
        (json!({"weight": 0}), "weight must be at least 1"),
        (
            json!({"models": ["claude-sonnet-4-5", " "]}),
            "models must not hold an empty name",
        ),
        (
            json!({"model_map": {" ": "claude-sonnet-4-5"}}),
            "model_map keys and values must not be empty",
        ),
        (
            json!({"model_map": {"sonnet": ""}}),
            "model_map keys and values must not be empty",
        ),
        (
            json!({"model_map": {"sonnet": "a", " sonnet ": "b"}}),
            "model_map has \"sonnet\" twice",
        ),
        (json!({"name": "  "}), "name is required"),
        (
            json!({"base_url": "https://api.example.com?x"}),
            "must not have a query",
        ),
        (
            json!({"base_url": "https://api.example.com/v1#top"}),
            "must not have a fragment",
        ),
        (
            json!({"base_url": "https://user:hunter2@api.example.com"}),
            "must not carry user info",
        ),
        (
            json!({"base_url": "https://api.example .com"}),
            "must not contain spaces",
        ),
    ];
    for (extra, says) in &refused {
        let (status, v) = create(extra.clone()).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{extra}: {v}"
        );
        assert!(!v.to_string().contains("hunter2"), "{v}");
    }

    // Accepted: trimmed as stored.
    let (status, v) = create(json!({
        "name": " acct ", "base_url": " https://api.example.com/v1 ",
        "models": [" claude-sonnet-4-5 "], "model_map": {" sonnet ": " claude-sonnet-4-5 "},
        "max_concurrency": 100_000, "weight": 10_000,
    }))
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["name"], "acct");
    assert_eq!(v["base_url"], "https://api.example.com/v1");
    assert_eq!(v["models"], json!(["claude-sonnet-4-5"]));
    assert_eq!(v["model_map"], json!({"sonnet": "claude-sonnet-4-5"}));
    let id = v["id"].as_str().unwrap().to_string();
    let before = relay.admin_get(&format!("/api/admin/accounts/{id}")).await;

    for (extra, says) in &refused {
        let (status, v) = relay.patch_account(&id, extra.clone()).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{extra}: {v}"
        );
    }
    assert_eq!(
        relay.admin_get(&format!("/api/admin/accounts/{id}")).await,
        before
    );

    // A rename is trimmed; an empty base URL, like null, is the type's default.
    let (status, v) = relay
        .patch_account(
            &id,
            json!({"name": " renamed ", "base_url": " ", "max_concurrency": null}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["name"], &v["base_url"], &v["max_concurrency"]),
        (&json!("renamed"), &Value::Null, &Value::Null)
    );
}

/// The ChatGPT account id of an `openai-responses` account is set on creation, changed and
/// removed later, and checked alike.
#[tokio::test]
async fn the_chatgpt_account_id_can_be_changed_and_removed() {
    let relay = Relay::start().await;
    let (status, v) = relay
        .admin_post(
            "/api/admin/accounts",
            json!({"name": "codex", "type": "openai-responses", "credential": "eyJhbGciOi.x.y", "chatgpt_account_id": " "}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let id = relay
        .create_account_with(json!({
            "name": "codex", "type": "openai-responses", "credential": "eyJhbGciOi.x.y",
            "chatgpt_account_id": " acct-1 ",
        }))
        .await;
    let path = format!("/api/admin/accounts/{id}");
    assert_eq!(
        relay.admin_get(&path).await["extra"],
        json!({"chatgpt_account_id": "acct-1"})
    );
    for bad in [json!(""), json!("acct 2"), json!("acct-\u{e9}")] {
        let (status, v) = relay
            .patch_account(&id, json!({"chatgpt_account_id": bad}))
            .await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("chatgpt_account_id"),
            "{v}"
        );
    }
    let (status, v) = relay
        .patch_account(&id, json!({"chatgpt_account_id": "acct-2"}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["extra"], json!({"chatgpt_account_id": "acct-2"}));
    // Other changes leave it; null removes it.
    let (_, v) = relay.patch_account(&id, json!({"priority": 3})).await;
    assert_eq!(v["extra"], json!({"chatgpt_account_id": "acct-2"}));
    let (status, v) = relay
        .patch_account(&id, json!({"chatgpt_account_id": null}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["extra"], json!({}));
    let audit = relay.admin_get("/api/admin/audit?per_page=500").await;
    assert!(!audit.to_string().contains("eyJhbGciOi"), "{audit}");
}

/// The detail of the newest audit entry with `action`.
/// A price override keeps the shipped long-prompt card when it names none, drops it with
/// `null`, sets its own otherwise; each as listed, answered and audited; the service tiers'
/// cards alike. Bad cards are refused.
#[tokio::test]
async fn price_overrides_keep_set_or_drop_the_long_context_card() {
    let relay = Relay::start().await;
    const HAIKU: &str = "claude-haiku-5-5";
    let shipped = json!({"above_tokens": 100_000, "input": 500_000, "output": 2_500_000,
                         "cache_write_5m": 625_000, "cache_write_1h": 1_000_000,
                         "cache_read": 50_000});
    let listed = |prices: &Value| {
        prices["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["model"] == HAIKU)
            .cloned()
            .expect("listed")
    };
    let view = listed(&relay.admin_get("/api/admin/pricing").await);
    assert_eq!(view["override"], false, "{view}");
    assert_eq!(view["long_context"], shipped, "{view}");
    assert_eq!(view["shipped_long_context"], shipped, "{view}");
    let own = json!({"above_tokens": 50_000, "input": 400_000, "output": 2_000_000});
    // (body's long_context, as sent; the card that applies; the audit's long_context)
    let cases = [
        (None, shipped.clone(), None),
        (Some(Value::Null), Value::Null, Some(Value::Null)),
        (Some(own.clone()), own.clone(), Some(own.clone())),
    ];
    for (sent, applies, audited) in cases {
        let mut body = json!({"model": HAIKU, "input": 80_000, "output": 400_000});
        if let Some(card) = &sent {
            body["long_context"] = card.clone();
        }
        let (status, v) = relay.admin_post("/api/admin/pricing", body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["long_context"], applies, "{sent:?}: {v}");
        assert_eq!(v["shipped_long_context"], shipped, "{v}");
        let view = listed(&relay.admin_get("/api/admin/pricing").await);
        assert_eq!(view["override"], true, "{view}");
        assert_eq!(view["input"], 80_000, "{view}");
        assert_eq!(view["long_context"], applies, "{sent:?}: {view}");
        let detail = last_audit(&relay, "price.upsert").await;
        assert_eq!(detail.get("long_context"), audited.as_ref(), "{detail}");
    }
    for (card, why) in [
        (
            json!({"above_tokens": 0, "input": 1, "output": 1}),
            "threshold 0",
        ),
        (
            json!({"above_tokens": 1_000_000_000_001u64, "input": 1, "output": 1}),
            "threshold over the token cap",
        ),
        (
            json!({"above_tokens": 10, "input": -1, "output": 1}),
            "negative price",
        ),
        (json!({"above_tokens": 10, "input": 1}), "no output price"),
        (
            json!({"above_tokens": 10, "input": 1, "output": 1, "web_search": 1}),
            "unknown field",
        ),
        (
            json!({"above_tokens": 10, "input": 1, "output": 1,
                   "priority": {"input": 1, "output": -1}}),
            "negative price in its priority card",
        ),
        (
            json!({"above_tokens": 10, "input": 1, "output": 1,
                   "flex": {"input": 1, "output": 1, "above_tokens": 5}}),
            "a threshold in its flex card",
        ),
    ] {
        let (status, v) = relay
            .admin_post(
                "/api/admin/pricing",
                json!({"model": HAIKU, "input": 1, "output": 1, "long_context": card}),
            )
            .await;
        assert_eq!(status, 400, "{why}: {v}");
    }
    // The refused cards changed nothing.
    let view = listed(&relay.admin_get("/api/admin/pricing").await);
    assert_eq!(view["long_context"], own, "{view}");
    // The service tiers' cards take the same three forms; a card with an unknown field or no
    // output price is refused.
    let priority = json!({"input": 200_000, "output": 1_000_000, "cache_read": 20_000});
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": HAIKU, "input": 80_000, "output": 400_000,
                   "long_context": own, "priority": priority, "flex": null}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["priority"], &v["flex"]),
        (&priority, &Value::Null),
        "{v}"
    );
    let detail = last_audit(&relay, "price.upsert").await;
    assert_eq!(detail["priority"], priority, "{detail}");
    assert_eq!(detail.get("flex"), Some(&Value::Null), "{detail}");
    for card in [
        json!({"input": 1}),
        json!({"input": 1, "output": 1, "above_tokens": 5}),
        json!({"input": 1, "output": -1}),
    ] {
        let (status, v) = relay
            .admin_post(
                "/api/admin/pricing",
                json!({"model": HAIKU, "input": 1, "output": 1, "flex": card}),
            )
            .await;
        assert_eq!(status, 400, "{card}: {v}");
    }
    let view = listed(&relay.admin_get("/api/admin/pricing").await);
    assert_eq!(view["priority"], priority, "{view}");
    // A long card may carry its own cards for long prompts at a tier; they are kept as sent.
    let long_tiers = json!({"above_tokens": 50_000, "input": 400_000, "output": 2_000_000,
        "priority": {"input": 800_000, "output": 4_000_000},
        "flex": {"input": 200_000, "output": 1_000_000, "cache_read": 20_000}});
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": HAIKU, "input": 80_000, "output": 400_000,
                   "long_context": long_tiers, "priority": priority}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["long_context"], long_tiers, "{v}");
    let view = listed(&relay.admin_get("/api/admin/pricing").await);
    assert_eq!(view["long_context"], long_tiers, "{view}");
    assert_eq!(
        last_audit(&relay, "price.upsert").await["long_context"],
        long_tiers
    );
    // A tier an override drops is dropped for long prompts too: GPT-5.6's shipped long card
    // keeps its flex card, not its priority one.
    let (status, v) = relay
        .admin_post(
            "/api/admin/pricing",
            json!({"model": "gpt-5.6", "input": 5_000_000, "output": 30_000_000,
                   "priority": null}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["priority"], Value::Null, "{v}");
    assert_eq!(v["long_context"]["above_tokens"], 272_000, "{v}");
    assert_eq!(v["long_context"].get("priority"), None, "{v}");
    assert_eq!(v["long_context"]["flex"]["input"], 5_000_000, "{v}");
    assert_eq!(
        v["shipped_long_context"]["priority"]["input"], 20_000_000,
        "{v}"
    );
    // Without the override, the shipped card again.
    let (status, v) = relay
        .admin_delete(&format!("/api/admin/pricing/{HAIKU}"))
        .await;
    assert_eq!(status, 200, "{v}");
    let view = listed(&relay.admin_get("/api/admin/pricing").await);
    assert_eq!(view["long_context"], shipped, "{view}");
}

async fn last_audit(relay: &Relay, action: &str) -> Value {
    let audit = relay.admin_get("/api/admin/audit?per_page=500").await;
    audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == action)
        .unwrap_or_else(|| panic!("no {action}: {audit}"))["detail"]
        .clone()
}

/// A change of an account is audited field by field, old → new, with its secrets only
/// flagged as changed; saving a secret the account has already is no change.
#[tokio::test]
async fn account_changes_are_audited_from_old_to_new_without_secrets() {
    let relay = Relay::start().await;
    let (credential, refresh) = (
        "sk-ant-oat01-first-access-token-0123456789",
        "sk-ant-ort01-first-refresh-token-0123456789",
    );
    let id = relay
        .create_account_with(json!({
            "name": "audited", "type": "claude-official", "base_url": "https://api.example.com",
            "credential": credential, "refresh_token": refresh,
        }))
        .await;
    assert_eq!(
        last_audit(&relay, "account.create").await,
        json!({"name": "audited", "type": "claude-official", "base_url": "https://api.example.com"})
    );

    let (status, v) = relay
        .patch_account(
            &id,
            json!({
                "name": "audited-2", "base_url": null, "priority": 7, "weight": 3,
                "max_concurrency": 4, "models": ["claude-sonnet-4-5"],
                "model_map": {"sonnet": "claude-sonnet-4-5"}, "enabled": false,
                "status": "error", "token_expires_at": 1_900_000_000_000_i64,
                "credential": "sk-ant-oat01-second-access-token-0123456789",
                "refresh_token": "sk-ant-ort01-second-refresh-token-0123456789",
            }),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        last_audit(&relay, "account.update").await,
        json!({
            "name": "audited-2",
            "changes": {
                "name": {"from": "audited", "to": "audited-2"},
                "base_url": {"from": "https://api.example.com", "to": null},
                "priority": {"from": 50, "to": 7},
                "weight": {"from": 1, "to": 3},
                "max_concurrency": {"from": null, "to": 4},
                "models": {"from": [], "to": ["claude-sonnet-4-5"]},
                "model_map": {"from": {}, "to": {"sonnet": "claude-sonnet-4-5"}},
                "enabled": {"from": true, "to": false},
                "status": {"from": "valid", "to": "error"},
                "token_expires_at": {"from": null, "to": 1_900_000_000_000_i64},
            },
            "credential_changed": true,
            "refresh_token_changed": true,
        })
    );

    // The same secrets again, and a type change that removes the refresh token.
    let (status, v) = relay
        .patch_account(
            &id,
            json!({"credential": "sk-ant-oat01-second-access-token-0123456789",
                   "refresh_token": "sk-ant-ort01-second-refresh-token-0123456789"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        last_audit(&relay, "account.update").await,
        json!({"name": "audited-2", "changes": {}, "credential_changed": false, "refresh_token_changed": false})
    );
    let (status, v) = relay
        .patch_account(&id, json!({"type": "claude", "refresh_token": null}))
        .await;
    assert_eq!(status, 200, "{v}");
    let detail = last_audit(&relay, "account.update").await;
    assert_eq!(
        detail["changes"],
        json!({
            "type": {"from": "claude-official", "to": "claude"},
            "has_refresh_token": {"from": true, "to": false},
        })
    );
    assert_eq!(detail["refresh_token_changed"], true);

    let audit = relay
        .admin_get("/api/admin/audit?per_page=500")
        .await
        .to_string();
    for secret in [
        "first-access",
        "first-refresh",
        "second-access",
        "second-refresh",
    ] {
        assert!(
            !audit.contains(secret),
            "{secret} in the audit log: {audit}"
        );
    }
}

/// With `metrics_token` set, `/metrics` (which names accounts and shows all traffic) answers
/// only a bearer of it or of the admin token.
#[tokio::test]
async fn metrics_can_ask_for_a_token() {
    let relay = Relay::start_with(RelayOptions {
        env: vec![(
            "RELAY_METRICS_TOKEN".into(),
            "metrics-token-0123456789".into(),
        )],
        ..Default::default()
    })
    .await;
    let scrape = |token: Option<&'static str>| {
        let mut r = relay.http.get(format!("{}/metrics", relay.admin));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap() }
    };
    let r = scrape(None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert!(!r.text().await.unwrap().contains("relay_"));
    assert_eq!(scrape(Some("metrics-token-wrong-012")).await.status(), 401);
    let r = scrape(Some("metrics-token-0123456789")).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("relay_usage_queue_depth"));
    assert_eq!(scrape(Some(ADMIN_TOKEN)).await.status(), 200);
}
