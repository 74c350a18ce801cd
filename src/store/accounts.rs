//! Upstream accounts: provider credentials (encrypted by the caller with `secrets::SecretBox`),
//! scheduling fields and health state.

use std::collections::BTreeMap;

use relay_filters::AccountType;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{
    from_json, get_bool, new_id, now_ms, require_non_empty, to_json, Page, Param, Result, SqlParts,
    SqlStore, StoreError,
};

/// Columns of `accounts`, read by name in [`account_from_row`].
const ACCOUNT_COLUMNS: &str = "id, name, account_type, base_url, credential_enc, \
     credential_key_id, refresh_token_enc, priority, weight, models, model_map, max_concurrency, \
     enabled, status, consecutive_error_count, cooldown_until, cooldown_cleared_at, status_set_at, \
     last_used_at, extra, created_at, updated_at, token_expires_at, token_refreshed_at, \
     token_refresh_error, token_refresh_refused";

/// Health state of an account as the relay judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    /// Usable.
    Valid,
    /// Too many auth errors in a row: not scheduled until an operator or a health check clears it.
    Error,
    /// The provider blocked it ("organization disabled"): not scheduled.
    Blocked,
}

impl AccountStatus {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Valid => "valid",
            AccountStatus::Error => "error",
            AccountStatus::Blocked => "blocked",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<AccountStatus> {
        match s {
            "valid" => Some(AccountStatus::Valid),
            "error" => Some(AccountStatus::Error),
            "blocked" => Some(AccountStatus::Blocked),
            _ => None,
        }
    }
}

/// A row of `accounts`; encrypted secrets are never serialized.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Account {
    /// uuid v7.
    pub id: String,
    /// Unique name shown to operators and in metrics.
    pub name: String,
    /// Kind of upstream.
    pub account_type: AccountType,
    /// Upstream base URL; `None` = the type's default.
    pub base_url: Option<String>,
    /// Credential encrypted by `SecretBox::encrypt`.
    #[serde(skip)]
    pub credential_enc: String,
    /// Id of the key the credential is encrypted with.
    pub credential_key_id: String,
    /// OAuth refresh token encrypted by `SecretBox::encrypt`.
    #[serde(skip)]
    pub refresh_token_enc: Option<String>,
    /// Whether a refresh token is stored (the token itself is never shown).
    pub has_refresh_token: bool,
    /// Lower is picked first.
    pub priority: i64,
    /// Relative share inside a priority tier (`weighted` strategy).
    pub weight: i64,
    /// Models it serves; empty = all.
    pub models: Vec<String>,
    /// Requested model → upstream model.
    pub model_map: BTreeMap<String, String>,
    /// Requests in flight at once.
    pub max_concurrency: Option<i64>,
    /// Operator switch.
    pub enabled: bool,
    /// Health state.
    pub status: AccountStatus,
    /// Auth errors in a row.
    pub consecutive_error_count: i64,
    /// Epoch ms until which it is not scheduled.
    pub cooldown_until: Option<i64>,
    /// Epoch ms when an operator last ended its cooldown; it only moves forward.
    pub cooldown_cleared_at: Option<i64>,
    /// Epoch ms when an operator last set its status or replaced its credential; it only moves
    /// forward.
    pub status_set_at: Option<i64>,
    /// Epoch ms of the newest recorded request.
    pub last_used_at: Option<i64>,
    /// Type-specific data (e.g. `chatgpt_account_id`), a JSON object.
    pub extra: serde_json::Value,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms of the last change.
    pub updated_at: i64,
    /// OAuth accounts: when the access token expires (epoch ms), when known.
    pub token_expires_at: Option<i64>,
    /// When the relay last refreshed the access token (epoch ms).
    pub token_refreshed_at: Option<i64>,
    /// Why the last token refresh failed; `None` after a success or new tokens.
    pub token_refresh_error: Option<String>,
    /// The provider refused the refresh token: no automatic refresh until new tokens are set.
    pub token_refresh_refused: bool,
}

