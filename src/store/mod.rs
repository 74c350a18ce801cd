//! Durable storage of llm-relay on SQLite or PostgreSQL through one `sqlx::AnyPool`: users, API
//! keys, accounts, prices, usage records and daily rollups, settings, audit log, admin sessions.
//!
//! Every query is written once in a portable dialect (`$1, $2, ...` placeholders in ascending
//! order, BIGINT for numbers and booleans, TEXT for ids and JSON) and runs unchanged on both.

mod accounts;
mod admin_sessions;
mod api_keys;
mod limits;
mod prices;
pub mod redis_counters;
pub mod redis_limits;
pub mod redis_sessions;
mod settings;
pub mod sqlite_usage;
mod usage;
mod users;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, AnyPool, Executor, Row};

pub use accounts::{Account, AccountPatch, AccountStatus, NewAccount, RefreshedTokens};
pub use admin_sessions::AdminSession;
pub use api_keys::{ActiveApiKey, ApiKey, ApiKeyPatch, NewApiKey, DISABLED_BY_ADMIN};
pub use limits::Spend;
pub use prices::{
    override_at, overrides_by_model, CardChoice, CardChoices, LongContextChoice, LongContextPrice,
    ModelPrice, ModelPriceRow, TierChoice, TierPrice,
};
pub use redis_sessions::{
    FallbackSessionStore, RedisCooldowns, RedisLink, RedisLinkConfig, RedisSessionStore,
};
pub use settings::AuditEntry;
pub use usage::{utc_day, RecordFilter, UsageDailyRow, UsageDim, UsageRow, UsageTotals};
pub use users::{NewUser, Role, User, UserCostLimits};

/// Largest page size a list call returns; larger requests are clamped.
pub const MAX_PER_PAGE: i64 = 500;

/// What went wrong in a store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row addressed by id (or key) does not exist.
    #[error("not found")]
    NotFound,
    /// A unique constraint refused the write (duplicate username, account name, key hash...).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request or a stored value breaks a rule of the store.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Db(#[source] sqlx::Error),
    /// The usage batches' own SQLite connection failed.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_owned())
            }
            other => StoreError::Db(other),
        }
    }
}

impl StoreError {
    /// Whether the database refused the data itself, so that the same write can never succeed:
    /// PostgreSQL SQLSTATE class 22 (data exception) or 23 (integrity constraint violation),
    /// SQLite `CONSTRAINT`, `MISMATCH` or `TOOBIG`. A unique violation is not one: on a usage
    /// record it is its id, stored meanwhile, which a retry skips. Everything else (a lock
    /// wait, a busy file, a lost connection, a full disk) may pass.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(db)) => {
                if db.is_unique_violation() {
                    return false;
                }
                let Some(code) = db.code() else {
                    return false;
                };
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                {
                    postgres_data_error(&code)
                } else if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    code.parse().is_ok_and(sqlite_data_error)
                } else {
                    false
                }
            }
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                sqlite_data_error(e.extended_code)
            }
            _ => false,
        }
    }

    /// Whether the database could not be reached at all: no connection (or none in time), the
    /// pool closed, the SQLite file not openable or not readable.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Db(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ),
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::SystemIoFailure
                    | rusqlite::ErrorCode::NotADatabase
            ),
            _ => false,
        }
    }
}

/// Whether a PostgreSQL SQLSTATE names bad data: class 22 or 23, a unique violation aside.
fn postgres_data_error(sqlstate: &str) -> bool {
    (sqlstate.starts_with("22") || sqlstate.starts_with("23")) && sqlstate != "23505"
}

/// Whether a SQLite extended result code names bad data: `CONSTRAINT` (but for a primary key
/// or unique one), `MISMATCH`, `TOOBIG`.
fn sqlite_data_error(extended: std::ffi::c_int) -> bool {
    use rusqlite::ffi;
    match extended & 0xff {
        ffi::SQLITE_CONSTRAINT => {
            extended != ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                && extended != ffi::SQLITE_CONSTRAINT_UNIQUE
        }
        ffi::SQLITE_MISMATCH | ffi::SQLITE_TOOBIG => true,
        _ => false,
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Db(sqlx::Error::Migrate(Box::new(e)))
    }
}

/// Result of a store call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One page of a list, with the total number of rows matching the query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page<T> {
    /// Rows of this page, in the list's order.
    pub items: Vec<T>,
    /// Rows matching the query across all pages.
    pub total: i64,
    /// 1-based page number actually served (after clamping).
    pub page: i64,
    /// Page size actually served (after clamping to `1..=MAX_PER_PAGE`).
    pub per_page: i64,
}

