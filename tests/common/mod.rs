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

/// A free port for a server a test stops and starts again on the same port: picked below the
/// kernel's ephemeral range (`ip_local_port_range`, 32768 and up by default), so that no
/// socket bound to port 0 meanwhile can take it.
pub fn restartable_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_from <= 11_000 {
        return free_port();
    }
    let span = u64::from(ephemeral_from - 10_000);
    let mut seed = std::collections::hash_map::RandomState::new().build_hasher();
    for _ in 0..1000 {
        seed.write_u8(0);
        let port = 10_000 + (seed.finish() % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
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
    log: tempfile::NamedTempFile,
    pub http: reqwest::Client,
    /// The proxy speaks TLS (`RELAY_PROXY_TLS_CERT` set): readiness is its port accepting.
    proxy_tls: bool,
}

/// Why a relay did not come up.
enum Exit {
    Stopped(std::process::ExitStatus),
    NotReady,
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
        let mut tmp = tmp;
        // A port found free may be taken by another test before the relay binds it; the relay
        // then stops at once, saying it cannot listen, and gets new ports.
        for attempt in 1.. {
            let mut relay = Self::spawn(&opts.db, &opts.env, data_dir.clone());
            match relay.wait_ready().await {
                Ok(()) => {
                    relay._tmp = tmp.take();
                    return relay;
                }
                Err(Exit::Stopped(status))
                    if attempt < 5 && relay.log().contains("cannot listen on") =>
                {
                    eprintln!("relay start {attempt}: {status}, a port was taken; again");
                }
                Err(Exit::Stopped(status)) => {
                    panic!("relay exited during start-up: {status}\n{}", relay.log())
                }
                Err(Exit::NotReady) => panic!("relay did not become ready\n{}", relay.log()),
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn spawn(db: &Db, env: &[(String, String)], data_dir: PathBuf) -> Relay {
        let proxy_port = free_port();
        let admin_port = free_port();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        // The relay's own log goes to a file, shown when a test fails (see `Drop`).
        let log = tempfile::NamedTempFile::new().expect("log file");
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
            .stderr(Stdio::from(log.reopen().expect("log file")));
        if let Db::Postgres(url) = db {
            cmd.env("RELAY_DATABASE_URL", url);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn relay");
        Relay {
            proxy_tls: env.iter().any(|(k, _)| k == "RELAY_PROXY_TLS_CERT"),
            child,
            proxy: format!("http://127.0.0.1:{proxy_port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            data_dir,
            _tmp: None,
            log,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
        }
    }

    /// What the relay has written to its standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    async fn wait_ready(&mut self) -> Result<(), Exit> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Bounded: the admin socket is bound before the control plane serves it, so a probe
            // can wait rather than be refused while the relay starts.
            let probe = |url: String| self.http.get(url).timeout(Duration::from_secs(2)).send();
            let admin = probe(format!("{}/readyz", self.admin)).await;
            let proxy_ok = if self.proxy_tls {
                let addr = self.proxy.trim_start_matches("http://");
                tokio::net::TcpStream::connect(addr).await.is_ok()
            } else {
                let proxy = probe(format!("{}/healthz", self.proxy)).await;
                proxy.is_ok_and(|p| p.status().is_success())
            };
            if proxy_ok && admin.is_ok_and(|a| a.status().is_success()) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child_status() {
                return Err(Exit::Stopped(status));
            }
            if Instant::now() >= deadline {
                return Err(Exit::NotReady);
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

    /// `PATCH /api/admin/users/{id}` with the static token: (status, answer).
    pub async fn patch_user(&self, id: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.admin_patch(&format!("/api/admin/users/{id}"), body)
            .await
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

    /// POSTs a JSON body to the proxy with the key; the response, whatever its status.
    pub async fn post_json(
        &self,
        path: &str,
        key: &str,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        self.post(path, key).json(body).send().await.expect("send")
    }

    /// A user (price rate 1.0) with an active key and no limits; the key.
    pub async fn active_key(&self, user_name: &str) -> String {
        let user = self.create_user(user_name, 10_000).await;
        let (_, key) = self.create_key(&user, serde_json::json!({})).await;
        self.wait_key_active(&key).await;
        key
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) {
        self.stop_with("TERM");
    }

    /// Sends `signal` (`TERM`, `INT`) and waits for the process to exit (killed after 20 s);
    /// its exit status, `None` when it had to be killed.
    pub fn stop_with(&mut self, signal: &str) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let mut from = log.len().saturating_sub(8192);
            while !log.is_char_boundary(from) {
                from += 1;
            }
            let tail = &log[from..];
            if !tail.is_empty() {
                eprintln!("--- relay log ({}) ---\n{tail}", self.proxy);
            }
        }
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

// ---------------------------------------------------------------------------------------------
// OpenAI and Gemini helpers
// ---------------------------------------------------------------------------------------------

impl Relay {
    /// Creates an account from a whole create body (`chatgpt_account_id`, `models`, ...) and
    /// returns its id.
    pub async fn create_account_with(&self, body: serde_json::Value) -> String {
        let (s, v) = self.admin_post("/api/admin/accounts", body).await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    /// A POST to the proxy with no credential and no protocol header.
    pub fn post_bare(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{}", self.proxy, path))
    }

    /// Waits until the proxy's account cache holds at least `n` accounts: the cache refresh
    /// publishes `relay_account_state` once it has replaced the accounts.
    pub async fn wait_accounts_loaded(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics_text().await;
            let loaded: i64 = text
                .lines()
                .filter(|l| l.starts_with("relay_account_state{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
                .sum();
            if loaded >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy loaded {loaded} of {n} accounts"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The secrets every node sharing one database must share.
pub fn shared_node_secrets() -> Vec<(String, String)> {
    vec![
        ("RELAY_ENCRYPTION_KEY".to_string(), "11".repeat(32)),
        ("RELAY_KEY_PEPPER".to_string(), "22".repeat(32)),
    ]
}

/// The sum of an integer field over usage records.
pub fn sum(records: &[serde_json::Value], field: &str) -> i64 {
    records.iter().map(|r| r[field].as_i64().unwrap()).sum()
}

/// The usage record with request id `id` (sent as `x-request-id`).
pub fn record_by_request_id<'a>(
    records: &'a [serde_json::Value],
    id: &str,
) -> &'a serde_json::Value {
    records
        .iter()
        .find(|r| r["request_id"] == id)
        .unwrap_or_else(|| panic!("no usage record with request id {id} among {records:?}"))
}

/// The usage record whose id is `id` (the relay's own, answered as `x-relay-request-id`).
pub fn record_by_id<'a>(records: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    records
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no usage record {id} among {records:?}"))
}

/// An OpenAI Chat Completions request body.
pub fn chat_body(model: &str, stream: bool, messages: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": messages,
    })
}

/// A Chat conversation with `turns` user turns: a system message, then [`conversation`].
pub fn chat_conversation(topic: &str, turns: usize) -> serde_json::Value {
    let mut msgs =
        vec![serde_json::json!({"role": "system", "content": "You are a helpful assistant."})];
    if let serde_json::Value::Array(rest) = conversation(topic, turns) {
        msgs.extend(rest);
    }
    serde_json::Value::Array(msgs)
}

/// A Gemini request body: a system instruction and a conversation of `turns` user turns
/// (and the model turns between them).
pub fn gemini_body(topic: &str, turns: usize) -> serde_json::Value {
    let mut contents = Vec::new();
    for i in 0..turns {
        if i > 0 {
            contents.push(
                serde_json::json!({"role": "model", "parts": [{"text": format!("answer {i}")}]}),
            );
        }
        contents.push(
            serde_json::json!({"role": "user", "parts": [{"text": format!("{topic}: question {i}")}]}),
        );
    }
    serde_json::json!({
        "systemInstruction": {"parts": [{"text": "You are a helpful assistant."}]},
        "contents": contents,
        "generationConfig": {"temperature": 0.2},
    })
}

/// A captured client request from `tests/fixtures/client-requests/`.
#[derive(Debug, Clone)]
pub struct ClientFixture {
    /// The file name (`claude-code.turn1.json`).
    pub name: String,
    pub method: String,
    pub path: String,
    /// Query parameters as captured (`beta=true`, `alt=sse`), by name.
    pub query: Vec<(String, String)>,
    /// Headers as captured (lower-case names); the credential is `<KEY>`.
    pub headers: Vec<(String, String)>,
    /// The body, parsed; what is sent is [`ClientFixture::body_bytes`].
    pub body: serde_json::Value,
    /// Whether the client asked for a stream, as the capture records it.
    pub stream: bool,
    /// The body's JSON text in the client's field order, without insignificant whitespace.
    body_text: String,
}

/// Headers a test client never copies from a capture: they describe the captured connection
/// and body (the capture's host, its unshortened length), and reqwest sets them itself.
const TRANSPORT_HEADERS: &[&str] = &["host", "content-length", "transfer-encoding"];

/// JSON text without the whitespace between tokens, everything else (field order, escapes)
/// kept.
fn compact_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if !c.is_ascii_whitespace() {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// The directory of the client captures.
fn client_fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/client-requests")
}

impl ClientFixture {
    /// Loads `tests/fixtures/client-requests/{name}`.
    pub fn load(name: &str) -> ClientFixture {
        let path = client_fixtures_dir().join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // The body once more as raw text, to send its fields in the order the client wrote them.
        let raw: std::collections::HashMap<String, Box<serde_json::value::RawValue>> =
            serde_json::from_str(&text).unwrap();
        let headers = v["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap().to_string()))
            .collect();
        let query = v
            .get("query")
            .and_then(|q| q.as_object())
            .map(|q| {
                q.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        ClientFixture {
            name: name.to_string(),
            method: v["method"].as_str().unwrap().to_string(),
            path: v["path"].as_str().unwrap().to_string(),
            query,
            headers,
            body: v["body"].clone(),
            stream: v["stream"].as_bool().unwrap_or(false),
            body_text: compact_json(raw["body"].get()),
        }
    }

    /// Every capture in `tests/fixtures/client-requests/`, sorted by file name (so each
    /// `turn1` comes just before its `turn2`).
    pub fn load_all() -> Vec<ClientFixture> {
        let mut names: Vec<String> = std::fs::read_dir(client_fixtures_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        names.sort();
        names.iter().map(|n| ClientFixture::load(n)).collect()
    }

    /// The conversation a capture belongs to: its file name before `.turn`.
    pub fn conversation(&self) -> &str {
        self.name
            .split_once(".turn")
            .map_or(self.name.as_str(), |(c, _)| c)
    }

    /// First captured value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The header that carries the client's credential (`<KEY>`).
    pub fn credential_header(&self) -> &str {
        self.headers
            .iter()
            .find(|(_, v)| v.contains("<KEY>"))
            .map(|(k, _)| k.as_str())
            .unwrap_or_else(|| panic!("{}: no header carries <KEY>", self.name))
    }

    /// The captured query as sent: `""`, or `?` and the parameters joined by `&` (the captured
    /// values need no escaping).
    pub fn query_string(&self) -> String {
        if self.query.is_empty() {
            return String::new();
        }
        let pairs: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("?{}", pairs.join("&"))
    }

    /// Replaces `from` by `to` in every header value and everywhere in the body (to make a
    /// new conversation out of a captured one).
    pub fn replace_everywhere(&self, from: &str, to: &str) -> ClientFixture {
        let mut out = self.clone();
        for (_, v) in &mut out.headers {
            *v = v.replace(from, to);
        }
        let body = serde_json::to_string(&self.body).unwrap().replace(from, to);
        out.body = serde_json::from_str(&body).unwrap();
        out.body_text = self.body_text.replace(from, to);
        out
    }

    /// The body bytes this fixture sends: the captured body in the client's field order.
    pub fn body_bytes(&self) -> Vec<u8> {
        self.body_text.clone().into_bytes()
    }

    /// The captured request sent to the relay at `path` with the captured method and query,
    /// with `key` in place of the captured credential (`<KEY>`), in the header the client used.
    pub fn request(&self, relay: &Relay, path: &str, key: &str) -> reqwest::RequestBuilder {
        let method = reqwest::Method::from_bytes(self.method.as_bytes()).unwrap();
        let url = format!("{}{}{}", relay.proxy, path, self.query_string());
        let mut rb = relay.http.request(method, url);
        for (k, v) in &self.headers {
            if TRANSPORT_HEADERS.contains(&k.as_str()) {
                continue;
            }
            rb = rb.header(k, v.replace("<KEY>", key));
        }
        rb.body(self.body_bytes())
    }

    /// The captured request sent to the relay as captured: its method, path, query, headers
    /// and body, with `key` in place of `<KEY>`.
    pub fn request_as_captured(&self, relay: &Relay, key: &str) -> reqwest::RequestBuilder {
        self.request(relay, &self.path, key)
    }
}

/// Neither the path, a header nor the body of an upstream request carries the relay key.
pub fn assert_no_relay_key(req: &mock_upstream::Received, key: &str) {
    assert!(
        !req.path.contains(key),
        "relay key in upstream path {}",
        req.path
    );
    for (k, v) in &req.headers {
        assert!(!v.contains(key), "relay key leaked upstream in header {k}");
    }
    assert!(
        !String::from_utf8_lossy(&req.body).contains(key),
        "relay key leaked upstream in the body"
    );
}

// ---------------------------------------------------------------------------------------------
// Admin API helpers: login sessions and raw calls
// ---------------------------------------------------------------------------------------------

/// Password of the `admin` user every test relay bootstraps.
pub const ADMIN_PASSWORD: &str = "admin-password-1";

/// A login session on the admin API: the session cookie and its CSRF token.
#[derive(Debug, Clone)]
pub struct LoginSession {
    /// `relay_session=...`, as sent back in `cookie`.
    pub cookie: String,
    /// The whole `set-cookie` header of the login answer.
    pub set_cookie: String,
    pub csrf: String,
    /// The login answer's body.
    pub body: serde_json::Value,
}

impl Relay {
    /// `POST /api/auth/login`; the raw answer.
    pub async fn login_raw(&self, username: &str, password: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/api/auth/login", self.admin))
            .json(&serde_json::json!({"username": username, "password": password}))
            .send()
            .await
            .expect("login call")
    }

    /// Logs in, asserting success.
    pub async fn login(&self, username: &str, password: &str) -> LoginSession {
        let r = self.login_raw(username, password).await;
        assert_eq!(r.status(), 200, "login of {username}");
        let set_cookie = r
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .expect("set-cookie")
            .to_string();
        let cookie = set_cookie.split(';').next().unwrap().trim().to_string();
        let body: serde_json::Value = r.json().await.expect("login json");
        LoginSession {
            cookie,
            set_cookie,
            csrf: body["csrf_token"].as_str().expect("csrf_token").to_string(),
            body,
        }
    }

    /// An admin API call with a login session: the cookie always, the CSRF header when
    /// `csrf`. Returns the status and the raw body text.
    pub async fn session_call(
        &self,
        session: &LoginSession,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        csrf: bool,
    ) -> (u16, String) {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.admin, path))
            .header("cookie", &session.cookie);
        if csrf {
            req = req.header("x-csrf-token", &session.csrf);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.expect("admin call");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// An admin API call with the static token (`None` = no credential at all); the status
    /// and the raw body text.
    pub async fn token_call(
        &self,
        token: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, String) {
        let mut req = self.http.request(method, format!("{}{}", self.admin, path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.expect("admin call");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// An admin API call with the static token; the status and the JSON answer (a body that is
    /// no JSON comes back as `{"text": ...}`).
    pub async fn admin_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let (status, text) = self.token_call(Some(ADMIN_TOKEN), method, path, body).await;
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "text": text })),
        )
    }

    /// Waits until the account's cooldown is stored (the proxy stores it off the request path)
    /// and returns its end, epoch ms.
    pub async fn wait_stored_cooldown(&self, account_id: &str) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self
                .admin_get(&format!("/api/admin/accounts/{account_id}"))
                .await;
            if let Some(until) = v["cooldown_until"].as_i64() {
                return until;
            }
            assert!(Instant::now() < deadline, "no cooldown was stored: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `PATCH /api/admin/accounts/{id}` with `body`, as the admin.
    pub async fn patch_account(
        &self,
        id: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        self.admin_json(
            reqwest::Method::PATCH,
            &format!("/api/admin/accounts/{id}"),
            Some(body),
        )
        .await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default()
    }

    /// Waits until `/metrics` holds exactly this line (a gauge set by a background loop shows
    /// up there a refresh later).
    pub async fn wait_metric(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics_text().await;
            if text.lines().any(|l| l == line) {
                return;
            }
            assert!(Instant::now() < deadline, "metrics never showed {line}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every byte the relay stored on disk in its SQLite files (database and write-ahead log).
    pub fn stored_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&self.data_dir)
            .expect("data dir")
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with("relay.db") {
                all.extend(std::fs::read(entry.path()).unwrap_or_default());
            }
        }
        all
    }

    /// `DELETE` on the admin API with the static token.
    pub async fn admin_delete(&self, path: &str) -> (u16, serde_json::Value) {
        let (status, text) = self
            .token_call(Some(ADMIN_TOKEN), reqwest::Method::DELETE, path, None)
            .await;
        (status, serde_json::from_str(&text).unwrap_or_default())
    }
}
