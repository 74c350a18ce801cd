//! The usage record writer: a bounded queue fed by the proxy, drained in batches (one
//! transaction each, rollups included) into the database. When the database is unreachable,
//! batches go to an append-only spool under `data/spool/` and are replayed later. A record, once
//! queued, is never dropped: what is still queued when the writer stops is spooled on the spot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use relay_filters::UsageRecord;
use tokio::sync::mpsc;

use crate::metrics::metrics;
use crate::store::{SqlStore, StoreError};

/// The proxy's end of the queue.
#[derive(Clone)]
pub struct UsageQueue {
    tx: mpsc::Sender<UsageRecord>,
    spool_dir: PathBuf,
}

impl UsageQueue {
    /// Queues a record; waits when the queue is full (back-pressure, never loss). If the writer
    /// is gone (shutdown), the record is spooled directly.
    /// A push cancelled while it waits for room (its task dropped) spools the record.
    pub async fn push(&self, record: UsageRecord) {
        let mut held = Held {
            queue: self,
            record: Some(record),
        };
        if let Ok(permit) = self.tx.reserve().await {
            if let Some(record) = held.record.take() {
                metrics().usage_queue_depth.inc();
                permit.send(record);
            }
        }
    }

    /// Queues a record without waiting: when the queue is full or the writer gone, the record is
    /// spooled at once.
    pub fn push_now(&self, record: UsageRecord) {
        match self.tx.try_send(record) {
            Ok(()) => metrics().usage_queue_depth.inc(),
            Err(
                mpsc::error::TrySendError::Full(record) | mpsc::error::TrySendError::Closed(record),
            ) => self.spool_one(&record),
        }
    }

    /// A view of how many records wait in the queue, which does not keep the queue open.
    pub fn backlog(&self) -> Backlog {
        Backlog(self.tx.downgrade())
    }

    fn spool_one(&self, record: &UsageRecord) {
        metrics().usage_spilled.inc();
        if let Err(e) = spool(&self.spool_dir, std::slice::from_ref(record)) {
            tracing::error!(error = %e, record_id = %record.id, "usage record could not be spooled");
        }
    }
}

/// How full the usage queue is (records the writer has not taken yet).
#[derive(Clone)]
pub struct Backlog(mpsc::WeakSender<UsageRecord>);

impl Backlog {
    /// (waiting records, capacity); `None` once the queue is closed.
    pub fn fill(&self) -> Option<(usize, usize)> {
        let tx = self.0.upgrade()?;
        Some((tx.max_capacity() - tx.capacity(), tx.max_capacity()))
    }
}

/// A record on its way into the queue; spooled if it never got there.
struct Held<'a> {
    queue: &'a UsageQueue,
    record: Option<UsageRecord>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            self.queue.spool_one(&record);
        }
    }
}

/// Creates the queue and its writer.
pub fn usage_channel(capacity: usize, spool_dir: PathBuf) -> (UsageQueue, UsageWriter) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        UsageQueue {
            tx,
            spool_dir: spool_dir.clone(),
        },
        UsageWriter {
            rx: Some(rx),
            batch: Vec::new(),
            writing: None,
            spool_dir,
        },
    )
}

/// The writer's end: owns the receiver, the batch filling and the batch being written, and
/// spools whatever is left of them when dropped. A runtime shutting down drops the running
/// writer (its future owns it), so records still queued, or in a batch whose write was cut, are
/// spooled then; a batch that was in fact committed is skipped on replay (ids are unique).
pub struct UsageWriter {
    rx: Option<mpsc::Receiver<UsageRecord>>,
    batch: Vec<UsageRecord>,
    /// The batch being written, shared with the store (on a SQLite file its usage thread reads
    /// the records without copying them).
    writing: Option<Arc<[UsageRecord]>>,
    spool_dir: PathBuf,
}

