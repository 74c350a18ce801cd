//! Usage batches on a SQLite file, written through a connection of their own on a thread of
//! their own ("sqlite-usage").
//!
//! Under load the usage writer is the relay's largest piece of user-space work after the
//! proxy itself. Through sqlx's Any driver every value of a record (27 per row) became an
//! `AnyValue` on the writer's task, was converted to a SQLite argument on sqlx's worker thread
//! and bound there, and each multi-row statement's text went to that thread and was hashed and
//! compared there. Here the same multi-row statements (SQLite runs one statement of 256 rows
//! for much less than 256 single-row ones: the table's and the five indexes' cursors open once)
//! are bound straight from the records on the thread that runs them: under load 1 to 2 µs less
//! CPU per record (the README has the runs), and the control plane's runtime, which also serves
//! the admin API, is left nearly all of its time. Everything else on SQLite (migrations, admin
//! queries, the caches) stays on sqlx; this connection opens the file sqlx created and
//! migrated, and never creates one.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ffi::c_int;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use relay_filters::UsageRecord;
use rusqlite::types::ToSqlOutput;
use rusqlite::{ffi, params, OpenFlags, ToSql, TransactionBehavior};

use super::usage::{
    batch_sums, last_used_sql, record_values, rollup_values, statement_runs, unique_records,
    BatchStatement, RowValue, IDS_PER_STATEMENT, RECORDS_PER_STATEMENT,
};
use super::{Result, StoreError};

/// Name of the writing thread, as the kernel keeps it (at most 15 bytes).
pub const THREAD_NAME: &str = "sqlite-usage";

/// How long a write waits for another connection's write lock: under the usage writer's own
/// timeout (3 s), so a locked database ends in an error the writer retries, not in a stuck
/// thread.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// Batches waiting for the thread. A batch comes about once a second; a full queue means the
/// thread is far behind, and a batch refused then is retried or spooled by the writer rather
/// than held in memory.
const QUEUE: usize = 4;

/// Hands usage batches to the writing thread; starts it on first use.
#[derive(Debug)]
pub(super) struct SqliteUsageWriter {
    path: PathBuf,
    thread: Mutex<Thread>,
}

/// The writing thread, as the writer knows it.
#[derive(Debug)]
enum Thread {
    /// Not started yet (or gone, short of a panic): started by the next batch.
    Idle,
    Running(mpsc::SyncSender<Job>),
    /// [`SqliteUsageWriter::close`] ended it: no thread is started again.
    Closed,
}

#[derive(Debug)]
struct Job {
    records: Arc<[UsageRecord]>,
    done: tokio::sync::oneshot::Sender<Result<()>>,
}

/// The error of a batch that was not stored, and why.
fn not_stored(why: &str) -> StoreError {
    StoreError::Invalid(format!("usage batch not stored: {why}"))
}

impl SqliteUsageWriter {
    pub(super) fn new(path: PathBuf) -> Self {
        SqliteUsageWriter {
            path,
            thread: Mutex::new(Thread::Idle),
        }
    }

    /// Ends the thread once it has finished the batch in hand (its connection closes with it);
    /// later writes fail, as the store's other calls do once its pool is closed.
    pub(super) fn close(&self) {
        *relay_filters::lock(&self.thread) = Thread::Closed;
    }

    /// Stores `records` (new ids written and counted, stored ones skipped) in one transaction.
    pub(super) async fn write(&self, records: Arc<[UsageRecord]>) -> Result<()> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job = Job { records, done };
        self.send(job)?;
        result
            .await
            .unwrap_or_else(|_| Err(not_stored("the SQLite usage thread ended")))
    }

    fn send(&self, job: Job) -> Result<()> {
        let mut thread = relay_filters::lock(&self.thread);
        let job = match &*thread {
            Thread::Closed => return Err(not_stored("the store is closed")),
            Thread::Running(tx) => match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::TrySendError::Full(_)) => {
                    return Err(not_stored("the SQLite usage thread is behind"))
                }
                // The thread is gone (it never is, short of a panic): start another.
                Err(mpsc::TrySendError::Disconnected(job)) => job,
            },
            Thread::Idle => job,
        };
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let path = self.path.clone();
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || serve(path, rx))
            .map_err(|e| not_stored(&format!("cannot start the SQLite usage thread: {e}")))?;
        tx.try_send(job)
            .map_err(|_| not_stored("the SQLite usage thread ended"))?;
        *thread = Thread::Running(tx);
        Ok(())
    }
}

