//! A mock upstream speaking the providers' wire formats over HTTP/1.1 on a loopback port, plain
//! or over TLS with a certificate from a CA made for the test: JSON and SSE answers with chosen
//! usage, delays between events, cuts, error statuses; it records every request it receives.
//!
//! The request path decides the protocol of the answer, as it does at the real providers:
//! `…/chat/completions` → OpenAI Chat, `…/responses` → OpenAI Responses,
//! `…/models/{m}:generateContent` / `:streamGenerateContent` / `:countTokens` → Gemini, anything
//! else → Anthropic Messages. Any prefix before those (an account's base-URL path) is ignored.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// Token counts the mock reports, as each wire format's own fields (not normalised):
///
/// | field | Anthropic | OpenAI Chat | OpenAI Responses | Gemini |
/// |---|---|---|---|---|
/// | `input` | `input_tokens` (uncached) | `prompt_tokens` (cached included) | `input_tokens` (cached included) | `promptTokenCount` (cached included) |
/// | `output` | `output_tokens` | `completion_tokens` (reasoning included) | `output_tokens` (reasoning included) | `candidatesTokenCount` (thoughts apart) |
/// | `cache_read` | `cache_read_input_tokens` | `cached_tokens` | `cached_tokens` | `cachedContentTokenCount` |
/// | `cache_write_*` | `cache_creation.ephemeral_*` | — | — | — |
///
/// Reasoning and Gemini tool-use counts are in [`Behavior::extra_usage`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MockUsage {
    pub input: u64,
    pub output: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub cache_read: u64,
}

impl MockUsage {
    /// Only input and output tokens.
    pub fn io(input: u64, output: u64) -> Self {
        MockUsage {
            input,
            output,
            ..MockUsage::default()
        }
    }
}

/// Counts only some protocols report.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtraUsage {
    /// OpenAI `reasoning_tokens` (inside the output count), Gemini `thoughtsTokenCount`
    /// (apart from it); omitted when 0.
    pub reasoning: u64,
    /// Gemini `toolUsePromptTokenCount`; omitted when 0.
    pub tool_use: u64,
    /// Web searches: Anthropic `usage.server_tool_use.web_search_requests` (0 in
    /// message_start, the count in message_delta and the JSON answer), OpenAI Responses
    /// `web_search_call` output items and their `response.web_search_call.*` events, Gemini
    /// `groundingMetadata.webSearchQueries` in the finishing chunk (with an empty query and a
    /// repeated one, which Gemini does not bill); omitted when 0.
    pub web_searches: u64,
}

/// The wire protocol a request path implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireProtocol {
    Anthropic,
    OpenaiChat,
    OpenaiResponses,
    Gemini,
}

impl WireProtocol {
    /// The protocol of a request path (query ignored), whatever prefix precedes it.
    pub fn of_path(path: &str) -> WireProtocol {
        let path = path.split('?').next().unwrap_or(path);
        if path.ends_with("/chat/completions") {
            WireProtocol::OpenaiChat
        } else if path.ends_with("/responses") || path.ends_with("/responses/compact") {
            WireProtocol::OpenaiResponses
        } else if path.contains("/models/")
            && (path.ends_with(":generateContent")
                || path.ends_with(":streamGenerateContent")
                || path.ends_with(":countTokens"))
        {
            WireProtocol::Gemini
        } else {
            WireProtocol::Anthropic
        }
    }
}