impl Drop for UsageWriter {
    fn drop(&mut self) {
        let mut left = std::mem::take(&mut self.batch);
        if let Some(writing) = self.writing.take() {
            left.extend_from_slice(&writing);
        }
        let in_batch = left.len();
        if let Some(rx) = self.rx.as_mut() {
            rx.close();
            // A sender that reserved room before the close may still be sending (a request
            // booked as another runtime stops): the queue reads empty, not disconnected, until
            // it has. Waited for briefly.
            let mut waits = 0;
            loop {
                match rx.try_recv() {
                    Ok(r) => left.push(r),
                    Err(mpsc::error::TryRecvError::Empty) if waits < 200 => {
                        waits += 1;
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    Err(_) => break,
                }
            }
        }
        if !left.is_empty() {
            // The records drained from the queue here leave its depth.
            metrics()
                .usage_queue_depth
                .sub((left.len() - in_batch) as i64);
            metrics().usage_spilled.inc_by(left.len() as u64);
            if let Err(e) = spool(&self.spool_dir, &left) {
                tracing::error!(error = %e, count = left.len(), "usage records could not be spooled at shutdown");
            }
        }
    }
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub batch_size: usize,
    pub flush_interval: Duration,
}

impl UsageWriter {
    /// Writes batches until every sender is gone. After `shutdown` turns true, batches are written
    /// after a short fill (50 ms); when the runtime drops the writer, `Drop` spools what is left.
    pub async fn run(
        mut self,
        store: SqlStore,
        settings: WriterSettings,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let this = &mut self;
        let Some(rx) = this.rx.as_mut() else { return };
        let (batch, writing) = (&mut this.batch, &mut this.writing);
        batch.reserve(settings.batch_size);
        let mut replay_tick = tokio::time::interval(Duration::from_secs(5));
        let mut stopping = false;
        loop {
            let flush_wait = if stopping {
                Duration::from_millis(50)
            } else {
                settings.flush_interval
            };
            tokio::select! {
                got = rx.recv_many(batch, settings.batch_size) => {
                    if got == 0 {
                        break;
                    }
                    // Records in the batch have left the queue (and its gauge) from here on.
                    metrics().usage_queue_depth.sub(got as i64);
                    // Let a batch fill a little under load, without delaying a lone record
                    // long. The writer sleeps instead of waiting on the queue, so records pushed
                    // meanwhile wake nobody: one wake-up per batch, not one per request.
                    if batch.len() < settings.batch_size {
                        tokio::time::sleep(flush_wait.min(FILL_WAIT)).await;
                    }
                    loop {
                        while batch.len() < settings.batch_size {
                            match rx.try_recv() {
                                Ok(r) => {
                                    metrics().usage_queue_depth.dec();
                                    batch.push(r);
                                }
                                Err(_) => break,
                            }
                        }
                        let full = batch.len() == settings.batch_size;
                        let shared = writing.insert(Arc::from(std::mem::take(batch)));
                        write_batch(&store, &this.spool_dir, shared).await;
                        *writing = None;
                        batch.reserve(settings.batch_size);
                        if !full {
                            break;
                        }
                    }
                }
                _ = replay_tick.tick() => {
                    replay_spool(&store, &this.spool_dir, settings.batch_size).await;
                }
                changed = shutdown.changed(), if !stopping => {
                    if changed.is_err() || *shutdown.borrow() {
                        stopping = true;
                    }
                }
            }
        }
    }
}

/// How long a batch may fill before it is written.
const FILL_WAIT: Duration = Duration::from_millis(100);

/// Longest wait for one batch write: an unreachable database must not hold the queue.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// Writes one batch, retrying briefly, spooling it when the database stays unreachable.
async fn write_batch(store: &SqlStore, spool_dir: &Path, batch: &Arc<[UsageRecord]>) {
    let mut delay = Duration::from_millis(100);
    for attempt in 0..3 {
        match tokio::time::timeout(WRITE_TIMEOUT, store.insert_usage_shared(batch)).await {
            Ok(Ok(())) => {
                metrics().usage_written.inc_by(batch.len() as u64);
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, attempt, count = batch.len(), "usage batch write failed");
            }
            Err(_) => {
                tracing::warn!(attempt, count = batch.len(), "usage batch write timed out");
            }
        }
        tokio::time::sleep(delay).await;
        delay *= 4;
    }
    metrics().usage_spilled.inc_by(batch.len() as u64);
    if let Err(e) = spool(spool_dir, batch) {
        tracing::error!(error = %e, count = batch.len(), "usage batch could not be spooled");
    }
}