/// Fields of an account to create; [`NewAccount::new`] fills the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAccount {
    /// Unique name.
    pub name: String,
    /// Kind of upstream.
    pub account_type: AccountType,
    /// Upstream base URL; `None` = the type's default.
    pub base_url: Option<String>,
    /// Credential encrypted by `SecretBox::encrypt`.
    pub credential_enc: String,
    /// Id of the key the credential is encrypted with.
    pub credential_key_id: String,
    /// OAuth refresh token encrypted by `SecretBox::encrypt`.
    pub refresh_token_enc: Option<String>,
    /// Lower is picked first (default 50).
    pub priority: i64,
    /// Relative share inside a tier (default 1).
    pub weight: i64,
    /// Models it serves; empty = all.
    pub models: Vec<String>,
    /// Requested model → upstream model.
    pub model_map: BTreeMap<String, String>,
    /// Requests in flight at once.
    pub max_concurrency: Option<i64>,
    /// Operator switch (default on).
    pub enabled: bool,
    /// Type-specific data, a JSON object (default `{}`).
    pub extra: serde_json::Value,
    /// OAuth accounts: when the access token expires (epoch ms), when known.
    pub token_expires_at: Option<i64>,
}

impl NewAccount {
    /// An account with the default priority (50), weight (1), all models, enabled.
    pub fn new(
        name: impl Into<String>,
        account_type: AccountType,
        credential_enc: String,
        credential_key_id: String,
    ) -> NewAccount {
        NewAccount {
            name: name.into(),
            account_type,
            base_url: None,
            credential_enc,
            credential_key_id,
            refresh_token_enc: None,
            priority: 50,
            weight: 1,
            models: Vec::new(),
            model_map: BTreeMap::new(),
            max_concurrency: None,
            enabled: true,
            extra: serde_json::Value::Object(serde_json::Map::new()),
            token_expires_at: None,
        }
    }
}

impl NewAccount {
    /// The row this account is stored as under `id` at `at_ms`: valid, no errors, no cooldown,
    /// never used.
    pub fn into_account(self, id: impl Into<String>, at_ms: i64) -> Account {
        Account {
            id: id.into(),
            name: self.name,
            account_type: self.account_type,
            base_url: self.base_url,
            credential_enc: self.credential_enc,
            credential_key_id: self.credential_key_id,
            has_refresh_token: self.refresh_token_enc.is_some(),
            refresh_token_enc: self.refresh_token_enc,
            priority: self.priority,
            weight: self.weight,
            models: self.models,
            model_map: self.model_map,
            max_concurrency: self.max_concurrency,
            enabled: self.enabled,
            status: AccountStatus::Valid,
            consecutive_error_count: 0,
            cooldown_until: None,
            cooldown_cleared_at: None,
            status_set_at: None,
            last_used_at: None,
            extra: self.extra,
            created_at: at_ms,
            updated_at: at_ms,
            token_expires_at: self.token_expires_at,
            token_refreshed_at: None,
            token_refresh_error: None,
            token_refresh_refused: false,
        }
    }
}