/// What the mock answers.
#[derive(Debug, Clone)]
pub struct Behavior {
    /// Status of the answer; non-2xx answers carry `error_body`.
    pub status: u16,
    pub extra_headers: Vec<(String, String)>,
    pub error_body: String,
    pub usage: MockUsage,
    pub extra_usage: ExtraUsage,
    /// Model reported by Anthropic answers.
    pub model: String,
    /// Model reported by OpenAI and Gemini answers; `None` echoes the requested model (body
    /// `model`, or the Gemini path's).
    pub upstream_model: Option<String>,
    /// Text deltas in a stream.
    pub deltas: usize,
    /// Pause after the first SSE event.
    pub pause_after_first: Duration,
    /// Hold the second event until this is notified (for at most 10 s).
    pub second_event_gate: Option<Arc<tokio::sync::Notify>>,
    /// Pause between the other events.
    pub event_delay: Duration,
    /// Close the connection after this many events, without finishing the stream.
    pub cut_after: Option<usize>,
    /// With `cut_after`: send the first half of the next event before closing.
    pub cut_mid_event: bool,
    /// Send a JSON answer chunked, and close after this many bytes of it.
    pub cut_json_after: Option<usize>,
    /// End the stream after this many events with clean framing (the last chunk), its
    /// terminal event never sent; `in_band_error` (a whole SSE event) goes out first.
    pub end_after: Option<usize>,
    pub in_band_error: Option<String>,
    /// The content type of a streamed answer (`text/event-stream` unless set).
    pub stream_content_type: Option<String>,
    /// Wait this long before sending the response head.
    pub head_delay: Duration,
    /// Answer with the request's own `x-request-id` (a gateway echoing it) instead of an id
    /// of the upstream's.
    pub echo_request_id: bool,
    /// OAuth token answers: wait this long between the head and the body.
    pub body_delay: Duration,
    /// OAuth token answers: their `expires_in` (seconds), or none (an opaque token of unknown
    /// expiry).
    pub token_expires_in: Option<u64>,
    /// OAuth token answers: whether they carry a new refresh token (a provider that rotates
    /// them) or none (the one sent stays in force).
    pub token_rotates: bool,
    /// Answer with this status as soon as the request head is in, and close without reading
    /// the body (an upstream refusing a body too large).
    pub refuse_body_with: Option<u16>,
    /// Refuse a `/responses` call that does not ask for a stream, as the ChatGPT Codex backend
    /// does: `400 {"detail":"Stream must be set to true"}` (`/responses/compact` is answered).
    pub streams_only: bool,
    /// OpenAI answers: the `service_tier` they name (Chat chunks and Responses objects only
    /// when set; a whole Chat answer says `default` when unset); Anthropic answers: the
    /// `usage.speed` they name (only when set).
    pub service_tier: Option<String>,
    /// Anthropic answers: the `usage.iterations` of the whole answer and of message_delta.
    pub iterations: Option<serde_json::Value>,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            status: 200,
            extra_headers: Vec::new(),
            error_body: String::new(),
            usage: MockUsage {
                input: 12,
                output: 34,
                cache_write_5m: 0,
                cache_write_1h: 0,
                cache_read: 0,
            },
            extra_usage: ExtraUsage::default(),
            model: "claude-sonnet-4-5-20250929".into(),
            upstream_model: None,
            deltas: 3,
            pause_after_first: Duration::ZERO,
            second_event_gate: None,
            event_delay: Duration::ZERO,
            cut_after: None,
            cut_mid_event: false,
            cut_json_after: None,
            end_after: None,
            in_band_error: None,
            stream_content_type: None,
            head_delay: Duration::ZERO,
            echo_request_id: false,
            body_delay: Duration::ZERO,
            token_expires_in: Some(28800),
            token_rotates: true,
            refuse_body_with: None,
            streams_only: false,
            service_tier: None,
            iterations: None,
        }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Received {
    /// First value of a header (name lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The path without its query.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or(&self.path)
    }

    /// The query string, if any.
    pub fn query(&self) -> Option<&str> {
        self.path.split_once('?').map(|(_, q)| q)
    }
}

/// What the mock knows about a request when it builds the answer.
#[derive(Debug, Clone)]
pub struct AnswerFor {
    pub protocol: WireProtocol,
    /// The model the request named (body `model`, or the Gemini path's).
    pub requested_model: Option<String>,
    /// Whether the answer is a stream (body `stream`, or Gemini `:streamGenerateContent`).
    pub stream: bool,
    /// Gemini `:streamGenerateContent` with `alt=sse` (else a JSON array).
    pub gemini_sse: bool,
    /// Gemini `:countTokens`: answered with a token count, no content.
    pub count_tokens: bool,
    /// Chat `stream_options.include_usage` is `true`.
    pub include_usage: bool,
    /// Response / completion id, unique per mock and request.
    pub id: String,
}

