//! The usage record writer: a bounded queue fed by the proxy, drained in batches (one
//! transaction each, rollups included) into the database. When the database is unreachable,
//! batches go to an append-only spool under `data/spool/` and are replayed later. A record, once
//! queued, is never dropped: what is still queued when the writer stops is spooled on the spot;
//! records that neither the database nor the spool takes (a full disk, a spool directory that
//! cannot be written) are kept in memory and retried, and the queue waits for them meanwhile
//! (the proxy's requests wait for room rather than records being lost).

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use relay_filters::UsageRecord;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::metrics::metrics;
use crate::store::{SqlStore, StoreError};

/// The proxy's end of the queue.
#[derive(Clone)]
pub struct UsageQueue {
    tx: mpsc::Sender<UsageRecord>,
    shared: Arc<Shared>,
    _alive: Alive,
}

impl UsageQueue {
    /// Queues a record; waits when the queue is full (back-pressure, never loss). If the writer
    /// is gone (shutdown), the record is spooled directly.
    /// A push cancelled while it waits for room (its task dropped) spools the record (or keeps
    /// it, when the spool fails, as [`UsageQueue::push_now`] does).
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
    /// spooled at once (and kept for the writer, or the exit, when the spool fails).
    pub fn push_now(&self, record: UsageRecord) {
        match self.tx.try_send(record) {
            Ok(()) => metrics().usage_queue_depth.inc(),
            Err(
                mpsc::error::TrySendError::Full(record) | mpsc::error::TrySendError::Closed(record),
            ) => self.shared.spool_or_keep(vec![record]),
        }
    }

    /// A view of how many records wait in the queue, which does not keep the queue open.
    pub fn backlog(&self) -> Backlog {
        Backlog(self.tx.downgrade())
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
            self.queue.shared.spool_or_keep(vec![record]);
        }
    }
}

/// A handle that keeps its end of the queue counted as live: [`UsageDrain::finish`] waits until
/// every one is dropped. Nothing is ever sent on the channel; its closing is the signal.
#[derive(Clone)]
struct Alive {
    _sender: std::sync::mpsc::Sender<Infallible>,
}

/// What every end of the queue shares.
struct Shared {
    spool_dir: PathBuf,
    /// Records that neither the database nor the spool took, put down where nothing could wait
    /// for a retry (a request cut, a push cancelled, the writer dropped): the running writer
    /// takes them into its retries; at exit [`UsageDrain::finish`] retries them.
    unsaved: Mutex<Vec<UsageRecord>>,
}

impl Shared {
    /// Spools `records` at once; when the spool fails they are kept for a retry.
    fn spool_or_keep(&self, records: Vec<UsageRecord>) {
        match spool(&self.spool_dir, &records) {
            Ok(()) => metrics().usage_spilled.inc_by(records.len() as u64),
            Err(e) => {
                spool_failed(&e, records.len());
                metrics().usage_held.add(records.len() as i64);
                relay_filters::lock(&self.unsaved).extend(records);
            }
        }
    }

    /// The records kept by [`Shared::spool_or_keep`], taken out (still counted as held).
    fn take_unsaved(&self) -> Vec<UsageRecord> {
        std::mem::take(&mut *relay_filters::lock(&self.unsaved))
    }
}

/// Counts and logs a spool write that failed; its records are kept in memory and retried.
fn spool_failed(e: &std::io::Error, count: usize) {
    metrics().usage_spool_failures.inc();
    tracing::error!(
        error = %e,
        count,
        "usage records could not be spooled; kept in memory and retried"
    );
}

/// Creates the queue, its writer, and the drain that waits for both at exit.
pub fn usage_channel(capacity: usize, spool_dir: PathBuf) -> (UsageQueue, UsageWriter, UsageDrain) {
    let (tx, rx) = mpsc::channel(capacity);
    let (alive, gone) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        spool_dir,
        unsaved: Mutex::new(Vec::new()),
    });
    (
        UsageQueue {
            tx,
            shared: shared.clone(),
            _alive: Alive {
                _sender: alive.clone(),
            },
        },
        UsageWriter {
            rx: Some(rx),
            batch: Vec::new(),
            writing: None,
            held: Vec::new(),
            shared: shared.clone(),
            _alive: Alive { _sender: alive },
        },
        UsageDrain { gone, shared },
    )
}

