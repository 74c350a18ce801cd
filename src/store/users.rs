//! Users: tenants and administrators, with their password hash, role and price rate.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{
    from_json, get_bool, new_id, now_ms, require_non_empty, to_json, Page, Param, Result, SqlParts,
    SqlStore, StoreError,
};

/// Columns of `users`, in the order [`user_from_row`] reads them.
const USER_COLUMNS: &str = "id, username, password_hash, role, enabled, price_rate, \
     daily_cost_limit, monthly_cost_limit, total_cost_limit, allowed_platforms, allowed_models, \
     created_at, updated_at";

/// What a user may do on the admin service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages everything.
    Admin,
    /// Manages its own keys and sees its own usage.
    User,
}

impl Role {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

/// A row of `users`; the password hash is never serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// uuid v7.
    pub id: String,
    /// Unique login name.
    pub username: String,
    /// argon2id PHC string.
    #[serde(skip)]
    pub password_hash: String,
    /// Admin or plain user.
    pub role: Role,
    /// Disabled users cannot log in and their keys are refused.
    pub enabled: bool,
    /// Price multiplier in ten-thousandths (10000 = 1.0).
    pub price_rate: i64,
    /// Billed micro-USD per UTC day over all the user's keys (`None`: no limit).
    pub daily_cost_limit: Option<i64>,
    /// Billed micro-USD per UTC calendar month over all the user's keys (`None`: no limit).
    pub monthly_cost_limit: Option<i64>,
    /// Billed micro-USD in total over all the user's keys (`None`: no limit).
    pub total_cost_limit: Option<i64>,
    /// Platforms every key of the user may use (`claude`, `openai`, `gemini`); empty: all.
    pub allowed_platforms: Vec<String>,
    /// Models (exact or `*` / `?` globs) every key of the user may use; empty: all.
    pub allowed_models: Vec<String>,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms of the last change.
    pub updated_at: i64,
}

/// Fields of a user to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    /// Unique login name.
    pub username: String,
    /// argon2id PHC string (see `secrets::hash_password`).
    pub password_hash: String,
    /// Admin or plain user.
    pub role: Role,
    /// Price multiplier in ten-thousandths (10000 = 1.0).
    pub price_rate: i64,
    /// Billed micro-USD per UTC day over all the user's keys.
    pub daily_cost_limit: Option<i64>,
    /// Billed micro-USD per UTC calendar month over all the user's keys.
    pub monthly_cost_limit: Option<i64>,
    /// Billed micro-USD in total over all the user's keys.
    pub total_cost_limit: Option<i64>,
    /// Platforms the user's keys may use; empty: all.
    pub allowed_platforms: Vec<String>,
    /// Models the user's keys may use; empty: all.
    pub allowed_models: Vec<String>,
}

/// Changes to a user's cost limits: `None` leaves one as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserCostLimits {
    pub daily: Option<Option<i64>>,
    pub monthly: Option<Option<i64>>,
    pub total: Option<Option<i64>>,
}

