//! Usage metering throughput (DESIGN §9): the SSE parser alone and each protocol's stream meter,
//! fed a long recorded answer (~1 MiB) in upstream chunks of 64 B to 64 KiB, as the response
//! body filter sees them. Target: ≥ 1 GB/s per core on 4 KiB chunks.
//!
//! `cargo bench --bench sse_usage` (add `-- --quick` for a rough pass).

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use relay_filters::sse_usage::{SseParser, UsageMeter};
use relay_filters::Protocol;

const STREAM_BYTES: usize = 1 << 20;
const CHUNK_SIZES: [usize; 6] = [64, 256, 1024, 4096, 16 << 10, 64 << 10];

const PROTOCOLS: [(Protocol, &str); 4] = [
    (Protocol::Anthropic, "anthropic"),
    (Protocol::OpenaiChat, "openai_chat"),
    (Protocol::OpenaiResponses, "openai_responses"),
    (Protocol::Gemini, "gemini"),
];

/// One whole response through a fresh meter, chunk by chunk, then the end of the body.
fn meter_stream(protocol: Protocol, chunks: &[&[u8]]) -> u64 {
    let mut meter = UsageMeter::new(protocol, true);
    for chunk in chunks {
        meter.feed(black_box(chunk));
    }
    meter.finish().usage.output_tokens
}

fn parse_stream(chunks: &[&[u8]]) -> usize {
    let mut parser = SseParser::new();
    let mut seen = 0;
    for chunk in chunks {
        parser.feed(black_box(chunk), |ev| seen += ev.data.len());
    }
    parser.finish(|ev| seen += ev.data.len());
    seen
}

fn bench_meters(c: &mut Criterion) {
    for (protocol, name) in PROTOCOLS {
        let stream = common::long_stream(protocol, STREAM_BYTES);
        // The grown stream must still meter to the recorded counts' shape (output > 0).
        assert!(meter_stream(protocol, &[&stream]) > 0, "{name}: no usage");
        let mut group = c.benchmark_group(format!("sse_meter/{name}"));
        group.throughput(Throughput::Bytes(stream.len() as u64));
        for size in CHUNK_SIZES {
            let chunks: Vec<&[u8]> = stream.chunks(size).collect();
            group.bench_with_input(BenchmarkId::from_parameter(size), &chunks, |b, chunks| {
                b.iter(|| meter_stream(protocol, chunks))
            });
        }
        group.finish();
    }
}

fn bench_parser(c: &mut Criterion) {
    let stream = common::long_stream(Protocol::Anthropic, STREAM_BYTES);
    let mut group = c.benchmark_group("sse_parser/anthropic");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for size in CHUNK_SIZES {
        let chunks: Vec<&[u8]> = stream.chunks(size).collect();
        group.bench_with_input(BenchmarkId::from_parameter(size), &chunks, |b, chunks| {
            b.iter(|| parse_stream(chunks))
        });
    }
    group.finish();
}

/// Non-streamed answers: the JSON meter buffers the body and parses it once at the end; a
/// Gemini array (`streamGenerateContent` without `alt=sse`) is read element by element.
fn bench_json(c: &mut Criterion) {
    let mut group = c.benchmark_group("json_meter");
    for (protocol, file) in [
        (Protocol::Anthropic, "anthropic.json"),
        (Protocol::OpenaiChat, "openai-chat.json"),
        (Protocol::OpenaiResponses, "openai-responses.json"),
        (Protocol::Gemini, "gemini.json"),
        (Protocol::Gemini, "gemini.array.json"),
    ] {
        let body = common::fixture(&format!("streams/{file}"));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(file), &body, |b, body| {
            b.iter(|| {
                let mut meter = UsageMeter::new(protocol, false);
                meter.feed(black_box(body));
                meter.finish().usage.output_tokens
            })
        });
    }
    group.finish();
}

fn config() -> Criterion {
    // Short runs: the machine is small and shared; raise with --measurement-time when needed.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_meters, bench_parser, bench_json
}
criterion_main!(benches);
