//! Integration tests of the SQL store against real databases: every test body runs once on a
//! SQLite file in a temp dir and once on a throwaway PostgreSQL database.
//!
//! PostgreSQL: `postgres://postgres@127.0.0.1:5432/postgres` (override with `RELAY_TEST_PG_URL`)
//! must accept `CREATE DATABASE`; each test creates `relay_test_<uuid>` and drops it afterwards.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use llm_relay::secrets::{api_key_hash, api_key_prefix, generate_api_key, SecretBox};
use llm_relay::store::{
    AccountPatch, AccountStatus, ApiKeyPatch, CardChoice, CardChoices, LongContextPrice,
    ModelPrice, NewAccount, NewApiKey, NewUser, RecordFilter, RefreshedTokens, Role, Spend,
    SqlStore, StoreError, TierPrice, UsageDim, UsageTotals,
};
use relay_filters::cost::ServiceTier;
use relay_filters::key_limits::Spent;
use relay_filters::{AccountType, TokenUsage, UsageRecord};
use secrecy::ExposeSecret;
use sqlx::{Connection, Executor, Row};

/// Which database a test body runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// What a test body gets: a migrated store and the backend it sits on.
#[derive(Clone)]
struct Env {
    store: SqlStore,
    backend: Backend,
}

fn pg_admin_url() -> String {
    std::env::var("RELAY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `postgres://.../postgres?x` with the database name replaced.
fn with_database(admin_url: &str, db: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let (server, _) = base.rsplit_once('/').expect("admin URL has a path");
    match query {
        Some(q) => format!("{server}/{db}?{q}"),
        None => format!("{server}/{db}"),
    }
}

/// Opens a fresh, migrated store on `backend`, runs `body`, then drops the database (even when
/// the body panicked) and re-raises the body's panic.
async fn run<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = ()>,
{
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, pg_db) = match backend {
        Backend::Sqlite => {
            let path = dir.path().join("nested/relay.db");
            (format!("sqlite://{}", path.display()), None)
        }
        Backend::Postgres => {
            let admin = pg_admin_url();
            let db = format!("relay_test_{}", uuid::Uuid::now_v7().simple());
            let mut conn = sqlx::AnyConnection::connect(&admin)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is required: {e}"));
            conn.execute(format!("CREATE DATABASE {db}").as_str())
                .await
                .expect("create test database");
            conn.close().await.ok();
            (with_database(&admin, &db), Some((admin, db)))
        }
    };
    let store = SqlStore::connect(&url, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    let outcome = AssertUnwindSafe(body(Env {
        store: store.clone(),
        backend,
    }))
    .catch_unwind()
    .await;
    store.close().await;
    if let Some((admin, db)) = pg_db {
        if let Ok(mut conn) = sqlx::AnyConnection::connect(&admin).await {
            let _ = conn
                .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
                .await;
            conn.close().await.ok();
        }
    }
    drop(dir);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Declares `mod $name { sqlite, postgres }` running the async fn `$name(Env)` on each backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::run(super::Backend::Sqlite, super::$name).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::run(super::Backend::Postgres, super::$name).await;
            }
        }
    )*};
}

on_both_backends!(
    migrations_apply_twice,
    a_database_a_newer_version_migrated_still_opens,
    users_crud,
    api_keys_lifecycle,
    api_key_cap_holds_under_concurrency,
    accounts_with_encrypted_credentials,
    oauth_tokens_are_stored_only_over_the_refresh_token_they_came_from,
    usage_batches_roll_up_exactly,
    usage_records_filter_and_paginate,
    old_usage_records_are_pruned_and_their_totals_kept,
    limit_spend_counts_the_day_its_month_and_all_time,
    prices_settings_audit_and_sessions,
);

fn new_user(name: &str) -> NewUser {
    NewUser {
        username: name.to_owned(),
        password_hash: format!("$argon2id$fake${name}"),
        role: Role::User,
        price_rate: 10_000,
        daily_cost_limit: None,
        monthly_cost_limit: None,
        total_cost_limit: None,
        allowed_platforms: Vec::new(),
        allowed_models: Vec::new(),
    }
}

fn new_key(user_id: &str, name: &str) -> (String, NewApiKey) {
    let key = generate_api_key();
    let new = NewApiKey {
        user_id: user_id.to_owned(),
        name: name.to_owned(),
        key_hash: api_key_hash(b"test-pepper", &key),
        key_prefix: api_key_prefix(&key),
        ..NewApiKey::default()
    };
    (key, new)
}

// ---------------------------------------------------------------------------------------------

async fn migrations_apply_twice(env: Env) {
    let store = env.store;
    assert_eq!(store.is_postgres(), env.backend == Backend::Postgres);
    store.ping().await.unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let applied: i64 = sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
    assert_eq!(applied, i64::try_from(files).unwrap());
    assert_eq!(store.count_users().await.unwrap(), 0);
    assert_eq!(store.count_records().await.unwrap(), 0);
    if env.backend == Backend::Sqlite {
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = sqlx::query("PRAGMA foreign_keys")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(fk, 1);
    }
}

