//! Keeps OAuth accounts' access tokens fresh: a round every `oauth.refresh_interval` refreshes
//! the enabled accounts with a refresh token whose access token expires within
//! `oauth.refresh_margin` (or whose expiry is unknown), and an admin can refresh one by hand.
//!
//! Refresh tokens are single-use at the providers, so two refreshes of one account must never
//! both be stored: one refresh per account at a time on a node, one node per round (claimed in
//! `settings`), and every write conditional on the refresh token the refresh started from.
//! A refresh another node or an operator overtook is dropped, its failure too.
//!
//! A refused refresh token (400/401/403 at the token endpoint) is not tried again by the
//! rounds until an operator stores new tokens; other failures are retried next round.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::background::cache_refresh as reload;
use crate::cache::AccountCache;
use crate::metrics::metrics;
use crate::proxy::oauth::{Provider, Refresh, TokenClient, TokenEndpoint};
use crate::secrets::SecretBox;
use crate::store::{Account as AccountRow, RefreshedTokens, SqlStore, StoreError};

/// Accounts refreshed at once in a round.
const PARALLEL_REFRESHES: usize = 4;
/// The setting whose `updated_at` is the last claimed round.
const ROUND_KEY: &str = "oauth_refresh_last_round";

/// The refresh settings (`[oauth]`), the endpoints parsed.
#[derive(Debug, Clone)]
pub struct RefreshSettings {
    /// Whether the rounds run.
    pub enabled: bool,
    pub interval: Duration,
    pub margin: Duration,
    pub timeout: Duration,
    pub claude: TokenEndpoint,
    pub openai: TokenEndpoint,
}

impl RefreshSettings {
    pub fn from_config(c: &crate::config::OAuthConfig) -> Result<Self, String> {
        Ok(RefreshSettings {
            enabled: c.refresh_enabled,
            interval: c.refresh_interval,
            margin: c.refresh_margin,
            timeout: c.timeout,
            claude: TokenEndpoint::parse(&c.claude_token_url, &c.claude_client_id)?,
            openai: TokenEndpoint::parse(&c.openai_token_url, &c.openai_client_id)?,
        })
    }
}

/// One account's refresh, as the admin API answers it.
#[derive(Debug, Clone, Serialize)]
pub struct RefreshReport {
    pub account_id: String,
    pub name: String,
    /// `refreshed`, `refused` (the provider turned the refresh token down: new tokens are
    /// needed), `failed` (try again later) or `superseded` (new tokens were stored meanwhile by
    /// an operator or another node; this refresh's result was dropped).
    pub result: &'static str,
    pub detail: String,
    /// The access token's expiry after the refresh (epoch ms), when known.
    pub token_expires_at: Option<i64>,
    /// Epoch ms.
    pub refreshed_at: i64,
}

/// Why an account was not refreshed.
#[derive(Debug, PartialEq, Eq)]
pub enum NotRefreshed {
    /// Not an OAuth account, or no refresh token stored.
    NotRefreshable,
    /// Deleted meanwhile.
    Gone,
    /// Its refresh token cannot be decrypted with this node's key.
    Undecryptable,
    /// A refresh of it is running already.
    Busy,
}

/// Refreshes tokens and stores them; shared by the rounds and the admin API.
pub struct TokenRefresh {
    pub client: TokenClient,
    pub store: SqlStore,
    pub accounts: Arc<AccountCache>,
    pub secrets: Arc<SecretBox>,
    pub margin: Duration,
    /// Accounts being refreshed on this node.
    refreshing: std::sync::Mutex<HashSet<String>>,
}

/// Takes an account out of [`TokenRefresh::refreshing`] however its refresh ends.
struct Refreshing<'a>(&'a TokenRefresh, String);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        relay_filters::lock(&self.0.refreshing).remove(&self.1);
    }
}

/// Whether the account's tokens can be refreshed: an OAuth type with a refresh token.
pub fn refreshable(row: &AccountRow) -> bool {
    row.refresh_token_enc.is_some() && Provider::of(row.account_type).is_some()
}

