//! The usage writer's database work per record: batches of 2 000 records (the default batch
//! size) inserted with their daily rollups into a fresh SQLite file, as the writer does under
//! load. Reported per record.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llm_relay::store::SqlStore;
use relay_filters::{TokenUsage, UsageRecord};

const BATCH: usize = 2_000;

fn record(n: usize, at: i64) -> UsageRecord {
    UsageRecord {
        id: uuid::Uuid::now_v7().to_string(),
        request_id: None,
        created_at: at,
        user_id: Some(format!("0199a3c2-0000-7000-8000-{:012}", n % 20)),
        api_key_id: Some(format!("0199a3c2-0000-7000-9000-{:012}", n % 50)),
        account_id: Some(format!("0199a3c2-0000-7000-a000-{:012}", n % 8)),
        session_key: Some(format!("key-{}:anthropic:0123456789abcdef", n % 50)),
        protocol: "anthropic".into(),
        requested_model: Some("claude-sonnet-4-5".into()),
        upstream_model: Some("claude-sonnet-4-5-20250929".into()),
        stream: n % 2 == 0,
        status: 200,
        usage: TokenUsage {
            input_tokens: 1_200,
            output_tokens: 340,
            cache_write_5m_tokens: 0,
            cache_write_1h_tokens: 0,
            cache_read_tokens: 20_000,
            reasoning_tokens: 0,
            web_search_requests: 0,
        },
        base_cost: 12_345,
        billed_cost: 12_345,
        price_rate: 10_000,
        latency_ms: 800,
        ttfb_ms: Some(300),
        failover_count: 0,
        error_type: None,
        unpriced: false,
        estimated: false,
        service_tier: None,
        // Anthropic's ids run about 30 characters.
        upstream_request_id: Some(format!("req_011C{n:022}")),
        response_id: Some(format!("msg_01{n:024}")),
        passes: None,
    }
}

fn bench_writes(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("relay.db").display());
    let store = rt.block_on(async {
        let store = SqlStore::connect(&url, 1).await.expect("open");
        store.migrate().await.expect("migrate");
        store
    });
    let mut group = c.benchmark_group("usage_write");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("sqlite_batch_2000", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for i in 0..iters {
                let at = 1_795_132_800_000 + i as i64 * 1_000;
                let batch: Vec<UsageRecord> = (0..BATCH).map(|n| record(n, at)).collect();
                let started = Instant::now();
                rt.block_on(store.insert_usage_batch(&batch))
                    .expect("insert");
                spent += started.elapsed();
            }
            spent
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_writes
}
criterion_main!(benches);
