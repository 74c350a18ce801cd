//! The relay's own HTTP server application over Pingora: request heads it cannot read, keep-alive
//! connections between requests, and idle connections at shutdown.

mod common;

use std::time::Duration;

use common::{Relay, RelayOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(relay: &Relay) -> TcpStream {
    let addr = relay.proxy.trim_start_matches("http://");
    TcpStream::connect(addr)
        .await
        .expect("connect to the relay")
}

/// A relay started with one more environment setting.
async fn relay_with(env: &[(&str, &str)]) -> Relay {
    Relay::start_with(RelayOptions {
        env: env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
        ..Default::default()
    })
    .await
}

/// Asks for the health check on `conn`; asserts its 200 and returns its body.
async fn health_on(conn: &mut TcpStream) -> Vec<u8> {
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write the request");
    let (head, body) = read_response(conn).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body
}

/// Reads one response with a `Content-Length` body; returns its head and body.
async fn read_response(conn: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("a content-length");
            while buf.len() < end + 4 + len {
                let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
                    .await
                    .expect("body in time")
                    .expect("read body");
                assert!(n > 0, "connection closed inside the body");
                buf.extend_from_slice(&chunk[..n]);
            }
            return (head, buf[end + 4..end + 4 + len].to_vec());
        }
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("head in time")
            .expect("read head");
        assert!(n > 0, "connection closed before a response head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until the peer closes; returns what came before the close.
async fn read_to_close(conn: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let mut rest = Vec::new();
    tokio::time::timeout(wait, conn.read_to_end(&mut rest))
        .await
        .ok()
        .map(|r| {
            r.expect("read until close");
            rest
        })
}

#[tokio::test]
async fn an_unreadable_request_head_is_answered_400_and_the_connection_closed() {
    let relay = Relay::start().await;
    let mut conn = connect(&relay).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut conn, Duration::from_secs(10))
        .await
        .expect("the relay closes the connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");

    // So is an HTTP/1.1 request without Host, or with two (RFC 9112 §3.2).
    for head in [
        &b"GET /healthz HTTP/1.1\r\n\r\n"[..],
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ] {
        let mut conn = connect(&relay).await;
        conn.write_all(head).await.unwrap();
        let answer = read_to_close(&mut conn, Duration::from_secs(10))
            .await
            .expect("the relay closes the connection");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    }

    // The relay itself is unharmed.
    let ok = relay
        .http
        .get(format!("{}/healthz", relay.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn requests_share_a_kept_alive_connection_and_a_refusal_closes_it() {
    let relay = Relay::start().await;
    let mut conn = connect(&relay).await;
    for _ in 0..3 {
        assert_eq!(health_on(&mut conn).await, b"ok");
    }
    // A key the relay does not know: refused in the protocol's shape, and the connection ends.
    let body = br#"{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: sk-unknown\r\n\
         anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
    let err: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(err["error"]["type"], "authentication_error");
    let rest = read_to_close(&mut conn, Duration::from_secs(10))
        .await
        .expect("closed after the refusal");
    assert!(rest.is_empty(), "{rest:?}");
}

/// With work stealing off, Pingora runs the proxy on single-threaded runtimes, one per thread;
/// connections accepted by the proxy's own service are served on them like any others.
#[tokio::test]
async fn connections_are_served_with_work_stealing_off() {
    let relay = relay_with(&[("RELAY_WORK_STEALING", "false"), ("RELAY_THREADS", "4")]).await;
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.push(connect(&relay).await);
    }
    for _ in 0..3 {
        for conn in &mut conns {
            assert_eq!(health_on(conn).await, b"ok");
        }
    }
}

#[tokio::test]
async fn a_connection_idle_between_requests_is_closed_when_shutdown_begins() {
    // A long grace period: the relay keeps running well after SIGTERM, so a close seen during
    // it comes from the shutdown of idle connections, not from the process exiting.
    let mut relay = relay_with(&[("RELAY_SHUTDOWN__GRACE_PERIOD_SECONDS", "60")]).await;
    let mut conn = connect(&relay).await;
    health_on(&mut conn).await;

    let pid = relay.child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let rest = read_to_close(&mut conn, Duration::from_secs(30))
        .await
        .expect("the idle connection is closed during the grace period");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay is still in its grace period"
    );
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let relay = relay_with(&[("RELAY_CLIENT_IDLE_TIMEOUT", "1s")]).await;
    let mut conn = connect(&relay).await;
    health_on(&mut conn).await;
    // Without a bound the relay would wait for a next request as long as the client stays.
    let rest = read_to_close(&mut conn, Duration::from_secs(20))
        .await
        .expect("the idle connection is closed");
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn a_request_body_the_client_cannot_frame_is_answered_400() {
    let relay = Relay::start().await;
    let key = relay.active_key("framing").await;
    let mut conn = connect(&relay).await;
    let req = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\n\
         anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\nnot-a-chunk-size\r\n{{}}\r\n0\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut conn, Duration::from_secs(10))
        .await
        .expect("the relay answers and closes the connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
}

/// Runs `llm-relay serve` with `setting` pointing at a port another socket holds; returns the
/// exit status and standard error once it stops (at most 30 s).
fn serve_on_a_taken_port(setting: &str) -> (std::process::ExitStatus, String, u16) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().expect("its address").port();
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llm-relay"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RELAY_DATA_DIR", data.path())
        .env("RELAY_ADMIN_PASSWORD", "admin-password-1")
        .env(
            "RELAY_PROXY_ADDR",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .env(
            "RELAY_ADMIN_ADDR",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .env(setting, format!("127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the relay");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("the relay's status") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the relay kept running without its {setting} port");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr).expect("the relay's stderr");
    }
    drop(taken);
    (status, stderr, port)
}

#[test]
fn a_node_that_cannot_listen_stops_and_says_where() {
    for (setting, name) in [
        ("RELAY_ADMIN_ADDR", "admin_addr"),
        ("RELAY_PROXY_ADDR", "proxy_addr"),
    ] {
        let (status, stderr, port) = serve_on_a_taken_port(setting);
        assert_eq!(status.code(), Some(1), "{setting}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot listen on 127.0.0.1:{port} ({name})")),
            "{setting}: {stderr}"
        );
        assert!(stderr.contains("Address already in use"), "{stderr}");
    }
}

/// A certificate for `localhost` and `127.0.0.1` signed by a CA made here: (CA PEM, chain PEM
/// file, key PEM file) in `dir`.
fn proxy_certificate(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("params");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("certificate");
    let (cert_file, key_file) = (dir.join("proxy.pem"), dir.join("proxy.key"));
    std::fs::write(&cert_file, cert.pem()).expect("write certificate");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    (ca.pem(), cert_file, key_file)
}

/// A TLS connection to the relay trusting `ca_pem`, offering HTTP/2 and HTTP/1.1.
async fn tls_connect(
    relay: &Relay,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .expect("CA certificate");
    roots.add(ca).expect("CA trusted");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = connect(relay).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

#[tokio::test]
async fn the_proxy_serves_over_tls_when_a_certificate_is_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_pem, cert_file, key_file) = proxy_certificate(dir.path());
    let mock = common::mock_upstream::MockUpstream::start().await;
    let relay = Relay::start_with(RelayOptions {
        env: vec![
            (
                "RELAY_PROXY_TLS_CERT".into(),
                cert_file.display().to_string(),
            ),
            ("RELAY_PROXY_TLS_KEY".into(), key_file.display().to_string()),
        ],
        ..Default::default()
    })
    .await;
    relay
        .create_account("tls", "claude", &mock.url(), "sk-ant-upstream")
        .await;
    let user = relay.create_user("tls-user", 10_000).await;
    let (_, key) = relay.create_key(&user, serde_json::json!({})).await;
    let body = serde_json::to_vec(&common::messages_body(
        "claude-sonnet-4-5",
        false,
        serde_json::json!([{"role": "user", "content": "hello over TLS"}]),
    ))
    .expect("body");
    let request = |key: &str| {
        let mut r = format!(
            "POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key}\r\n\
             anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(&body);
        r
    };
    // The key reaches the proxy's cache within moments; until then it is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let mut tls = tls_connect(&relay, &ca_pem).await.expect("TLS handshake");
        // HTTP/1.1 is the only protocol offered, whatever the client prefers.
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        tls.write_all(&request(&key)).await.expect("send");
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.expect("read");
        let answer = String::from_utf8_lossy(&answer).into_owned();
        if answer.starts_with("HTTP/1.1 200") || std::time::Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"usage\""), "{answer}");
    let received = mock.requests();
    let last = received.last().expect("the upstream was asked");
    assert!(
        String::from_utf8_lossy(&last.body).contains("hello over TLS"),
        "the request went through"
    );
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = connect(&relay).await;
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(!got.starts_with(b"HTTP/1.1 200"), "plain HTTP was served");
    // Neither that failed handshake nor a client that connects and stays silent holds up the
    // next client: each handshake runs in its connection's own task.
    let _silent = connect(&relay).await;
    let mut tls = tokio::time::timeout(Duration::from_secs(5), tls_connect(&relay, &ca_pem))
        .await
        .expect("a handshake beside a silent connection")
        .expect("TLS handshake");
    tls.write_all(&request(&key)).await.expect("send");
    let mut answer = Vec::new();
    tls.read_to_end(&mut answer).await.expect("read");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}