impl AnswerFor {
    /// Reads what matters from the request line and body.
    pub fn of(path: &str, body: &[u8], port: u16, seq: usize) -> AnswerFor {
        let protocol = WireProtocol::of_path(path);
        let json = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
        let (path_only, query) = match path.split_once('?') {
            Some((p, q)) => (p, q),
            None => (path, ""),
        };
        let gemini_method = path_only.rsplit_once(':').map(|(_, m)| m).unwrap_or("");
        let requested_model = match protocol {
            WireProtocol::Gemini => path_only
                .rsplit_once("/models/")
                .and_then(|(_, rest)| rest.split_once(':'))
                .map(|(m, _)| m.to_string()),
            _ => json
                .get("model")
                .and_then(|m| m.as_str())
                .map(str::to_string),
        };
        let stream = match protocol {
            WireProtocol::Gemini => gemini_method == "streamGenerateContent",
            _ => json
                .get("stream")
                .and_then(|s| s.as_bool())
                .unwrap_or(false),
        };
        AnswerFor {
            protocol,
            requested_model,
            stream,
            gemini_sse: query.split('&').any(|kv| kv == "alt=sse"),
            count_tokens: protocol == WireProtocol::Gemini && gemini_method == "countTokens",
            include_usage: json
                .pointer("/stream_options/include_usage")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            id: format!("mock_{port}_{seq}"),
        }
    }

    /// The id the upstream gives the request in `x-request-id` (OpenAI's `req_...`).
    pub fn upstream_request_id(&self) -> String {
        format!("req_{}", self.id)
    }

    fn model(&self, b: &Behavior) -> String {
        b.upstream_model
            .clone()
            .or_else(|| self.requested_model.clone())
            .unwrap_or_else(|| "mock-model".into())
    }
}

/// A running mock upstream.
#[derive(Clone)]
pub struct MockUpstream {
    pub port: u16,
    pub behavior: Arc<Mutex<Behavior>>,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// When the mock wrote the second SSE event (for the no-buffering test).
    pub second_event_sent: Arc<Mutex<Option<Instant>>>,
    /// When the mock finished writing a whole stream.
    pub streams_completed: Arc<Mutex<u32>>,
    /// Connections accepted so far.
    pub connections: Arc<Mutex<u32>>,
}

