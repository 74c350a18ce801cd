//! Relay API keys: stored as a peppered hash with a display prefix, each owned by one user,
//! with its limits and allowed platforms and models.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{
    from_json, get_bool, new_id, now_ms, require_non_empty, to_json, Page, Param, Result, SqlParts,
    SqlStore, StoreError,
};

/// Columns of `api_keys k JOIN users u`, in the order [`api_key_from_row`] reads them.
const KEY_COLUMNS: &str = "k.id, k.user_id, u.username, k.name, k.key_hash, k.key_prefix, \
     k.enabled, k.disabled_by_admin, k.expires_at, k.allowed_platforms, k.allowed_models, k.rpm_limit, \
     k.max_concurrency, k.daily_cost_limit, k.monthly_cost_limit, k.total_cost_limit, k.created_at, \
     k.updated_at, k.last_used_at";

/// A row of `api_keys` with its owner's username; the hash is never serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKey {
    /// uuid v7.
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// Owner's username.
    pub username: String,
    /// Name given by the owner.
    pub name: String,
    /// Hex SHA-256 of pepper || key.
    #[serde(skip)]
    pub key_hash: String,
    /// Display form, e.g. `sk-relay-Ab1…`.
    pub key_prefix: String,
    /// Disabled keys are refused.
    pub enabled: bool,
    /// An admin disabled the key: its owner cannot enable it again.
    pub disabled_by_admin: bool,
    /// Epoch ms after which the key is refused.
    pub expires_at: Option<i64>,
    /// Platforms (`claude`, `openai`, `gemini`) the key may use; empty = all.
    pub allowed_platforms: Vec<String>,
    /// Models (exact or glob) the key may use; empty = all.
    pub allowed_models: Vec<String>,
    /// Requests per minute.
    pub rpm_limit: Option<i64>,
    /// Requests in flight at once.
    pub max_concurrency: Option<i64>,
    /// Billed micro-USD per UTC day.
    pub daily_cost_limit: Option<i64>,
    /// Billed micro-USD per UTC calendar month.
    pub monthly_cost_limit: Option<i64>,
    /// Billed micro-USD over the key's life.
    pub total_cost_limit: Option<i64>,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms of the last change (not of the last use).
    pub updated_at: i64,
    /// Epoch ms of the newest recorded request.
    pub last_used_at: Option<i64>,
}

/// Fields of a key to create; the caller generates the key and passes its hash and prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewApiKey {
    /// Owner.
    pub user_id: String,
    /// Name given by the owner.
    pub name: String,
    /// Hex SHA-256 of pepper || key (`secrets::api_key_hash`).
    pub key_hash: String,
    /// Display form (`secrets::api_key_prefix`).
    pub key_prefix: String,
    /// Epoch ms after which the key is refused.
    pub expires_at: Option<i64>,
    /// Allowed platforms; empty = all.
    pub allowed_platforms: Vec<String>,
    /// Allowed models (exact or glob); empty = all.
    pub allowed_models: Vec<String>,
    /// Requests per minute.
    pub rpm_limit: Option<i64>,
    /// Requests in flight at once.
    pub max_concurrency: Option<i64>,
    /// Billed micro-USD per UTC day.
    pub daily_cost_limit: Option<i64>,
    /// Billed micro-USD per UTC calendar month.
    pub monthly_cost_limit: Option<i64>,
    /// Billed micro-USD over the key's life.
    pub total_cost_limit: Option<i64>,
}

/// Changes to a key: `None` leaves a field as it is; `Some(None)` clears a nullable field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiKeyPatch {
    /// New name.
    pub name: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// New expiry, or none.
    pub expires_at: Option<Option<i64>>,
    /// New allowed platforms.
    pub allowed_platforms: Option<Vec<String>>,
    /// New allowed models.
    pub allowed_models: Option<Vec<String>>,
    /// New rpm limit, or none.
    pub rpm_limit: Option<Option<i64>>,
    /// New concurrency limit, or none.
    pub max_concurrency: Option<Option<i64>>,
    /// New daily cost limit, or none.
    pub daily_cost_limit: Option<Option<i64>>,
    /// New monthly cost limit, or none.
    pub monthly_cost_limit: Option<Option<i64>>,
    /// New total cost limit, or none.
    pub total_cost_limit: Option<Option<i64>>,
    /// The change is an admin's: enabling or disabling also clears or sets
    /// `disabled_by_admin`. The owner's enabling is refused while that is set.
    pub by_admin: bool,
}

/// A usable key with what the in-process key cache needs about its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActiveApiKey {
    /// The key, with the owner's username.
    pub key: ApiKey,
    /// Whether the owner is enabled (a disabled owner's keys are refused).
    pub user_enabled: bool,
    /// The owner's price rate in ten-thousandths.
    pub user_price_rate: i64,
    /// The owner's cost limits over all its keys (billed micro-USD): per UTC day, per UTC
    /// calendar month, in total.
    pub user_daily_cost_limit: Option<i64>,
    pub user_monthly_cost_limit: Option<i64>,
    pub user_total_cost_limit: Option<i64>,
    /// The owner's platform and model allow-lists, which hold for all its keys.
    pub user_allowed_platforms: Vec<String>,
    pub user_allowed_models: Vec<String>,
}