/// Change fingerprint of one table: any insert, update or delete changes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TableMarker {
    /// Number of rows.
    pub rows: i64,
    /// Largest `updated_at`.
    pub max_updated_at: i64,
    /// Sum of `updated_at`; every update raises a row's `updated_at` by at least 1 ms.
    pub sum_updated_at: i64,
}

/// Change fingerprints of the tables the in-process caches mirror; nodes poll and compare it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ChangeMarker {
    /// Fingerprint of `users`.
    pub users: TableMarker,
    /// Fingerprint of `api_keys`.
    pub api_keys: TableMarker,
    /// Fingerprint of `accounts`.
    pub accounts: TableMarker,
    /// Fingerprint of `model_prices` (price overrides).
    pub prices: TableMarker,
    /// Fingerprint of `model_price_changes` (scheduled price overrides).
    pub price_changes: TableMarker,
}

/// Handle on the relay database; cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    postgres: bool,
    /// On a SQLite file: the usage batches' own connection and thread.
    sqlite_usage: Option<Arc<sqlite_usage::SqliteUsageWriter>>,
}

impl SqlStore {
    /// Opens a pool on a `sqlite://...` or `postgres://...` URL.
    ///
    /// For SQLite the parent directory and the file are created when missing, the journal is
    /// switched to WAL, and every connection gets `busy_timeout` 5 s and foreign keys on.
    pub async fn connect(url: &str, max_connections: u32) -> Result<SqlStore> {
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let sqlite = url.starts_with("sqlite:");
        if !postgres && !sqlite {
            return Err(StoreError::Invalid(
                "database URL must start with sqlite:// or postgres://".to_owned(),
            ));
        }
        let mut own_usage_connection = false;
        let mut options = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(3));
        let url = if sqlite {
            let (url, in_memory) = prepare_sqlite_url(url)?;
            own_usage_connection = !in_memory && plain_sqlite_settings(&url);
            if in_memory {
                // Each new connection would open a new, empty in-memory database: keep one.
                options = options
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None);
            }
            options = options.after_connect(|conn, _meta| {
                Box::pin(async move {
                    // Statement journals (a multi-row insert within a transaction keeps one,
                    // to undo just that statement) in memory: in temporary files they cost a
                    // write of every page the statement touched.
                    conn.execute(
                        "PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON; \
                         PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY;",
                    )
                    .await?;
                    Ok(())
                })
            });
            url
        } else {
            url.to_owned()
        };
        let pool = options.connect(&url).await?;
        if sqlite {
            // WAL is a property of the database file: set once, it holds for every connection.
            sqlx::query("PRAGMA journal_mode = WAL")
                .fetch_optional(&pool)
                .await?;
        }
        // The usage thread opens the very file sqlx opened (SQLite names it, absolute), never
        // creating one.
        let sqlite_usage = if own_usage_connection {
            let file: Option<String> =
                sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
                    .fetch_optional(&pool)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|row| row.try_get(0).ok());
            let file = file
                .map(std::path::PathBuf::from)
                .filter(|p| p.is_absolute() && p.is_file());
            if file.is_none() {
                tracing::info!("usage batches go through the database pool (no file named)");
            }
            file.map(|p| Arc::new(sqlite_usage::SqliteUsageWriter::new(p)))
        } else {
            None
        };
        Ok(SqlStore {
            pool,
            postgres,
            sqlite_usage,
        })
    }

    /// Applies the embedded migrations that are not yet applied (idempotent).
    ///
    /// Migrations only add (tables, nullable or defaulted columns, indexes), so a node of the
    /// previous version still starts on a database a newer node has migrated, as a rolling
    /// upgrade of several nodes on one PostgreSQL needs; it says so in its log.
    pub async fn migrate(&self) -> Result<()> {
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&self.pool).await?;
        let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        let newer: i64 = sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations WHERE version > $1")
            .bind(known)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        if newer > 0 {
            tracing::warn!(
                newer,
                "the database has migrations of a newer llm-relay version; running on its schema"
            );
        }
        Ok(())
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
    }

    /// Whether the database is PostgreSQL (else SQLite).
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// The underlying pool, for callers that need a query the store does not offer.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Closes every connection of the pool (and the usage batches' own); later calls fail.
    pub async fn close(&self) {
        if let Some(usage) = &self.sqlite_usage {
            usage.close();
        }
        self.pool.close().await;
    }

    /// Current change fingerprints of users, API keys and accounts, in one cheap query.
    pub async fn change_marker(&self) -> Result<ChangeMarker> {
        let part = |t: &str| {
            format!(
                "(SELECT COUNT(*) FROM {t}), (SELECT COALESCE(MAX(updated_at), 0) FROM {t}), \
                 (SELECT CAST(COALESCE(SUM(updated_at), 0) AS BIGINT) FROM {t})"
            )
        };
        let sql = format!(
            "SELECT {}, {}, {}, {}, {}",
            part("users"),
            part("api_keys"),
            part("accounts"),
            part("model_prices"),
            part("model_price_changes")
        );
        let row = sqlx::query(&sql).fetch_one(&self.pool).await?;
        let table = |base: usize| -> Result<TableMarker> {
            Ok(TableMarker {
                rows: row.try_get(base)?,
                max_updated_at: row.try_get(base + 1)?,
                sum_updated_at: row.try_get(base + 2)?,
            })
        };
        Ok(ChangeMarker {
            users: table(0)?,
            api_keys: table(3)?,
            accounts: table(6)?,
            prices: table(9)?,
            price_changes: table(12)?,
        })
    }
}

