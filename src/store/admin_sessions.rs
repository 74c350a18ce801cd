//! Admin login sessions, kept in the database so every node accepts every session cookie.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{now_ms, Result, SqlStore};

/// A login session; the cookie holds the token, the database only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSession {
    /// Hash of the session token.
    pub token_hash: String,
    /// Logged-in user.
    pub user_id: String,
    /// CSRF token state-changing calls must echo.
    pub csrf_token: String,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms after which the session is refused.
    pub expires_at: i64,
}

/// Builds an [`AdminSession`] from an `admin_sessions` row.
fn session_from_row(row: &AnyRow) -> Result<AdminSession> {
    Ok(AdminSession {
        token_hash: row.try_get("token_hash")?,
        user_id: row.try_get("user_id")?,
        csrf_token: row.try_get("csrf_token")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

impl SqlStore {
    /// Stores a new login session.
    pub async fn create_admin_session(
        &self,
        token_hash: &str,
        user_id: &str,
        csrf_token: &str,
        expires_at: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO admin_sessions (token_hash, user_id, csrf_token, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(csrf_token)
        .bind(now_ms())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The session with this token hash, if it exists and has not expired.
    pub async fn admin_session(&self, token_hash: &str) -> Result<Option<AdminSession>> {
        let row = sqlx::query(
            "SELECT token_hash, user_id, csrf_token, created_at, expires_at FROM admin_sessions \
             WHERE token_hash = $1 AND expires_at > $2",
        )
        .bind(token_hash)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(session_from_row).transpose()
    }

    /// Ends a session (logout); ending an unknown session is not an error.
    pub async fn delete_admin_session(&self, token_hash: &str) -> Result<()> {
        sqlx::query("DELETE FROM admin_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends every session of a user (password reset, disable); returns how many ended.
    pub async fn delete_admin_sessions_of_user(&self, user_id: &str) -> Result<u64> {
        let done = sqlx::query("DELETE FROM admin_sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Removes expired sessions; returns how many were removed.
    pub async fn purge_expired_admin_sessions(&self) -> Result<u64> {
        let done = sqlx::query("DELETE FROM admin_sessions WHERE expires_at <= $1")
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