/// Builds an [`ApiKey`] from a row selected with [`KEY_COLUMNS`].
fn api_key_from_row(row: &AnyRow) -> Result<ApiKey> {
    let platforms: String = row.try_get("allowed_platforms")?;
    let models: String = row.try_get("allowed_models")?;
    Ok(ApiKey {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        username: row.try_get("username")?,
        name: row.try_get("name")?,
        key_hash: row.try_get("key_hash")?,
        key_prefix: row.try_get("key_prefix")?,
        enabled: get_bool(row, "enabled")?,
        disabled_by_admin: get_bool(row, "disabled_by_admin")?,
        expires_at: row.try_get("expires_at")?,
        allowed_platforms: from_json(&platforms, "api_keys.allowed_platforms")?,
        allowed_models: from_json(&models, "api_keys.allowed_models")?,
        rpm_limit: row.try_get("rpm_limit")?,
        max_concurrency: row.try_get("max_concurrency")?,
        daily_cost_limit: row.try_get("daily_cost_limit")?,
        monthly_cost_limit: row.try_get("monthly_cost_limit")?,
        total_cost_limit: row.try_get("total_cost_limit")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

/// Why the owner cannot enable a key.
pub const DISABLED_BY_ADMIN: &str =
    "an administrator disabled this key: only an administrator can enable it again";

/// Rejects negative limits.
fn check_limits(limits: &[(&str, Option<i64>)]) -> Result<()> {
    for (what, value) in limits {
        if value.is_some_and(|v| v < 0) {
            return Err(StoreError::Invalid(format!("{what} must not be negative")));
        }
    }
    Ok(())
}

impl SqlStore {
    /// Creates a key, refused with `Invalid` when the owner already holds `max_keys_per_user`
    /// keys; the count and the insert are one transaction holding the owner's row lock.
    pub async fn create_api_key(&self, new: &NewApiKey, max_keys_per_user: i64) -> Result<ApiKey> {
        require_non_empty("key name", &new.name)?;
        require_non_empty("key hash", &new.key_hash)?;
        check_limits(&[
            ("rpm_limit", new.rpm_limit),
            ("max_concurrency", new.max_concurrency),
            ("daily_cost_limit", new.daily_cost_limit),
            ("monthly_cost_limit", new.monthly_cost_limit),
            ("total_cost_limit", new.total_cost_limit),
        ])?;
        let platforms = to_json(&new.allowed_platforms)?;
        let models = to_json(&new.allowed_models)?;
        let id = new_id();
        let now = now_ms();

        let mut tx = self.pool.begin().await?;
        // A no-op UPDATE locks the owner's row (PostgreSQL) or takes the write lock (SQLite):
        // concurrent creations for one user queue here, so the count below stays true.
        let locked = sqlx::query("UPDATE users SET updated_at = updated_at WHERE id = $1")
            .bind(&new.user_id)
            .execute(&mut *tx)
            .await?;
        if locked.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        let owned: i64 = sqlx::query("SELECT COUNT(*) FROM api_keys WHERE user_id = $1")
            .bind(&new.user_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if owned >= max_keys_per_user {
            return Err(StoreError::Invalid(format!(
                "this user already owns {owned} API keys, the maximum is {max_keys_per_user}"
            )));
        }
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, key_hash, key_prefix, enabled, expires_at, \
             allowed_platforms, allowed_models, rpm_limit, max_concurrency, daily_cost_limit, \
             monthly_cost_limit, total_cost_limit, created_at, updated_at, last_used_at) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(&id)
        .bind(&new.user_id)
        .bind(&new.name)
        .bind(&new.key_hash)
        .bind(&new.key_prefix)
        .bind(1_i64)
        .bind(new.expires_at)
        .bind(platforms)
        .bind(models)
        .bind(new.rpm_limit)
        .bind(new.max_concurrency)
        .bind(new.daily_cost_limit)
        .bind(new.monthly_cost_limit)
        .bind(new.total_cost_limit)
        .bind(now)
        .bind(now)
        .bind(None::<i64>)
        .execute(&mut *tx)
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => StoreError::Conflict("API key hash already exists".into()),
            other => other,
        })?;
        tx.commit().await?;
        self.api_key_by_id(&id).await?.ok_or(StoreError::NotFound)
    }

    /// The key with this hash, if any (whatever its state).
    pub async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id \
             WHERE k.key_hash = $1"
        );
        let row = sqlx::query(&sql)
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    /// The key with this id, if any.
    pub async fn api_key_by_id(&self, id: &str) -> Result<Option<ApiKey>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id \
             WHERE k.id = $1"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }

    /// One page of keys, newest first: one user's (`Some`) or everybody's (`None`).
    pub async fn list_api_keys(
        &self,
        user_id: Option<&str>,
        page: i64,
        per_page: i64,
    ) -> Result<Page<ApiKey>> {
        let mut filter = SqlParts::default();
        if let Some(user_id) = user_id {
            filter.push("k.user_id = ?", vec![Param::Text(Some(user_id.to_owned()))]);
        }
        let where_sql = if filter.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", filter.joined(" AND "))
        };
        let select = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys k JOIN users u ON u.id = k.user_id {where_sql} \
             ORDER BY k.created_at DESC, k.id DESC"
        );
        let count = format!("SELECT COUNT(*) FROM api_keys k {where_sql}");
        self.fetch_page(&select, &count, &filter, page, per_page, api_key_from_row)
            .await
    }

    /// Applies a patch to a key and returns the key as it now is.
    pub async fn update_api_key(&self, id: &str, patch: &ApiKeyPatch) -> Result<ApiKey> {
        check_limits(&[
            ("rpm_limit", patch.rpm_limit.flatten()),
            ("max_concurrency", patch.max_concurrency.flatten()),
            ("daily_cost_limit", patch.daily_cost_limit.flatten()),
            ("monthly_cost_limit", patch.monthly_cost_limit.flatten()),
            ("total_cost_limit", patch.total_cost_limit.flatten()),
        ])?;
        let mut parts = SqlParts::default();
        if let Some(name) = &patch.name {
            require_non_empty("key name", name)?;
            parts.set("name", Param::Text(Some(name.clone())));
        }
        if let Some(enabled) = patch.enabled {
            parts.set("enabled", Param::Int(Some(i64::from(enabled))));
            if patch.by_admin {
                parts.set("disabled_by_admin", Param::Int(Some(i64::from(!enabled))));
            }
        }
        if let Some(expires_at) = patch.expires_at {
            parts.set("expires_at", Param::Int(expires_at));
        }
        if let Some(platforms) = &patch.allowed_platforms {
            parts.set("allowed_platforms", Param::Text(Some(to_json(platforms)?)));
        }
        if let Some(models) = &patch.allowed_models {
            parts.set("allowed_models", Param::Text(Some(to_json(models)?)));
        }
        for (column, value) in [
            ("rpm_limit", patch.rpm_limit),
            ("max_concurrency", patch.max_concurrency),
            ("daily_cost_limit", patch.daily_cost_limit),
            ("monthly_cost_limit", patch.monthly_cost_limit),
            ("total_cost_limit", patch.total_cost_limit),
        ] {
            if let Some(value) = value {
                parts.set(column, Param::Int(value));
            }
        }
        if !parts.is_empty() {
            parts.bump_updated_at();
            // The owner's enabling holds only while no admin has disabled the key, checked in
            // the same statement so an admin's disabling in between is never undone.
            let guard = if patch.enabled == Some(true) && !patch.by_admin {
                " AND disabled_by_admin = 0"
            } else {
                ""
            };
            let sql = format!(
                "UPDATE api_keys SET {} WHERE id = ${}{guard}",
                parts.joined(", "),
                parts.param_count() + 1
            );
            let done = parts
                .bind(sqlx::query(&sql))
                .bind(id)
                .execute(&self.pool)
                .await?;
            if done.rows_affected() == 0 {
                return match self.api_key_by_id(id).await? {
                    Some(_) => Err(StoreError::Invalid(DISABLED_BY_ADMIN.into())),
                    None => Err(StoreError::NotFound),
                };
            }
        }
        self.api_key_by_id(id).await?.ok_or(StoreError::NotFound)
    }

    /// Deletes a key.
    pub async fn delete_api_key(&self, id: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM api_keys WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Every key with its owner's state, in one query (for the key cache). Disabled and expired
    /// keys are included so the relay can tell a client why its key is refused.
    pub async fn load_api_keys_with_users(&self) -> Result<Vec<ActiveApiKey>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS}, u.enabled AS user_enabled, u.price_rate AS user_price_rate, \
             u.daily_cost_limit AS user_daily_cost_limit, \
             u.monthly_cost_limit AS user_monthly_cost_limit, \
             u.total_cost_limit AS user_total_cost_limit, \
             u.allowed_platforms AS user_allowed_platforms, \
             u.allowed_models AS user_allowed_models \
             FROM api_keys k JOIN users u ON u.id = k.user_id"
        );
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                Ok(ActiveApiKey {
                    key: api_key_from_row(row)?,
                    user_enabled: get_bool(row, "user_enabled")?,
                    user_price_rate: row.try_get("user_price_rate")?,
                    user_daily_cost_limit: row.try_get("user_daily_cost_limit")?,
                    user_monthly_cost_limit: row.try_get("user_monthly_cost_limit")?,
                    user_total_cost_limit: row.try_get("user_total_cost_limit")?,
                    user_allowed_platforms: super::from_json(
                        &row.try_get::<String, _>("user_allowed_platforms")?,
                        "users.allowed_platforms",
                    )?,
                    user_allowed_models: super::from_json(
                        &row.try_get::<String, _>("user_allowed_models")?,
                        "users.allowed_models",
                    )?,
                })
            })
            .collect()
    }
}
