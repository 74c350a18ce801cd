//! Session identity cost (DESIGN §7): parsing the routing fields of a body and deriving the
//! session key, for a 20 KiB Anthropic request (Claude Code shape) and a 200 KiB Codex request.
//! `explicit_id` carries the client's session id (header / `metadata.user_id` /
//! `prompt_cache_key`); `content` has none, so the opening of the conversation is hashed.
//! Target: < 20 µs for the 20 KiB request, parse included. `output_cap` is the second walk of
//! the body that a key with cost limits costs (the estimate its request holds).

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use relay_filters::request_body::{output_cap, parse_request_body, validate_for};
use relay_filters::session_hash::{session_key, SessionInput, SessionStrategy};
use relay_filters::Protocol;

const KEY_ID: &str = "0199a3c2-7d1e-7c4a-9f3b-5e2d8a1c6b40";

fn bench_session_key(c: &mut Criterion) {
    let cases = [
        (
            "anthropic_20k",
            Protocol::Anthropic,
            common::anthropic_request(20 << 10, true),
            common::anthropic_request(20 << 10, false),
        ),
        (
            "codex_200k",
            Protocol::OpenaiResponses,
            common::codex_request(200 << 10, true),
            common::codex_request(200 << 10, false),
        ),
    ];
    for (name, protocol, explicit, content) in &cases {
        let mut group = c.benchmark_group(format!("session_key/{name}"));
        for (variant, req) in [("explicit_id", explicit), ("content", content)] {
            eprintln!(
                "session_key/{name}/{variant}: body {} bytes",
                req.body.len()
            );
            group.throughput(Throughput::Bytes(req.body.len() as u64));
            let parsed = parse_request_body(&req.body).expect("fixture parses");
            let input = SessionInput::new(*protocol, KEY_ID, &req.headers, &parsed);
            let key = session_key(SessionStrategy::Content, &input).expect("a key");
            assert!(key.starts_with(KEY_ID), "{key}");

            group.bench_function(BenchmarkId::new("parse", variant), |b| {
                b.iter(|| {
                    let p = parse_request_body(black_box(&req.body)).expect("parses");
                    validate_for(*protocol, &p).expect("valid");
                    p.stream
                })
            });
            // Read only for keys with cost limits (the hold's estimate), a second walk.
            group.bench_function(BenchmarkId::new("output_cap", variant), |b| {
                b.iter(|| output_cap(black_box(&req.body)))
            });
            group.bench_function(BenchmarkId::new("key", variant), |b| {
                b.iter(|| session_key(SessionStrategy::Content, black_box(&input)))
            });
            group.bench_function(BenchmarkId::new("parse_and_key", variant), |b| {
                b.iter(|| {
                    let p = parse_request_body(black_box(&req.body)).expect("parses");
                    validate_for(*protocol, &p).expect("valid");
                    let input = SessionInput::new(*protocol, KEY_ID, &req.headers, &p);
                    session_key(SessionStrategy::Content, &input)
                })
            });
        }
        group.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_session_key
}
criterion_main!(benches);