/// What a relay needs to reach a TLS mock: its base URL and the CA to trust.
pub struct TlsFiles {
    pub url: String,
    /// PEM of the CA that signed the mock's certificate (for `SSL_CERT_FILE`).
    pub ca_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl MockUpstream {
    /// Starts a mock on a free loopback port.
    pub async fn start() -> MockUpstream {
        MockUpstream::listen(None).await
    }

    /// Binds a free loopback port and serves each connection, over TLS when `tls` is given.
    async fn listen(tls: Option<tokio_rustls::TlsAcceptor>) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let port = listener.local_addr().expect("addr").port();
        let mock = MockUpstream {
            port,
            behavior: Arc::new(Mutex::new(Behavior::default())),
            received: Arc::new(Mutex::new(Vec::new())),
            second_event_sent: Arc::new(Mutex::new(None)),
            streams_completed: Arc::new(Mutex::new(0)),
            connections: Arc::new(Mutex::new(0)),
        };
        let m = mock.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                *m.connections.lock().unwrap() += 1;
                let m = m.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = match tls {
                        // A client that rejects the certificate ends the handshake: nothing to
                        // serve.
                        Some(acceptor) => match acceptor.accept(sock).await {
                            Ok(stream) => m.serve(stream).await,
                            Err(_) => Ok(()),
                        },
                        None => m.serve(sock).await,
                    };
                });
            }
        });
        mock
    }

    /// Base URL for an account.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts a mock that speaks TLS (HTTP/1.1 by ALPN) with a certificate for `localhost` and
    /// `127.0.0.1`, signed by a CA made for this mock; the CA's PEM file is in the returned
    /// [`TlsFiles`].
    pub async fn start_tls() -> (MockUpstream, TlsFiles) {
        use tokio_rustls::rustls;
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "llm-relay test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let mock = MockUpstream::listen(Some(acceptor)).await;
        let url = format!("https://127.0.0.1:{}", mock.port);
        (
            mock,
            TlsFiles {
                url,
                ca_file,
                _dir: dir,
            },
        )
    }

    pub fn set(&self, f: impl FnOnce(&mut Behavior)) {
        f(&mut self.behavior.lock().unwrap());
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Waits until the mock has received `n` requests in all (each is counted as soon as it
    /// is read, before any `head_delay`).
    pub async fn wait_count(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count() < n {
            assert!(
                Instant::now() < deadline,
                "the mock received {} of {n} requests",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, mut sock: S) -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            // Read one request head.
            let head_end = loop {
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    break i;
                }
                let mut chunk = [0u8; 65536];
                let n = sock.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            buf.drain(..head_end + 4);
            let mut lines = head.split("\r\n");
            let request_line = lines.next().unwrap_or("");
            let mut parts = request_line.split(' ');
            let method = parts.next().unwrap_or("").to_string();
            let path = parts.next().unwrap_or("").to_string();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let refuse = self.behavior.lock().unwrap().refuse_body_with;
            if let Some(status) = refuse {
                let body = r#"{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum allowed number of bytes."}}"#;
                let resp = format!(
                    "HTTP/1.1 {status} Payload Too Large\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(resp.as_bytes()).await?;
                sock.flush().await?;
                // Closed with the body unread: the kernel resets the connection.
                return Ok(());
            }
            while buf.len() < len {
                let mut chunk = vec![0u8; 1 << 20];
                let n = sock.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body: Vec<u8> = buf.drain(..len).collect();
            let sent_request_id = headers
                .iter()
                .find(|(k, _)| k == "x-request-id")
                .map(|(_, v)| v.clone());
            let token_endpoint = path.ends_with("/oauth/token");
            let compact = path.split('?').next().unwrap_or("").ends_with("/compact");
            let answer = {
                let mut received = self.received.lock().unwrap();
                let answer = AnswerFor::of(&path, &body, self.port, received.len() + 1);
                received.push(Received {
                    method,
                    path,
                    headers,
                    body,
                    at: Instant::now(),
                });
                answer
            };
            let mut b = self.behavior.lock().unwrap().clone();
            if !b.head_delay.is_zero() {
                tokio::time::sleep(b.head_delay).await;
            }
            let responses_call = answer.protocol == WireProtocol::OpenaiResponses && !compact;
            if b.streams_only && responses_call && !answer.stream {
                b.status = 400;
                b.error_body = r#"{"detail":"Stream must be set to true"}"#.into();
            }
            // OpenAI names every answer, errors too, by its own request id; Anthropic's is
            // `request-id`, Gemini sends none.
            let upstream_id = match answer.protocol {
                // A gateway that echoes the request's `x-request-id` and names none of its own.
                _ if b.echo_request_id => sent_request_id
                    .map(|id| format!("x-request-id: {id}\r\n"))
                    .unwrap_or_default(),
                WireProtocol::OpenaiChat | WireProtocol::OpenaiResponses => {
                    format!("x-request-id: {}\r\n", answer.upstream_request_id())
                }
                WireProtocol::Anthropic => {
                    format!("request-id: {}\r\n", answer.upstream_request_id())
                }
                WireProtocol::Gemini => String::new(),
            };
            if b.status != 200 {
                let mut resp = format!(
                    "HTTP/1.1 {} Error\r\ncontent-type: application/json\r\n{upstream_id}content-length: {}\r\n",
                    b.status,
                    b.error_body.len()
                );
                for (k, v) in &b.extra_headers {
                    resp.push_str(&format!("{k}: {v}\r\n"));
                }
                resp.push_str("\r\n");
                resp.push_str(&b.error_body);
                sock.write_all(resp.as_bytes()).await?;
                continue;
            }
            // An OAuth token endpoint: new tokens numbered by the request, rotated each time.
            if token_endpoint {
                let seq = answer.id.rsplit('_').next().unwrap_or("0");
                let mut json = serde_json::json!({
                    "token_type": "Bearer",
                    "access_token": format!("sk-ant-oat01-refreshed-{seq}"),
                    "refresh_token": format!("sk-ant-ort01-rotated-{seq}"),
                    "scope": "user:inference user:profile",
                });
                if let Some(s) = b.token_expires_in {
                    json["expires_in"] = s.into();
                }
                if !b.token_rotates {
                    if let Some(o) = json.as_object_mut() {
                        o.remove("refresh_token");
                    }
                }
                let json = json.to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    json.len()
                );
                sock.write_all(head.as_bytes()).await?;
                sock.flush().await?;
                if !b.body_delay.is_zero() {
                    tokio::time::sleep(b.body_delay).await;
                }
                sock.write_all(json.as_bytes()).await?;
                continue;
            }
            // Gemini streams are SSE only with `alt=sse`, a JSON array otherwise.
            let sse =
                answer.stream && (answer.protocol != WireProtocol::Gemini || answer.gemini_sse);
            if sse {
                let events = match answer.protocol {
                    WireProtocol::Anthropic => anthropic_events(&b),
                    WireProtocol::OpenaiChat => chat_events(&b, &answer),
                    WireProtocol::OpenaiResponses => responses_events(&b, &answer),
                    WireProtocol::Gemini => gemini_events(&b, &answer),
                };
                self.write_stream(&mut sock, &b, &events, &upstream_id)
                    .await?;
                if b.cut_after.is_some() {
                    return Ok(());
                }
            } else {
                let extra = &upstream_id;
                let json = match answer.protocol {
                    WireProtocol::Anthropic => anthropic_json(&b),
                    WireProtocol::OpenaiChat => chat_json(&b, &answer),
                    WireProtocol::OpenaiResponses => responses_json(&b, &answer),
                    // `:streamGenerateContent` without `alt=sse` answers one JSON array.
                    WireProtocol::Gemini if answer.count_tokens => gemini_count(&b),
                    WireProtocol::Gemini if answer.stream => gemini_array(&b, &answer),
                    WireProtocol::Gemini => gemini_json(&b, &answer),
                };
                // `cut_after` on an array stream: its first elements, then the connection closes.
                let (json, cut_json_after) = match b.cut_after {
                    Some(n) if answer.protocol == WireProtocol::Gemini && answer.stream => {
                        let part = gemini_array_cut(&b, &answer, n);
                        let len = part.len();
                        (part, Some(len))
                    }
                    _ => (json, b.cut_json_after),
                };
                if let Some(n) = cut_json_after {
                    let part = &json.as_bytes()[..n.min(json.len())];
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}transfer-encoding: chunked\r\n\r\n{:x}\r\n",
                        part.len()
                    );
                    sock.write_all(head.as_bytes()).await?;
                    sock.write_all(part).await?;
                    sock.write_all(b"\r\n").await?;
                    sock.shutdown().await?;
                    return Ok(());
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{}",
                    json.len(),
                    json
                );
                sock.write_all(resp.as_bytes()).await?;
            }
        }
    }

    async fn write_stream(
        &self,
        sock: &mut (impl AsyncWrite + Unpin),
        b: &Behavior,
        events: &[String],
        extra_head: &str,
    ) -> std::io::Result<()> {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncache-control: no-cache\r\n{extra_head}transfer-encoding: chunked\r\n\r\n",
            b.stream_content_type.as_deref().unwrap_or("text/event-stream")
        );
        sock.write_all(head.as_bytes()).await?;
        for (i, ev) in events.iter().enumerate() {
            if b.cut_after == Some(i) {
                if b.cut_mid_event {
                    let half = &ev.as_bytes()[..ev.len() / 2];
                    sock.write_all(format!("{:x}\r\n", half.len()).as_bytes())
                        .await?;
                    sock.write_all(half).await?;
                    sock.write_all(b"\r\n").await?;
                    sock.flush().await?;
                }
                sock.shutdown().await?;
                return Ok(());
            }
            if b.end_after == Some(i) {
                if let Some(err) = &b.in_band_error {
                    let chunk = format!("{:x}\r\n{}\r\n", err.len(), err);
                    sock.write_all(chunk.as_bytes()).await?;
                }
                break;
            }
            if i == 1 {
                if !b.pause_after_first.is_zero() {
                    tokio::time::sleep(b.pause_after_first).await;
                }
                if let Some(gate) = &b.second_event_gate {
                    let _ = tokio::time::timeout(Duration::from_secs(10), gate.notified()).await;
                }
                *self.second_event_sent.lock().unwrap() = Some(Instant::now());
            } else if i > 1 && !b.event_delay.is_zero() {
                tokio::time::sleep(b.event_delay).await;
            }
            let chunk = format!("{:x}\r\n{}\r\n", ev.len(), ev);
            sock.write_all(chunk.as_bytes()).await?;
            sock.flush().await?;
        }
        sock.write_all(b"0\r\n\r\n").await?;
        *self.streams_completed.lock().unwrap() += 1;
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn usage_json(u: &MockUsage, output: u64) -> serde_json::Value {
    serde_json::json!({
        "input_tokens": u.input,
        "cache_creation_input_tokens": u.cache_write_5m + u.cache_write_1h,
        "cache_read_input_tokens": u.cache_read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": u.cache_write_5m,
            "ephemeral_1h_input_tokens": u.cache_write_1h
        },
        "output_tokens": output,
        "service_tier": "standard"
    })
}