async fn a_database_a_newer_version_migrated_still_opens(env: Env) {
    let store = env.store;
    // A newer node applied a migration this version does not know.
    let checksum = match env.backend {
        Backend::Sqlite => "X'00'",
        Backend::Postgres => "'\\x00'::bytea",
    };
    sqlx::query(&format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (29991231000001, 'from a newer version', TRUE, {checksum}, 1)"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
    assert_eq!(store.count_users().await.unwrap(), 0);
}

async fn users_crud(env: Env) {
    let store = env.store;
    let marker0 = store.change_marker().await.unwrap();
    let alice = store
        .create_user(&NewUser {
            role: Role::Admin,
            price_rate: 12_500,
            ..new_user("alice")
        })
        .await
        .unwrap();
    assert_eq!(alice.username, "alice");
    assert_eq!(alice.role, Role::Admin);
    assert_eq!(alice.price_rate, 12_500);
    assert!(alice.enabled);
    assert_eq!(alice.id.len(), 36);

    let marker1 = store.change_marker().await.unwrap();
    assert_ne!(marker0, marker1);
    assert_eq!(marker1.users.rows, 1);

    let dup = store.create_user(&new_user("alice")).await;
    assert!(
        matches!(dup, Err(StoreError::Conflict(ref m)) if m.contains("alice")),
        "{dup:?}"
    );
    assert!(matches!(
        store.create_user(&new_user("  ")).await,
        Err(StoreError::Invalid(_))
    ));

    let bob = store.create_user(&new_user("bob")).await.unwrap();
    let carol = store.create_user(&new_user("carol")).await.unwrap();
    assert_eq!(store.count_users().await.unwrap(), 3);

    assert_eq!(store.user_by_id(&bob.id).await.unwrap(), Some(bob.clone()));
    let by_name = store.user_by_username("carol").await.unwrap().unwrap();
    assert_eq!(by_name.id, carol.id);
    assert_eq!(by_name.password_hash, "$argon2id$fake$carol");
    assert_eq!(store.user_by_username("dave").await.unwrap(), None);
    assert_eq!(store.user_by_id("missing").await.unwrap(), None);

    let page1 = store.list_users(1, 2).await.unwrap();
    assert_eq!(page1.total, 3);
    assert_eq!((page1.page, page1.per_page), (1, 2));
    let names: Vec<_> = page1.items.iter().map(|u| u.username.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    let page2 = store.list_users(2, 2).await.unwrap();
    assert_eq!(page2.items.len(), 1);
    assert_eq!(page2.items[0].username, "carol");

    // The password hash is never serialized.
    let json = serde_json::to_value(&page1.items[0]).unwrap();
    assert!(json.get("password_hash").is_none());
    assert_eq!(json["role"], "admin");
    assert_eq!(json["enabled"], true);

    store
        .set_user_password(&bob.id, "$argon2id$new")
        .await
        .unwrap();
    store.set_user_enabled(&bob.id, false).await.unwrap();
    let bob2 = store.user_by_id(&bob.id).await.unwrap().unwrap();
    assert_eq!(bob2.password_hash, "$argon2id$new");
    assert!(!bob2.enabled);
    assert!(bob2.updated_at > bob.updated_at);

    let marker2 = store.change_marker().await.unwrap();
    assert_ne!(marker1, marker2);

    let n = store
        .set_price_rate(&[bob.id.clone(), carol.id.clone(), "missing".into()], 8_000)
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        store.user_by_id(&bob.id).await.unwrap().unwrap().price_rate,
        8_000
    );
    assert_eq!(
        store
            .user_by_id(&carol.id)
            .await
            .unwrap()
            .unwrap()
            .price_rate,
        8_000
    );
    assert_eq!(
        store
            .user_by_id(&alice.id)
            .await
            .unwrap()
            .unwrap()
            .price_rate,
        12_500
    );
    assert!(matches!(
        store
            .set_price_rate(std::slice::from_ref(&bob.id), -1)
            .await,
        Err(StoreError::Invalid(_))
    ));

    store.set_user_role(&carol.id, Role::Admin).await.unwrap();
    assert_eq!(
        store.user_by_id(&carol.id).await.unwrap().unwrap().role,
        Role::Admin
    );

    assert!(matches!(
        store.set_user_enabled("missing", true).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.set_user_password("missing", "x").await,
        Err(StoreError::NotFound)
    ));

    store.delete_user(&carol.id).await.unwrap();
    assert_eq!(store.count_users().await.unwrap(), 2);
    assert!(matches!(
        store.delete_user(&carol.id).await,
        Err(StoreError::NotFound)
    ));
}

async fn api_keys_lifecycle(env: Env) {
    let store = env.store;
    let alice = store.create_user(&new_user("alice")).await.unwrap();
    let bob = store.create_user(&new_user("bob")).await.unwrap();

    let (key, mut new) = new_key(&alice.id, "laptop");
    new.allowed_platforms = vec!["claude".into()];
    new.allowed_models = vec!["claude-sonnet-*".into(), "claude-opus-4".into()];
    new.rpm_limit = Some(60);
    new.daily_cost_limit = Some(5_000_000);
    let marker0 = store.change_marker().await.unwrap();
    let created = store.create_api_key(&new, 10).await.unwrap();
    assert_eq!(created.user_id, alice.id);
    assert_eq!(created.username, "alice");
    assert_eq!(created.name, "laptop");
    assert_eq!(created.key_prefix, format!("{}…", &key[..12]));
    assert!(created.enabled);
    assert_eq!(created.allowed_platforms, ["claude"]);
    assert_eq!(created.allowed_models, ["claude-sonnet-*", "claude-opus-4"]);
    assert_eq!(created.rpm_limit, Some(60));
    assert_eq!(created.max_concurrency, None);
    assert_eq!(created.daily_cost_limit, Some(5_000_000));
    assert_eq!(created.total_cost_limit, None);
    assert_eq!(created.last_used_at, None);
    assert_ne!(
        store.change_marker().await.unwrap().api_keys,
        marker0.api_keys
    );

    let found = store
        .api_key_by_hash(&api_key_hash(b"test-pepper", &key))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, created);
    assert_eq!(
        store
            .api_key_by_hash(&api_key_hash(b"other-pepper", &key))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.api_key_by_id(&created.id).await.unwrap(),
        Some(created.clone())
    );
    let json = serde_json::to_value(&created).unwrap();
    assert!(json.get("key_hash").is_none());
    assert_eq!(json["username"], "alice");

    // Same hash twice is a conflict.
    assert!(matches!(
        store.create_api_key(&new, 10).await,
        Err(StoreError::Conflict(_))
    ));
    // Unknown owner.
    let (_, orphan) = new_key("missing", "x");
    assert!(matches!(
        store.create_api_key(&orphan, 10).await,
        Err(StoreError::NotFound)
    ));

    // The cap: alice may hold 10 keys; the 11th is refused with a clear message.
    for i in 1..10 {
        let (_, k) = new_key(&alice.id, &format!("key-{i}"));
        store.create_api_key(&k, 10).await.unwrap();
    }
    let (_, eleventh) = new_key(&alice.id, "key-10");
    match store.create_api_key(&eleventh, 10).await {
        Err(StoreError::Invalid(msg)) => {
            assert_eq!(msg, "this user already owns 10 API keys, the maximum is 10");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // Bob is not affected by alice's cap.
    let (_, bob_key) = new_key(&bob.id, "bob-key");
    let bob_key = store.create_api_key(&bob_key, 10).await.unwrap();

    let all = store.list_api_keys(None, 1, 100).await.unwrap();
    assert_eq!(all.total, 11);
    assert_eq!(all.items[0].id, bob_key.id, "newest first");
    assert_eq!(all.items[0].username, "bob");
    let alices = store.list_api_keys(Some(&alice.id), 2, 4).await.unwrap();
    assert_eq!(alices.total, 10);
    assert_eq!(alices.items.len(), 4);
    assert!(alices.items.iter().all(|k| k.username == "alice"));
    let names: Vec<_> = alices.items.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["key-5", "key-4", "key-3", "key-2"]);

    // Update, then disable.
    let marker1 = store.change_marker().await.unwrap();
    let updated = store
        .update_api_key(
            &created.id,
            &ApiKeyPatch {
                name: Some("desktop".into()),
                rpm_limit: Some(None),
                max_concurrency: Some(Some(4)),
                allowed_models: Some(vec![]),
                ..ApiKeyPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.name, "desktop");
    assert_eq!(updated.rpm_limit, None);
    assert_eq!(updated.max_concurrency, Some(4));
    assert!(updated.allowed_models.is_empty());
    assert_eq!(updated.allowed_platforms, ["claude"]);
    assert_eq!(updated.daily_cost_limit, Some(5_000_000));
    assert!(updated.updated_at > created.updated_at);
    let marker2 = store.change_marker().await.unwrap();
    assert_ne!(marker1, marker2);

    let active = store.load_api_keys_with_users().await.unwrap();
    assert_eq!(active.len(), 11);
    let entry = active.iter().find(|a| a.key.id == created.id).unwrap();
    assert!(entry.user_enabled);
    assert_eq!(entry.user_price_rate, 10_000);
    assert_eq!(entry.key.username, "alice");
    assert_eq!(entry.key.key_hash, created.key_hash);

    let disabled = store
        .update_api_key(
            &created.id,
            &ApiKeyPatch {
                enabled: Some(false),
                ..ApiKeyPatch::default()
            },
        )
        .await
        .unwrap();
    assert!(!disabled.enabled);
    let expired_id = alices.items[0].id.clone();
    store
        .update_api_key(
            &expired_id,
            &ApiKeyPatch {
                expires_at: Some(Some(1_000)),
                ..ApiKeyPatch::default()
            },
        )
        .await
        .unwrap();
    store.set_user_enabled(&bob.id, false).await.unwrap();
    store
        .set_price_rate(std::slice::from_ref(&alice.id), 15_000)
        .await
        .unwrap();
    let active = store.load_api_keys_with_users().await.unwrap();
    assert_eq!(
        active.len(),
        11,
        "disabled and expired keys stay, with their state"
    );
    let find = |id: &str| active.iter().find(|a| a.key.id == id).unwrap();
    assert!(!find(&created.id).key.enabled);
    assert_eq!(find(&expired_id).key.expires_at, Some(1_000));
    let bobs = active.iter().find(|a| a.key.id == bob_key.id).unwrap();
    assert!(!bobs.user_enabled);
    assert!(active
        .iter()
        .filter(|a| a.key.user_id == alice.id)
        .all(|a| a.user_price_rate == 15_000));

    assert!(matches!(
        store
            .update_api_key(
                "missing",
                &ApiKeyPatch {
                    enabled: Some(true),
                    ..ApiKeyPatch::default()
                }
            )
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .update_api_key(
                &created.id,
                &ApiKeyPatch {
                    rpm_limit: Some(Some(-5)),
                    ..ApiKeyPatch::default()
                }
            )
            .await,
        Err(StoreError::Invalid(_))
    ));

    // Deleting frees a slot under the cap.
    let marker3 = store.change_marker().await.unwrap();
    store.delete_api_key(&created.id).await.unwrap();
    assert_ne!(store.change_marker().await.unwrap(), marker3);
    assert_eq!(store.api_key_by_id(&created.id).await.unwrap(), None);
    store.create_api_key(&eleventh, 10).await.unwrap();
    assert!(matches!(
        store.delete_api_key(&created.id).await,
        Err(StoreError::NotFound)
    ));
}

async fn api_key_cap_holds_under_concurrency(env: Env) {
    let store = env.store;
    let user = store.create_user(&new_user("racer")).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            let (_, k) = new_key(&user.id, &format!("k{i}"));
            tokio::spawn(async move { store.create_api_key(&k, 10).await })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Invalid(_)) => refused += 1,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert_eq!((ok, refused), (10, 6));
    let page = store.list_api_keys(Some(&user.id), 1, 50).await.unwrap();
    assert_eq!(page.total, 10);
}

async fn accounts_with_encrypted_credentials(env: Env) {
    let store = env.store;
    let secrets = SecretBox::new("k1".into(), [42; 32]);
    let mut new = NewAccount::new(
        "claude-main",
        AccountType::ClaudeOfficial,
        secrets.encrypt("sk-ant-oat01-secret"),
        secrets.key_id().to_owned(),
    );
    new.refresh_token_enc = Some(secrets.encrypt("sk-ant-ort01-refresh"));
    new.models = vec!["claude-sonnet-4-5".into()];
    new.model_map = BTreeMap::from([("sonnet".into(), "claude-sonnet-4-5".into())]);
    new.max_concurrency = Some(8);
    new.priority = 10;
    let main = store.create_account(&new).await.unwrap();
    assert_eq!(main.name, "claude-main");
    assert_eq!(main.account_type, AccountType::ClaudeOfficial);
    assert_eq!(main.priority, 10);
    assert_eq!(main.weight, 1);
    assert_eq!(main.status, AccountStatus::Valid);
    assert!(main.enabled);
    assert!(main.has_refresh_token);
    assert_eq!(main.consecutive_error_count, 0);
    assert_eq!(main.extra, serde_json::json!({}));

    let mut gpt = NewAccount::new(
        "codex",
        AccountType::OpenaiResponses,
        secrets.encrypt("eyJhbGciOi.jwt"),
        "k1".into(),
    );
    gpt.extra = serde_json::json!({"chatgpt_account_id": "acc-123"});
    gpt.base_url = Some("https://chatgpt.com/backend-api/codex".into());
    let codex = store.create_account(&gpt).await.unwrap();
    assert!(!codex.has_refresh_token);

    let dup = store.create_account(&new).await;
    assert!(
        matches!(dup, Err(StoreError::Conflict(ref m)) if m.contains("claude-main")),
        "{dup:?}"
    );
    let mut bad = gpt.clone();
    bad.name = "bad".into();
    bad.extra = serde_json::json!([1]);
    assert!(matches!(
        store.create_account(&bad).await,
        Err(StoreError::Invalid(_))
    ));

    let page = store.list_accounts(1, 10).await.unwrap();
    assert_eq!(page.total, 2);
    let names: Vec<_> = page.items.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["claude-main", "codex"]);

    // Credentials come back encrypted and decrypt to the original; JSON never shows them.
    let loaded = store.load_accounts().await.unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded[0].id, main.id, "lowest priority number first");
    assert_eq!(
        secrets
            .decrypt(&loaded[0].credential_enc)
            .unwrap()
            .expose_secret(),
        "sk-ant-oat01-secret"
    );
    assert_eq!(
        secrets
            .decrypt(loaded[0].refresh_token_enc.as_deref().unwrap())
            .unwrap()
            .expose_secret(),
        "sk-ant-ort01-refresh"
    );
    assert_eq!(
        secrets
            .decrypt(&loaded[1].credential_enc)
            .unwrap()
            .expose_secret(),
        "eyJhbGciOi.jwt"
    );
    assert_eq!(loaded[1].extra["chatgpt_account_id"], "acc-123");
    assert_eq!(loaded[0].models, ["claude-sonnet-4-5"]);
    assert_eq!(loaded[0].model_map["sonnet"], "claude-sonnet-4-5");
    let json = serde_json::to_string(&loaded).unwrap();
    assert!(!json.contains("credential_enc") && !json.contains("refresh_token_enc"));
    assert!(!json.contains(&loaded[0].credential_enc));
    assert!(json.contains("\"account_type\":\"claude-official\""));

    // Patch: rotate the credential, change priority, clear the concurrency cap.
    let marker = store.change_marker().await.unwrap();
    let rotated = store
        .update_account(
            &main.id,
            &AccountPatch {
                credential: Some((secrets.encrypt("sk-ant-oat01-new"), "k1".into())),
                priority: Some(60),
                max_concurrency: Some(None),
                refresh_token_enc: Some(None),
                ..AccountPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(rotated.priority, 60);
    assert_eq!(rotated.max_concurrency, None);
    assert!(!rotated.has_refresh_token);
    assert_eq!(
        secrets
            .decrypt(&rotated.credential_enc)
            .unwrap()
            .expose_secret(),
        "sk-ant-oat01-new"
    );
    assert_eq!(
        rotated.models,
        ["claude-sonnet-4-5"],
        "untouched fields stay"
    );
    assert_ne!(
        store.change_marker().await.unwrap().accounts,
        marker.accounts
    );
    assert!(matches!(
        store
            .update_account(
                &codex.id,
                &AccountPatch {
                    name: Some("claude-main".into()),
                    ..AccountPatch::default()
                }
            )
            .await,
        Err(StoreError::Conflict(_))
    ));

    // Health state.
    store
        .record_account_state(
            &codex.id,
            AccountStatus::Error,
            5,
            Some(1_900_000_000_000),
            None,
        )
        .await
        .unwrap();
    let state = store.account_by_id(&codex.id).await.unwrap().unwrap();
    assert_eq!(state.status, AccountStatus::Error);
    assert_eq!(state.consecutive_error_count, 5);
    assert_eq!(state.cooldown_until, Some(1_900_000_000_000));
    store
        .record_account_state(&codex.id, AccountStatus::Valid, 0, None, None)
        .await
        .unwrap();
    let state = store.account_by_id(&codex.id).await.unwrap().unwrap();
    assert_eq!(state.status, AccountStatus::Valid);
    assert_eq!(state.cooldown_until, None);
    assert!(matches!(
        store
            .record_account_state("missing", AccountStatus::Valid, 0, None, None)
            .await,
        Err(StoreError::NotFound)
    ));

    // A cooldown is stored alone: a later one wins, status and count stay.
    store
        .record_account_state(&codex.id, AccountStatus::Error, 3, None, None)
        .await
        .unwrap();
    let before = store.account_by_id(&codex.id).await.unwrap().unwrap();
    let seen = relay_filters::now_ms();
    store
        .record_account_cooldown(&codex.id, 1_900_000_000_000, seen)
        .await
        .unwrap();
    store
        .record_account_cooldown(&codex.id, 1_800_000_000_000, seen)
        .await
        .unwrap();
    let state = store.account_by_id(&codex.id).await.unwrap().unwrap();
    assert_eq!(
        (
            state.status,
            state.consecutive_error_count,
            state.cooldown_until
        ),
        (AccountStatus::Error, 3, Some(1_900_000_000_000))
    );
    assert!(
        state.updated_at > before.updated_at,
        "other nodes notice it"
    );
    // An operator's clear ends the cooldown alone and moves `cooldown_cleared_at` forward,
    // also for two clears within one millisecond; a later cooldown is stored over it as usual.
    let clear = AccountPatch {
        clear_cooldown: true,
        ..AccountPatch::default()
    };
    let first = store.update_account(&codex.id, &clear).await.unwrap();
    let second = store.update_account(&codex.id, &clear).await.unwrap();
    assert_eq!(
        (
            first.status,
            first.consecutive_error_count,
            first.cooldown_until
        ),
        (AccountStatus::Error, 3, None)
    );
    let (a, b) = (
        first.cooldown_cleared_at.unwrap(),
        second.cooldown_cleared_at.unwrap(),
    );
    assert!(b > a, "the second clear at {b}, the first at {a}");
    // A cooldown the proxy saw before the clear, whose write comes after it, is not stored:
    // the operator's word was the later one.
    for seen_before in [a, b] {
        store
            .record_account_cooldown(&codex.id, 1_900_000_000_000, seen_before)
            .await
            .unwrap();
        let state = store.account_by_id(&codex.id).await.unwrap().unwrap();
        assert_eq!(state.cooldown_until, None, "seen at {seen_before}");
    }
    store
        .record_account_cooldown(&codex.id, 1_900_000_000_000, b + 1)
        .await
        .unwrap();
    let state = store.account_by_id(&codex.id).await.unwrap().unwrap();
    assert_eq!(
        (state.cooldown_until, state.cooldown_cleared_at),
        (Some(1_900_000_000_000), Some(b))
    );
    // Likewise a status observed by requests sent before an operator set the status or
    // replaced the credential (they carry the account's `status_set_at` as they had it): auth
    // errors of a revoked key do not take the account out again, a success does not undo the
    // operator's status. Only requests on the operator's account are stored.
    let seen = store
        .account_by_id(&codex.id)
        .await
        .unwrap()
        .unwrap()
        .status_set_at;
    assert_eq!(seen, None, "no operator's word yet");
    let set_valid = store
        .update_account(
            &codex.id,
            &AccountPatch {
                status: Some(AccountStatus::Valid),
                ..AccountPatch::default()
            },
        )
        .await
        .unwrap();
    let set_at = set_valid.status_set_at;
    assert!(set_at.is_some());
    assert!(!store
        .record_account_state(&codex.id, AccountStatus::Error, 5, None, seen)
        .await
        .unwrap());
    let state = store.account_by_id(&codex.id).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.cooldown_until),
        (AccountStatus::Valid, Some(1_900_000_000_000)),
        "nothing of the refused write"
    );
    let new_key = store
        .update_account(
            &codex.id,
            &AccountPatch {
                credential: Some(("ciphertext-2".into(), "key-1".into())),
                ..AccountPatch::default()
            },
        )
        .await
        .unwrap();
    let replaced_at = new_key.status_set_at;
    assert!(replaced_at > set_at, "{replaced_at:?} after {set_at:?}");
    // The old key's requests, however late they answer.
    assert!(!store
        .record_account_state(&codex.id, AccountStatus::Error, 5, None, set_at)
        .await
        .unwrap());
    // The new key's.
    assert!(store
        .record_account_state(&codex.id, AccountStatus::Error, 5, None, replaced_at)
        .await
        .unwrap());
    let error_patch = AccountPatch {
        status: Some(AccountStatus::Error),
        ..AccountPatch::default()
    };
    let set_error = store.update_account(&codex.id, &error_patch).await.unwrap();
    store
        .record_account_recovered(&codex.id, replaced_at)
        .await
        .unwrap();
    let state = store.account_by_id(&codex.id).await.unwrap().unwrap();
    assert_eq!(
        state.status,
        AccountStatus::Error,
        "the operator's status stands"
    );
    store
        .record_account_recovered(&codex.id, set_error.status_set_at)
        .await
        .unwrap();
    let state = store.account_by_id(&codex.id).await.unwrap().unwrap();
    assert_eq!(
        (
            state.status,
            state.consecutive_error_count,
            state.cooldown_until
        ),
        (AccountStatus::Valid, 0, None)
    );
    // Back to the state below.
    store
        .record_account_state(
            &codex.id,
            AccountStatus::Error,
            3,
            None,
            set_error.status_set_at,
        )
        .await
        .unwrap();
    store
        .record_account_cooldown(
            &codex.id,
            1_900_000_000_000,
            relay_filters::now_ms() + 1_000,
        )
        .await
        .unwrap();
    // A health check's state is stored only over the status it was decided on, never over
    // `blocked`, and leaves the cooldown.
    assert!(!store
        .record_health_state(
            &codex.id,
            (AccountStatus::Valid, 3, set_error.status_set_at),
            AccountStatus::Error,
            4
        )
        .await
        .unwrap());
    assert!(!store
        .record_health_state(
            &codex.id,
            (AccountStatus::Error, 2, set_error.status_set_at),
            AccountStatus::Valid,
            0
        )
        .await
        .unwrap());
    // Nor by a check that ran on the account before the operator's last change.
    assert!(!store
        .record_health_state(
            &codex.id,
            (AccountStatus::Error, 3, replaced_at),
            AccountStatus::Valid,
            0
        )
        .await
        .unwrap());
    assert!(store
        .record_health_state(
            &codex.id,
            (AccountStatus::Error, 3, set_error.status_set_at),
            AccountStatus::Valid,
            0
        )
        .await
        .unwrap());
    let state = store.account_by_id(&codex.id).await.unwrap().unwrap();
    assert_eq!(
        (
            state.status,
            state.consecutive_error_count,
            state.cooldown_until
        ),
        (AccountStatus::Valid, 0, Some(1_900_000_000_000))
    );
    store
        .record_account_state(
            &codex.id,
            AccountStatus::Blocked,
            0,
            None,
            set_error.status_set_at,
        )
        .await
        .unwrap();
    assert!(!store
        .record_health_state(
            &codex.id,
            (AccountStatus::Blocked, 0, set_error.status_set_at),
            AccountStatus::Valid,
            0
        )
        .await
        .unwrap());
    assert_eq!(
        store
            .account_by_id(&codex.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        AccountStatus::Blocked
    );

    store.delete_account(&codex.id).await.unwrap();
    assert_eq!(store.account_by_id(&codex.id).await.unwrap(), None);
    assert_eq!(store.load_accounts().await.unwrap().len(), 1);
}

