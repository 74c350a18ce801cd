//! Runtime settings (JSON values by key) and the audit log of state-changing admin calls.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{from_json, new_id, now_ms, to_json, Page, Result, SqlParts, SqlStore};

/// One audit log entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// uuid v7.
    pub id: String,
    /// Epoch ms.
    pub at: i64,
    /// Who did it (username, or `system`).
    pub actor: String,
    /// What was done, e.g. `account.create`.
    pub action: String,
    /// What it was done to (an id or name).
    pub target: String,
    /// Details (never secrets), a JSON value.
    pub detail: serde_json::Value,
}

/// Builds an [`AuditEntry`] from an `audit_log` row.
fn audit_from_row(row: &AnyRow) -> Result<AuditEntry> {
    let detail: String = row.try_get("detail")?;
    Ok(AuditEntry {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        detail: from_json(&detail, "audit_log.detail")?,
    })
}

impl SqlStore {
    /// The value of a setting, if set.
    pub async fn get_setting(&self, key: &str) -> Result<Option<serde_json::Value>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => {
                let text: String = row.try_get(0)?;
                Ok(Some(from_json(&text, "settings.value")?))
            }
            None => Ok(None),
        }
    }

    /// Sets a setting, creating or replacing it.
    pub async fn set_setting(&self, key: &str, value: &serde_json::Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (key, value, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
             updated_at = excluded.updated_at",
        )
        .bind(key)
        .bind(to_json(value)?)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claims the periodic job `key` for this node at `now` (epoch ms), unless a node claimed
    /// it less than `min_gap_ms` ago: of several nodes sharing the database, one runs each
    /// round. The claim is the setting's `updated_at`, moved by one conditional update.
    pub async fn claim_round(&self, key: &str, now: i64, min_gap_ms: i64) -> Result<bool> {
        sqlx::query(
            "INSERT INTO settings (key, value, updated_at) VALUES ($1, '0', 0) \
             ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .execute(&self.pool)
        .await?;
        let done = sqlx::query(
            "UPDATE settings SET value = $1, updated_at = $2 WHERE key = $3 AND updated_at <= $4",
        )
        .bind(now.to_string())
        .bind(now)
        .bind(key)
        .bind(now.saturating_sub(min_gap_ms))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Every setting, by key.
    pub async fn list_settings(&self) -> Result<BTreeMap<String, serde_json::Value>> {
        let rows = sqlx::query("SELECT key, value FROM settings ORDER BY key")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let value: String = row.try_get("value")?;
                Ok((row.try_get("key")?, from_json(&value, "settings.value")?))
            })
            .collect()
    }

    /// Appends an entry to the audit log, stamped now.
    pub async fn append_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (id, at, actor, action, target, detail) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(new_id())
        .bind(now_ms())
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(to_json(detail)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One page of the audit log, newest first.
    pub async fn list_audit(&self, page: i64, per_page: i64) -> Result<Page<AuditEntry>> {
        self.fetch_page(
            "SELECT id, at, actor, action, target, detail FROM audit_log ORDER BY at DESC, id DESC",
            "SELECT COUNT(*) FROM audit_log",
            &SqlParts::default(),
            page,
            per_page,
            audit_from_row,
        )
        .await
    }
}