/// Rewrites a SQLite URL so the file is created when missing, and creates its directory.
/// Returns the URL and whether the database is in memory.
fn prepare_sqlite_url(url: &str) -> Result<(String, bool)> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path.is_empty() || path == ":memory:" || query.contains("mode=memory");
    if in_memory {
        return Ok((url.to_owned(), true));
    }
    if let Some(parent) = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|e| {
            StoreError::Invalid(format!(
                "cannot create database directory {}: {e}",
                parent.display()
            ))
        })?;
    }
    let has_mode = query.split('&').any(|kv| kv.starts_with("mode="));
    let url = match (query.is_empty(), has_mode) {
        (_, true) => url.to_owned(),
        (true, false) => format!("{url}?mode=rwc"),
        (false, false) => format!("{url}&mode=rwc"),
    };
    Ok((url, false))
}

/// Whether a file's `sqlite:` URL sets nothing but its open mode (`rw`, `rwc`): the usage
/// thread's own connection could not honour other settings (a VFS, `immutable`, a cache mode).
fn plain_sqlite_settings(url: &str) -> bool {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .all(|kv| kv == "mode=rw" || kv == "mode=rwc")
}

/// Milliseconds since the Unix epoch, now.
pub(crate) use relay_filters::now_ms;

/// A new time-ordered id (uuid v7, hyphenated lower case). Encoded into a stack buffer, not
/// through `Display`: one allocation of the exact size, no formatter (one per request).
pub(crate) fn new_id() -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}

/// Serializes a JSON column value.
pub(crate) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(format!("JSON encoding: {e}")))
}

/// Parses a JSON column value, naming the column when it is corrupt.
pub(crate) fn from_json<T: DeserializeOwned>(text: &str, column: &str) -> Result<T> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Invalid(format!("column {column} holds invalid JSON: {e}")))
}

/// Reads a 0/1 BIGINT column as a bool.
pub(crate) fn get_bool(row: &AnyRow, column: &str) -> Result<bool> {
    Ok(row.try_get::<i64, _>(column)? != 0)
}

/// Clamps page numbers: returns (page, per_page, offset).
pub(crate) fn page_bounds(page: i64, per_page: i64) -> (i64, i64, i64) {
    let page = page.max(1);
    let per_page = per_page.clamp(1, MAX_PER_PAGE);
    let offset = (page - 1).saturating_mul(per_page);
    (page, per_page, offset)
}

impl SqlStore {
    /// One page of `select` (a query up to its ORDER BY, whose parameters are `parts`') and the
    /// total from `count` (the matching COUNT, same parameters): the shape of every list.
    pub(crate) async fn fetch_page<T>(
        &self,
        select: &str,
        count: &str,
        parts: &SqlParts,
        page: i64,
        per_page: i64,
        map: impl Fn(&AnyRow) -> Result<T>,
    ) -> Result<Page<T>> {
        let (page, per_page, offset) = page_bounds(page, per_page);
        let n = parts.param_count();
        let sql = format!("{select} LIMIT ${} OFFSET ${}", n + 1, n + 2);
        let rows = parts
            .bind(sqlx::query(&sql))
            .bind(per_page)
            .bind(offset)
            .fetch_all(&self.pool)
            .await?;
        let items = rows.iter().map(map).collect::<Result<Vec<_>>>()?;
        let total: i64 = parts
            .bind(sqlx::query(count))
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        Ok(Page {
            items,
            total,
            page,
            per_page,
        })
    }
}