/// Changes to an account: `None` leaves a field as it is; `Some(None)` clears a nullable field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountPatch {
    /// New unique name.
    pub name: Option<String>,
    /// New type.
    pub account_type: Option<AccountType>,
    /// New base URL, or the type's default.
    pub base_url: Option<Option<String>>,
    /// New encrypted credential and the id of its key.
    pub credential: Option<(String, String)>,
    /// New encrypted refresh token, or none.
    pub refresh_token_enc: Option<Option<String>>,
    /// New priority.
    pub priority: Option<i64>,
    /// New weight.
    pub weight: Option<i64>,
    /// New model list.
    pub models: Option<Vec<String>>,
    /// New model map.
    pub model_map: Option<BTreeMap<String, String>>,
    /// New concurrency limit, or none.
    pub max_concurrency: Option<Option<i64>>,
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// New health state (e.g. an operator clearing `error`).
    pub status: Option<AccountStatus>,
    /// New error count (e.g. 0 when clearing `error`).
    pub consecutive_error_count: Option<i64>,
    /// New cooldown end, or none.
    pub cooldown_until: Option<Option<i64>>,
    /// Ends the cooldown on every node: `cooldown_until` cleared and `cooldown_cleared_at`
    /// moved forward (an operator's word over the cooldowns nodes hold).
    pub clear_cooldown: bool,
    /// New type-specific data (a JSON object).
    pub extra: Option<serde_json::Value>,
    /// New access token expiry (epoch ms), or unknown.
    pub token_expires_at: Option<Option<i64>>,
}

/// What a token refresh stores: the new access token and refresh token (encrypted by
/// `SecretBox::encrypt`) and the access token's expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshedTokens {
    pub credential_enc: String,
    pub credential_key_id: String,
    pub refresh_token_enc: String,
    /// Epoch ms, when known.
    pub expires_at: Option<i64>,
}

/// Builds an [`Account`] from a row selected with [`ACCOUNT_COLUMNS`].
fn account_from_row(row: &AnyRow) -> Result<Account> {
    let account_type: String = row.try_get("account_type")?;
    let status: String = row.try_get("status")?;
    let models: String = row.try_get("models")?;
    let model_map: String = row.try_get("model_map")?;
    let extra: String = row.try_get("extra")?;
    let refresh_token_enc: Option<String> = row.try_get("refresh_token_enc")?;
    Ok(Account {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        account_type: AccountType::parse(&account_type).ok_or_else(|| {
            StoreError::Invalid(format!("unknown account type {account_type:?} in accounts"))
        })?,
        base_url: row.try_get("base_url")?,
        credential_enc: row.try_get("credential_enc")?,
        credential_key_id: row.try_get("credential_key_id")?,
        has_refresh_token: refresh_token_enc.is_some(),
        refresh_token_enc,
        priority: row.try_get("priority")?,
        weight: row.try_get("weight")?,
        models: from_json(&models, "accounts.models")?,
        model_map: from_json(&model_map, "accounts.model_map")?,
        max_concurrency: row.try_get("max_concurrency")?,
        enabled: get_bool(row, "enabled")?,
        status: AccountStatus::parse(&status)
            .ok_or_else(|| StoreError::Invalid(format!("unknown status {status:?} in accounts")))?,
        consecutive_error_count: row.try_get("consecutive_error_count")?,
        cooldown_until: row.try_get("cooldown_until")?,
        cooldown_cleared_at: row.try_get("cooldown_cleared_at")?,
        status_set_at: row.try_get("status_set_at")?,
        last_used_at: row.try_get("last_used_at")?,
        extra: from_json(&extra, "accounts.extra")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        token_expires_at: row.try_get("token_expires_at")?,
        token_refreshed_at: row.try_get("token_refreshed_at")?,
        token_refresh_error: row.try_get("token_refresh_error")?,
        token_refresh_refused: get_bool(row, "token_refresh_refused")?,
    })
}

/// Rejects a non-object `extra`.
fn check_extra(extra: &serde_json::Value) -> Result<()> {
    if !extra.is_object() {
        return Err(StoreError::Invalid(
            "account extra must be a JSON object".to_owned(),
        ));
    }
    Ok(())
}

/// Rejects negative weights and limits.
fn check_non_negative(what: &str, value: Option<i64>) -> Result<()> {
    if value.is_some_and(|v| v < 0) {
        return Err(StoreError::Invalid(format!("{what} must not be negative")));
    }
    Ok(())
}

/// Maps a unique violation on `accounts.name` to a readable conflict.
fn name_conflict(name: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |e| match StoreError::from(e) {
        StoreError::Conflict(_) => StoreError::Conflict(format!("account {name:?} exists")),
        other => other,
    }
}