/// Whether a round refreshes the account now.
pub fn due(row: &AccountRow, now_ms: i64, margin: Duration) -> bool {
    let margin = i64::try_from(margin.as_millis()).unwrap_or(i64::MAX);
    row.enabled
        && refreshable(row)
        && !row.token_refresh_refused
        && row
            .token_expires_at
            .is_none_or(|at| at.saturating_sub(now_ms) <= margin)
}

impl TokenRefresh {
    pub fn new(
        client: TokenClient,
        store: SqlStore,
        accounts: Arc<AccountCache>,
        secrets: Arc<SecretBox>,
        margin: Duration,
    ) -> Self {
        TokenRefresh {
            client,
            store,
            accounts,
            secrets,
            margin,
            refreshing: std::sync::Mutex::new(HashSet::new()),
        }
    }

    /// Refreshes one account now and reloads this node's accounts when its tokens changed.
    pub async fn refresh(&self, id: &str) -> Result<RefreshReport, NotRefreshed> {
        let (report, stored) = self.refresh_one(id).await?;
        if stored {
            self.reload().await;
        }
        Ok(report)
    }

    /// Refreshes one account; whether new tokens were stored.
    async fn refresh_one(&self, id: &str) -> Result<(RefreshReport, bool), NotRefreshed> {
        let _guard = {
            if !relay_filters::lock(&self.refreshing).insert(id.to_string()) {
                return Err(NotRefreshed::Busy);
            }
            Refreshing(self, id.to_string())
        };
        // The row as it is now: the refresh token a moment ago may have been used already.
        let row = match self.store.account_by_id(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(NotRefreshed::Gone),
            Err(e) => {
                tracing::warn!(account = %id, error = %e, "account unreadable before its token refresh");
                return Err(NotRefreshed::Gone);
            }
        };
        let (Some(expected), Some(provider)) = (
            row.refresh_token_enc.clone(),
            Provider::of(row.account_type),
        ) else {
            return Err(NotRefreshed::NotRefreshable);
        };
        let refresh_token = self
            .secrets
            .decrypt(&expected)
            .map_err(|_| NotRefreshed::Undecryptable)?;
        let now = relay_filters::now_ms();
        let outcome = self
            .client
            .refresh(provider, refresh_token.expose_secret(), now)
            .await;
        metrics()
            .oauth_refreshes
            .with_label_values(&[outcome.as_str()])
            .inc();
        let mut report = RefreshReport {
            account_id: row.id.clone(),
            name: row.name.clone(),
            result: outcome.as_str(),
            detail: String::new(),
            token_expires_at: row.token_expires_at,
            refreshed_at: now,
        };
        let stored = match outcome {
            Refresh::Refreshed(tokens) => {
                let new = RefreshedTokens {
                    credential_enc: self.secrets.encrypt(&tokens.access_token),
                    credential_key_id: self.secrets.key_id().to_string(),
                    // Not rotated: the old one stays in force.
                    refresh_token_enc: match &tokens.refresh_token {
                        Some(t) => self.secrets.encrypt(t),
                        None => expected.clone(),
                    },
                    expires_at: tokens.expires_at,
                };
                match self.store.store_refreshed_token(id, &expected, &new).await {
                    Ok(true) => {
                        tracing::info!(account = %row.name, expires_at = ?tokens.expires_at, "access token refreshed");
                        report.detail = "new access token stored".into();
                        report.token_expires_at = tokens.expires_at;
                        true
                    }
                    Ok(false) => {
                        report.result = "superseded";
                        report.detail =
                            "new tokens were stored meanwhile; this refresh was dropped".into();
                        false
                    }
                    Err(e) => {
                        // The provider may have rotated the refresh token: the old one stored
                        // will be refused next time, and an operator must set new tokens.
                        tracing::error!(account = %row.name, error = %e, "refreshed tokens could not be stored");
                        report.result = "failed";
                        report.detail = format!("the new tokens could not be stored: {e}");
                        false
                    }
                }
            }
            Refresh::Refused(detail) | Refresh::Failed(detail) => {
                let refused = report.result == "refused";
                match self
                    .store
                    .record_token_refresh_failure(id, &expected, &detail, refused)
                    .await
                {
                    Ok(true) => {
                        if refused {
                            tracing::warn!(account = %row.name, %detail, "the provider refused the account's refresh token: new tokens are needed");
                        } else {
                            tracing::info!(account = %row.name, %detail, "token refresh failed; tried again next round");
                        }
                    }
                    Ok(false) => {
                        report.result = "superseded";
                    }
                    Err(e) => {
                        tracing::warn!(account = %row.name, error = %e, "token refresh failure could not be stored")
                    }
                }
                report.detail = detail;
                false
            }
        };
        Ok((report, stored))
    }