/// The writer's end: owns the receiver, the batch filling, the batch being written and the
/// records held for a retry, and spools whatever is left of them when dropped. A runtime
/// shutting down drops the running writer (its future owns it), so records still queued, or in
/// a batch whose write was cut, are spooled then; a batch that was in fact committed is skipped
/// on replay (ids are unique).
pub struct UsageWriter {
    rx: Option<mpsc::Receiver<UsageRecord>>,
    batch: Vec<UsageRecord>,
    /// The batch being written, shared with the store (on a SQLite file its usage thread reads
    /// the records without copying them).
    writing: Option<Arc<[UsageRecord]>>,
    /// Records that neither the database nor the spool took: retried with backoff, and the
    /// queue is not drained meanwhile, so requests wait for room instead of records being lost.
    held: Vec<UsageRecord>,
    shared: Arc<Shared>,
    /// Dropped after `drop` has spooled what the writer held.
    _alive: Alive,
}

impl Drop for UsageWriter {
    fn drop(&mut self) {
        // Held records stay counted in `relay_usage_records_held` until they are spooled.
        let mut left = std::mem::take(&mut self.held);
        left.extend(self.shared.take_unsaved());
        let held = left.len();
        left.append(&mut self.batch);
        if let Some(writing) = self.writing.take() {
            left.extend_from_slice(&writing);
        }
        let taken = left.len();
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
        // The records drained from the queue here leave its depth.
        metrics().usage_queue_depth.sub((left.len() - taken) as i64);
        if !left.is_empty() {
            metrics().usage_held.sub(held as i64);
            // What the spool does not take now is left for the exit's drain to retry.
            self.shared.spool_or_keep(left);
        }
    }
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub batch_size: usize,
    pub flush_interval: Duration,
}

/// The database as the writer reaches it: empty until the control plane has connected, and
/// until then every batch is spooled.
pub type StoreSlot = Arc<OnceLock<SqlStore>>;

/// How often the spool is replayed (or, while the database is down, a ping tells whether it
/// is back).
const REPLAY_INTERVAL: Duration = Duration::from_secs(5);

/// How long a batch may fill before it is written.
const FILL_WAIT: Duration = Duration::from_millis(100);

/// Longest wait for one batch write: an unreachable database must not hold the queue.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// Pause before the one retry of a write that failed for a reason that may pass at once (a
/// busy SQLite file, the usage thread behind).
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// First and longest pause between retries of held records.
const HELD_RETRY_FIRST: Duration = Duration::from_millis(250);
const HELD_RETRY_MAX: Duration = Duration::from_secs(5);