impl SqlStore {
    /// Creates an account; a taken name is `Conflict`.
    pub async fn create_account(&self, new: &NewAccount) -> Result<Account> {
        require_non_empty("account name", &new.name)?;
        check_extra(&new.extra)?;
        check_non_negative("weight", Some(new.weight))?;
        check_non_negative("max_concurrency", new.max_concurrency)?;
        let id = new_id();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO accounts (id, name, account_type, base_url, credential_enc, \
             credential_key_id, refresh_token_enc, priority, weight, models, model_map, \
             max_concurrency, enabled, status, consecutive_error_count, cooldown_until, \
             last_used_at, extra, created_at, updated_at, token_expires_at) VALUES ($1, $2, $3, \
             $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
        )
        .bind(&id)
        .bind(&new.name)
        .bind(new.account_type.as_str())
        .bind(&new.base_url)
        .bind(&new.credential_enc)
        .bind(&new.credential_key_id)
        .bind(&new.refresh_token_enc)
        .bind(new.priority)
        .bind(new.weight)
        .bind(to_json(&new.models)?)
        .bind(to_json(&new.model_map)?)
        .bind(new.max_concurrency)
        .bind(i64::from(new.enabled))
        .bind(AccountStatus::Valid.as_str())
        .bind(0_i64)
        .bind(None::<i64>)
        .bind(None::<i64>)
        .bind(to_json(&new.extra)?)
        .bind(now)
        .bind(now)
        .bind(new.token_expires_at)
        .execute(&self.pool)
        .await
        .map_err(name_conflict(&new.name))?;
        self.account_by_id(&id).await?.ok_or(StoreError::NotFound)
    }