async fn oauth_tokens_are_stored_only_over_the_refresh_token_they_came_from(env: Env) {
    let store = env.store;
    let secrets = SecretBox::new("k1".into(), [42; 32]);
    let mut new = NewAccount::new(
        "claude-oauth",
        AccountType::ClaudeOfficial,
        secrets.encrypt("sk-ant-oat01-first"),
        secrets.key_id().to_owned(),
    );
    let first_refresh = secrets.encrypt("sk-ant-ort01-first");
    new.refresh_token_enc = Some(first_refresh.clone());
    new.token_expires_at = Some(1_800_000_000_000);
    let account = store.create_account(&new).await.unwrap();
    assert_eq!(account.token_expires_at, Some(1_800_000_000_000));
    assert_eq!(
        (
            account.token_refreshed_at,
            account.token_refresh_error.as_deref(),
            account.token_refresh_refused
        ),
        (None, None, false)
    );

    // A failure is stored over the refresh token it was met with, not over another.
    assert!(!store
        .record_token_refresh_failure(&account.id, "v1:k1:other", "HTTP 400", true)
        .await
        .unwrap());
    assert!(store
        .record_token_refresh_failure(&account.id, &first_refresh, "HTTP 400: invalid_grant", true)
        .await
        .unwrap());
    let refused = store.account_by_id(&account.id).await.unwrap().unwrap();
    assert!(refused.token_refresh_refused);
    assert_eq!(
        refused.token_refresh_error.as_deref(),
        Some("HTTP 400: invalid_grant")
    );
    assert_eq!(
        refused.updated_at, account.updated_at,
        "no cache reload for it"
    );
    // A later failure of another kind keeps the refusal and its reason (a dead token stays
    // dead).
    assert!(store
        .record_token_refresh_failure(&account.id, &first_refresh, "HTTP 503", false)
        .await
        .unwrap());
    let still = store.account_by_id(&account.id).await.unwrap().unwrap();
    assert!(still.token_refresh_refused);
    assert_eq!(
        still.token_refresh_error.as_deref(),
        Some("HTTP 400: invalid_grant")
    );

    // One refresh at a time holds the lease, over the refresh token it starts from; it ends
    // with the refresh's result, or expires.
    let now = 1_800_000_000_000;
    assert!(!store
        .lease_token_refresh(&account.id, "v1:k1:other", now, now + 60_000)
        .await
        .unwrap());
    assert!(store
        .lease_token_refresh(&account.id, &first_refresh, now, now + 60_000)
        .await
        .unwrap());
    assert!(!store
        .lease_token_refresh(&account.id, &first_refresh, now + 59_000, now + 119_000)
        .await
        .unwrap());
    assert!(store
        .lease_token_refresh(&account.id, &first_refresh, now + 61_000, now + 121_000)
        .await
        .unwrap());
    assert!(store
        .record_token_refresh_failure(&account.id, &first_refresh, "HTTP 400: invalid_grant", true)
        .await
        .unwrap());
    assert!(store
        .lease_token_refresh(&account.id, &first_refresh, now + 62_000, now + 122_000)
        .await
        .unwrap());

    // Errors took the account out; new tokens from the refresh they started put it back (the
    // errors were the old token's) and clear the refusal.
    store
        .record_account_state(&account.id, AccountStatus::Error, 5, None, None)
        .await
        .unwrap();
    let tokens = RefreshedTokens {
        credential_enc: secrets.encrypt("sk-ant-oat01-second"),
        credential_key_id: "k1".into(),
        refresh_token_enc: secrets.encrypt("sk-ant-ort01-second"),
        expires_at: Some(1_900_000_000_000),
    };
    assert!(!store
        .store_refreshed_token(&account.id, "v1:k1:stale", &tokens, Some((5, None)))
        .await
        .unwrap());
    assert!(store
        .store_refreshed_token(&account.id, &first_refresh, &tokens, Some((5, None)))
        .await
        .unwrap());
    let fresh = store.account_by_id(&account.id).await.unwrap().unwrap();
    assert_eq!(
        secrets
            .decrypt(&fresh.credential_enc)
            .unwrap()
            .expose_secret(),
        "sk-ant-oat01-second"
    );
    assert_eq!(
        fresh.refresh_token_enc.as_deref(),
        Some(tokens.refresh_token_enc.as_str())
    );
    assert_eq!(fresh.token_expires_at, Some(1_900_000_000_000));
    assert!(fresh.token_refreshed_at.is_some());
    assert_eq!(
        (fresh.token_refresh_error, fresh.token_refresh_refused),
        (None, false)
    );
    assert_eq!(
        (fresh.status, fresh.consecutive_error_count),
        (AccountStatus::Valid, 0)
    );
    // The refresh that started from the first token is overtaken: a second store of it fails.
    assert!(!store
        .store_refreshed_token(&account.id, &first_refresh, &tokens, None)
        .await
        .unwrap());

    // Any other refresh leaves an account in error as it is: put there by an operator or a
    // health check, or by errors that went on counting since the refresh began.
    let mut held = tokens.refresh_token_enc.clone();
    for (errors, put_back) in [(0, None), (3, None), (6, Some((5, None)))] {
        store
            .record_account_state(&account.id, AccountStatus::Error, errors, None, None)
            .await
            .unwrap();
        let next = RefreshedTokens {
            refresh_token_enc: secrets.encrypt("sk-ant-ort01-next"),
            ..tokens.clone()
        };
        assert!(store
            .store_refreshed_token(&account.id, &held, &next, put_back)
            .await
            .unwrap());
        held = next.refresh_token_enc;
        let after = store.account_by_id(&account.id).await.unwrap().unwrap();
        assert_eq!(
            (after.status, after.consecutive_error_count),
            (AccountStatus::Error, errors),
            "{errors} errors, put back after {put_back:?}"
        );
    }
    // A valid account's errors in a row were the old token's: the count clears.
    store
        .record_account_state(&account.id, AccountStatus::Valid, 2, None, None)
        .await
        .unwrap();
    let next = RefreshedTokens {
        refresh_token_enc: secrets.encrypt("sk-ant-ort01-after-valid"),
        ..tokens.clone()
    };
    assert!(store
        .store_refreshed_token(&account.id, &held, &next, None)
        .await
        .unwrap());
    let after = store.account_by_id(&account.id).await.unwrap().unwrap();
    assert_eq!(
        (after.status, after.consecutive_error_count),
        (AccountStatus::Valid, 0)
    );
    let tokens = RefreshedTokens {
        refresh_token_enc: next.refresh_token_enc.clone(),
        ..tokens
    };

    // A blocked account stays blocked; an operator's new refresh token clears a refusal.
    store
        .record_account_state(&account.id, AccountStatus::Blocked, 0, None, None)
        .await
        .unwrap();
    let second = tokens.refresh_token_enc.clone();
    let third = RefreshedTokens {
        refresh_token_enc: secrets.encrypt("sk-ant-ort01-third"),
        ..tokens
    };
    assert!(store
        .store_refreshed_token(&account.id, &second, &third, Some((0, None)))
        .await
        .unwrap());
    assert!(store
        .record_token_refresh_failure(&account.id, &third.refresh_token_enc, "HTTP 401", true)
        .await
        .unwrap());
    let blocked = store.account_by_id(&account.id).await.unwrap().unwrap();
    assert_eq!(blocked.status, AccountStatus::Blocked);
    assert!(blocked.token_refresh_refused);
    let patched = store
        .update_account(
            &account.id,
            &AccountPatch {
                refresh_token_enc: Some(Some(secrets.encrypt("sk-ant-ort01-operator"))),
                token_expires_at: Some(None),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            patched.token_refresh_refused,
            patched.token_refresh_error,
            patched.token_expires_at
        ),
        (false, None, None)
    );

    // A refresh that auth errors started puts the account back only if no operator set its
    // status since: one who set it in error (with the very count the errors left) keeps it so.
    let set_error = store
        .update_account(
            &account.id,
            &AccountPatch {
                status: Some(AccountStatus::Error),
                consecutive_error_count: Some(4),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let held = store
        .account_by_id(&account.id)
        .await
        .unwrap()
        .unwrap()
        .refresh_token_enc
        .unwrap();
    let next = RefreshedTokens {
        refresh_token_enc: secrets.encrypt("sk-ant-ort01-after-operator"),
        credential_enc: secrets.encrypt("sk-ant-oat01-after-operator"),
        credential_key_id: "k1".into(),
        expires_at: None,
    };
    assert!(store
        .store_refreshed_token(&account.id, &held, &next, Some((4, patched.status_set_at)))
        .await
        .unwrap());
    let after = store.account_by_id(&account.id).await.unwrap().unwrap();
    assert_eq!(
        (after.status, after.consecutive_error_count),
        (AccountStatus::Error, 4),
        "set at {:?}, the refresh began at {:?}",
        set_error.status_set_at,
        patched.status_set_at
    );
    // Begun after the operator's word: put back.
    let last = RefreshedTokens {
        refresh_token_enc: secrets.encrypt("sk-ant-ort01-last"),
        ..next.clone()
    };
    assert!(store
        .store_refreshed_token(
            &account.id,
            &next.refresh_token_enc,
            &last,
            Some((4, set_error.status_set_at))
        )
        .await
        .unwrap());
    let after = store.account_by_id(&account.id).await.unwrap().unwrap();
    assert_eq!(
        (after.status, after.consecutive_error_count),
        (AccountStatus::Valid, 0)
    );
}

/// 2026-11-20T00:00:00Z in epoch ms.
const DAY0: i64 = 1_795_132_800_000;
const HOUR: i64 = 3_600_000;

#[allow(clippy::too_many_arguments)]
fn record(
    id: &str,
    at: i64,
    user: &str,
    key: &str,
    account: &str,
    model: &str,
    input: u64,
    output: u64,
    cost: i64,
) -> UsageRecord {
    UsageRecord {
        id: id.to_owned(),
        request_id: None,
        created_at: at,
        user_id: Some(user.to_owned()),
        api_key_id: Some(key.to_owned()),
        account_id: Some(account.to_owned()),
        session_key: Some(format!("{key}:anthropic:0123456789abcdef")),
        protocol: "anthropic".into(),
        requested_model: Some(model.to_owned()),
        upstream_model: Some(model.to_owned()),
        stream: true,
        status: 200,
        usage: TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cache_write_5m_tokens: 10,
            cache_write_1h_tokens: 5,
            cache_read_tokens: 100,
            reasoning_tokens: 1,
            web_search_requests: 3,
        },
        base_cost: cost,
        billed_cost: cost * 2,
        price_rate: 20_000,
        latency_ms: 1_234,
        ttfb_ms: Some(321),
        failover_count: 1,
        error_type: None,
        unpriced: false,
        estimated: false,
        service_tier: Some(ServiceTier::Priority),
        upstream_request_id: Some(format!("req_{id}")),
        response_id: Some(format!("msg_{id}")),
        passes: Some(format!(
            r#"[{{"model":"advisor-{id}","input_tokens":5,"output_tokens":2,"cache_write_5m_tokens":0,"cache_write_1h_tokens":0,"cache_read_tokens":0}}]"#
        )),
    }
}

fn totals(requests: i64, input: i64, output: i64, base: i64) -> UsageTotals {
    UsageTotals {
        requests,
        input_tokens: input,
        output_tokens: output,
        cache_write_tokens: 15 * requests,
        cache_read_tokens: 100 * requests,
        base_cost: base,
        billed_cost: base * 2,
    }
}

async fn usage_batches_roll_up_exactly(env: Env) {
    let store = env.store;
    let user = store.create_user(&new_user("u")).await.unwrap();
    let (_, k) = new_key(&user.id, "k");
    let key = store.create_api_key(&k, 10).await.unwrap();
    let account = store
        .create_account(&NewAccount::new(
            "acc",
            AccountType::Claude,
            "v1:k1:AAAA".into(),
            "k1".into(),
        ))
        .await
        .unwrap();
    let (u, kid, a) = (user.id.as_str(), key.id.as_str(), account.id.as_str());

    let batch1 = vec![
        record(
            "r1",
            DAY0 + HOUR,
            u,
            kid,
            a,
            "claude-sonnet-4-5",
            100,
            50,
            1_000,
        ),
        record(
            "r2",
            DAY0 + 2 * HOUR,
            u,
            kid,
            a,
            "claude-sonnet-4-5",
            200,
            70,
            3_000,
        ),
        UsageRecord {
            // The client sent an x-request-id of its own.
            request_id: Some("client-chosen".into()),
            ..record(
                "r3",
                DAY0 + 25 * HOUR,
                u,
                kid,
                a,
                "claude-opus-4",
                300,
                90,
                9_000,
            )
        },
    ];
    let marker = store.change_marker().await.unwrap();
    store.insert_usage_batch(&batch1).await.unwrap();
    // The writer replays batch 1 (say after a timeout whose commit did go through) with a
    // new record, and one id twice: only r4 counts.
    let r4 = record(
        "r4",
        DAY0 + 3 * HOUR,
        u,
        kid,
        a,
        "claude-opus-4",
        1_000,
        400,
        20_000,
    );
    let mut batch2 = batch1.clone();
    batch2.push(r4.clone());
    batch2.push(r4.clone());
    store.insert_usage_batch(&batch2).await.unwrap();
    store.insert_usage_batch(&[]).await.unwrap();

    assert_eq!(store.count_records().await.unwrap(), 4);

    let day0 = "2026-11-20";
    let day1 = "2026-11-21";
    let rows = store
        .usage_daily(UsageDim::User, Some(u), day0, day1)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].day, day0);
    assert_eq!(rows[0].dim, "user");
    assert_eq!(rows[0].dim_id, u);
    assert_eq!(rows[0].requests, 3);
    assert_eq!(rows[0].input_tokens, 1_300);
    assert_eq!(rows[0].output_tokens, 520);
    assert_eq!(rows[0].cache_write_tokens, 45);
    assert_eq!(rows[0].cache_read_tokens, 300);
    assert_eq!(rows[0].base_cost, 24_000);
    assert_eq!(rows[0].billed_cost, 48_000);
    assert_eq!(rows[1].day, day1);
    assert_eq!(rows[1].requests, 1);
    assert_eq!(rows[1].input_tokens, 300);
    assert_eq!(rows[1].base_cost, 9_000);

    for (dim, id) in [(UsageDim::Key, kid), (UsageDim::Account, a)] {
        let t = store.usage_totals(dim, Some(id), None, None).await.unwrap();
        assert_eq!(t, totals(4, 1_600, 610, 33_000), "{dim:?}");
    }
    let by_model = store
        .usage_daily(UsageDim::Model, None, day0, day0)
        .await
        .unwrap();
    let got: Vec<_> = by_model
        .iter()
        .map(|r| (r.dim_id.as_str(), r.requests, r.input_tokens, r.base_cost))
        .collect();
    assert_eq!(
        got,
        [
            ("claude-opus-4", 1, 1_000, 20_000),
            ("claude-sonnet-4-5", 2, 300, 4_000)
        ]
    );
    assert_eq!(
        store
            .usage_totals(
                UsageDim::Model,
                Some("claude-opus-4"),
                Some(day0),
                Some(day1)
            )
            .await
            .unwrap(),
        totals(2, 1_300, 490, 29_000)
    );
    assert_eq!(
        store
            .usage_totals(UsageDim::User, Some(u), Some(day1), None)
            .await
            .unwrap(),
        totals(1, 300, 90, 9_000)
    );
    assert_eq!(
        store
            .usage_totals(UsageDim::User, Some("nobody"), None, None)
            .await
            .unwrap(),
        UsageTotals::default()
    );
    assert!(matches!(
        store
            .usage_daily(UsageDim::User, None, "2026-11", day1)
            .await,
        Err(StoreError::Invalid(_))
    ));

    // A record without upstream model rolls up under the requested model; missing ids skip.
    let mut anon = record("r5", DAY0 + 4 * HOUR, u, kid, a, "gpt-5", 1, 1, 0);
    anon.upstream_model = None;
    anon.user_id = None;
    anon.api_key_id = None;
    anon.account_id = None;
    store.insert_usage_batch(&[anon]).await.unwrap();
    let gpt = store
        .usage_daily(UsageDim::Model, Some("gpt-5"), day0, day0)
        .await
        .unwrap();
    assert_eq!(gpt.len(), 1);
    assert_eq!(gpt[0].requests, 1);
    assert_eq!(
        store
            .usage_totals(UsageDim::User, Some(u), None, None)
            .await
            .unwrap()
            .requests,
        4
    );

    // last_used_at moves to the newest record, without touching the change marker.
    let key_now = store.api_key_by_id(kid).await.unwrap().unwrap();
    assert_eq!(key_now.last_used_at, Some(DAY0 + 25 * HOUR));
    assert_eq!(key_now.updated_at, key.updated_at);
    let acc_now = store.account_by_id(a).await.unwrap().unwrap();
    assert_eq!(acc_now.last_used_at, Some(DAY0 + 25 * HOUR));
    assert_eq!(store.change_marker().await.unwrap(), marker);

    // The stored row keeps every field.
    let page = store
        .list_usage_records(
            &RecordFilter {
                api_key_id: Some(kid.to_owned()),
                ..RecordFilter::default()
            },
            1,
            1,
        )
        .await
        .unwrap();
    assert_eq!(page.total, 4);
    let r = &page.items[0];
    assert_eq!(r.id, "r3");
    assert_eq!(r.request_id, "client-chosen");
    assert_eq!(r.created_at, DAY0 + 25 * HOUR);
    assert_eq!(r.user_id.as_deref(), Some(u));
    assert_eq!(r.account_id.as_deref(), Some(a));
    assert_eq!(
        r.session_key.as_deref(),
        Some(format!("{kid}:anthropic:0123456789abcdef").as_str())
    );
    assert_eq!(r.protocol, "anthropic");
    assert_eq!(r.requested_model.as_deref(), Some("claude-opus-4"));
    assert!(r.stream);
    assert_eq!(r.status, 200);
    assert_eq!(
        (
            r.input_tokens,
            r.output_tokens,
            r.cache_write_5m_tokens,
            r.cache_write_1h_tokens
        ),
        (300, 90, 10, 5)
    );
    assert_eq!((r.cache_read_tokens, r.reasoning_tokens), (100, 1));
    assert_eq!(r.web_search_requests, 3);
    assert_eq!(r.service_tier.as_deref(), Some("priority"));
    assert_eq!(
        (r.upstream_request_id.as_deref(), r.response_id.as_deref()),
        (
            Some(format!("req_{}", r.id).as_str()),
            Some(format!("msg_{}", r.id).as_str())
        )
    );
    let passes = r.passes.as_ref().expect("the advisor's pass");
    assert_eq!(passes[0]["model"], format!("advisor-{}", r.id));
    assert_eq!(
        (&passes[0]["input_tokens"], &passes[0]["output_tokens"]),
        (&serde_json::json!(5), &serde_json::json!(2))
    );
    assert_eq!(
        (r.base_cost, r.billed_cost, r.price_rate),
        (9_000, 18_000, 20_000)
    );
    assert_eq!(
        (r.latency_ms, r.ttfb_ms, r.failover_count),
        (1_234, Some(321), 1)
    );
    assert_eq!(r.error_type, None);
    assert!(!r.unpriced && !r.estimated);
}