/// Appends records to a new spool file (JSON lines), synced to disk.
fn spool(dir: &Path, records: &[UsageRecord]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("usage-{}.jsonl", uuid::Uuid::now_v7()));
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    for r in records {
        serde_json::to_writer(&mut file, r)?;
        file.write_all(b"\n")?;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Why a write did not store its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database refused the records' data: the same write can never succeed.
    Data,
    /// The database could not be reached, or did not answer in time.
    Down,
    /// Anything else (a lock, a busy file, a full disk): it may pass by itself.
    Other,
}

impl Failure {
    fn of(e: &StoreError) -> Failure {
        if e.is_data_error() {
            Failure::Data
        } else if e.is_unreachable() {
            Failure::Down
        } else {
            Failure::Other
        }
    }
}

/// Stores `records` in one transaction, within the write timeout.
async fn store_records(store: &SqlStore, records: &[UsageRecord]) -> Result<(), Failure> {
    match tokio::time::timeout(WRITE_TIMEOUT, store.insert_usage_batch(records)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let failure = Failure::of(&e);
            tracing::warn!(error = %e, ?failure, count = records.len(), "usage records not stored");
            Err(failure)
        }
        Err(_) => {
            tracing::warn!(count = records.len(), "usage records not stored in time");
            Err(Failure::Down)
        }
    }
}

/// Appends `bytes` to the file at `path` (created when missing) and syncs it.
fn append_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// How a replay of the spool ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Every spool file was stored (or set aside in part), or there was none.
    Done,
    /// A write failed for a reason that may pass: the files left wait for the next replay.
    Postponed(Failure),
}