    /// The account with this id, if any.
    pub async fn account_by_id(&self, id: &str) -> Result<Option<Account>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(account_from_row).transpose()
    }

    /// One page of accounts, by name.
    pub async fn list_accounts(&self, page: i64, per_page: i64) -> Result<Page<Account>> {
        let select = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY name");
        self.fetch_page(
            &select,
            "SELECT COUNT(*) FROM accounts",
            &SqlParts::default(),
            page,
            per_page,
            account_from_row,
        )
        .await
    }

    /// Every account with its encrypted credentials, by priority then name (for the scheduler).
    pub async fn load_accounts(&self) -> Result<Vec<Account>> {
        let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY priority, name");
        let rows = sqlx::query(&sql).fetch_all(&self.pool).await?;
        rows.iter().map(account_from_row).collect()
    }

    /// Applies a patch to an account and returns the account as it now is.
    pub async fn update_account(&self, id: &str, patch: &AccountPatch) -> Result<Account> {
        let mut parts = SqlParts::default();
        if let Some(name) = &patch.name {
            require_non_empty("account name", name)?;
            parts.set("name", Param::Text(Some(name.clone())));
        }
        if let Some(account_type) = patch.account_type {
            parts.set(
                "account_type",
                Param::Text(Some(account_type.as_str().to_owned())),
            );
        }
        if let Some(base_url) = &patch.base_url {
            parts.set("base_url", Param::Text(base_url.clone()));
        }
        if let Some((credential_enc, key_id)) = &patch.credential {
            parts.set("credential_enc", Param::Text(Some(credential_enc.clone())));
            parts.set("credential_key_id", Param::Text(Some(key_id.clone())));
        }
        if let Some(refresh) = &patch.refresh_token_enc {
            parts.set("refresh_token_enc", Param::Text(refresh.clone()));
        }
        if let Some(expires) = patch.token_expires_at {
            parts.set("token_expires_at", Param::Int(expires));
        }
        // New tokens from an operator: what was said of the old ones no longer holds.
        if patch.credential.is_some() || patch.refresh_token_enc.is_some() {
            parts.set("token_refresh_error", Param::Text(None));
            parts.set("token_refresh_refused", Param::Int(Some(0)));
            parts.set("token_refreshed_at", Param::Int(None));
        }
        // A refresh running over the old refresh token no longer holds the new one back.
        if patch.refresh_token_enc.is_some() {
            parts.set("token_refresh_lease_until", Param::Int(None));
        }
        if let Some(priority) = patch.priority {
            parts.set("priority", Param::Int(Some(priority)));
        }
        if let Some(weight) = patch.weight {
            check_non_negative("weight", Some(weight))?;
            parts.set("weight", Param::Int(Some(weight)));
        }
        if let Some(models) = &patch.models {
            parts.set("models", Param::Text(Some(to_json(models)?)));
        }
        if let Some(model_map) = &patch.model_map {
            parts.set("model_map", Param::Text(Some(to_json(model_map)?)));
        }
        if let Some(max_concurrency) = patch.max_concurrency {
            check_non_negative("max_concurrency", max_concurrency)?;
            parts.set("max_concurrency", Param::Int(max_concurrency));
        }
        if let Some(enabled) = patch.enabled {
            parts.set("enabled", Param::Int(Some(i64::from(enabled))));
        }
        if let Some(status) = patch.status {
            parts.set("status", Param::Text(Some(status.as_str().to_owned())));
        }
        if let Some(count) = patch.consecutive_error_count {
            parts.set("consecutive_error_count", Param::Int(Some(count)));
        }
        if let Some(cooldown_until) = patch.cooldown_until {
            parts.set("cooldown_until", Param::Int(cooldown_until));
        }
        if patch.clear_cooldown {
            parts.set("cooldown_until", Param::Int(None));
            // Always forward, also for two clears within one millisecond (or a clock behind
            // another node's): each must be seen as a new one.
            let now = now_ms();
            parts.push(
                "cooldown_cleared_at = CASE WHEN cooldown_cleared_at IS NULL \
                 OR cooldown_cleared_at < ? THEN ? ELSE cooldown_cleared_at + 1 END",
                vec![Param::Int(Some(now)), Param::Int(Some(now))],
            );
        }
        if patch.status.is_some() || patch.credential.is_some() {
            // A new generation always, as for a clear: a status observed by requests that ran
            // before this change must lose to it.
            let now = now_ms();
            parts.push(
                "status_set_at = CASE WHEN status_set_at IS NULL \
                 OR status_set_at < ? THEN ? ELSE status_set_at + 1 END",
                vec![Param::Int(Some(now)), Param::Int(Some(now))],
            );
        }
        if let Some(extra) = &patch.extra {
            check_extra(extra)?;
            parts.set("extra", Param::Text(Some(to_json(extra)?)));
        }
        if !parts.is_empty() {
            parts.bump_updated_at();
            let sql = format!(
                "UPDATE accounts SET {} WHERE id = ${}",
                parts.joined(", "),
                parts.param_count() + 1
            );
            let name = patch.name.as_deref().unwrap_or_default();
            let done = parts
                .bind(sqlx::query(&sql))
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(name_conflict(name))?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
        }
        self.account_by_id(id).await?.ok_or(StoreError::NotFound)
    }

    /// Records the health state the proxy observed: status, auth errors in a row, cooldown.
    /// `seen_status_set_at` is the account's `status_set_at` as the requests that observed it
    /// had the account: if an operator set the status or replaced the credential since, it is
    /// not stored (`false`). Those requests ran on what the operator replaced (a revoked key's
    /// 401s, say), however late they answered; a generation, so no clock is compared.
    pub async fn record_account_state(
        &self,
        id: &str,
        status: AccountStatus,
        consecutive_error_count: i64,
        cooldown_until: Option<i64>,
        seen_status_set_at: Option<i64>,
    ) -> Result<bool> {
        let now = super::now_ms();
        let done = sqlx::query(
            "UPDATE accounts SET status = $1, consecutive_error_count = $2, cooldown_until = $3, \
             updated_at = CASE WHEN updated_at < $4 THEN $5 ELSE updated_at + 1 END \
             WHERE id = $6 AND status_set_at IS NOT DISTINCT FROM $7",
        )
        .bind(status.as_str())
        .bind(consecutive_error_count)
        .bind(cooldown_until)
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(seen_status_set_at)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        match self.account_by_id(id).await? {
            Some(_) => Ok(false),
            None => Err(StoreError::NotFound),
        }
    }

    /// Stores what a health check found, only if the account's status and error count are still
    /// `expected` (what the check's decision was based on), its `status_set_at` still the one
    /// of the account the check ran on (an operator who set the status or replaced the
    /// credential since has the last word), and the status is not `blocked`: a change an
    /// operator, the proxy or another node's check made meanwhile wins. The cooldown is not
    /// touched. Whether the row was changed.
    pub async fn record_health_state(
        &self,
        id: &str,
        expected: (AccountStatus, i64, Option<i64>),
        status: AccountStatus,
        consecutive_error_count: i64,
    ) -> Result<bool> {
        let now = super::now_ms();
        // `updated_at` always moves: other nodes notice the change by it.
        let done = sqlx::query(
            "UPDATE accounts SET status = $1, consecutive_error_count = $2, \
             updated_at = CASE WHEN updated_at < $3 THEN $4 ELSE updated_at + 1 END \
             WHERE id = $5 AND status = $6 AND consecutive_error_count = $7 \
             AND status <> 'blocked' AND status_set_at IS NOT DISTINCT FROM $8",
        )
        .bind(status.as_str())
        .bind(consecutive_error_count)
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(expected.0.as_str())
        .bind(expected.1)
        .bind(expected.2)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores a cooldown the proxy observed at `observed_at` (epoch ms), keeping a later one
    /// already stored; status and error count stay as they are. A cooldown observed before an
    /// operator last ended the account's cooldown is not stored: the operator's word came
    /// after it, though the write comes later.
    pub async fn record_account_cooldown(
        &self,
        id: &str,
        until: i64,
        observed_at: i64,
    ) -> Result<()> {
        let now = super::now_ms();
        sqlx::query(
            "UPDATE accounts SET cooldown_until = $1, \
             updated_at = CASE WHEN updated_at < $2 THEN $3 ELSE updated_at + 1 END \
             WHERE id = $4 AND (cooldown_until IS NULL OR cooldown_until < $5) \
             AND (cooldown_cleared_at IS NULL OR cooldown_cleared_at < $6)",
        )
        .bind(until)
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(until)
        .bind(observed_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores that a request succeeded after errors: status `valid`, count and cooldown
    /// cleared, unless the provider reported the account blocked meanwhile (only an operator
    /// clears that) or an operator set its status or credential since the request's account
    /// was loaded (`seen_status_set_at`, as for [`SqlStore::record_account_state`]).
    pub async fn record_account_recovered(
        &self,
        id: &str,
        seen_status_set_at: Option<i64>,
    ) -> Result<()> {
        let now = super::now_ms();
        sqlx::query(
            "UPDATE accounts SET status = 'valid', consecutive_error_count = 0, \
             cooldown_until = NULL, \
             updated_at = CASE WHEN updated_at < $1 THEN $2 ELSE updated_at + 1 END \
             WHERE id = $3 AND status <> 'blocked' \
             AND status_set_at IS NOT DISTINCT FROM $4",
        )
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(seen_status_set_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores the tokens of a refresh, only if the account's refresh token is still `expected`
    /// (the ciphertext the refresh started from): tokens an operator or another node stored
    /// meanwhile win. The refresh error clears. Whether the row was changed.
    ///
    /// `put_back`: for the refresh that authentication errors started, the error count they
    /// left on the account they took out (`error`), and its `status_set_at` then. If both are
    /// still so, the account comes back (`valid`, count cleared): the errors were the old
    /// token's. Any other `error` (an operator's, a health check's, errors that went on
    /// counting) stays, as does `blocked`; a `valid` account's count clears (its errors in a
    /// row were the old token's too).
    pub async fn store_refreshed_token(
        &self,
        id: &str,
        expected: &str,
        tokens: &RefreshedTokens,
        put_back: Option<(i64, Option<i64>)>,
    ) -> Result<bool> {
        let now = super::now_ms();
        // Every expression reads the row as it was before the update (SQLite and PostgreSQL).
        let done = sqlx::query(
            "UPDATE accounts SET credential_enc = $1, credential_key_id = $2, \
             refresh_token_enc = $3, token_expires_at = $4, token_refreshed_at = $5, \
             token_refresh_error = NULL, token_refresh_refused = 0, \
             token_refresh_lease_until = NULL, \
             consecutive_error_count = CASE WHEN status = 'valid' \
             OR (status = 'error' AND consecutive_error_count = $6 \
             AND status_set_at IS NOT DISTINCT FROM $12) THEN 0 \
             ELSE consecutive_error_count END, \
             status = CASE WHEN status = 'error' AND consecutive_error_count = $7 \
             AND status_set_at IS NOT DISTINCT FROM $13 THEN 'valid' ELSE status END, \
             updated_at = CASE WHEN updated_at < $8 THEN $9 ELSE updated_at + 1 END \
             WHERE id = $10 AND refresh_token_enc = $11",
        )
        .bind(&tokens.credential_enc)
        .bind(&tokens.credential_key_id)
        .bind(&tokens.refresh_token_enc)
        .bind(tokens.expires_at)
        .bind(now)
        .bind(put_back.map(|p| p.0))
        .bind(put_back.map(|p| p.0))
        .bind(now)
        .bind(now)
        .bind(id)
        .bind(expected)
        .bind(put_back.and_then(|p| p.1))
        .bind(put_back.and_then(|p| p.1))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores why a refresh failed (`refused`: the provider turned the refresh token down; a
    /// refusal stored before stays, with its reason, through other failures) and ends the
    /// refresh's lease, only
    /// if the refresh token is still `expected`. `updated_at` stays: nothing the proxy uses
    /// changed, so the nodes' caches need no reload. Whether the row was changed.
    pub async fn record_token_refresh_failure(
        &self,
        id: &str,
        expected: &str,
        detail: &str,
        refused: bool,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE accounts SET \
             token_refresh_error = CASE WHEN token_refresh_refused = 1 AND $2 = 0 \
             THEN token_refresh_error ELSE $1 END, \
             token_refresh_refused = CASE WHEN $2 = 1 THEN 1 ELSE token_refresh_refused END, \
             token_refresh_lease_until = NULL WHERE id = $3 AND refresh_token_enc = $4",
        )
        .bind(detail)
        .bind(i64::from(refused))
        .bind(id)
        .bind(expected)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes the lease on refreshing the account's tokens until `until` (epoch ms), if its
    /// refresh token is still `expected` and no other refresh holds an unexpired lease: the one
    /// refresh that may send this refresh token to the provider. Ended by
    /// [`store_refreshed_token`](Self::store_refreshed_token) or
    /// [`record_token_refresh_failure`](Self::record_token_refresh_failure), else it expires.
    pub async fn lease_token_refresh(
        &self,
        id: &str,
        expected: &str,
        now: i64,
        until: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE accounts SET token_refresh_lease_until = $1 WHERE id = $2 \
             AND refresh_token_enc = $3 \
             AND (token_refresh_lease_until IS NULL OR token_refresh_lease_until < $4)",
        )
        .bind(until)
        .bind(id)
        .bind(expected)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes an account.
    pub async fn delete_account(&self, id: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM accounts WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}