async fn usage_records_filter_and_paginate(env: Env) {
    let store = env.store;
    // 30 records, one per minute: users alternate u0/u1, keys cycle k0..k2, accounts a0/a1
    // switch halfway.
    let records: Vec<_> = (0..30)
        .map(|i: i64| {
            let mut r = record(
                &format!("rec-{i:02}"),
                DAY0 + i * 60_000,
                &format!("u{}", i % 2),
                &format!("k{}", i % 3),
                if i < 15 { "a0" } else { "a1" },
                "m",
                1,
                1,
                i,
            );
            if i == 7 {
                r.status = 529;
                r.error_type = Some("upstream_error".into());
                r.unpriced = true;
                r.estimated = true;
                r.stream = false;
                r.ttfb_ms = None;
            }
            r
        })
        .collect();
    store.insert_usage_batch(&records[..20]).await.unwrap();
    store.insert_usage_batch(&records[20..]).await.unwrap();
    assert_eq!(store.count_records().await.unwrap(), 30);

    let all = store
        .list_usage_records(&RecordFilter::default(), 1, 10)
        .await
        .unwrap();
    assert_eq!((all.total, all.page, all.per_page), (30, 1, 10));
    let ids: Vec<_> = all.items.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids[0], "rec-29");
    // Without a client id, the one the relay answered with is the record's.
    assert_eq!(all.items[0].request_id, "rec-29");
    assert_eq!(ids[9], "rec-20");
    let last = store
        .list_usage_records(&RecordFilter::default(), 3, 10)
        .await
        .unwrap();
    assert_eq!(last.items.last().unwrap().id, "rec-00");
    let beyond = store
        .list_usage_records(&RecordFilter::default(), 4, 10)
        .await
        .unwrap();
    assert!(beyond.items.is_empty());
    assert_eq!(beyond.total, 30);

    let u1 = store
        .list_usage_records(
            &RecordFilter {
                user_id: Some("u1".into()),
                ..RecordFilter::default()
            },
            1,
            5,
        )
        .await
        .unwrap();
    assert_eq!(u1.total, 15);
    let ids: Vec<_> = u1.items.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["rec-29", "rec-27", "rec-25", "rec-23", "rec-21"]);

    // Combined filters and a time window [from, to).
    let narrow = store
        .list_usage_records(
            &RecordFilter {
                user_id: Some("u0".into()),
                api_key_id: Some("k0".into()),
                account_id: Some("a0".into()),
                from: Some(DAY0 + 60_000),
                to: Some(DAY0 + 12 * 60_000),
            },
            1,
            50,
        )
        .await
        .unwrap();
    // i in 1..12, even (u0), divisible by 3 (k0), < 15 (a0): 6 only (0 and 12 are outside).
    let ids: Vec<_> = narrow.items.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["rec-06"]);
    assert_eq!(narrow.total, 1);

    let a1 = store
        .list_usage_records(
            &RecordFilter {
                account_id: Some("a1".into()),
                from: Some(DAY0 + 25 * 60_000),
                ..RecordFilter::default()
            },
            1,
            50,
        )
        .await
        .unwrap();
    assert_eq!(a1.total, 5);

    let failed = store
        .list_usage_records(
            &RecordFilter {
                from: Some(DAY0 + 7 * 60_000),
                to: Some(DAY0 + 8 * 60_000),
                ..RecordFilter::default()
            },
            1,
            50,
        )
        .await
        .unwrap();
    assert_eq!(failed.items.len(), 1);
    let f = &failed.items[0];
    assert_eq!(f.status, 529);
    assert_eq!(f.error_type.as_deref(), Some("upstream_error"));
    assert!(f.unpriced && f.estimated && !f.stream);
    assert_eq!(f.ttfb_ms, None);
    let json = serde_json::to_value(f).unwrap();
    assert_eq!(json["unpriced"], true);
    assert_eq!(json["ttfb_ms"], serde_json::Value::Null);

    // An export's batches: oldest first, each record once, ties on the arrival time broken by
    // id, the filter kept across batches.
    let mut same_ms: Vec<_> = (0..4)
        .map(|i| {
            record(
                &format!("tie-{i}"),
                DAY0 + 10 * 60_000,
                "u0",
                "k0",
                "a0",
                "m",
                1,
                1,
                0,
            )
        })
        .collect();
    same_ms.reverse();
    store.insert_usage_batch(&same_ms).await.unwrap();
    let mut exported = Vec::new();
    let mut after: Option<(i64, String)> = None;
    loop {
        let batch = store
            .usage_records_after(
                &RecordFilter::default(),
                after.as_ref().map(|(at, id)| (*at, id.as_str())),
                3,
            )
            .await
            .unwrap();
        let Some(last) = batch.last() else { break };
        after = Some((last.created_at, last.id.clone()));
        exported.extend(batch.into_iter().map(|r| r.id));
    }
    let mut expected: Vec<String> = (0..30).map(|i| format!("rec-{i:02}")).collect();
    let ties = (0..4).map(|i| format!("tie-{i}"));
    expected.splice(11..11, ties);
    assert_eq!(exported, expected);
    let u1_exported: Vec<_> = store
        .usage_records_after(
            &RecordFilter {
                user_id: Some("u1".into()),
                from: Some(DAY0 + 20 * 60_000),
                ..RecordFilter::default()
            },
            Some((DAY0 + 23 * 60_000, "rec-23")),
            100,
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(u1_exported, ["rec-25", "rec-27", "rec-29"]);

    // Clamped page sizes.
    let clamped = store
        .list_usage_records(&RecordFilter::default(), 0, 0)
        .await
        .unwrap();
    assert_eq!(
        (clamped.page, clamped.per_page, clamped.items.len()),
        (1, 1, 1)
    );
}

