//! A mock upstream speaking the providers' wire formats over plain HTTP/1.1 on a loopback
//! port: JSON and SSE answers with chosen usage, delays between events, cuts, error statuses;
//! it records every request it receives.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Token counts the mock reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct MockUsage {
    pub input: u64,
    pub output: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub cache_read: u64,
}

/// What the mock answers.
#[derive(Debug, Clone)]
pub struct Behavior {
    /// Status of the answer; non-2xx answers carry `error_body`.
    pub status: u16,
    pub extra_headers: Vec<(String, String)>,
    pub error_body: String,
    pub usage: MockUsage,
    pub model: String,
    /// Text deltas in a stream.
    pub deltas: usize,
    /// Pause after the first SSE event.
    pub pause_after_first: Duration,
    /// Pause between the other events.
    pub event_delay: Duration,
    /// Close the connection after this many events, without finishing the stream.
    pub cut_after: Option<usize>,
    /// Wait this long before sending the response head.
    pub head_delay: Duration,
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
            model: "claude-sonnet-4-5-20250929".into(),
            deltas: 3,
            pause_after_first: Duration::ZERO,
            event_delay: Duration::ZERO,
            cut_after: None,
            head_delay: Duration::ZERO,
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
}

impl MockUpstream {
    /// Starts a mock on a free loopback port.
    pub async fn start() -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind mock");
        let port = listener.local_addr().expect("addr").port();
        let mock = MockUpstream {
            port,
            behavior: Arc::new(Mutex::new(Behavior::default())),
            received: Arc::new(Mutex::new(Vec::new())),
            second_event_sent: Arc::new(Mutex::new(None)),
            streams_completed: Arc::new(Mutex::new(0)),
        };
        let m = mock.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let m = m.clone();
                tokio::spawn(async move {
                    let _ = m.serve(sock).await;
                });
            }
        });
        mock
    }

    /// Base URL for an account.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
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

    async fn serve(&self, mut sock: TcpStream) -> std::io::Result<()> {
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
            while buf.len() < len {
                let mut chunk = vec![0u8; 1 << 20];
                let n = sock.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body: Vec<u8> = buf.drain(..len).collect();
            let stream = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("stream").and_then(|s| s.as_bool()))
                .unwrap_or(false);
            self.received.lock().unwrap().push(Received {
                method,
                path,
                headers,
                body,
                at: Instant::now(),
            });
            let b = self.behavior.lock().unwrap().clone();
            if !b.head_delay.is_zero() {
                tokio::time::sleep(b.head_delay).await;
            }
            if b.status != 200 {
                let mut resp = format!(
                    "HTTP/1.1 {} Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
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
            if stream {
                self.write_stream(&mut sock, &b).await?;
                if b.cut_after.is_some() {
                    return Ok(());
                }
            } else {
                let json = anthropic_json(&b);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nrequest-id: req_mock\r\ncontent-length: {}\r\n\r\n{}",
                    json.len(),
                    json
                );
                sock.write_all(resp.as_bytes()).await?;
            }
        }
    }

    async fn write_stream(&self, sock: &mut TcpStream, b: &Behavior) -> std::io::Result<()> {
        sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
            .await?;
        let events = anthropic_events(b);
        for (i, ev) in events.iter().enumerate() {
            if b.cut_after == Some(i) {
                sock.shutdown().await?;
                return Ok(());
            }
            if i == 1 {
                if !b.pause_after_first.is_zero() {
                    tokio::time::sleep(b.pause_after_first).await;
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
    serde_json::json!({
        "id": "msg_mock_1",
        "type": "message",
        "role": "assistant",
        "model": b.model,
        "content": [{"type": "text", "text": "Hello from the mock."}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": usage_json(&b.usage, b.usage.output),
    })
    .to_string()
}

/// The SSE events of a streamed Anthropic Messages answer.
pub fn anthropic_events(b: &Behavior) -> Vec<String> {
    let ev = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    let mut out = vec![ev(
        "message_start",
        serde_json::json!({"type": "message_start", "message": {
            "id": "msg_mock_1", "type": "message", "role": "assistant", "model": b.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": usage_json(&b.usage, 1)}}),
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
    out.push(ev("message_delta", serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": b.usage.output}})));
    out.push(ev(
        "message_stop",
        serde_json::json!({"type": "message_stop"}),
    ));
    out
}