/// Rejects empty (or blank) names.
pub(crate) fn require_non_empty(what: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(StoreError::Invalid(format!("{what} must not be empty")));
    }
    Ok(())
}

/// A value bound into a dynamically built statement.
#[derive(Debug, Clone)]
pub(crate) enum Param {
    /// TEXT (or NULL).
    Text(Option<String>),
    /// BIGINT (or NULL).
    Int(Option<i64>),
}

/// Builds the SET list of an UPDATE or the WHERE list of a SELECT with numbered placeholders,
/// so each placeholder is used once and in ascending order (the portable form).
#[derive(Debug, Default)]
pub(crate) struct SqlParts {
    clauses: Vec<String>,
    params: Vec<Param>,
}

impl SqlParts {
    /// Adds `fragment` where every `?` is replaced by the next placeholder of its parameter.
    pub(crate) fn push(&mut self, fragment: &str, params: Vec<Param>) {
        let mut out = String::with_capacity(fragment.len() + 4);
        let mut next = params.into_iter();
        for ch in fragment.chars() {
            if ch == '?' {
                if let Some(p) = next.next() {
                    self.params.push(p);
                    out.push_str(&format!("${}", self.params.len()));
                    continue;
                }
            }
            out.push(ch);
        }
        self.clauses.push(out);
    }

    /// Adds `column = ?` with one parameter.
    pub(crate) fn set(&mut self, column: &str, param: Param) {
        self.push(&format!("{column} = ?"), vec![param]);
    }

    /// Adds `updated_at` moved to now, or one millisecond past its old value when that is later,
    /// so every update changes the row's `updated_at` (see [`TableMarker`]).
    pub(crate) fn bump_updated_at(&mut self) {
        let now = now_ms();
        self.push(
            "updated_at = CASE WHEN updated_at < ? THEN ? ELSE updated_at + 1 END",
            vec![Param::Int(Some(now)), Param::Int(Some(now))],
        );
    }