async fn old_usage_records_are_pruned_and_their_totals_kept(env: Env) {
    let store = env.store;
    // Ten records an hour apart from DAY0, all on one user.
    let records: Vec<_> = (0..10)
        .map(|i: i64| {
            record(
                &format!("old-{i}"),
                DAY0 + i * HOUR,
                "u0",
                "k0",
                "a0",
                "m",
                10,
                5,
                7,
            )
        })
        .collect();
    store.insert_usage_batch(&records).await.unwrap();
    let day = "2026-11-20";
    let before = store
        .usage_totals(UsageDim::User, Some("u0"), Some(day), Some(day))
        .await
        .unwrap();
    assert_eq!(before, totals(10, 100, 50, 70));
    // Those that arrived before hour 7, three at a time, the oldest first.
    let cutoff = DAY0 + 7 * HOUR;
    assert_eq!(store.prune_usage_records(cutoff, 3).await.unwrap(), 3);
    let left = store
        .usage_records_after(&RecordFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(left.first().map(|r| r.id.as_str()), Some("old-3"));
    assert_eq!(store.prune_usage_records(cutoff, 3).await.unwrap(), 3);
    assert_eq!(store.prune_usage_records(cutoff, 3).await.unwrap(), 1);
    assert_eq!(store.prune_usage_records(cutoff, 3).await.unwrap(), 0);
    let ids: Vec<_> = store
        .usage_records_after(&RecordFilter::default(), None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["old-7", "old-8", "old-9"]);
    // The daily totals still count every record.
    assert_eq!(
        store
            .usage_totals(UsageDim::User, Some("u0"), Some(day), Some(day))
            .await
            .unwrap(),
        before
    );
}

async fn limit_spend_counts_the_day_its_month_and_all_time(env: Env) {
    let store = env.store;
    let user = store
        .create_user(&NewUser {
            monthly_cost_limit: Some(1_000),
            ..new_user("spender")
        })
        .await
        .unwrap();
    let (_, limited) = new_key(&user.id, "limited");
    let limited = store
        .create_api_key(
            &NewApiKey {
                monthly_cost_limit: Some(500),
                ..limited
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(limited.monthly_cost_limit, Some(500));
    let (_, free) = new_key(&user.id, "free");
    let free = store.create_api_key(&free, 10).await.unwrap();
    // On the limited key: 2026-10-31, 11-01, 11-20 (the day asked) and 11-21 (a request
    // begun after it); billed twice the cost. On the other key: one on 11-20.
    let day = |d: i64| DAY0 + d * 24 * HOUR + HOUR;
    let mut batch: Vec<_> = [(-20, 1), (-19, 10), (0, 100), (1, 1_000)]
        .into_iter()
        .map(|(d, cost)| {
            record(
                &format!("spend{d}"),
                day(d),
                &user.id,
                &limited.id,
                "a",
                "m",
                1,
                1,
                cost,
            )
        })
        .collect();
    batch.push(record(
        "free",
        day(0),
        &user.id,
        &free.id,
        "a",
        "m",
        1,
        1,
        5,
    ));
    store.insert_usage_batch(&batch).await.unwrap();

    let spend = |all: Vec<Spend>| -> BTreeMap<String, Spent> {
        all.into_iter().map(|s| (s.subject, s.spent)).collect()
    };
    let user_subject = relay_filters::key_limits::user_subject(&user.id);
    let all = spend(store.limit_spend("2026-11-20", false).await.unwrap());
    assert_eq!(all[&limited.id], Spent::new(200, 220, 2_222));
    assert_eq!(all[&free.id], Spent::new(10, 10, 10));
    assert_eq!(all[&user_subject], Spent::new(210, 230, 2_232));
    // Only subjects with a cost limit: the user and the limited key (monthly limits only).
    let limited_only = spend(store.limit_spend("2026-11-20", true).await.unwrap());
    assert_eq!(limited_only.keys().collect::<Vec<_>>(), {
        let mut want = vec![&limited.id, &user_subject];
        want.sort();
        want
    });
    // In December the month starts over.
    let december = spend(store.limit_spend("2026-12-01", false).await.unwrap());
    assert_eq!(december[&limited.id], Spent::new(0, 0, 2_222));

    // A user's monthly limit is changed and cleared on its own.
    let limits = llm_relay::store::UserCostLimits {
        monthly: Some(Some(2_000)),
        ..Default::default()
    };
    store.set_user_cost_limits(&user.id, &limits).await.unwrap();
    let changed = store.user_by_id(&user.id).await.unwrap().unwrap();
    assert_eq!(
        (changed.daily_cost_limit, changed.monthly_cost_limit),
        (None, Some(2_000))
    );
    let cleared = llm_relay::store::UserCostLimits {
        monthly: Some(None),
        ..Default::default()
    };
    store
        .set_user_cost_limits(&user.id, &cleared)
        .await
        .unwrap();
    let refused = llm_relay::store::UserCostLimits {
        monthly: Some(Some(-1)),
        ..Default::default()
    };
    assert!(store
        .set_user_cost_limits(&user.id, &refused)
        .await
        .is_err());
    assert_eq!(
        store
            .user_by_id(&user.id)
            .await
            .unwrap()
            .unwrap()
            .monthly_cost_limit,
        None
    );
    let patched = store
        .update_api_key(
            &limited.id,
            &ApiKeyPatch {
                monthly_cost_limit: Some(None),
                ..ApiKeyPatch::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(patched.monthly_cost_limit, None);
}

async fn prices_settings_audit_and_sessions(env: Env) {
    let store = env.store;

    // Prices.
    let price = ModelPrice {
        input: 3_000_000,
        output: 15_000_000,
        cache_write_5m: Some(3_750_000),
        cache_write_1h: None,
        cache_read: Some(300_000),
        web_search: Some(10_000),
        web_search_request: None,
        long_context: None,
        priority: None,
        flex: None,
        fast: None,
    };
    store
        .upsert_price("claude-sonnet-4-5", &price, CardChoices::default())
        .await
        .unwrap();
    let card = LongContextPrice {
        above_tokens: 272_000,
        input: 2_500_000,
        output: 15_000_000,
        cache_write_5m: None,
        cache_write_1h: None,
        cache_read: Some(250_000),
        // Long prompts at priority: a card of their own, kept with the long card.
        priority: Some(TierPrice {
            input: 5_000_000,
            output: 30_000_000,
            cache_read: Some(500_000),
            ..TierPrice::default()
        }),
        flex: None,
        fast: None,
    };
    store
        .upsert_price(
            "gpt-5",
            &ModelPrice {
                input: 1_250_000,
                output: 10_000_000,
                ..ModelPrice::default()
            },
            CardChoices {
                long_context: CardChoice::Card(card),
                flex: CardChoice::Card(TierPrice {
                    input: 625_000,
                    output: 5_000_000,
                    ..TierPrice::default()
                }),
                ..CardChoices::default()
            },
        )
        .await
        .unwrap();
    store
        .upsert_price(
            "gemini-2.5-pro",
            &price,
            CardChoices {
                long_context: CardChoice::None,
                priority: CardChoice::None,
                ..CardChoices::default()
            },
        )
        .await
        .unwrap();
    let changed = ModelPrice {
        cache_write_1h: Some(6_000_000),
        ..price
    };
    store
        .upsert_price("claude-sonnet-4-5", &changed, CardChoices::default())
        .await
        .unwrap();
    let prices = store.list_prices().await.unwrap();
    assert_eq!(prices.len(), 3);
    assert_eq!(prices[0].model, "claude-sonnet-4-5");
    assert_eq!(prices[0].price(), changed);
    assert_eq!(prices[0].web_search, Some(10_000));
    assert_eq!(prices[0].cards, CardChoices::default());
    // The three long-context choices come back as they were stored.
    assert_eq!(prices[1].model, "gemini-2.5-pro");
    assert_eq!(prices[1].cards.long_context, CardChoice::None);
    assert_eq!(prices[1].cards.priority, CardChoice::None);
    assert_eq!(prices[1].cards.flex, CardChoice::Shipped);
    assert_eq!(prices[2].model, "gpt-5");
    assert_eq!(prices[2].cache_read, None);
    assert_eq!(prices[2].web_search, None);
    assert_eq!(prices[2].cards.long_context, CardChoice::Card(card));
    assert_eq!(prices[2].price().long_context, Some(card));
    assert_eq!(prices[2].price().flex.map(|f| f.input), Some(625_000));
    assert_eq!(prices[2].cards.priority, CardChoice::Shipped);
    // A card replaced by none and back.
    store
        .upsert_price(
            "gpt-5",
            &prices[2].price(),
            CardChoices {
                long_context: CardChoice::None,
                ..CardChoices::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.list_prices().await.unwrap()[2].cards,
        CardChoices {
            long_context: CardChoice::None,
            ..CardChoices::default()
        }
    );
    store.delete_price("gemini-2.5-pro").await.unwrap();
    // A negative price anywhere, its own or a card's, is refused.
    let negative_card = CardChoices {
        priority: CardChoice::Card(TierPrice {
            cache_read: Some(-1),
            ..TierPrice::default()
        }),
        ..CardChoices::default()
    };
    for (price, cards) in [
        (
            ModelPrice {
                web_search: Some(-1),
                ..ModelPrice::default()
            },
            CardChoices::default(),
        ),
        (
            ModelPrice {
                input: -1,
                ..ModelPrice::default()
            },
            CardChoices::default(),
        ),
        (ModelPrice::default(), negative_card),
    ] {
        assert!(matches!(
            store.upsert_price("x", &price, cards).await,
            Err(StoreError::Invalid(_))
        ));
    }
    store.delete_price("gpt-5").await.unwrap();
    assert!(matches!(
        store.delete_price("gpt-5").await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.list_prices().await.unwrap().len(), 1);

    // Settings.
    assert_eq!(
        store
            .get_setting("account_health_check_enabled")
            .await
            .unwrap(),
        None
    );
    store
        .set_setting("account_health_check_enabled", &serde_json::json!(true))
        .await
        .unwrap();
    store
        .set_setting("account_health_check_interval", &serde_json::json!(5))
        .await
        .unwrap();
    store
        .set_setting("account_health_check_interval", &serde_json::json!(10))
        .await
        .unwrap();
    assert_eq!(
        store
            .get_setting("account_health_check_interval")
            .await
            .unwrap(),
        Some(serde_json::json!(10))
    );
    let all = store.list_settings().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all["account_health_check_enabled"], serde_json::json!(true));

    // A periodic round is claimed by one node: again only once the gap has passed.
    let t = 1_800_000_000_000;
    assert!(store.claim_round("round", t, 60_000).await.unwrap());
    assert!(!store.claim_round("round", t + 1_000, 60_000).await.unwrap());
    let racers =
        futures::future::join_all((0..4).map(|_| store.claim_round("round", t + 60_000, 60_000)))
            .await;
    assert_eq!(
        racers.iter().filter(|r| matches!(r, Ok(true))).count(),
        1,
        "{racers:?}"
    );

    // Audit log: newest first, paginated.
    for i in 0..3 {
        store
            .append_audit(
                "admin",
                "account.update",
                &format!("acc-{i}"),
                &serde_json::json!({"field": "priority", "to": i}),
            )
            .await
            .unwrap();
    }
    let page = store.list_audit(1, 2).await.unwrap();
    assert_eq!(page.total, 3);
    let targets: Vec<_> = page.items.iter().map(|e| e.target.as_str()).collect();
    assert_eq!(targets, ["acc-2", "acc-1"]);
    assert_eq!(page.items[0].actor, "admin");
    assert_eq!(page.items[0].action, "account.update");
    assert_eq!(
        page.items[0].detail,
        serde_json::json!({"field": "priority", "to": 2})
    );
    let page2 = store.list_audit(2, 2).await.unwrap();
    assert_eq!(page2.items.len(), 1);
    assert_eq!(page2.items[0].target, "acc-0");

    // Admin sessions.
    let admin = store.create_user(&new_user("root")).await.unwrap();
    let far = i64::MAX / 2;
    store
        .create_admin_session("hash-live", &admin.id, "csrf-1", far)
        .await
        .unwrap();
    store
        .create_admin_session("hash-old", &admin.id, "csrf-2", 1_000)
        .await
        .unwrap();
    store
        .create_admin_session("hash-other", &admin.id, "csrf-3", far)
        .await
        .unwrap();
    let live = store.admin_session("hash-live").await.unwrap().unwrap();
    assert_eq!(live.user_id, admin.id);
    assert_eq!(live.csrf_token, "csrf-1");
    assert_eq!(live.expires_at, far);
    assert_eq!(
        store.admin_session("hash-old").await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(store.admin_session("nope").await.unwrap(), None);
    assert!(matches!(
        store
            .create_admin_session("hash-live", &admin.id, "csrf-x", far)
            .await,
        Err(StoreError::Conflict(_))
    ));
    store.delete_admin_session("hash-live").await.unwrap();
    store.delete_admin_session("hash-live").await.unwrap();
    assert_eq!(store.admin_session("hash-live").await.unwrap(), None);
    assert_eq!(store.purge_expired_admin_sessions().await.unwrap(), 1);
    assert_eq!(
        store
            .delete_admin_sessions_of_user(&admin.id)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.admin_session("hash-other").await.unwrap(), None);
}

/// `sqlite::memory:` keeps one connection, so the migrated schema stays visible.
#[tokio::test]
async fn in_memory_sqlite_keeps_its_schema() {
    let store = SqlStore::connect("sqlite::memory:", 8).await.unwrap();
    assert!(!store.is_postgres());
    store.migrate().await.unwrap();
    store.create_user(&new_user("mem")).await.unwrap();
    assert_eq!(store.count_users().await.unwrap(), 1);
    assert!(store.user_by_username("mem").await.unwrap().is_some());
    // Usage batches go through the pool's one connection here: a connection of their own
    // would open another, empty database.
    let r = record("mem-1", 1_795_132_800_000, "u", "k", "a", "m", 10, 5, 100);
    store.insert_usage_batch(&[r.clone(), r]).await.unwrap();
    assert_eq!(store.count_records().await.unwrap(), 1);
}

/// On a SQLite file, usage batches have a connection and a thread of their own (named, so the
/// priority rule finds it). A batch that meets another connection's write lock waits a while,
/// then fails whole and leaves nothing behind (the writer retries or spools it); once the lock
/// is gone the same batch is stored and counted once.
#[tokio::test]
async fn sqlite_usage_batches_wait_for_a_locked_file_then_fail_whole() {
    let dir = tempfile::tempdir().unwrap();
    // A path sqlx tidies before opening: the usage thread writes to the file sqlx opened.
    let url = format!("sqlite://{}/nested/../relay.db", dir.path().display());
    let store = SqlStore::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let at = 1_795_132_800_000;
    let batch: Vec<UsageRecord> = (0..300)
        .map(|n| {
            record(
                &format!("lock-{n:03}"),
                at + n,
                "u",
                "k",
                "a",
                "m",
                10,
                5,
                100,
            )
        })
        .collect();
    store.insert_usage_batch(&batch[..1]).await.unwrap();
    let threads = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|name| name.trim_end() == llm_relay::store::sqlite_usage::THREAD_NAME)
        .count();
    // Other tests of this binary may run usage threads of their own at the same time.
    assert!(threads >= 1, "the usage thread runs under its name");

    let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
    other.execute("BEGIN IMMEDIATE").await.unwrap();
    let started = std::time::Instant::now();
    let locked = store.insert_usage_batch(&batch).await;
    assert!(locked.is_err(), "a locked database is an error: {locked:?}");
    // The wait is bounded under the usage writer's 3 s timeout.
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    other.execute("ROLLBACK").await.unwrap();
    assert_eq!(store.count_records().await.unwrap(), 1);

    store.insert_usage_batch(&batch).await.unwrap();
    assert_eq!(store.count_records().await.unwrap(), 300);
    let day = relay_filters::key_limits::utc_day(at);
    let rows = store
        .usage_daily(UsageDim::User, Some("u"), &day, &day)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].requests, 300);
    assert_eq!((rows[0].base_cost, rows[0].billed_cost), (30_000, 60_000));

    // A replayed batch meets the lock: it fails within the bound too, and once the lock is
    // gone only its new record is stored and counted.
    other.execute("BEGIN IMMEDIATE").await.unwrap();
    let started = std::time::Instant::now();
    assert!(store.insert_usage_batch(&batch).await.is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    other.execute("ROLLBACK").await.unwrap();
    let mut replay = batch.clone();
    replay.push(record("lock-new", at, "u", "k", "a", "m", 10, 5, 100));
    store.insert_usage_batch(&replay).await.unwrap();
    assert_eq!(store.count_records().await.unwrap(), 301);
    let rows = store
        .usage_daily(UsageDim::User, Some("u"), &day, &day)
        .await
        .unwrap();
    assert_eq!(rows[0].requests, 301);

    store.close().await;
    assert!(store.insert_usage_batch(&batch[..1]).await.is_err());
}

#[tokio::test]
async fn unknown_url_schemes_are_refused() {
    assert!(matches!(
        SqlStore::connect("mysql://localhost/db", 1).await,
        Err(StoreError::Invalid(_))
    ));
}