/// Replays spooled files into the database; a file is removed only after all of it is stored.
/// Inserts are idempotent by record id, so a replay interrupted halfway is safe to repeat.
///
/// A record is set aside (into a `.rejected` file beside its spool file, counted in
/// `relay_usage_records_set_aside_total`) only when the database refuses its data; any other
/// failure (the database gone, a lock wait, a busy file) postpones the replay.
pub async fn replay_spool(store: &SqlStore, dir: &Path, batch_size: usize) -> Replay {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Replay::Done;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut records = Vec::new();
        let mut unreadable = String::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<UsageRecord>(line) {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "unreadable spooled record set aside");
                    unreadable.push_str(line);
                    unreadable.push('\n');
                }
            }
        }
        let mut rejected = String::new();
        let mut refused = 0;
        for chunk in records.chunks(batch_size.max(1)) {
            match store_records(store, chunk).await {
                Ok(()) => continue,
                Err(Failure::Data) => {}
                Err(failure) => {
                    tracing::debug!(?failure, "spool replay postponed");
                    return Replay::Postponed(failure);
                }
            }
            // The database refused the chunk's data: one record of it is the cause, and must not
            // hold up this file and every file after it. The records go one by one; those whose
            // data is refused are set aside. A lock wait, a busy file or a lost connection is no
            // verdict on a record: the replay waits for the next round then.
            for r in chunk {
                match store_records(store, std::slice::from_ref(r)).await {
                    Ok(()) => {}
                    Err(Failure::Data) => {
                        tracing::error!(file = %path.display(), record_id = %r.id, "spooled record refused by the database for its data, set aside");
                        refused += 1;
                        if let Ok(line) = serde_json::to_string(r) {
                            rejected.push_str(&line);
                            rejected.push('\n');
                        }
                    }
                    Err(failure) => {
                        tracing::debug!(?failure, "spool replay postponed");
                        return Replay::Postponed(failure);
                    }
                }
            }
        }
        // Lines this version cannot read, and records the database refuses, are kept beside the
        // file (not replayed), for a person or a later version to look at: the file itself goes
        // once the rest is stored.
        if !rejected.is_empty() {
            let aside = path.with_extension("rejected");
            if let Err(e) = append_synced(&aside, rejected.as_bytes()) {
                tracing::error!(file = %aside.display(), error = %e, "refused spooled records could not be set aside; the spool file stays");
                continue;
            }
        }
        if !unreadable.is_empty() {
            let aside = path.with_extension("unreadable");
            if let Err(e) = append_synced(&aside, unreadable.as_bytes()) {
                tracing::error!(file = %aside.display(), error = %e, "unreadable spooled records could not be set aside; the spool file stays");
                continue;
            }
        }
        metrics().usage_set_aside.inc_by(refused as u64);
        metrics()
            .usage_written
            .inc_by((records.len() - refused) as u64);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::error!(file = %path.display(), error = %e, "replayed spool file could not be removed");
        } else {
            tracing::info!(file = %path.display(), count = records.len(), "spooled usage records replayed");
        }
    }
    Replay::Done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_spools_when_writer_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, writer) = usage_channel(4, dir.path().to_path_buf());
        queue
            .push(UsageRecord {
                id: "a".into(),
                ..Default::default()
            })
            .await;
        // Dropping the writer spools what it still holds; later pushes spool directly.
        drop(writer);
        queue
            .push(UsageRecord {
                id: "b".into(),
                ..Default::default()
            })
            .await;
        let mut ids: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .flat_map(|e| {
                let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
                text.lines()
                    .map(|l| serde_json::from_str::<UsageRecord>(l).unwrap().id)
                    .collect::<Vec<_>>()
            })
            .collect();
        ids.sort();
        assert_eq!(ids, ["a", "b"]);
    }

    /// The ids in the spool directory's files.
    fn spooled_ids(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flat_map(|e| {
                    let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
                    text.lines()
                        .map(|l| serde_json::from_str::<UsageRecord>(l).unwrap().id)
                        .collect::<Vec<_>>()
                })
                .collect()
            })
            .unwrap_or_default()
    }

    /// Pingora ends a service by shutting its runtime down, which drops the running writer
    /// wherever it is: records it had taken from the queue and those still queued are spooled.
    #[test]
    fn a_writer_dropped_with_its_runtime_spools_what_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let url = format!("sqlite://{}", dir.path().join("relay.db").display());
        let store = rt.block_on(async {
            let store = SqlStore::connect(&url, 1).await.unwrap();
            store.migrate().await.unwrap();
            store
        });
        let (queue, writer) = usage_channel(100, spool_dir.clone());
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let settings = WriterSettings {
            batch_size: 100,
            flush_interval: Duration::from_secs(1),
        };
        rt.spawn(writer.run(store.clone(), settings, stopping));
        let ids: Vec<String> = (0..5).map(|i| format!("r{i}")).collect();
        rt.block_on(async {
            stop.send(true).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            for id in &ids {
                queue
                    .push(UsageRecord {
                        id: id.clone(),
                        created_at: 1_764_000_000_000,
                        protocol: "anthropic".into(),
                        status: 200,
                        ..Default::default()
                    })
                    .await;
            }
        });
        // The writer now waits for its batch to fill (50 ms once stopping): cut it there.
        rt.shutdown_timeout(Duration::from_secs(2));

        let mut kept = spooled_ids(&spool_dir);
        let check = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stored = check.block_on(async {
            let page = store
                .list_usage_records(&crate::store::RecordFilter::default(), 1, 100)
                .await
                .unwrap();
            page.items.into_iter().map(|r| r.id).collect::<Vec<_>>()
        });
        kept.extend(stored);
        kept.sort();
        kept.dedup();
        assert_eq!(kept, ids, "every queued record is stored or spooled");
    }

    /// A push waiting for room in a full queue whose task is dropped (a request cut at
    /// shutdown) spools its record; `push_now` spools at once when the queue is full.
    #[tokio::test]
    async fn records_that_cannot_wait_for_room_are_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, _writer) = usage_channel(1, dir.path().to_path_buf());
        let record = |id: &str| UsageRecord {
            id: id.into(),
            ..Default::default()
        };
        queue.push(record("queued")).await;
        let waiting = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.push(record("waiting")).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the queue is full: the push waits");
        waiting.abort();
        let _ = waiting.await;
        queue.push_now(record("at-once"));
        let mut ids = spooled_ids(dir.path());
        ids.sort();
        assert_eq!(ids, ["at-once", "waiting"]);
    }

    /// A spool line this version cannot read is set aside in a file of its own, never deleted
    /// with the records replayed from its file.
    #[tokio::test]
    async fn unreadable_spool_lines_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        std::fs::create_dir_all(&spool_dir).unwrap();
        let url = format!("sqlite://{}", dir.path().join("relay.db").display());
        let store = SqlStore::connect(&url, 1).await.unwrap();
        store.migrate().await.unwrap();
        let good = serde_json::to_string(&UsageRecord {
            id: "good".into(),
            created_at: 1_764_000_000_000,
            protocol: "anthropic".into(),
            status: 200,
            ..Default::default()
        })
        .unwrap();
        let file = spool_dir.join("usage-1.jsonl");
        std::fs::write(
            &file,
            format!("{good}\n{{\"id\": 7, \"from\": \"elsewhere\"}}\n"),
        )
        .unwrap();
        replay_spool(&store, &spool_dir, 100).await;
        assert_eq!(store.count_records().await.unwrap(), 1);
        assert!(!file.exists(), "the replayed file is gone");
        let aside = std::fs::read_to_string(spool_dir.join("usage-1.unreadable")).unwrap();
        assert_eq!(aside, "{\"id\": 7, \"from\": \"elsewhere\"}\n");
        // Set aside, it is not replayed again.
        replay_spool(&store, &spool_dir, 100).await;
        assert!(spool_dir.join("usage-1.unreadable").exists());
    }

    /// A SQLite file busy beyond the usage connection's busy timeout (another connection holds
    /// the write lock) says nothing about the records: the replay waits for the next round and
    /// sets none aside; once the lock is gone they are stored.
    #[tokio::test]
    async fn a_busy_database_postpones_the_replay_and_sets_nothing_aside() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        std::fs::create_dir_all(&spool_dir).unwrap();
        let db_file = dir.path().join("relay.db");
        let store = SqlStore::connect(&format!("sqlite://{}", db_file.display()), 1)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let lines: String = ["one", "two"]
            .iter()
            .map(|id| {
                serde_json::to_string(&UsageRecord {
                    id: (*id).into(),
                    created_at: 1_764_000_000_000,
                    protocol: "anthropic".into(),
                    status: 200,
                    ..Default::default()
                })
                .unwrap()
                    + "\n"
            })
            .collect();
        let file = spool_dir.join("usage-1.jsonl");
        std::fs::write(&file, lines).unwrap();

        let locker = rusqlite::Connection::open(&db_file).unwrap();
        locker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let replay = replay_spool(&store, &spool_dir, 100).await;
        assert_eq!(replay, Replay::Postponed(Failure::Other));
        assert!(file.exists(), "the spool file waits for the next replay");
        assert!(
            !spool_dir.join("usage-1.rejected").exists(),
            "nothing set aside"
        );

        locker.execute_batch("ROLLBACK").unwrap();
        assert_eq!(replay_spool(&store, &spool_dir, 100).await, Replay::Done);
        assert_eq!(store.count_records().await.unwrap(), 2);
        assert!(!file.exists());
        assert!(!spool_dir.join("usage-1.rejected").exists());
    }
}