/// A non-streamed Anthropic Messages answer.
pub fn anthropic_json(b: &Behavior) -> String {
    let mut usage = usage_json(&b.usage, b.usage.output);
    add_server_tool_use(&mut usage, b, b.extra_usage.web_searches);
    if let Some(passes) = &b.iterations {
        usage["iterations"] = passes.clone();
    }
    serde_json::json!({
        "id": "msg_mock_1",
        "type": "message",
        "role": "assistant",
        "model": b.model,
        "content": [{"type": "text", "text": "Hello from the mock."}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": usage,
    })
    .to_string()
}

/// Anthropic `usage.server_tool_use` with `searches`, when the answer searched at all.
fn add_server_tool_use(usage: &mut serde_json::Value, b: &Behavior, searches: u64) {
    if b.extra_usage.web_searches > 0 {
        usage["server_tool_use"] = serde_json::json!({"web_search_requests": searches});
    }
    // Anthropic names the speed a request ran at in its usage.
    if let Some(speed) = &b.service_tier {
        usage["speed"] = speed.as_str().into();
    }
}

/// The SSE events of a streamed Anthropic Messages answer.
pub fn anthropic_events(b: &Behavior) -> Vec<String> {
    let ev = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    let mut start_usage = usage_json(&b.usage, 1);
    add_server_tool_use(&mut start_usage, b, 0);
    let mut out = vec![ev(
        "message_start",
        serde_json::json!({"type": "message_start", "message": {
            "id": "msg_mock_1", "type": "message", "role": "assistant", "model": b.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": start_usage}}),
    )];
    out.push(ev("content_block_start", serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
    out.push(ev("ping", serde_json::json!({"type": "ping"})));
    for i in 0..b.deltas {
        out.push(ev("content_block_delta", serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": format!("word{i} ")}})));
    }
    out.push(ev(
        "content_block_stop",
        serde_json::json!({"type": "content_block_stop", "index": 0}),
    ));
    let mut delta_usage = serde_json::json!({"output_tokens": b.usage.output});
    add_server_tool_use(&mut delta_usage, b, b.extra_usage.web_searches);
    if let Some(passes) = &b.iterations {
        delta_usage["iterations"] = passes.clone();
    }
    out.push(ev("message_delta", serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": delta_usage})));
    out.push(ev(
        "message_stop",
        serde_json::json!({"type": "message_stop"}),
    ));
    out
}

/// OpenAI Chat `usage` (cached input inside `prompt_tokens`, reasoning inside
/// `completion_tokens`).
fn chat_usage_json(u: &MockUsage, x: &ExtraUsage) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": u.input,
        "completion_tokens": u.output,
        "total_tokens": u.input + u.output,
        "prompt_tokens_details": {"cached_tokens": u.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": x.reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

/// A non-streamed OpenAI Chat Completions answer.
pub fn chat_json(b: &Behavior, a: &AnswerFor) -> String {
    serde_json::json!({
        "id": format!("chatcmpl-{}", a.id),
        "object": "chat.completion",
        "created": 1_759_327_400,
        "model": a.model(b),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from the mock.", "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": chat_usage_json(&b.usage, &b.extra_usage),
        "service_tier": b.service_tier.as_deref().unwrap_or("default"),
        "system_fingerprint": null
    })
    .to_string()
}

/// The SSE events of a streamed OpenAI Chat answer: `data:` chunks only, the usage-only chunk
/// (`choices: []`) only when the request asked for it, then `data: [DONE]`.
pub fn chat_events(b: &Behavior, a: &AnswerFor) -> Vec<String> {
    let model = a.model(b);
    let id = format!("chatcmpl-{}", a.id);
    let chunk = |choices: serde_json::Value, usage: serde_json::Value| {
        let mut v = serde_json::json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": 1_759_327_400,
            "model": model,
            "system_fingerprint": null,
            "choices": choices,
        });
        // With include_usage every chunk carries `"usage": null` until the last one.
        if a.include_usage {
            v["usage"] = usage;
        }
        if let Some(tier) = &b.service_tier {
            v["service_tier"] = tier.as_str().into();
        }
        format!("data: {v}\n\n")
    };
    let mut out = vec![chunk(
        serde_json::json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "finish_reason": null}]),
        serde_json::Value::Null,
    )];
    for i in 0..b.deltas {
        out.push(chunk(
            serde_json::json!([{"index": 0, "delta": {"content": format!("word{i} ")}, "finish_reason": null}]),
            serde_json::Value::Null,
        ));
    }
    out.push(chunk(
        serde_json::json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        serde_json::Value::Null,
    ));
    if a.include_usage {
        out.push(chunk(
            serde_json::json!([]),
            chat_usage_json(&b.usage, &b.extra_usage),
        ));
    }
    out.push("data: [DONE]\n\n".to_string());
    out
}

/// OpenAI Responses `usage`.
fn responses_usage_json(u: &MockUsage, x: &ExtraUsage) -> serde_json::Value {
    serde_json::json!({
        "input_tokens": u.input,
        "input_tokens_details": {"cached_tokens": u.cache_read},
        "output_tokens": u.output,
        "output_tokens_details": {"reasoning_tokens": x.reasoning},
        "total_tokens": u.input + u.output
    })
}

/// An OpenAI Responses `response` object.
fn response_object(
    b: &Behavior,
    a: &AnswerFor,
    status: &str,
    text: Option<&str>,
) -> serde_json::Value {
    let output = match text {
        Some(t) => {
            let mut items: Vec<serde_json::Value> = (0..b.extra_usage.web_searches)
                .map(|n| web_search_call(a, n, "completed"))
                .collect();
            items.push(serde_json::json!({
                "id": format!("msg_{}", a.id),
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": t}]
            }));
            serde_json::Value::Array(items)
        }
        None => serde_json::json!([]),
    };
    serde_json::json!({
        "id": format!("resp_{}", a.id),
        "object": "response",
        "created_at": 1_759_329_375,
        "status": status,
        "error": null,
        "incomplete_details": null,
        "instructions": null,
        "model": a.model(b),
        "output": output,
        "parallel_tool_calls": true,
        "previous_response_id": null,
        "store": false,
        "usage": if status == "completed" { responses_usage_json(&b.usage, &b.extra_usage) } else { serde_json::Value::Null },
        "metadata": {},
        "service_tier": b.service_tier,
    })
}

/// An OpenAI Responses `web_search_call` output item, the `n`th search of the answer.
fn web_search_call(a: &AnswerFor, n: u64, status: &str) -> serde_json::Value {
    serde_json::json!({
        "id": format!("ws_{}_{n}", a.id),
        "type": "web_search_call",
        "status": status,
        "action": {"type": "search", "query": format!("query {n}")}
    })
}

/// A non-streamed OpenAI Responses answer.
pub fn responses_json(b: &Behavior, a: &AnswerFor) -> String {
    response_object(b, a, "completed", Some("Hello from the mock.")).to_string()
}

/// The SSE events of a streamed OpenAI Responses answer: `response.created` …
/// `response.completed` (which carries the usage).
pub fn responses_events(b: &Behavior, a: &AnswerFor) -> Vec<String> {
    let mut seq = 0u64;
    let mut ev = |name: &str, mut data: serde_json::Value| {
        data["type"] = serde_json::Value::String(name.to_string());
        data["sequence_number"] = seq.into();
        seq += 1;
        format!("event: {name}\ndata: {data}\n\n")
    };
    let item_id = format!("msg_{}", a.id);
    let text: String = (0..b.deltas).map(|i| format!("word{i} ")).collect();
    let mut out = vec![
        ev(
            "response.created",
            serde_json::json!({"response": response_object(b, a, "in_progress", None)}),
        ),
        ev(
            "response.in_progress",
            serde_json::json!({"response": response_object(b, a, "in_progress", None)}),
        ),
    ];
    for n in 0..b.extra_usage.web_searches {
        let item_id = format!("ws_{}_{n}", a.id);
        out.push(ev(
            "response.output_item.added",
            serde_json::json!({"output_index": n, "item": web_search_call(a, n, "in_progress")}),
        ));
        for phase in ["in_progress", "searching", "completed"] {
            out.push(ev(
                &format!("response.web_search_call.{phase}"),
                serde_json::json!({"output_index": n, "item_id": item_id}),
            ));
        }
        out.push(ev(
            "response.output_item.done",
            serde_json::json!({"output_index": n, "item": web_search_call(a, n, "completed")}),
        ));
    }
    out.extend([
        ev(
            "response.output_item.added",
            serde_json::json!({"output_index": 0, "item": {"id": item_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}}),
        ),
        ev(
            "response.content_part.added",
            serde_json::json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}}),
        ),
    ]);
    for i in 0..b.deltas {
        out.push(ev(
            "response.output_text.delta",
            serde_json::json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": format!("word{i} "), "logprobs": []}),
        ));
    }
    out.push(ev(
        "response.output_text.done",
        serde_json::json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
    ));
    out.push(ev(
        "response.content_part.done",
        serde_json::json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": text}}),
    ));
    out.push(ev(
        "response.output_item.done",
        serde_json::json!({"output_index": 0, "item": {"id": item_id, "type": "message", "status": "completed", "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}], "role": "assistant"}}),
    ));
    out.push(ev(
        "response.completed",
        serde_json::json!({"response": response_object(b, a, "completed", Some(&text))}),
    ));
    out
}

/// Gemini `usageMetadata` with `candidates` output tokens so far (cumulative, as Gemini
/// reports it in every chunk).
fn gemini_usage_json(u: &MockUsage, x: &ExtraUsage, candidates: Option<u64>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "promptTokenCount": u.input,
        "totalTokenCount": u.input + candidates.unwrap_or(0) + x.reasoning + x.tool_use,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": u.input}],
    });
    if let Some(c) = candidates {
        v["candidatesTokenCount"] = c.into();
    }
    if u.cache_read > 0 {
        v["cachedContentTokenCount"] = u.cache_read.into();
    }
    if x.reasoning > 0 {
        v["thoughtsTokenCount"] = x.reasoning.into();
    }
    if x.tool_use > 0 {
        v["toolUsePromptTokenCount"] = x.tool_use.into();
    }
    v
}

/// One Gemini GenerateContentResponse.
fn gemini_chunk(
    b: &Behavior,
    a: &AnswerFor,
    text: &str,
    finished: bool,
    candidates: Option<u64>,
) -> serde_json::Value {
    let mut candidate = serde_json::json!({
        "content": {"parts": [{"text": text}], "role": "model"},
        "index": 0
    });
    if finished {
        candidate["finishReason"] = "STOP".into();
        let searches = b.extra_usage.web_searches;
        if searches > 0 {
            let mut queries: Vec<String> = (0..searches).map(|n| format!("query {n}")).collect();
            queries.push(String::new());
            queries.push("query 0".into());
            candidate["groundingMetadata"] = serde_json::json!({
                "webSearchQueries": queries,
                "groundingChunks": [{"web": {"uri": "https://vertexaisearch.cloud.google.com/grounding-api-redirect/x", "title": "example.com"}}],
                "searchEntryPoint": {"renderedContent": "<div></div>"},
            });
        }
    }
    serde_json::json!({
        "candidates": [candidate],
        "usageMetadata": gemini_usage_json(&b.usage, &b.extra_usage, candidates),
        "modelVersion": a.model(b),
        "responseId": a.id,
    })
}

/// A Gemini `countTokens` answer: the prompt's size, `usage.input` tokens.
pub fn gemini_count(b: &Behavior) -> String {
    serde_json::json!({
        "totalTokens": b.usage.input,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": b.usage.input}],
    })
    .to_string()
}

/// A non-streamed Gemini `generateContent` answer.
pub fn gemini_json(b: &Behavior, a: &AnswerFor) -> String {
    gemini_chunk(b, a, "Hello from the mock.", true, Some(b.usage.output)).to_string()
}

/// The chunks of a Gemini stream: output tokens grow chunk by chunk to `usage.output` in the
/// last one, which carries `finishReason`.
fn gemini_chunks(b: &Behavior, a: &AnswerFor) -> Vec<serde_json::Value> {
    let n = b.deltas.max(1) as u64;
    (0..n)
        .map(|i| {
            // The first chunk has no candidatesTokenCount yet, like Gemini's own first chunk.
            let candidates = (i > 0).then(|| b.usage.output * (i + 1) / n);
            gemini_chunk(b, a, &format!("word{i} "), i + 1 == n, candidates)
        })
        .collect()
}

/// The SSE events of a Gemini `:streamGenerateContent?alt=sse` answer (`\r\n` line endings,
/// as Gemini sends them).
pub fn gemini_events(b: &Behavior, a: &AnswerFor) -> Vec<String> {
    gemini_chunks(b, a)
        .into_iter()
        .map(|c| format!("data: {c}\r\n\r\n"))
        .collect()
}

/// A Gemini `:streamGenerateContent` answer without `alt=sse`: one JSON array.
pub fn gemini_array(b: &Behavior, a: &AnswerFor) -> String {
    serde_json::Value::Array(gemini_chunks(b, a)).to_string()
}

/// The first `n` elements of [`gemini_array`], the array left open (a stream cut after them).
fn gemini_array_cut(b: &Behavior, a: &AnswerFor, n: usize) -> String {
    let elements: Vec<String> = gemini_chunks(b, a)
        .iter()
        .take(n)
        .map(|c| c.to_string())
        .collect();
    format!("[{}", elements.join(",\r\n"))
}
