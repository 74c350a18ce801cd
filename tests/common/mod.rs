//! Test support: runs the real relay binary on free loopback ports with a throwaway database,
//! and talks to its admin API.

#![allow(dead_code, clippy::unwrap_used)]

pub mod mock_upstream;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Admin token every test relay accepts.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Which database a relay uses.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite,
    /// A PostgreSQL URL of a throwaway database.
    Postgres(String),
}

/// A relay process; killed on drop.
pub struct Relay {
    pub child: Child,
    pub proxy: String,
    pub admin: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
}

/// Options of a relay start.
pub struct RelayOptions {
    pub db: Db,
    pub env: Vec<(String, String)>,
    /// Reuse this data directory (restarts); a new temp dir otherwise.
    pub data_dir: Option<PathBuf>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            db: Db::Sqlite,
            env: Vec::new(),
            data_dir: None,
        }
    }
}

impl Relay {
    pub async fn start() -> Relay {
        Self::start_with(RelayOptions::default()).await
    }

    pub async fn start_with(opts: RelayOptions) -> Relay {
        let (tmp, data_dir) = match opts.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let proxy_port = free_port();
        let admin_port = free_port();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llm-relay"));
        cmd.arg("serve")
            .current_dir(&root)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RELAY_PROXY_ADDR", format!("127.0.0.1:{proxy_port}"))
            .env("RELAY_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("RELAY_DATA_DIR", &data_dir)
            .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RELAY_ADMIN_PASSWORD", "admin-password-1")
            .env("RELAY_CACHE_REFRESH_INTERVAL", "100ms")
            .env("RELAY_SHUTDOWN__GRACE_PERIOD_SECONDS", "1")
            .env("RELAY_SHUTDOWN__GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS", "2")
            .env("RELAY_USAGE__FLUSH_INTERVAL", "100ms")
            .env("RELAY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Db::Postgres(url) = &opts.db {
            cmd.env("RELAY_DATABASE_URL", url);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn relay");
        let mut relay = Relay {
            child,
            proxy: format!("http://127.0.0.1:{proxy_port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            data_dir,
            _tmp: tmp,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
        };
        relay.wait_ready().await;
        relay
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let admin = self.http.get(format!("{}/readyz", self.admin)).send().await;
            let proxy = self
                .http
                .get(format!("{}/healthz", self.proxy))
                .send()
                .await;
            if matches!((&admin, &proxy), (Ok(a), Ok(p)) if a.status().is_success() && p.status().is_success())
            {
                return;
            }
            assert!(Instant::now() < deadline, "relay did not become ready");
            if let Ok(Some(status)) = self.child_status() {
                panic!("relay exited during start-up: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn child_status(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// An admin API call with the static token.
    pub async fn admin_post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{}", self.admin, path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("admin call");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn admin_patch(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .http
            .patch(format!("{}{}", self.admin, path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("admin call");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn admin_get(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}{}", self.admin, path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin call")
            .json()
            .await
            .expect("json")
    }

    /// Creates a user and returns its id.
    pub async fn create_user(&self, name: &str, price_rate: i64) -> String {
        let (s, v) = self
            .admin_post("/api/admin/users", serde_json::json!({"username": name, "password": "password-123", "price_rate": price_rate}))
            .await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    /// Creates a key and returns (id, plaintext).
    pub async fn create_key(&self, user_id: &str, extra: serde_json::Value) -> (String, String) {
        let mut body = serde_json::json!({"user_id": user_id, "name": "test key"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (s, v) = self.admin_post("/api/admin/api-keys", body).await;
        assert_eq!(s, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        )
    }

    /// Creates an account and returns its id.
    pub async fn create_account(
        &self,
        name: &str,
        kind: &str,
        base_url: &str,
        credential: &str,
    ) -> String {
        let (s, v) = self
            .admin_post(
                "/api/admin/accounts",
                serde_json::json!({"name": name, "type": kind, "base_url": base_url, "credential": credential}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    /// Waits until the proxy knows a key (the cache refresh is asynchronous).
    pub async fn wait_key_active(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self
                .http
                .get(format!("{}/v1/models", self.proxy))
                .header("x-api-key", key)
                .send()
                .await
                .expect("models");
            if r.status().is_success() {
                return;
            }
            assert!(Instant::now() < deadline, "key never became active");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Usage records, newest first, waiting until `n` exist.
    pub async fn wait_records(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self
                .admin_get("/api/admin/usage/records?per_page=500")
                .await;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if items.len() >= n {
                return items;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} usage records arrived",
                items.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A POST to the proxy.
    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{}", self.proxy, path))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway PostgreSQL database for one test; dropped (best effort) at the end.
pub struct PgDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgDb {
    pub async fn create() -> PgDb {
        let admin_url = std::env::var("RELAY_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
        let name = format!("relay_it_{}", uuid::Uuid::now_v7().simple());
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
            .await
            .expect("postgres reachable");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create db");
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&admin_url);
        PgDb {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
                    .await
                    .ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// An Anthropic Messages request body.
pub fn messages_body(model: &str, stream: bool, messages: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "max_tokens": 256,
        "stream": stream,
        "system": "You are a helpful assistant.",
        "messages": messages,
    })
}

/// A conversation with `turns` user turns (and the assistant turns between them).
pub fn conversation(topic: &str, turns: usize) -> serde_json::Value {
    let mut msgs = Vec::new();
    for i in 0..turns {
        if i > 0 {
            msgs.push(serde_json::json!({"role": "assistant", "content": format!("answer {i}")}));
        }
        msgs.push(serde_json::json!({"role": "user", "content": format!("{topic}: question {i}")}));
    }
    serde_json::Value::Array(msgs)
}
