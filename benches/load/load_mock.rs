//! Load-test helper for `benches/load/run.sh` (`cargo build --release --example load_mock`):
//!
//! - `serve`: a fast mock Anthropic upstream on loopback. HTTP/1.1 keep-alive, answers every
//!   POST at once with a Messages JSON body, or with an SSE stream of `--events` events (one
//!   write per event, chunked) when the body says `"stream": true`. With `--hold-secs` a stream
//!   sends its first events, then a `ping` every `--ping-secs` until the time is up: the slow
//!   upstream of the memory scenario.
//! - `body`: prints an Anthropic request body of about `--bytes` bytes (what wrk posts).
//! - `hold`: opens `--streams` streamed requests at once against the relay, waits until each has
//!   received its first event, reports the relay's RSS (`/proc/<pid>/status`) while they are
//!   all open, then closes them. Bounded by `--secs`. With `--idle`, each connection instead
//!   sends one non-stream request, reads its whole answer and stays open and silent: idle
//!   keep-alive connections.
//! - `free-port`: prints a free TCP port on 127.0.0.1.
//!
//! Plain tokio and hand-written HTTP/1.1: the mock must cost far less than what it measures.
//! Loopback only: every address it binds or connects to is checked to be 127.0.0.0/8.

#[path = "../common/answer.rs"]
mod answer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "Mock upstream and helpers of the llm-relay load test")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve mock Anthropic answers.
    Serve {
        /// Listen address (loopback only).
        #[arg(long, default_value = "127.0.0.1:0")]
        addr: SocketAddr,
        /// Events of a streamed answer.
        #[arg(long, default_value_t = 20)]
        events: usize,
        /// Keep each stream open this long (slow upstream); 0 = answer at once.
        #[arg(long, default_value_t = 0)]
        hold_secs: u64,
        /// Interval of the pings of a held stream.
        #[arg(long, default_value_t = 5)]
        ping_secs: u64,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Print a request body.
    Body {
        #[arg(long, default_value_t = 2048)]
        bytes: usize,
        #[arg(long)]
        stream: bool,
    },
    /// Hold many streams (or idle connections) open against the relay and report its RSS.
    Hold(HoldArgs),
    /// Print a free loopback port.
    FreePort,
}

#[derive(clap::Args)]
struct HoldArgs {
    /// Relay proxy address.
    #[arg(long)]
    addr: SocketAddr,
    /// Relay API key.
    #[arg(long)]
    key: String,
    /// Streams to open.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Relay pid, for its RSS.
    #[arg(long)]
    pid: u32,
    /// Give up opening after this long.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Request body size (Claude Code's first turn is about 20 KiB, later turns more).
    #[arg(long, default_value_t = 2048)]
    bytes: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 200)]
    parallel: usize,
    /// Idle keep-alive connections instead of streams: each sends one non-stream request,
    /// reads its whole answer and then stays open, silent.
    #[arg(long)]
    idle: bool,
}

fn main() -> std::io::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            addr,
            events,
            hold_secs,
            ping_secs,
            threads,
        } => {
            loopback_only(addr)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()?;
            rt.block_on(serve(
                addr,
                Arc::new(Answers::new(events)),
                Duration::from_secs(hold_secs),
                Duration::from_secs(ping_secs.max(1)),
            ))
        }
        Command::Body { bytes, stream } => {
            println!("{}", body(bytes, stream));
            Ok(())
        }
        Command::Hold(args) => {
            loopback_only(args.addr)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(hold(args))
        }
        Command::FreePort => {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            println!("{}", l.local_addr()?.port());
            Ok(())
        }
    }
}

fn loopback_only(addr: SocketAddr) -> std::io::Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{addr}: the load test only talks to loopback addresses"
        )))
    }
}

/// An Anthropic request body of about `bytes` bytes, no session id (the key comes from the
/// system prompt and the first message).
fn body(bytes: usize, stream: bool) -> String {
    let head = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":{stream},"system":"You are a careful assistant for software engineers.","messages":[{{"role":"user","content":""#
    );
    let tail = r#""}]}"#;
    let text: String = "Explain what this function does and how to test it. "
        .chars()
        .cycle()
        .take(bytes.saturating_sub(head.len() + tail.len()))
        .collect();
    format!("{head}{text}{tail}")
}

/// Pre-built responses.
struct Answers {
    json: Vec<u8>,
    /// HTTP head of a stream, then one chunk per event, then the last chunk.
    stream_head: Vec<u8>,
    stream_chunks: Vec<Vec<u8>>,
    ping_chunk: Vec<u8>,
}

impl Answers {
    fn new(events: usize) -> Self {
        let json_body = answer::anthropic_json();
        let mut json = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nrequest-id: req_loadmock\r\n\r\n",
            json_body.len()
        )
        .into_bytes();
        json.extend_from_slice(&json_body);
        let sse = answer::anthropic_sse(events);
        let stream_chunks = answer::split_events(&sse).into_iter().map(chunk).collect();
        Answers {
            json,
            stream_head: b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\nrequest-id: req_loadmock\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
            stream_chunks,
            ping_chunk: chunk(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"),
        }
    }
}

/// One HTTP/1.1 chunk.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

async fn serve(
    addr: SocketAddr,
    answers: Arc<Answers>,
    hold: Duration,
    ping: Duration,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let answers = answers.clone();
        tokio::spawn(async move {
            let _ = connection(sock, &answers, hold, ping).await;
        });
    }
}

