//! The access log: one line per request, in the same text or JSON shape as the relay's other log
//! lines (`tracing-subscriber`'s full and JSON formats), written by hand into the log sink.
//!
//! Through `tracing`, the line cost a field visitor, dynamic dispatch and `fmt` machinery for
//! every field (about 11 000 instructions per request, 7 % of the relay's own work on a small
//! request); formatted here it costs a fraction of that. It is written only where `tracing`
//! would have written it: the log filter (`RELAY_LOG`) is asked for the same target and level.
//! Without an installed sink (tests, tools) the line goes through `tracing` as before.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::log_sink::LogSink;

/// The target the line is filtered and shown under.
pub const TARGET: &str = "llm_relay::proxy";

static SINK: OnceLock<(Arc<LogSink>, bool)> = OnceLock::new();

/// Sends access lines to `sink`, as JSON objects when `json`.
pub fn install(sink: Arc<LogSink>, json: bool) {
    let _ = SINK.set((sink, json));
}

/// One request's access line.
pub struct AccessLine<'a> {
    /// The relay's id of the request (the usage record's, `x-relay-request-id`).
    pub request_id: &'a str,
    /// The client's own `x-request-id`, or `-`.
    pub client_request_id: &'a str,
    pub protocol: &'a str,
    pub account: &'a str,
    pub model: &'a str,
    pub status: u16,
    pub input: u64,
    pub output: u64,
    pub cost: i64,
    pub latency_ms: i64,
    pub failovers: u32,
}

/// Logs the line, if the log filter lets `llm_relay::proxy` through at INFO.
pub fn log(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: "llm_relay::proxy", tracing::Level::INFO) {
        return;
    }
    let Some((sink, json)) = SINK.get() else {
        emit_tracing(line);
        return;
    };
    thread_local! {
        static BUF: RefCell<String> = const { RefCell::new(String::new()) };
    }
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        let now = SystemTime::now();
        if *json {
            format_json(&mut buf, now, line);
        } else {
            format_text(&mut buf, now, line);
        }
        sink.append(buf.as_bytes());
        if buf.capacity() > 4096 {
            *buf = String::new();
        }
    });
}

/// The line as a `tracing` event.
fn emit_tracing(line: &AccessLine<'_>) {
    tracing::info!(
        target: "llm_relay::proxy",
        request_id = %line.request_id,
        client_request_id = line.client_request_id,
        protocol = line.protocol,
        account = line.account,
        model = line.model,
        status = line.status,
        input = line.input,
        output = line.output,
        cost = line.cost,
        latency_ms = line.latency_ms,
        failovers = line.failovers,
        "request"
    );
}

/// A field's value, as `tracing` records it.
enum Value<'a> {
    /// Recorded with `%` (Display): bare in text.
    Shown(&'a str),
    /// A `&str`: quoted in text.
    Str(&'a str),
    Num(i128),
}

/// The line's fields, in the order the event names them.
fn fields<'a>(l: &AccessLine<'a>) -> [(&'static str, Value<'a>); 11] {
    [
        ("request_id", Value::Shown(l.request_id)),
        // The client's words: quoted, as whatever it sent (spaces included) stays one field.
        ("client_request_id", Value::Str(l.client_request_id)),
        ("protocol", Value::Str(l.protocol)),
        ("account", Value::Str(l.account)),
        ("model", Value::Str(l.model)),
        ("status", Value::Num(l.status.into())),
        ("input", Value::Num(l.input.into())),
        ("output", Value::Num(l.output.into())),
        ("cost", Value::Num(l.cost.into())),
        ("latency_ms", Value::Num(l.latency_ms.into())),
        ("failovers", Value::Num(l.failovers.into())),
    ]
}

/// `2026-11-30T17:42:48.296750Z  INFO llm_relay::proxy: request request_id=… protocol="…" …`
fn format_text(out: &mut String, now: SystemTime, l: &AccessLine<'_>) {
    timestamp(out, now);
    out.push_str("  INFO ");
    out.push_str(TARGET);
    out.push_str(": request");
    for (name, value) in fields(l) {
        out.push(' ');
        out.push_str(name);
        out.push('=');
        match value {
            Value::Shown(s) => out.push_str(s),
            Value::Str(s) => debug_str(out, s),
            Value::Num(n) => out.push_str(itoa::Buffer::new().format(n)),
        }
    }
    out.push('\n');
}