impl UsageWriter {
    /// Writes batches until every sender is gone. After `shutdown` turns true, batches are written
    /// after a short fill (50 ms); when the runtime drops the writer, `Drop` spools what is left.
    pub async fn run(
        mut self,
        store: StoreSlot,
        settings: WriterSettings,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let batch_size = settings.batch_size.max(1);
        self.batch.reserve(batch_size);
        let mut replay_tick = tokio::time::interval(REPLAY_INTERVAL);
        // A tick missed while a batch or a replay ran is not made up for by a burst of ticks.
        replay_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut db = Breaker::default();
        let mut probe: Option<Probe> = None;
        let mut retry = Backoff::new();
        let mut stopping = false;
        loop {
            if self.take_unsaved() {
                retry.start();
            }
            let holding = !self.held.is_empty();
            let Some(rx) = self.rx.as_mut() else { return };
            tokio::select! {
                // Held records stop the draining: the queue waits for them.
                got = rx.recv_many(&mut self.batch, batch_size), if !holding => {
                    if got == 0 {
                        break;
                    }
                    // Records in the batch have left the queue (and its gauge) from here on.
                    metrics().usage_queue_depth.sub(got as i64);
                    // Let a batch fill a little under load, without delaying a lone record
                    // long. The writer sleeps instead of waiting on the queue, so records pushed
                    // meanwhile wake nobody: one wake-up per batch, not one per request.
                    if self.batch.len() < batch_size {
                        let fill = if stopping {
                            Duration::from_millis(50)
                        } else {
                            settings.flush_interval
                        };
                        tokio::time::sleep(fill.min(FILL_WAIT)).await;
                    }
                    loop {
                        let full = self.fill(batch_size);
                        self.flush(&store, &mut db, &mut retry).await;
                        self.batch.reserve(batch_size);
                        if !full || !self.held.is_empty() {
                            break;
                        }
                    }
                }
                _ = tokio::time::sleep_until(retry.at), if holding => {
                    self.retry_held(&store, &mut db, &mut retry).await;
                }
                _ = replay_tick.tick() => {
                    if db.down {
                        // No replay while the database is down: a ping beside the writer's work
                        // tells when it is back.
                        if probe.is_none() {
                            probe = Some(Box::pin(ping(store.clone())));
                        }
                    } else if !holding {
                        self.replay(&store, &mut db, batch_size).await;
                    }
                }
                up = async {
                    match probe.as_mut() {
                        Some(p) => p.await,
                        None => std::future::pending().await,
                    }
                }, if probe.is_some() => {
                    probe = None;
                    if up {
                        db.mark_up();
                        if !holding {
                            self.replay(&store, &mut db, batch_size).await;
                        }
                    }
                }
                changed = shutdown.changed(), if !stopping => {
                    if changed.is_err() || *shutdown.borrow() {
                        stopping = true;
                    }
                }
            }
        }
    }

    /// Tops the batch up from the queue without waiting; whether it is full.
    fn fill(&mut self, batch_size: usize) -> bool {
        if let Some(rx) = self.rx.as_mut() {
            while self.batch.len() < batch_size {
                match rx.try_recv() {
                    Ok(r) => {
                        metrics().usage_queue_depth.dec();
                        self.batch.push(r);
                    }
                    Err(_) => break,
                }
            }
        }
        self.batch.len() >= batch_size
    }

    /// Writes the batch to the database, else to the spool, else holds it for a retry.
    async fn flush(&mut self, store: &StoreSlot, db: &mut Breaker, retry: &mut Backoff) {
        let records = self
            .writing
            .insert(Arc::from(std::mem::take(&mut self.batch)))
            .clone();
        let count = records.len();
        // Otherwise the replay brings the batch in; a record refused for its data is set aside
        // there, one by one.
        if to_database(store, db, |s| write_batch(s, &records)).await {
            metrics().usage_written.inc_by(count as u64);
        } else {
            match spool(&self.shared.spool_dir, &records) {
                Ok(()) => metrics().usage_spilled.inc_by(count as u64),
                Err(e) => {
                    spool_failed(&e, count);
                    metrics().usage_held.add(count as i64);
                    self.held.extend(records.iter().cloned());
                    retry.start();
                }
            }
        }
        self.writing = None;
    }

    /// Moves records the other ends could not spool into the held ones; whether there were any
    /// while none were held.
    fn take_unsaved(&mut self) -> bool {
        let unsaved = self.shared.take_unsaved();
        let new = self.held.is_empty() && !unsaved.is_empty();
        self.held.extend(unsaved);
        new
    }

    /// Tries the held records on the database (unless it is known down), then on the spool.
    async fn retry_held(&mut self, store: &StoreSlot, db: &mut Breaker, retry: &mut Backoff) {
        let count = self.held.len();
        if to_database(store, db, |s| store_records(s, &self.held)).await {
            metrics().usage_written.inc_by(count as u64);
            self.release_held();
            tracing::info!(count, "held usage records stored");
            return;
        }
        match spool(&self.shared.spool_dir, &self.held) {
            Ok(()) => {
                metrics().usage_spilled.inc_by(count as u64);
                self.release_held();
                tracing::info!(count, "held usage records spooled");
            }
            Err(e) => {
                spool_failed(&e, count);
                retry.next();
            }
        }
    }