/// The thread: one connection, opened when first needed and again after any failure (a
/// connection left inside a transaction by a failed rollback, a file replaced); ends when the
/// writer is dropped or closed.
fn serve(path: PathBuf, jobs: mpsc::Receiver<Job>) {
    let mut conn: Option<UsageConn> = None;
    for job in jobs {
        // The caller stopped waiting (its timeout): it retries or spools the batch itself, and
        // running this copy too would only put the next batches further behind.
        if job.done.is_closed() {
            continue;
        }
        let result = match conn.as_mut() {
            Some(c) => insert_batch(c, &job.records),
            None => match open(&path) {
                Ok(c) => insert_batch(conn.insert(c), &job.records),
                Err(e) => Err(e.into()),
            },
        };
        if result.is_err() {
            conn = None;
        }
        // Had the caller given up meanwhile, the batch is retried or spooled, and inserting it
        // again is harmless (ids already stored are skipped).
        let _ = job.done.send(result);
    }
}

/// The thread's connection and its record inserts.
struct UsageConn {
    /// Inserts by row count, prepared on first use. Declared before the connection, so they
    /// are finalized before it closes (a connection with statements left open does not close).
    inserts: HashMap<usize, RawInsert>,
    conn: rusqlite::Connection,
}

/// Opens the existing database file read-write (never creating one) with the relay's settings.
fn open(path: &std::path::Path) -> rusqlite::Result<UsageConn> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // rusqlite's cache holds the rest: every run length of the id lookups (ten), the rollups'
    // and the last uses' statements. The inserts are the thread's own (`RawInsert`).
    conn.set_prepared_statement_cache_capacity(16);
    // Synchronous FULL, unlike sqlx's connections (NORMAL): in WAL mode NORMAL syncs the log
    // only at checkpoints, so the last batches committed could be lost to a power cut, records
    // of requests already served. FULL syncs the log at every commit: one sync per batch.
    // Statement journals in memory.
    conn.execute_batch(
        "PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL; PRAGMA temp_store = MEMORY;",
    )?;
    Ok(UsageConn {
        inserts: HashMap::new(),
        conn,
    })
}

fn insert_batch(uc: &mut UsageConn, records: &[UsageRecord]) -> Result<()> {
    let UsageConn { inserts, conn } = uc;
    let unique = unique_records(records);
    if unique.is_empty() {
        return Ok(());
    }
    // Immediate: the write lock is taken (or waited for) up front, not at the first insert,
    // and held to the commit.
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Nearly always every record is new: they are inserted without looking for them first.
    let all_new = {
        let mut first = tx.savepoint()?;
        let all_new = insert_records(&first, inserts, &unique)?;
        if all_new {
            first.commit()?;
        } else {
            first.rollback()?;
        }
        all_new
    };
    let fresh = if all_new {
        unique
    } else {
        // Some were stored already (a spooled batch replayed after its first write did
        // commit): back to the savepoint, still holding the lock, and insert only the others,
        // so none is counted twice.
        let existing = existing_ids(&tx, &unique)?;
        let fresh: Vec<&UsageRecord> = unique
            .into_iter()
            .filter(|r| !existing.contains(r.id.as_str()))
            .collect();
        // This connection holds the write lock: no other writer stored one meanwhile, yet
        // should one have, the batch is retried rather than counted twice.
        if !insert_records(&tx, inserts, &fresh)? {
            return Err(StoreError::Conflict(
                "usage records of this batch were stored meanwhile".into(),
            ));
        }
        fresh
    };
    let sums = batch_sums(&fresh);
    {
        let mut upsert = tx.prepare_cached(&BatchStatement::AddRollups.text(1, false))?;
        for (key, totals) in &sums.rollups {
            upsert.execute(rollup_values(key, totals))?;
        }
    }
    for (table, used) in [
        ("api_keys", &sums.key_used),
        ("accounts", &sums.account_used),
    ] {
        let mut touch = tx.prepare_cached(&last_used_sql(table))?;
        for (id, at) in used {
            touch.execute(params![*at, *id, *at])?;
        }
    }
    Ok(tx.commit()?)
}

