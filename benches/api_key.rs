//! API-key authentication (DESIGN §6): the peppered SHA-256 of the client's key and the lookup
//! in the relay's in-process key cache (10 000 keys), alone and as `ApiKeyAuth::authenticate`
//! runs it from the request headers.

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use relay_filters::api_key_auth::{hash_api_key, ApiKeyAuth, KeyStore};

const KEYS: usize = 10_000;

fn bench_api_key(c: &mut Criterion) {
    let (cache, plain) = common::key_cache(KEYS);
    let key = &plain[KEYS / 2];
    let hash = hash_api_key(common::PEPPER, key);
    let auth = ApiKeyAuth::new(cache.clone());
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "x-api-key",
        http::HeaderValue::from_str(key).expect("header"),
    );
    let mut bearer = http::HeaderMap::new();
    bearer.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&format!("Bearer {key}")).expect("header"),
    );
    let mut unknown = http::HeaderMap::new();
    unknown.insert(
        "x-api-key",
        http::HeaderValue::from_static("sk-relay-not-a-key-of-this-relay-0000000000000000000"),
    );

    let mut group = c.benchmark_group("api_key");
    group.bench_function("hash", |b| {
        b.iter(|| hash_api_key(common::PEPPER, black_box(key)))
    });
    group.bench_function("lookup_10k", |b| {
        b.iter(|| cache.lookup(black_box(&hash)).map(|e| e.price_rate))
    });
    group.bench_function("authenticate/x_api_key", |b| {
        b.iter(|| auth.authenticate(black_box(&headers), None, 0).is_ok())
    });
    group.bench_function("authenticate/bearer", |b| {
        b.iter(|| auth.authenticate(black_box(&bearer), None, 0).is_ok())
    });
    group.bench_function("authenticate/unknown", |b| {
        b.iter(|| auth.authenticate(black_box(&unknown), None, 0).is_err())
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
    targets = bench_api_key
}
criterion_main!(benches);
