//! The relay's per-request CPU work outside the network, as `RelayProxy::handle_api` does it:
//! route match, request id, the early key check, body parse and validation, the header copy and
//! the whole request chain (auth, limits, session key, sticky binding on the in-memory store,
//! header rewrite), over the relay's own caches (10 000 keys, 8 accounts). `response` adds the
//! response filters over the 20-event stream the load mock sends (meter, cost).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::executor::block_on;
use llm_relay::cache::{AccountCache, KeyCache, PriceCache};
use llm_relay::secrets::SecretBox;
use llm_relay::store::NewAccount;
use relay_filters::chain::{Chain, ChainDeps, FilterConfig, Flow, RequestView};
use relay_filters::context::RequestCtx;
use relay_filters::cost::PriceTable;
use relay_filters::key_limits::MemoryLimits;
use relay_filters::request_body::{parse_request_body, validate_for};
use relay_filters::route::{match_route, Route};
use relay_filters::session_store::MemorySessionStore;
use relay_filters::sticky_upstream::StickyConfig;
use relay_filters::AccountType;

const NOW_MS: i64 = 1_763_769_600_000;

struct Relay {
    chain: Chain,
    key: String,
}

fn accounts() -> Arc<AccountCache> {
    let secrets = SecretBox::new("bench".into(), [7; 32]);
    let kinds = [
        AccountType::Claude,
        AccountType::Claude,
        AccountType::ClaudeOfficial,
        AccountType::Claude,
        AccountType::Openai,
        AccountType::OpenaiResponses,
        AccountType::OpenaiResponses,
        AccountType::Gemini,
    ];
    let rows = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| {
            let mut new = NewAccount::new(
                format!("{}-{i}", kind.as_str()),
                *kind,
                secrets.encrypt(&format!("sk-upstream-credential-{i:040}")),
                "bench".into(),
            );
            new.base_url = Some("http://127.0.0.1:9".into());
            new.into_account(format!("0199a3c2-0000-7000-8000-{i:012}"), 0)
        })
        .collect();
    let cache = AccountCache::default();
    cache.replace(rows, &secrets);
    Arc::new(cache)
}

fn relay() -> Relay {
    let (keys, plain): (Arc<KeyCache>, _) = common::key_cache(10_000);
    let pricing =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pricing.toml"))
            .expect("conf/pricing.toml");
    let prices = PriceTable::from_toml_str(&pricing).expect("price list");
    let deps = ChainDeps {
        keys,
        accounts: accounts(),
        sessions: MemorySessionStore::new(10_000),
        prices: Arc::new(PriceCache::new(prices)),
        limits: Arc::new(MemoryLimits::default()),
        lease_ttl: Duration::from_secs(600),
        shared_account_caps: false,
        sticky: StickyConfig::default(),
        session_strategy: Default::default(),
        session_message_count: 1,
    };
    let chain = Chain::build(&FilterConfig::default_chain(), &deps).expect("default chain");
    Relay {
        chain,
        key: plain[1234].clone(),
    }
}

/// What `handle_api` does between reading the body and the upstream exchange.
fn request_side(
    relay: &Relay,
    path: &str,
    headers: &http::HeaderMap,
    query: Option<&str>,
    body: &[u8],
) -> RequestCtx {
    let request_id = uuid::Uuid::now_v7().to_string();
    let Some(Route::Api(route)) = match_route("POST", path) else {
        panic!("{path} is not an API route");
    };
    let protocol = route.protocol;
    if let Some(auth) = &relay.chain.auth {
        auth.authenticate(headers, query, NOW_MS)
            .expect("key is valid");
    }
    let mut ctx = RequestCtx::new(request_id, route, NOW_MS);
    let parsed = parse_request_body(body).expect("body parses");
    validate_for(protocol, &parsed).expect("body is valid");
    ctx.request.model = parsed.model.as_deref().map(str::to_string);
    ctx.request.stream = parsed.stream || ctx.route.path_stream;
    ctx.request.previous_response_id = parsed.previous_response_id.as_deref().map(str::to_string);
    ctx.request.include_usage_requested = parsed.stream_options_include_usage;
    ctx.request.body_len = body.len();
    let headers = headers.clone();
    let view = RequestView {
        headers: &headers,
        query,
        body,
        parsed: &parsed,
    };
    match block_on(relay.chain.run_request(&mut ctx, &view)) {
        Flow::Continue => {}
        Flow::Reject(r) => panic!("request rejected: {}", r.message),
    }
    assert!(ctx.upstream.request.is_some(), "no upstream request built");
    ctx
}

/// What the exchange does with a successful streamed answer: head, chunks, end.
fn response_side(relay: &Relay, ctx: &mut RequestCtx, head: &http::HeaderMap, events: &[&[u8]]) {
    for f in &relay.chain.response {
        f.on_response_head(ctx, 200, head);
    }
    for event in events {
        for f in &relay.chain.response {
            black_box(f.on_body_chunk(ctx, event));
        }
    }
    for f in &relay.chain.response {
        black_box(f.on_body_end(ctx));
    }
    for f in &relay.chain.response {
        f.on_end(ctx);
    }
}

fn with_key(mut req: common::ClientRequest, key: &str) -> common::ClientRequest {
    req.headers.remove(http::header::AUTHORIZATION);
    req.headers.insert(
        "x-api-key",
        http::HeaderValue::from_str(key).expect("header"),
    );
    req
}

fn bench_chain(c: &mut Criterion) {
    let relay = relay();
    let cases = [
        (
            "anthropic_2k",
            "/v1/messages",
            common::sdk_anthropic_request(2 << 10, false),
        ),
        (
            "claude_code_20k",
            "/v1/messages",
            common::anthropic_request(20 << 10, true),
        ),
        (
            "codex_200k",
            "/v1/responses",
            common::codex_request(200 << 10, true),
        ),
    ];
    let mut group = c.benchmark_group("request_chain");
    for (name, path, req) in &cases {
        let req = with_key(req.clone(), &relay.key);
        group.throughput(Throughput::Bytes(req.body.len() as u64));
        // First run binds the session; the measured runs are sticky hits, as every later turn.
        request_side(&relay, path, &req.headers, req.query.as_deref(), &req.body);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                request_side(
                    &relay,
                    path,
                    black_box(&req.headers),
                    req.query.as_deref(),
                    black_box(&req.body),
                )
            })
        });
    }
    group.finish();

    let stream = common::answer::anthropic_sse(20);
    let events = common::answer::split_events(&stream);
    let mut head = http::HeaderMap::new();
    head.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    let req = with_key(common::sdk_anthropic_request(2 << 10, true), &relay.key);
    let mut group = c.benchmark_group("whole_chain");
    group.bench_function("anthropic_2k_stream_20_events/response_only", |b| {
        b.iter_batched(
            || request_side(&relay, "/v1/messages", &req.headers, None, &req.body),
            |mut ctx| {
                response_side(&relay, &mut ctx, &head, &events);
                assert!(ctx.usage.billed_cost > 0);
                ctx
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.bench_function("anthropic_2k_stream_20_events/request_and_response", |b| {
        b.iter(|| {
            let mut ctx = request_side(&relay, "/v1/messages", &req.headers, None, &req.body);
            response_side(&relay, &mut ctx, &head, &events);
            ctx.usage.billed_cost
        })
    });
    group.finish();
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
    targets = bench_chain
}
criterion_main!(benches);