    /// Forgets the held records once stored or spooled.
    fn release_held(&mut self) {
        metrics().usage_held.sub(self.held.len() as i64);
        self.held.clear();
    }

    /// Replays the spool (once there is a database); a failure that says the database is gone
    /// marks it down.
    async fn replay(&mut self, store: &StoreSlot, db: &mut Breaker, batch_size: usize) {
        let Some(store) = store.get() else {
            return;
        };
        if replay_spool(store, &self.shared.spool_dir, batch_size).await
            == Replay::Postponed(Failure::Down)
        {
            db.mark_down();
        }
    }
}

/// A ping of the database running beside the writer's work.
type Probe = Pin<Box<dyn Future<Output = bool> + Send>>;

/// Whether the database answers (once the control plane has reached it).
async fn ping(store: StoreSlot) -> bool {
    match store.get() {
        Some(s) => matches!(
            tokio::time::timeout(WRITE_TIMEOUT, s.ping()).await,
            Ok(Ok(()))
        ),
        None => false,
    }
}

/// Whether the writer takes the database for down. While it does, batches go to the spool at
/// once (a write would only wait out its timeout) and the spool is not replayed; a ping on
/// each replay tick tells when it is back. Without it, an unreachable database cost every
/// batch its write timeouts and every replay tick a write and a ping timeout, and the queue
/// filled behind them.
#[derive(Default)]
struct Breaker {
    down: bool,
}

impl Breaker {
    fn mark_down(&mut self) {
        if !self.down {
            self.down = true;
            metrics().usage_database_down.set(1);
            tracing::warn!(
                "usage writer: database unreachable; batches go to the spool until it answers"
            );
        }
    }

    fn mark_up(&mut self) {
        if self.down {
            self.down = false;
            metrics().usage_database_down.set(0);
            tracing::info!("usage writer: the database answers again; replaying the spool");
        }
    }
}

/// When held records are tried next: the pause doubles with every failure, up to a bound.
struct Backoff {
    at: Instant,
    pause: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            at: Instant::now(),
            pause: HELD_RETRY_FIRST,
        }
    }

    /// The first retry, after the shortest pause.
    fn start(&mut self) {
        self.pause = HELD_RETRY_FIRST;
        self.at = Instant::now() + self.pause;
    }

    /// The next retry, after twice the last pause (at most [`HELD_RETRY_MAX`]).
    fn next(&mut self) {
        self.pause = (self.pause * 2).min(HELD_RETRY_MAX);
        self.at = Instant::now() + self.pause;
    }
}

/// Runs `write` on the database, unless there is none yet or it is known down (a write would
/// only wait out its timeout, and the queue behind it); whether it stored. A write that finds
/// the database down marks it so.
async fn to_database<'a, F>(
    store: &'a StoreSlot,
    db: &mut Breaker,
    write: impl FnOnce(&'a SqlStore) -> F,
) -> bool
where
    F: std::future::Future<Output = Result<(), Failure>> + 'a,
{
    let Some(s) = store.get().filter(|_| !db.down) else {
        return false;
    };
    match write(s).await {
        Ok(()) => true,
        Err(Failure::Down) => {
            db.mark_down();
            false
        }
        Err(Failure::Data | Failure::Other) => false,
    }
}