/// `{"timestamp":"…","level":"INFO","fields":{"message":"request",…},"target":"llm_relay::proxy"}`
fn format_json(out: &mut String, now: SystemTime, l: &AccessLine<'_>) {
    out.push_str("{\"timestamp\":\"");
    timestamp(out, now);
    out.push_str("\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\"");
    for (name, value) in fields(l) {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        match value {
            Value::Shown(s) | Value::Str(s) => json_str(out, s),
            Value::Num(n) => out.push_str(itoa::Buffer::new().format(n)),
        }
    }
    out.push_str("},\"target\":\"");
    out.push_str(TARGET);
    out.push_str("\"}\n");
}

/// A string as `{:?}` writes it: quoted, plain when nothing in it needs escaping.
fn debug_str(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| (b' '..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// A JSON string.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber`'s default timer writes it. The
/// date and time of day are made once per second per thread.
fn timestamp(out: &mut String, now: SystemTime) {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            cached.1.clear();
            let _ = write!(
                cached.1,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            cached.0 = secs;
        }
        out.push_str(&cached.1);
    });
    let micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push('.');
    out.push_str(std::str::from_utf8(&digits).unwrap_or("000000"));
    out.push('Z');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;
    use crate::log_sink::tests::Recorder as Capture;

    /// What `tracing-subscriber` writes for the line, in text or JSON.
    fn through_tracing(line: &AccessLine<'_>, json: bool) -> String {
        let capture = Capture::default();
        let writer = capture.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        if json {
            tracing::subscriber::with_default(builder.json().finish(), || emit_tracing(line));
        } else {
            tracing::subscriber::with_default(builder.finish(), || emit_tracing(line));
        }
        let out = capture.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    /// The line with its timestamp cut out, and the timestamp.
    fn split_timestamp(line: &str, json: bool) -> (String, String) {
        let start = if json {
            line.find("\"timestamp\":\"").unwrap() + 13
        } else {
            0
        };
        let end = start + line[start..].find('Z').unwrap() + 1;
        (
            format!("{}{}", &line[..start], &line[end..]),
            line[start..end].to_string(),
        )
    }

    #[test]
    fn lines_match_what_tracing_writes_in_text_and_json() {
        let lines = [
            AccessLine {
                request_id: "01a22d8d-5ae8-75cd-9c5f-316d40638d98",
                client_request_id: "-",
                protocol: "anthropic",
                account: "mock",
                model: "claude-sonnet-4-5-20250929",
                status: 200,
                input: 512,
                output: 96,
                cost: 3283,
                latency_ms: 0,
                failovers: 0,
            },
            AccessLine {
                request_id: "01a22d8d-5ae8-75cd-9c5f-316d40638d99",
                client_request_id: "req 7 \"quoted\"",
                protocol: "openai_chat",
                account: "acc \"quoted\" \\ back\tslash ü",
                model: "-",
                status: 502,
                input: u64::MAX,
                output: 0,
                cost: -5,
                latency_ms: 123_456,
                failovers: 3,
            },
        ];
        for line in &lines {
            for json in [false, true] {
                let expected = through_tracing(line, json);
                let mut ours = String::new();
                let now = SystemTime::now();
                if json {
                    format_json(&mut ours, now, line);
                } else {
                    format_text(&mut ours, now, line);
                }
                let (expected_rest, _) = split_timestamp(&expected, json);
                let (ours_rest, stamp) = split_timestamp(&ours, json);
                assert_eq!(ours_rest, expected_rest);
                if json {
                    let a: serde_json::Value = serde_json::from_str(&ours).unwrap();
                    let b: serde_json::Value = serde_json::from_str(&expected).unwrap();
                    assert_eq!(a["fields"], b["fields"]);
                }
                // The timestamp is now's, to the microsecond: read back field by field.
                assert_eq!(stamp.len(), "2026-11-30T17:42:48.296750Z".len());
                let n = |r: std::ops::Range<usize>| stamp[r].parse::<u32>().unwrap();
                let date = time::Date::from_calendar_date(
                    n(0..4) as i32,
                    time::Month::try_from(n(5..7) as u8).unwrap(),
                    n(8..10) as u8,
                )
                .unwrap();
                let clock = time::Time::from_hms_micro(
                    n(11..13) as u8,
                    n(14..16) as u8,
                    n(17..19) as u8,
                    n(20..26),
                )
                .unwrap();
                let read = time::PrimitiveDateTime::new(date, clock).assume_utc();
                let expected_micros = now.duration_since(UNIX_EPOCH).unwrap().as_micros();
                assert_eq!(
                    (read.unix_timestamp_nanos() / 1000) as u128,
                    expected_micros
                );
            }
        }
    }

    #[test]
    fn control_bytes_are_escaped_in_json() {
        let mut out = String::new();
        json_str(&mut out, "a\u{1}b\nc");
        assert_eq!(out, "\"a\\u0001b\\nc\"");
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, "a\u{1}b\nc");
    }
}