/// Inserts `records` in multi-row statements and tells whether every one was new.
fn insert_records(
    tx: &rusqlite::Connection,
    inserts: &mut HashMap<usize, RawInsert>,
    records: &[&UsageRecord],
) -> rusqlite::Result<bool> {
    for chunk in statement_runs(records, RECORDS_PER_STATEMENT) {
        let insert = match inserts.entry(chunk.len()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(RawInsert::prepare(
                tx,
                &BatchStatement::InsertRecords.text(chunk.len(), false),
            )?),
        };
        // Fewer rows than records: an id was stored already.
        if insert.run(chunk.iter().flat_map(|r| record_values(r)))? != chunk.len() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A statement prepared for the life of its connection, binding texts without copying them.
///
/// rusqlite binds every text as `SQLITE_TRANSIENT`: SQLite copies it into memory of its own,
/// and frees it again when the statement is reset. For a record's ten texts that was about a
/// fifth of this thread's work per record. Here texts are bound `SQLITE_STATIC`, and
/// [`RawInsert::run`] borrows them only for the call: the statement is run, reset and its
/// bindings cleared before it returns, so it never keeps a pointer into a record.
struct RawInsert {
    stmt: NonNull<ffi::sqlite3_stmt>,
    db: *mut ffi::sqlite3,
    params: c_int,
}

impl RawInsert {
    fn prepare(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<Self> {
        let len = c_int::try_from(sql.len()).map_err(|_| rusqlite::Error::InvalidQuery)?;
        // SAFETY: the handle is the open connection's; `stmt` gets a statement of it or null.
        let db = unsafe { conn.handle() };
        let mut stmt = std::ptr::null_mut();
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db,
                sql.as_ptr().cast(),
                len,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(failure(db, rc));
        }
        let stmt = NonNull::new(stmt).ok_or(rusqlite::Error::InvalidQuery)?;
        // SAFETY: a statement just prepared.
        let params = unsafe { ffi::sqlite3_bind_parameter_count(stmt.as_ptr()) };
        Ok(RawInsert { stmt, db, params })
    }

    /// Binds `values` to every parameter in order, runs the statement and returns the rows it
    /// changed.
    fn run<'v>(&mut self, values: impl Iterator<Item = RowValue<'v>>) -> rusqlite::Result<usize> {
        let stmt = self.stmt.as_ptr();
        let result = self.bind_and_step(values);
        // SAFETY: a live statement of this connection. Reset and cleared, it holds no pointer
        // to the texts bound above once this returns.
        unsafe {
            ffi::sqlite3_reset(stmt);
            ffi::sqlite3_clear_bindings(stmt);
        }
        result
    }

    fn bind_and_step<'v>(
        &mut self,
        values: impl Iterator<Item = RowValue<'v>>,
    ) -> rusqlite::Result<usize> {
        let stmt = self.stmt.as_ptr();
        let mut at: c_int = 0;
        for value in values {
            at += 1;
            if at > self.params {
                return Err(rusqlite::Error::InvalidParameterCount(
                    at as usize,
                    self.params as usize,
                ));
            }
            // SAFETY: `at` is a parameter of the statement; a text's bytes outlive its use:
            // `run` resets the statement and clears its bindings before the borrow ends.
            let rc = unsafe {
                match value {
                    RowValue::Text(Some(t)) => {
                        let len = c_int::try_from(t.len()).map_err(|_| {
                            rusqlite::Error::SqliteFailure(
                                ffi::Error::new(ffi::SQLITE_TOOBIG),
                                None,
                            )
                        })?;
                        ffi::sqlite3_bind_text(
                            stmt,
                            at,
                            t.as_ptr().cast(),
                            len,
                            ffi::SQLITE_STATIC(),
                        )
                    }
                    RowValue::Int(Some(i)) => ffi::sqlite3_bind_int64(stmt, at, i),
                    RowValue::Text(None) | RowValue::Int(None) => ffi::sqlite3_bind_null(stmt, at),
                }
            };
            if rc != ffi::SQLITE_OK {
                return Err(failure(self.db, rc));
            }
        }
        if at != self.params {
            return Err(rusqlite::Error::InvalidParameterCount(
                at as usize,
                self.params as usize,
            ));
        }
        // SAFETY: every parameter bound; the statement is the connection's.
        match unsafe { ffi::sqlite3_step(stmt) } {
            ffi::SQLITE_DONE => Ok(unsafe { ffi::sqlite3_changes64(self.db) } as usize),
            ffi::SQLITE_ROW => Err(rusqlite::Error::ExecuteReturnedResults),
            rc => Err(failure(self.db, rc)),
        }
    }
}

impl Drop for RawInsert {
    fn drop(&mut self) {
        // SAFETY: finalized once, before its connection closes (see `UsageConn`).
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

/// The error SQLite reported for `rc` on `db`, with its message.
fn failure(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
    // SAFETY: `db` is an open connection; its message is copied before anything else runs on it.
    let message = unsafe {
        let text = ffi::sqlite3_errmsg(db);
        (!text.is_null()).then(|| {
            std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned()
        })
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message)
}

impl ToSql for RowValue<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match self {
            RowValue::Text(t) => t.to_sql(),
            RowValue::Int(i) => i.to_sql(),
        }
    }
}

/// Which of the records' ids are stored.
fn existing_ids(
    tx: &rusqlite::Transaction<'_>,
    records: &[&UsageRecord],
) -> rusqlite::Result<HashSet<String>> {
    let mut existing = HashSet::new();
    for chunk in statement_runs(records, IDS_PER_STATEMENT) {
        let mut query = tx.prepare_cached(&BatchStatement::ExistingIds.text(chunk.len(), false))?;
        let ids = query.query_map(
            rusqlite::params_from_iter(chunk.iter().map(|r| r.id.as_str())),
            |row| row.get::<_, String>(0),
        )?;
        for id in ids {
            existing.insert(id?);
        }
    }
    Ok(existing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The usage connection syncs the log at every commit (`synchronous` 2 is FULL).
    #[test]
    fn the_usage_connection_syncs_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL")
            .unwrap();
        let usage = open(&path).unwrap();
        let synchronous: i64 = usage
            .conn
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .unwrap();
        assert_eq!(synchronous, 2);
    }
}