/// Writes one batch. A failure that may pass at once (neither the data nor the database gone)
/// is retried once; a database that does not answer is not waited for again.
async fn write_batch(store: &SqlStore, batch: &Arc<[UsageRecord]>) -> Result<(), Failure> {
    let mut retried = false;
    loop {
        let failure = match in_time(store.insert_usage_shared(batch), batch.len()).await {
            Ok(()) => return Ok(()),
            Err(f) => f,
        };
        if failure != Failure::Other || retried {
            return Err(failure);
        }
        retried = true;
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Appends records to a new spool file (JSON lines): written under a temporary name and synced,
/// renamed, then the directory synced, so that the file's name survives a power loss as well as
/// its lines. A file left half written (a full disk) is removed.
fn spool(dir: &Path, records: &[UsageRecord]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("usage-{}.jsonl", uuid::Uuid::now_v7()));
    let tmp = path.with_extension("tmp");
    let written = write_spool_file(&tmp, records).and_then(|()| std::fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

/// Syncs a directory's entries to disk. A file system that cannot sync a directory (it says
/// so with `EINVAL`) is taken as it is: the file itself is synced.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        synced => synced,
    }
}

/// Writes `records` as JSON lines to a new file at `path` and syncs it.
fn write_spool_file(path: &Path, records: &[UsageRecord]) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in records {
        serde_json::to_writer(&mut file, r)?;
        file.write_all(b"\n")?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()
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

/// Runs one write of `count` records within the write timeout; a failure is logged and told
/// apart (one that timed out takes the database for down).
async fn in_time(
    write: impl std::future::Future<Output = Result<(), StoreError>>,
    count: usize,
) -> Result<(), Failure> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let failure = Failure::of(&e);
            tracing::warn!(error = %e, ?failure, count, "usage records not stored");
            Err(failure)
        }
        Err(_) => {
            tracing::warn!(count, "usage records not stored in time");
            Err(Failure::Down)
        }
    }
}