    /// Reloads this node's accounts (the new credential is used from the next request on) and
    /// publishes their states.
    async fn reload(&self) {
        if let Err(e) = reload::reload_accounts(&self.store, &self.accounts, &self.secrets).await {
            tracing::warn!(error = %e, "account reload after a token refresh failed");
        }
        reload::publish_account_states(&self.accounts);
    }

    /// Refreshes every account that is due, a few at a time.
    pub async fn refresh_due(&self) -> Result<Vec<RefreshReport>, StoreError> {
        let now = relay_filters::now_ms();
        let ids: Vec<String> = self
            .store
            .load_accounts()
            .await?
            .into_iter()
            .filter(|a| due(a, now, self.margin))
            .map(|a| a.id)
            .collect();
        let done: Vec<_> = futures::stream::iter(ids)
            .map(|id| async move { self.refresh_one(&id).await })
            .buffer_unordered(PARALLEL_REFRESHES)
            .collect()
            .await;
        let mut reports = Vec::with_capacity(done.len());
        let mut stored = false;
        for (report, s) in done.into_iter().flatten() {
            stored |= s;
            reports.push(report);
        }
        if stored {
            self.reload().await;
        }
        Ok(reports)
    }
}

/// The rounds: every `interval`, on the node that claims the round.
pub async fn run(
    tokens: Arc<TokenRefresh>,
    interval: Duration,
    mut shutdown: pingora::server::ShutdownWatch,
) {
    let gap = i64::try_from(interval.as_millis() * 9 / 10).unwrap_or(i64::MAX);
    loop {
        let claimed = tokens
            .store
            .claim_round(ROUND_KEY, relay_filters::now_ms(), gap)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "token refresh round could not be claimed");
                false
            });
        if claimed {
            tokio::select! {
                done = tokens.refresh_due() => match done {
                    Ok(reports) if !reports.is_empty() => {
                        let refreshed = reports.iter().filter(|r| r.result == "refreshed").count();
                        tracing::debug!(due = reports.len(), refreshed, "token refresh round done");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "token refresh round could not list accounts"),
                },
                _ = shutdown.changed() => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;
    use crate::store::NewAccount;
    use relay_filters::AccountType;

    fn row(t: AccountType, refresh: bool, expires_at: Option<i64>) -> AccountRow {
        let mut new = NewAccount::new("a", t, "c".into(), "k".into());
        new.refresh_token_enc = refresh.then(|| "r".to_string());
        new.token_expires_at = expires_at;
        new.into_account("id", 0)
    }

    #[test]
    fn due_when_expiring_within_the_margin_or_unknown() {
        let margin = Duration::from_secs(600);
        let now = 1_000_000_000;
        let t = AccountType::ClaudeOfficial;
        assert!(due(&row(t, true, None), now, margin));
        assert!(due(&row(t, true, Some(now + 599_000)), now, margin));
        assert!(due(&row(t, true, Some(now - 1)), now, margin));
        assert!(!due(&row(t, true, Some(now + 601_000)), now, margin));
        assert!(!due(&row(t, false, None), now, margin));
        assert!(!due(&row(AccountType::Claude, true, None), now, margin));
        assert!(due(
            &row(AccountType::OpenaiResponses, true, None),
            now,
            margin
        ));
        let mut refused = row(t, true, None);
        refused.token_refresh_refused = true;
        assert!(!due(&refused, now, margin));
        let mut disabled = row(t, true, None);
        disabled.enabled = false;
        assert!(!due(&disabled, now, margin));
    }
}