/// Serves requests on one keep-alive connection until the peer closes it.
async fn connection(
    mut sock: TcpStream,
    answers: &Answers,
    hold: Duration,
    ping: Duration,
) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if read_more(&mut sock, &mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = &buf[..head_end];
        let Some(len) = content_length(head) else {
            sock.write_all(
                b"HTTP/1.1 411 Length Required\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await?;
            return Ok(());
        };
        while buf.len() < head_end + len {
            if read_more(&mut sock, &mut buf).await? == 0 {
                return Ok(());
            }
        }
        let stream = is_stream(&buf[head_end..head_end + len]);
        buf.drain(..head_end + len);
        if !stream {
            sock.write_all(&answers.json).await?;
            continue;
        }
        sock.write_all(&answers.stream_head).await?;
        let (first, rest) = answers
            .stream_chunks
            .split_at(3.min(answers.stream_chunks.len()));
        for c in first {
            sock.write_all(c).await?;
        }
        if !hold.is_zero() {
            let until = Instant::now() + hold;
            while Instant::now() < until {
                tokio::time::sleep(ping.min(until.saturating_duration_since(Instant::now()))).await;
                sock.write_all(&answers.ping_chunk).await?;
            }
        }
        for c in rest {
            sock.write_all(c).await?;
        }
        sock.write_all(b"0\r\n\r\n").await?;
    }
}

async fn read_more(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.reserve(8 << 10);
    sock.read_buf(buf).await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

/// The body asks for a stream: `"stream":true` at the top level (bodies here are flat enough
/// for a byte search; the relay re-serializes nothing).
fn is_stream(body: &[u8]) -> bool {
    find(body, b"\"stream\":true").is_some() || find(body, b"\"stream\": true").is_some()
}

async fn hold(args: HoldArgs) -> std::io::Result<()> {
    let HoldArgs {
        addr,
        key,
        streams,
        pid,
        secs,
        bytes,
        parallel,
        idle,
    } = args;
    let limit = Duration::from_secs(secs);
    let body = body(bytes, !idle);
    let request = Arc::new(
        format!(
            "POST /v1/messages HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\nanthropic-version: 2023-06-01\r\nx-api-key: {key}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    );
    let rss_before = rss_kib(pid, "VmRSS");
    let open = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let (close_tx, close_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(streams);
    for _ in 0..streams {
        let (request, open, failed, gate) =
            (request.clone(), open.clone(), failed.clone(), gate.clone());
        let mut close_rx = close_rx.clone();
        tasks.push(tokio::spawn(async move {
            let opened = {
                let Ok(_permit) = gate.acquire().await else {
                    return;
                };
                let open = async {
                    if idle {
                        open_idle(addr, &request).await
                    } else {
                        open_stream(addr, &request).await
                    }
                };
                tokio::time::timeout(Duration::from_secs(30), open).await
            };
            let mut sock = match opened {
                Ok(Ok(s)) => s,
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            open.fetch_add(1, Ordering::Relaxed);
            // Keep reading (pings) until told to close or the stream ends.
            let mut tmp = [0u8; 4096];
            loop {
                tokio::select! {
                    r = sock.read(&mut tmp) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = close_rx.changed() => break,
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    while open.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < streams
        && started.elapsed() < limit
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened_in = started.elapsed();
    // Let the relay settle with every stream open, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = open.load(Ordering::Relaxed);
    let rss = rss_kib(pid, "VmRSS");
    let hwm = rss_kib(pid, "VmHWM");
    println!(
        "hold {}={streams} open={held} failed={} opened_in_s={:.1} rss_before_kib={} rss_kib={} hwm_kib={}",
        if idle { "idle" } else { "streams" },
        failed.load(Ordering::Relaxed),
        opened_in.as_secs_f64(),
        rss_before.unwrap_or(0),
        rss.unwrap_or(0),
        hwm.unwrap_or(0),
    );
    let _ = close_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// Connects, sends the request and reads until the first SSE event has arrived.
async fn open_stream(addr: SocketAddr, request: &[u8]) -> std::io::Result<TcpStream> {
    let mut sock = TcpStream::connect(addr).await?;
    sock.write_all(request).await?;
    let mut seen = Vec::with_capacity(1024);
    let mut tmp = [0u8; 4096];
    while find(&seen, b"message_start").is_none() {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the first event"));
        }
        seen.extend_from_slice(&tmp[..n]);
        if seen.starts_with(b"HTTP/1.1 ") && !seen.starts_with(b"HTTP/1.1 200") {
            return Err(std::io::Error::other("not a 200 answer"));
        }
    }
    Ok(sock)
}

/// Connects, sends a non-stream request and reads its whole answer (a 200 with a length): the
/// connection is then an idle keep-alive one.
async fn open_idle(addr: SocketAddr, request: &[u8]) -> std::io::Result<TcpStream> {
    let mut sock = TcpStream::connect(addr).await?;
    sock.write_all(request).await?;
    let mut seen = Vec::with_capacity(2048);
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = find(&seen, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                return Err(std::io::Error::other("not a 200 answer"));
            }
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| std::io::Error::other("an answer without a length"))?;
            if seen.len() >= end + 4 + length {
                return Ok(sock);
            }
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the whole answer"));
        }
        seen.extend_from_slice(&tmp[..n]);
    }
}

fn rss_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .trim_start_matches(':')
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}