/// Stores `records` in one transaction, within the write timeout.
async fn store_records(store: &SqlStore, records: &[UsageRecord]) -> Result<(), Failure> {
    in_time(store.insert_usage_batch(records), records.len()).await
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

/// The exit's hold on the usage records. Pingora stops its runtimes without waiting for their
/// threads to finish dropping the tasks (with SIGINT it does not wait at all), and the process
/// would exit while the writer, or a request cut short, still spooled what it held.
/// [`UsageDrain::finish`] waits until the writer and every queue handle are gone, each having
/// spooled what it held on its way out, then retries the spool for records none could keep.
pub struct UsageDrain {
    gone: std::sync::mpsc::Receiver<Infallible>,
    shared: Arc<Shared>,
}

/// Usage records a stopping node could not keep.
#[derive(Debug, thiserror::Error)]
pub enum NotKept {
    /// The writer or a request still held records when the time was up.
    #[error("the usage writer did not finish within {0:?}; records it held may be lost")]
    Unfinished(Duration),
    /// The spool refused these records to the end.
    #[error("{0} usage records could be neither stored nor spooled and are lost")]
    Lost(usize),
}

impl UsageDrain {
    /// Blocks until the other ends of the queue are gone, then spools the records they left
    /// unsaved, retrying with backoff; gives up `within` from now.
    pub fn finish(self, within: Duration) -> Result<(), NotKept> {
        let deadline = std::time::Instant::now() + within;
        // Nothing is sent on the channel: it only tells when its last sender is gone.
        let finished = !matches!(
            self.gone.recv_timeout(within),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        );
        let kept = self.spool_unsaved(deadline);
        match (finished, kept) {
            (false, _) => Err(NotKept::Unfinished(within)),
            (true, Err(lost)) => Err(NotKept::Lost(lost)),
            (true, Ok(())) => Ok(()),
        }
    }

    /// Spools the records left unsaved, retrying until `deadline`; else how many are lost.
    fn spool_unsaved(&self, deadline: std::time::Instant) -> Result<(), usize> {
        let mut pause = HELD_RETRY_FIRST;
        loop {
            let left = self.shared.take_unsaved();
            if left.is_empty() {
                return Ok(());
            }
            let count = left.len();
            match spool(&self.shared.spool_dir, &left) {
                Ok(()) => {
                    metrics().usage_spilled.inc_by(count as u64);
                    metrics().usage_held.sub(count as i64);
                    tracing::info!(count, "held usage records spooled at exit");
                    return Ok(());
                }
                Err(e) => {
                    spool_failed(&e, count);
                    relay_filters::lock(&self.shared.unsaved).extend(left);
                    if std::time::Instant::now() + pause > deadline {
                        tracing::error!(
                            count,
                            "usage records lost: neither the database nor the spool took them"
                        );
                        return Err(count);
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(HELD_RETRY_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A served request's record, as a booking makes one.
    fn booked(id: &str) -> UsageRecord {
        UsageRecord {
            id: id.into(),
            created_at: 1_764_000_000_000,
            protocol: "anthropic".into(),
            status: 200,
            ..Default::default()
        }
    }

    /// A migrated SQLite database in `dir`.
    async fn sqlite_store(dir: &Path) -> SqlStore {
        let url = format!("sqlite://{}", dir.join("relay.db").display());
        let store = SqlStore::connect(&url, 1).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    /// A writer on `spool_dir` running with no database yet (its slot empty), flushing
    /// batches of 10 every 10 ms; the task runs until aborted.
    fn running_writer(
        spool_dir: &Path,
    ) -> (
        UsageQueue,
        StoreSlot,
        tokio::task::JoinHandle<()>,
        (UsageDrain, tokio::sync::watch::Sender<bool>),
    ) {
        let (queue, writer, drain) = usage_channel(10, spool_dir.to_path_buf());
        let slot: StoreSlot = Arc::default();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let settings = WriterSettings {
            batch_size: 10,
            flush_interval: Duration::from_millis(10),
        };
        let running = tokio::spawn(writer.run(slot.clone(), settings, stopping));
        (queue, slot, running, (drain, stop))
    }

    #[tokio::test]
    async fn queue_spools_when_writer_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, writer, _drain) = usage_channel(4, dir.path().to_path_buf());
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
                d.map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                    .flat_map(|p| {
                        let text = std::fs::read_to_string(p).unwrap();
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
        let (queue, writer, _drain) = usage_channel(100, spool_dir.clone());
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let settings = WriterSettings {
            batch_size: 100,
            flush_interval: Duration::from_secs(1),
        };
        rt.spawn(writer.run(Arc::new(OnceLock::from(store.clone())), settings, stopping));
        let ids: Vec<String> = (0..5).map(|i| format!("r{i}")).collect();
        rt.block_on(async {
            stop.send(true).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            for id in &ids {
                queue.push(booked(id)).await;
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
        let (queue, _writer, _drain) = usage_channel(1, dir.path().to_path_buf());
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
        let store = sqlite_store(dir.path()).await;
        let good = serde_json::to_string(&booked("good")).unwrap();
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
            .map(|id| serde_json::to_string(&booked(id)).unwrap() + "\n")
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

    /// A batch that neither the database (closed here) nor the spool (a file stands where its
    /// directory should be) takes is held, and tried again until the spool takes it.
    #[tokio::test]
    async fn a_batch_neither_the_database_nor_the_spool_takes_is_held_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        std::fs::write(&spool_dir, b"not a directory").unwrap();
        let store = sqlite_store(dir.path()).await;
        store.close().await;
        let (queue, mut writer, _drain) = usage_channel(10, spool_dir.clone());
        for id in ["a", "b"] {
            queue
                .push(UsageRecord {
                    id: id.into(),
                    ..Default::default()
                })
                .await;
        }
        let store: StoreSlot = Arc::new(OnceLock::from(store));
        let (mut db, mut retry) = (Breaker::default(), Backoff::new());
        assert!(!writer.fill(10), "two records do not fill a batch of ten");
        writer.flush(&store, &mut db, &mut retry).await;
        let held = |w: &UsageWriter| w.held.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(held(&writer), ["a", "b"]);
        writer.retry_held(&store, &mut db, &mut retry).await;
        assert_eq!(held(&writer), ["a", "b"], "still nowhere to go");

        std::fs::remove_file(&spool_dir).unwrap();
        writer.retry_held(&store, &mut db, &mut retry).await;
        assert!(writer.held.is_empty());
        let mut spooled = spooled_ids(&spool_dir);
        spooled.sort();
        assert_eq!(spooled, ["a", "b"]);
    }

    /// Records a request could not spool where it was (the writer gone, its push cut) are kept
    /// for the writer, and spooled by it when it is dropped.
    #[tokio::test]
    async fn records_a_request_could_not_spool_are_kept_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        std::fs::write(&spool_dir, b"not a directory").unwrap();
        let (queue, writer, _drain) = usage_channel(1, spool_dir.clone());
        queue.push_now(UsageRecord {
            id: "queued".into(),
            ..Default::default()
        });
        // The queue is full: this one goes to the spool at once, which fails.
        queue.push_now(UsageRecord {
            id: "kept".into(),
            ..Default::default()
        });
        assert_eq!(relay_filters::lock(&writer.shared.unsaved).len(), 1);
        std::fs::remove_file(&spool_dir).unwrap();
        drop(writer);
        let mut spooled = spooled_ids(&spool_dir);
        spooled.sort();
        assert_eq!(spooled, ["kept", "queued"]);
    }

    /// Until the control plane has reached the database, the writer spools every batch at
    /// once; once it has, the spool is replayed into it.
    #[tokio::test]
    async fn without_a_database_yet_the_writer_spools_and_replays_it_later() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (queue, slot, running, _ends) = running_writer(&spool_dir);
        queue.push(booked("early")).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while spooled_ids(&spool_dir).is_empty() {
            assert!(std::time::Instant::now() < deadline, "nothing was spooled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let store = sqlite_store(dir.path()).await;
        assert!(slot.set(store.clone()).is_ok());
        while store.count_records().await.unwrap() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the spool was not replayed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        running.abort();
    }

    /// The drain returns only once every end of the queue is gone: a request dropped on another
    /// thread after the writer (as a runtime shutting down drops it) has spooled its record by
    /// then.
    #[test]
    fn the_drain_waits_for_every_end_of_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (queue, writer, drain) = usage_channel(4, spool_dir.clone());
        drop(writer);
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            queue.push_now(UsageRecord {
                id: "late".into(),
                ..Default::default()
            });
        });
        drain.finish(Duration::from_secs(30)).unwrap();
        assert_eq!(spooled_ids(&spool_dir), ["late"]);
        late.join().unwrap();
    }

    /// Records the spool refused to the writer being dropped are spooled by the drain, which
    /// retries until the spool takes them; or, when it never does, says how many are lost.
    #[test]
    fn the_drain_retries_the_spool_for_records_left_unsaved() {
        let record = |id: &str| UsageRecord {
            id: id.into(),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        std::fs::write(&spool_dir, b"not a directory").unwrap();
        let (queue, writer, drain) = usage_channel(4, spool_dir.clone());
        queue.push_now(record("queued"));
        drop(writer);
        queue.push_now(record("cut"));
        drop(queue);
        let unblock = {
            let spool_dir = spool_dir.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                std::fs::remove_file(&spool_dir).unwrap();
            })
        };
        drain.finish(Duration::from_secs(30)).unwrap();
        unblock.join().unwrap();
        let mut spooled = spooled_ids(&spool_dir);
        spooled.sort();
        assert_eq!(spooled, ["cut", "queued"]);

        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, b"not a directory").unwrap();
        let (queue, writer, drain) = usage_channel(4, blocked);
        queue.push_now(record("lost"));
        drop((queue, writer));
        assert!(matches!(
            drain.finish(Duration::from_millis(100)),
            Err(NotKept::Lost(1))
        ));
    }

    /// A writer that starts before the control plane has connected (as it always does) does
    /// not take the database for down: once connected, batches go to it, not to the spool.
    #[tokio::test]
    async fn a_writer_started_before_the_database_is_connected_writes_to_it_once_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (queue, slot, running, _ends) = running_writer(&spool_dir);
        // The writer's first replay round comes at once, with no database yet.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let store = sqlite_store(dir.path()).await;
        assert!(slot.set(store.clone()).is_ok());
        queue.push(booked("first")).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store.count_records().await.unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline, "nothing was stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!spool_dir.exists(), "the record went through the spool");
        running.abort();
    }
}