    /// Whether no clause was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.clauses.is_empty()
    }

    /// Number of parameters so far (the last placeholder number).
    pub(crate) fn param_count(&self) -> usize {
        self.params.len()
    }

    /// The clauses joined by `sep`.
    pub(crate) fn joined(&self, sep: &str) -> String {
        self.clauses.join(sep)
    }

    /// Binds the parameters, in order, to `query`.
    pub(crate) fn bind<'q>(
        &self,
        mut query: Query<'q, Any, AnyArguments<'q>>,
    ) -> Query<'q, Any, AnyArguments<'q>> {
        for p in &self.params {
            query = match p.clone() {
                Param::Text(v) => query.bind(v),
                Param::Int(v) => query.bind(v),
            };
        }
        query
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_hyphenated_lower_case_uuid_v7_in_time_order() {
        let (a, b) = (new_id(), new_id());
        for id in [&a, &b] {
            let parsed = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(parsed.get_version_num(), 7, "{id}");
            assert_eq!(parsed.to_string(), *id, "the Display form");
            assert_eq!(id.len(), 36);
        }
        assert!(a < b, "{a} {b}");
    }

    #[test]
    fn sql_parts_number_placeholders_in_order() {
        let mut parts = SqlParts::default();
        parts.set("name", Param::Text(Some("a".into())));
        parts.bump_updated_at();
        parts.push("x IS NULL OR x > ?", vec![Param::Int(Some(1))]);
        assert_eq!(
            parts.joined(", "),
            "name = $1, updated_at = CASE WHEN updated_at < $2 THEN $3 ELSE updated_at + 1 END, \
             x IS NULL OR x > $4"
        );
        assert_eq!(parts.param_count(), 4);
    }

    #[test]
    fn only_errors_about_the_data_are_data_errors() {
        for (sqlstate, data) in [
            ("22021", true),  // a NUL in a text value
            ("22003", true),  // a number out of range
            ("23502", true),  // a NOT NULL violated
            ("23514", true),  // a CHECK violated
            ("23505", false), // a unique violation: the id, stored meanwhile
            ("55P03", false), // a lock not available
            ("57014", false), // a statement cancelled (its timeout)
            ("40001", false), // a serialization failure
            ("53100", false), // a full disk
            ("08006", false), // the connection lost
        ] {
            assert_eq!(postgres_data_error(sqlstate), data, "{sqlstate}");
        }
        let sqlite = |code: std::ffi::c_int| {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        use rusqlite::ffi;
        for (code, data) in [
            (ffi::SQLITE_CONSTRAINT_NOTNULL, true),
            (ffi::SQLITE_CONSTRAINT_CHECK, true),
            (ffi::SQLITE_CONSTRAINT, true),
            (ffi::SQLITE_MISMATCH, true),
            (ffi::SQLITE_TOOBIG, true),
            (ffi::SQLITE_CONSTRAINT_PRIMARYKEY, false),
            (ffi::SQLITE_CONSTRAINT_UNIQUE, false),
            (ffi::SQLITE_BUSY, false),
            (ffi::SQLITE_LOCKED, false),
            (ffi::SQLITE_FULL, false),
            (ffi::SQLITE_IOERR, false),
        ] {
            assert_eq!(sqlite(code).is_data_error(), data, "{code}");
        }
        assert!(sqlite(ffi::SQLITE_CANTOPEN).is_unreachable());
        assert!(!sqlite(ffi::SQLITE_BUSY).is_unreachable());
        assert!(!sqlite(ffi::SQLITE_CONSTRAINT_NOTNULL).is_unreachable());
        assert!(StoreError::Db(sqlx::Error::PoolTimedOut).is_unreachable());
        assert!(!StoreError::Db(sqlx::Error::PoolTimedOut).is_data_error());
        assert!(!StoreError::Conflict("stored meanwhile".into()).is_data_error());
        assert!(!StoreError::Invalid("the usage thread is behind".into()).is_data_error());
    }

    /// Through sqlx, the driver's own error is read: SQLite's extended result code.
    #[tokio::test]
    async fn a_refused_value_through_sqlx_is_a_data_error() {
        let store = SqlStore::connect("sqlite::memory:", 1).await.unwrap();
        sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY, n BIGINT NOT NULL)")
            .execute(store.pool())
            .await
            .unwrap();
        let insert = |id: &'static str, n: Option<i64>| {
            sqlx::query("INSERT INTO t (id, n) VALUES ($1, $2)")
                .bind(id)
                .bind(n)
                .execute(store.pool())
        };
        insert("a", Some(1)).await.unwrap();
        let null: StoreError = insert("b", None).await.unwrap_err().into();
        assert!(null.is_data_error(), "{null:?}");
        let again: StoreError = insert("a", Some(2)).await.unwrap_err().into();
        assert!(!again.is_data_error(), "{again:?}");
        store.close().await;
        let closed: StoreError = insert("c", Some(3)).await.unwrap_err().into();
        assert!(
            closed.is_unreachable() && !closed.is_data_error(),
            "{closed:?}"
        );
    }

    #[test]
    fn page_bounds_clamp() {
        assert_eq!(page_bounds(0, 0), (1, 1, 0));
        assert_eq!(page_bounds(3, 20), (3, 20, 40));
        assert_eq!(page_bounds(2, 10_000), (2, MAX_PER_PAGE, MAX_PER_PAGE));
    }

    #[test]
    fn sqlite_urls_gain_create_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/relay.db");
        let url = format!("sqlite://{}", path.display());
        let (out, mem) = prepare_sqlite_url(&url).unwrap();
        assert_eq!(out, format!("{url}?mode=rwc"));
        assert!(!mem);
        assert!(path.parent().unwrap().is_dir());
        let (out, _) = prepare_sqlite_url(&format!("{url}?cache=shared")).unwrap();
        assert_eq!(out, format!("{url}?cache=shared&mode=rwc"));
        let (out, _) = prepare_sqlite_url(&format!("{url}?mode=ro")).unwrap();
        assert_eq!(out, format!("{url}?mode=ro"));
        assert!(prepare_sqlite_url("sqlite::memory:").unwrap().1);
        assert!(plain_sqlite_settings("sqlite://data/relay.db?mode=rwc"));
        assert!(plain_sqlite_settings("sqlite:///srv/relay.db"));
        assert!(!plain_sqlite_settings(
            "sqlite://relay.db?mode=rwc&vfs=unix-none"
        ));
        assert!(!plain_sqlite_settings(
            "sqlite://relay.db?immutable=true&mode=rw"
        ));
        assert!(!plain_sqlite_settings("sqlite://relay.db?mode=ro"));
    }
}
