//! Usage records survive a database outage and a shutdown: the writer spools what it cannot
//! store and replays it later; SIGTERM flushes the queue (DESIGN §9).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::mock_upstream::{MockUpstream, MockUsage};
use common::{conversation, messages_body, restartable_port, Db, Relay, RelayOptions};

const MODEL: &str = "claude-sonnet-4-5";

/// A private PostgreSQL server on a free port that the test may stop and start.
struct PrivatePg {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    // PostgreSQL refuses to run as root.
    let mut cmd = if unsafe_is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c
    } else {
        Command::new("env")
    };
    cmd.args(args).output().expect("run a PostgreSQL command")
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PrivatePg {
    fn start() -> PrivatePg {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("initdb");
        let dir = std::env::temp_dir().join(format!("relay-pg-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        if unsafe_is_root() {
            Command::new("chown")
                .args(["-R", "postgres", dir.to_str().unwrap()])
                .status()
                .unwrap();
        }
        let data = dir.join("data");
        let out = as_postgres(&[
            bin.join("initdb").to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ]);
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = PrivatePg {
            dir,
            bin,
            port: restartable_port(),
        };
        pg.up();
        pg
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn up(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let out = as_postgres(&[
            self.bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            self.dir.join("data").to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            self.dir.join("log").to_str().unwrap(),
            "-w",
            "start",
        ]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn down(&self) {
        let out = as_postgres(&[
            self.bin.join("pg_ctl").to_str().unwrap(),
            "-D",
            self.dir.join("data").to_str().unwrap(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = as_postgres(&[
            self.bin.join("pg_ctl").to_str().unwrap_or(""),
            "-D",
            self.dir.join("data").to_str().unwrap_or(""),
            "-m",
            "immediate",
            "stop",
        ]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn send(relay: &Relay, key: &str, i: usize) -> bool {
    let r = relay
        .post("/v1/messages", key)
        .json(&messages_body(
            MODEL,
            i % 2 == 0,
            conversation(&format!("durable {i}"), 1),
        ))
        .send()
        .await
        .unwrap();
    let ok = r.status() == 200;
    let _ = r.bytes().await;
    ok
}

#[tokio::test]
async fn records_survive_a_database_outage() {
    let pg = PrivatePg::start();
    let mock = MockUpstream::start().await;
    mock.set(|b| {
        b.usage = MockUsage {
            input: 100,
            output: 10,
            ..Default::default()
        }
    });
    let relay = Relay::start_with(RelayOptions {
        db: Db::Postgres(pg.url()),
        ..Default::default()
    })
    .await;
    relay
        .create_account("a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let user = relay.create_user("durable", 10_000).await;
    let (_, key) = relay.create_key(&user, serde_json::json!({})).await;
    relay.wait_key_active(&key).await;

    let mut served = 0;
    for i in 0..10 {
        served += usize::from(send(&relay, &key, i).await);
    }
    pg.down();
    // The proxy keeps serving from its caches while the database is gone.
    for i in 10..30 {
        served += usize::from(send(&relay, &key, i).await);
    }
    assert_eq!(served, 30, "requests failed while the database was down");
    // Give the writer time to give up and spool, then bring the database back.
    let spool = relay.data_dir.join("spool");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing was spooled during the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pg.up();
    let records = wait_stored(&relay, served).await;
    assert_eq!(
        records.len(),
        served,
        "exactly one record per served request"
    );
    let input: i64 = records
        .iter()
        .map(|r| r["input_tokens"].as_i64().unwrap())
        .sum();
    assert_eq!(input, 100 * served as i64);
    let mut ids: Vec<&str> = records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), served, "a record was stored twice");
    // Replayed spool files are removed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0) > 0 {
        assert!(Instant::now() < deadline, "spool files left after replay");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A relay on the data directory `data` (kept across restarts).
async fn relay_on(data: &std::path::Path) -> Relay {
    Relay::start_with(RelayOptions {
        data_dir: Some(data.to_path_buf()),
        ..Default::default()
    })
    .await
}

/// The queue-to-spool path at shutdown itself is covered by the writer's unit test
/// (`queue_spools_when_writer_is_gone`); this checks the whole process keeps every record across
/// a SIGTERM and a restart.
#[tokio::test]
async fn records_made_before_sigterm_are_all_kept() {
    let mock = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = relay_on(data.path()).await;
    relay
        .create_account("a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let key = relay.active_key("flush").await;
    for i in 0..12 {
        assert!(send(&relay, &key, i).await);
    }
    relay.terminate();
    // Start again on the same data: every record is there (stored at shutdown, or spooled and
    // replayed now).
    let relay = relay_on(data.path()).await;
    let records = relay.wait_records(12).await;
    assert_eq!(records.len(), 12);
}

/// A stream still running when the grace period of a SIGTERM ends was served upstream: the
/// relay books it with what it metered so far, flagged estimated.
#[tokio::test]
async fn a_stream_cut_by_the_end_of_the_grace_period_is_booked() {
    let mock = MockUpstream::start().await;
    mock.set(|b| {
        b.usage = MockUsage {
            input: 100,
            output: 10,
            ..MockUsage::default()
        };
        b.deltas = 40;
        // About ten seconds: far longer than the test relays' grace period (1 s).
        b.event_delay = Duration::from_millis(250);
    });
    let data = tempfile::tempdir().unwrap();
    let mut relay = relay_on(data.path()).await;
    relay
        .create_account("a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let key = relay.active_key("cut").await;
    let mut answer = relay
        .post("/v1/messages", &key)
        .json(&messages_body(
            "claude-sonnet-4-5",
            true,
            conversation("long", 1),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(
        answer.chunk().await.unwrap().is_some(),
        "the stream is under way"
    );
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = answer.chunk().await {} });
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.terminate();
    let _ = reader.await;

    let relay = relay_on(data.path()).await;
    let records = relay.wait_records(1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["error_type"], "interrupted", "{r}");
    assert_eq!(r["estimated"], true, "{r}");
    assert_eq!(r["input_tokens"], 100, "{r}");
    assert!(r["billed_cost"].as_i64().unwrap() > 0, "{r}");
}

/// A served request's record, for the model it asked for.
fn booked(id: &str, model: &str) -> relay_filters::UsageRecord {
    relay_filters::UsageRecord {
        id: id.into(),
        created_at: 1_764_000_000_000,
        protocol: "anthropic".into(),
        requested_model: Some(model.into()),
        status: 200,
        ..Default::default()
    }
}

/// Records as the lines of a spool file.
fn spool_lines(records: &[relay_filters::UsageRecord]) -> String {
    records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect()
}

/// A record the database refuses (here a NUL in a text value, which PostgreSQL rejects; written
/// by hand, as the relay no longer books one) must not hold up its spool file and every file
/// after it: the others are stored, it is set aside beside the file.
#[tokio::test]
async fn a_spooled_record_the_database_refuses_is_set_aside() {
    use llm_relay::background::usage_writer::replay_spool;
    use llm_relay::store::SqlStore;

    let pg = common::PgDb::create().await;
    let store = SqlStore::connect(&pg.url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let spool = tempfile::tempdir().unwrap();
    let lines = spool_lines(&[
        booked("first", "claude-sonnet-4-5"),
        booked("refused", "x\0"),
        booked("last", "claude-sonnet-4-5"),
    ]);
    std::fs::write(spool.path().join("usage-1.jsonl"), lines).unwrap();
    std::fs::write(
        spool.path().join("usage-2.jsonl"),
        spool_lines(&[booked("next-file", "claude-sonnet-4-5")]),
    )
    .unwrap();

    replay_spool(&store, spool.path(), 100).await;

    assert_eq!(store.count_records().await.unwrap(), 3);
    assert!(!spool.path().join("usage-1.jsonl").exists());
    assert!(!spool.path().join("usage-2.jsonl").exists());
    let aside = std::fs::read_to_string(spool.path().join("usage-1.rejected")).unwrap();
    let kept: relay_filters::UsageRecord = serde_json::from_str(aside.trim()).unwrap();
    assert_eq!(kept.id, "refused");
    assert_eq!(kept.requested_model.as_deref(), Some("x\0"));
    assert!(llm_relay::metrics::metrics().usage_set_aside.get() >= 1);
}

/// A replay that waits on a lock past its write timeout (here another transaction holds the
/// records' table) has met no bad record: the records stay spooled, none is set aside, and the
/// next replay after the lock is gone stores them.
#[tokio::test]
async fn a_replay_held_up_by_a_lock_sets_nothing_aside() {
    use llm_relay::background::usage_writer::{replay_spool, Failure, Replay};
    use llm_relay::store::SqlStore;
    use sqlx::Connection;

    let pg = common::PgDb::create().await;
    // As many connections as a relay's pool: a write cut by its timeout leaves its connection
    // waiting on the lock, and the others still answer.
    let store = SqlStore::connect(&pg.url, 8).await.unwrap();
    store.migrate().await.unwrap();
    let spool = tempfile::tempdir().unwrap();
    let lines = spool_lines(&[
        booked("locked-1", "claude-sonnet-4-5"),
        booked("locked-2", "claude-sonnet-4-5"),
    ]);
    let file = spool.path().join("usage-1.jsonl");
    std::fs::write(&file, lines).unwrap();

    let mut locker = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let mut lock = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE request_logs IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let replay = replay_spool(&store, spool.path(), 100).await;
    assert!(
        matches!(replay, Replay::Postponed(Failure::Down | Failure::Other)),
        "{replay:?}"
    );
    assert!(file.exists(), "the spool file waits for the next replay");
    assert!(!spool.path().join("usage-1.rejected").exists());

    lock.rollback().await.unwrap();
    assert_eq!(replay_spool(&store, spool.path(), 100).await, Replay::Done);
    assert_eq!(store.count_records().await.unwrap(), 2);
    assert!(!file.exists());
    assert!(!spool.path().join("usage-1.rejected").exists());
}

/// The value of an unlabelled metric in `/metrics` (0 when it is not there yet).
async fn metric_value(relay: &Relay, name: &str) -> f64 {
    relay
        .metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until the metric `name` exceeds `above`.
async fn wait_metric_above(relay: &Relay, name: &str, above: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_value(relay, name).await <= above {
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {above} or below"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ids of the records in the spool files of `dir`.
fn spooled_ids(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .flat_map(|p| {
                    std::fs::read_to_string(p)
                        .unwrap_or_default()
                        .lines()
                        .map(|l| {
                            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                                .as_str()
                                .unwrap()
                                .to_string()
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Usage records stored, waiting (at most a minute) until there are `n`.
async fn wait_stored(relay: &Relay, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = relay
            .http
            .get(format!(
                "{}/api/admin/usage/records?per_page=500",
                relay.admin
            ))
            .bearer_auth(common::ADMIN_TOKEN)
            .send()
            .await;
        if let Ok(r) = v {
            if r.status().is_success() {
                let v: serde_json::Value = r.json().await.unwrap();
                let items = v["items"].as_array().cloned().unwrap_or_default();
                if items.len() >= n {
                    return items;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} records were stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// With the database down and the spool unusable (a file stands where its directory should
/// be), the writer keeps the batch it could put nowhere and tries it again, rather than
/// dropping it: the records land once the database comes back, or the spool does.
#[tokio::test]
async fn records_neither_the_database_nor_the_spool_takes_are_kept_until_one_does() {
    let pg = PrivatePg::start();
    let mock = MockUpstream::start().await;
    let relay = Relay::start_with(RelayOptions {
        db: Db::Postgres(pg.url()),
        ..Default::default()
    })
    .await;
    relay
        .create_account("a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let key = relay.active_key("held").await;
    let spool = relay.data_dir.join("spool");
    std::fs::write(&spool, b"not a directory").unwrap();
    let failures = "relay_usage_spool_failures_total";

    // The database comes back first: the held records go to it.
    pg.down();
    for i in 0..5 {
        assert!(send(&relay, &key, i).await);
    }
    wait_metric_above(&relay, failures, 0.0).await;
    pg.up();
    wait_stored(&relay, 5).await;

    // The spool comes back first: the held records go to it, then to the database.
    pg.down();
    let failed = metric_value(&relay, failures).await;
    for i in 5..10 {
        assert!(send(&relay, &key, i).await);
    }
    wait_metric_above(&relay, failures, failed).await;
    std::fs::remove_file(&spool).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while spooled_ids(&spool).len() < 5 {
        assert!(
            Instant::now() < deadline,
            "the held records were not spooled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pg.up();
    let records = wait_stored(&relay, 10).await;
    let mut ids: Vec<&str> = records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10, "a record was stored twice");
    assert_eq!(metric_value(&relay, "relay_usage_records_held").await, 0.0);
}

/// Once the writer knows the database is down it spools each batch at once (and pings, rather
/// than replays, until the database answers), instead of waiting out its write timeouts again
/// for every batch: with one record a batch, forty records booked during an outage are all
/// spooled well within a minute. At some 11 s a batch, as before, it took over seven.
#[tokio::test]
async fn an_outage_costs_one_write_timeout_not_one_per_batch() {
    let pg = PrivatePg::start();
    let mock = MockUpstream::start().await;
    let relay = Relay::start_with(RelayOptions {
        db: Db::Postgres(pg.url()),
        env: vec![("RELAY_USAGE__BATCH_SIZE".into(), "1".into())],
        ..Default::default()
    })
    .await;
    relay
        .create_account("a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let key = relay.active_key("breaker").await;
    let spool = relay.data_dir.join("spool");

    pg.down();
    for i in 0..40 {
        assert!(send(&relay, &key, i).await);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while spooled_ids(&spool).len() < 40 {
        assert!(
            Instant::now() < deadline,
            "{} of 40 records spooled",
            spooled_ids(&spool).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric_value(&relay, "relay_usage_database_down").await, 1.0);

    pg.up();
    let records = wait_stored(&relay, 40).await;
    assert_eq!(records.len(), 40);
    relay.wait_metric("relay_usage_database_down 0").await;
}

/// Clients sending requests without pause until the relay stops answering; the request ids
/// (`x-request-id`) of the answers they read to the end with status 200.
struct Load {
    served: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `clients` clients; request ids start with `tag`.
    fn start(relay: &Relay, key: &str, clients: usize, tag: &str) -> Load {
        let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let clients = (0..clients)
            .map(|c| {
                let (served, key, tag) = (served.clone(), key.to_string(), tag.to_string());
                let (http, url) = (relay.http.clone(), format!("{}/v1/messages", relay.proxy));
                tokio::spawn(async move {
                    for i in 0.. {
                        let id = format!("{tag}-{c}-{i}");
                        let sent = http
                            .post(&url)
                            .header("x-api-key", &key)
                            .header("anthropic-version", "2023-06-01")
                            .header("x-request-id", &id)
                            .json(&messages_body(
                                MODEL,
                                i % 2 == 0,
                                conversation(&format!("load {c} {i}"), 1),
                            ))
                            .send()
                            .await;
                        let Ok(answer) = sent else { return };
                        let ok = answer.status() == 200;
                        if answer.bytes().await.is_ok() && ok {
                            served.lock().unwrap().push(id);
                        }
                    }
                })
            })
            .collect();
        Load { served, clients }
    }

    fn served(&self) -> usize {
        self.served.lock().unwrap().len()
    }

    /// Waits for every client to stop; the ids served.
    async fn finish(self) -> Vec<String> {
        for c in self.clients {
            c.await.unwrap();
        }
        let served = self.served.lock().unwrap().clone();
        served
    }
}

/// Stops a relay with `signal` while clients keep it busy, three times over on the same data
/// (whether a record is caught in flight depends on the moment), then checks that every answer
/// a client read in full has its usage record, once.
async fn no_record_is_lost_when_stopped_under_load(signal: &str) {
    let mock = MockUpstream::start().await;
    let data = tempfile::tempdir().unwrap();
    let mut relay = relay_on(data.path()).await;
    relay
        .create_account("a", "claude", &mock.url(), "sk-ant-a")
        .await;
    let key = relay.active_key("load").await;
    let mut served = Vec::new();
    for round in 0..3 {
        if round > 0 {
            relay = relay_on(data.path()).await;
        }
        let load = Load::start(&relay, &key, 8, &format!("round-{round}"));
        while load.served() < 40 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = relay.stop_with(signal);
        served.extend(load.finish().await);
        assert!(
            status.is_some_and(|s| s.success()),
            "SIG{signal}: the relay exited with {status:?}"
        );
    }

    let relay = relay_on(data.path()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut booked: Vec<String> = Vec::new();
        for page in 1.. {
            let records = relay
                .admin_get(&format!(
                    "/api/admin/usage/records?per_page=500&page={page}"
                ))
                .await;
            let items = records["items"].as_array().cloned().unwrap_or_default();
            booked.extend(
                items
                    .iter()
                    .filter_map(|r| Some(r["request_id"].as_str()?.to_string())),
            );
            if items.len() < 500 {
                break;
            }
        }
        let missing = served.iter().filter(|id| !booked.contains(id)).count();
        if missing == 0 {
            booked.sort();
            let all = booked.len();
            booked.dedup();
            assert_eq!(booked.len(), all, "a request was booked twice");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "SIG{signal}: {missing} of {} answers served have no usage record",
            served.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGINT is Pingora's fast shutdown: it waits for nothing, and the process used to exit while
/// the writer was still spooling the records it held.
#[tokio::test]
async fn no_record_is_lost_when_sigint_stops_a_busy_relay() {
    no_record_is_lost_when_stopped_under_load("INT").await;
}

#[tokio::test]
async fn no_record_is_lost_when_sigterm_stops_a_busy_relay() {
    no_record_is_lost_when_stopped_under_load("TERM").await;
}

/// A relay keeping records a week removes older ones as it runs, batch by batch, and counts
/// them; their daily totals, which summaries and cost limits read, stay whole.
#[tokio::test]
async fn records_past_their_retention_are_removed_and_their_totals_kept() {
    let relay = Relay::start_with(RelayOptions {
        env: vec![
            ("RELAY_USAGE__RETENTION_DAYS".into(), "7".into()),
            ("RELAY_USAGE__RETENTION_INTERVAL".into(), "200ms".into()),
        ],
        ..RelayOptions::default()
    })
    .await;
    let url = format!("sqlite://{}", relay.data_dir.join("relay.db").display());
    let store = llm_relay::store::SqlStore::connect(&url, 2).await.unwrap();
    let day = 86_400_000;
    let now = relay_filters::now_ms();
    let record = |id: &str, at: i64| relay_filters::UsageRecord {
        id: id.into(),
        created_at: at,
        user_id: Some("u-retained".into()),
        protocol: "anthropic".into(),
        status: 200,
        usage: relay_filters::types::TokenUsage {
            input_tokens: 100,
            output_tokens: 10,
            ..Default::default()
        },
        base_cost: 50,
        billed_cost: 50,
        ..Default::default()
    };
    // Two from 30 days ago, one from yesterday (kept: 7 days).
    let old_at = now - 30 * day;
    store
        .insert_usage_batch(&[
            record("old-a", old_at),
            record("old-b", old_at + 1),
            record("recent", now - day),
        ])
        .await
        .unwrap();
    let old_day = llm_relay::store::utc_day(old_at);
    let totals = || {
        store.usage_totals(
            llm_relay::store::UsageDim::User,
            Some("u-retained"),
            Some(&old_day),
            Some(&old_day),
        )
    };
    let before = totals().await.unwrap();
    assert_eq!((before.requests, before.billed_cost), (2, 100));
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.count_records().await.unwrap() > 1 {
        assert!(Instant::now() < deadline, "the old records are still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = store
        .usage_records_after(&Default::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, "recent");
    assert_eq!(totals().await.unwrap(), before);
    relay
        .wait_metric("relay_usage_records_pruned_total 2")
        .await;
}