/// Builds a [`User`] from a row selected with [`USER_COLUMNS`].
fn user_from_row(row: &AnyRow) -> Result<User> {
    let role: String = row.try_get("role")?;
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        password_hash: row.try_get("password_hash")?,
        role: Role::parse(&role)
            .ok_or_else(|| StoreError::Invalid(format!("unknown role {role:?} in users")))?,
        enabled: get_bool(row, "enabled")?,
        price_rate: row.try_get("price_rate")?,
        daily_cost_limit: row.try_get("daily_cost_limit")?,
        monthly_cost_limit: row.try_get("monthly_cost_limit")?,
        total_cost_limit: row.try_get("total_cost_limit")?,
        allowed_platforms: from_json(
            &row.try_get::<String, _>("allowed_platforms")?,
            "users.allowed_platforms",
        )?,
        allowed_models: from_json(
            &row.try_get::<String, _>("allowed_models")?,
            "users.allowed_models",
        )?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Rejects negative price rates.
fn check_rate(rate: i64) -> Result<()> {
    if rate < 0 {
        return Err(StoreError::Invalid(
            "price rate must not be negative".to_owned(),
        ));
    }
    Ok(())
}

/// Rejects negative cost limits.
fn check_cost_limits(limits: [(&str, Option<i64>); 3]) -> Result<()> {
    match limits.iter().find(|(_, v)| v.is_some_and(|v| v < 0)) {
        Some((what, _)) => Err(StoreError::Invalid(format!("{what} must not be negative"))),
        None => Ok(()),
    }
}

impl SqlStore {
    /// Creates a user; a taken username is `Conflict`.
    pub async fn create_user(&self, new: &NewUser) -> Result<User> {
        require_non_empty("username", &new.username)?;
        check_rate(new.price_rate)?;
        check_cost_limits([
            ("daily_cost_limit", new.daily_cost_limit),
            ("monthly_cost_limit", new.monthly_cost_limit),
            ("total_cost_limit", new.total_cost_limit),
        ])?;
        let now = now_ms();
        let user = User {
            id: new_id(),
            username: new.username.clone(),
            password_hash: new.password_hash.clone(),
            role: new.role,
            enabled: true,
            price_rate: new.price_rate,
            daily_cost_limit: new.daily_cost_limit,
            monthly_cost_limit: new.monthly_cost_limit,
            total_cost_limit: new.total_cost_limit,
            allowed_platforms: new.allowed_platforms.clone(),
            allowed_models: new.allowed_models.clone(),
            created_at: now,
            updated_at: now,
        };
        sqlx::query(
            "INSERT INTO users (id, username, password_hash, role, enabled, price_rate, \
             daily_cost_limit, monthly_cost_limit, total_cost_limit, allowed_platforms, \
             allowed_models, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
             $10, $11, $12, $13)",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(&user.password_hash)
        .bind(user.role.as_str())
        .bind(1_i64)
        .bind(user.price_rate)
        .bind(user.daily_cost_limit)
        .bind(user.monthly_cost_limit)
        .bind(user.total_cost_limit)
        .bind(to_json(&user.allowed_platforms)?)
        .bind(to_json(&user.allowed_models)?)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => {
                StoreError::Conflict(format!("username {:?} is taken", new.username))
            }
            other => other,
        })?;
        Ok(user)
    }

    /// The user with this id, if any.
    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// The user with this username, if any.
    pub async fn user_by_username(&self, username: &str) -> Result<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = $1");
        let row = sqlx::query(&sql)
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// One page of users, oldest first.
    pub async fn list_users(&self, page: i64, per_page: i64) -> Result<Page<User>> {
        let select = format!("SELECT {USER_COLUMNS} FROM users ORDER BY created_at, id");
        self.fetch_page(
            &select,
            "SELECT COUNT(*) FROM users",
            &SqlParts::default(),
            page,
            per_page,
            user_from_row,
        )
        .await
    }

    /// Number of users.
    pub async fn count_users(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Replaces a user's password hash.
    pub async fn set_user_password(&self, id: &str, password_hash: &str) -> Result<()> {
        self.update_user_column(id, "password_hash", Param::Text(Some(password_hash.into())))
            .await
    }

    /// Enables or disables a user.
    pub async fn set_user_enabled(&self, id: &str, enabled: bool) -> Result<()> {
        self.update_user_column(id, "enabled", Param::Int(Some(i64::from(enabled))))
            .await
    }

    /// Changes a user's role.
    pub async fn set_user_role(&self, id: &str, role: Role) -> Result<()> {
        self.update_user_column(id, "role", Param::Text(Some(role.as_str().into())))
            .await
    }

    /// Sets or clears (`Some(None)`) a user's cost limits; `None` leaves one as it is.
    pub async fn set_user_cost_limits(&self, id: &str, limits: &UserCostLimits) -> Result<()> {
        let columns = [
            ("daily_cost_limit", limits.daily),
            ("monthly_cost_limit", limits.monthly),
            ("total_cost_limit", limits.total),
        ];
        check_cost_limits(columns.map(|(column, value)| (column, value.flatten())))?;
        let mut parts = SqlParts::default();
        for (column, value) in columns {
            if let Some(value) = value {
                parts.set(column, Param::Int(value));
            }
        }
        if parts.is_empty() {
            return Ok(());
        }
        self.update_user_columns(id, parts).await
    }

    /// Replaces a user's platform or model allow-list (`None` leaves one as it is).
    pub async fn set_user_allow_lists(
        &self,
        id: &str,
        platforms: Option<&[String]>,
        models: Option<&[String]>,
    ) -> Result<()> {
        let mut parts = SqlParts::default();
        if let Some(platforms) = platforms {
            parts.set("allowed_platforms", Param::Text(Some(to_json(platforms)?)));
        }
        if let Some(models) = models {
            parts.set("allowed_models", Param::Text(Some(to_json(models)?)));
        }
        if parts.is_empty() {
            return Ok(());
        }
        self.update_user_columns(id, parts).await
    }

    /// Sets the price rate of every listed user; returns how many users were updated.
    pub async fn set_price_rate(&self, ids: &[String], rate: i64) -> Result<u64> {
        check_rate(rate)?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut parts = SqlParts::default();
        parts.set("price_rate", Param::Int(Some(rate)));
        parts.bump_updated_at();
        let first = parts.param_count() + 1;
        let placeholders = (0..ids.len())
            .map(|i| format!("${}", first + i))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE users SET {} WHERE id IN ({placeholders})",
            parts.joined(", ")
        );
        let mut query = parts.bind(sqlx::query(&sql));
        for id in ids {
            query = query.bind(id.as_str());
        }
        Ok(query.execute(&self.pool).await?.rows_affected())
    }

    /// Deletes a user with its keys and admin sessions.
    pub async fn delete_user(&self, id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // Deleted explicitly rather than by cascade alone, so that the API key change marker
        // moves even where foreign keys are off.
        sqlx::query("DELETE FROM api_keys WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM admin_sessions WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }

    /// Sets one column of a user and bumps `updated_at`.
    async fn update_user_column(&self, id: &str, column: &str, value: Param) -> Result<()> {
        let mut parts = SqlParts::default();
        parts.set(column, value);
        self.update_user_columns(id, parts).await
    }

    /// Sets the columns in `parts` of a user and bumps `updated_at`.
    async fn update_user_columns(&self, id: &str, mut parts: SqlParts) -> Result<()> {
        parts.bump_updated_at();
        let sql = format!(
            "UPDATE users SET {} WHERE id = ${}",
            parts.joined(", "),
            parts.param_count() + 1
        );
        let done = parts
            .bind(sqlx::query(&sql))
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}
