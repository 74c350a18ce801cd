//! Keeps OAuth accounts' access tokens fresh: a round every `oauth.refresh_interval` refreshes
//! the enabled accounts with a refresh token whose access token expires within
//! `oauth.refresh_margin` (or whose expiry is unknown), and an admin can refresh one by hand.
//!
//! Refresh tokens are single-use at the providers, so one refresh token is sent once: one node
//! per round (claimed in `settings`), and before any refresh a lease on the account in the
//! database, taken only over the refresh token the refresh starts from and only while no other
//! refresh holds one. Every write is conditional on that refresh token too: a refresh an
//! operator overtook (new tokens meanwhile) is dropped, its failure too. A refresh is not cut
//! by the admin's connection closing (a manual refresh runs as a task of its own) nor by the
//! start of a shutdown (a round finishes the refreshes it started and starts no more); a
//! provider that answers only after the shutdown's grace period, when the runtime stops, is
//! not waited for.
//!
//! A dead refresh token (`invalid_grant` and the like at the token endpoint) is not tried again
//! by the rounds until an operator stores new tokens; other failures are retried next round.
//! Authentication errors that take an OAuth account out of scheduling start a refresh too, whose
//! new tokens put it back; no other refresh changes an account's status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use secrecy::ExposeSecret;
use serde::Serialize;

use crate::background::cache_refresh as reload;
use crate::background::InFlight;
use crate::cache::AccountCache;
use crate::metrics::metrics;
use crate::proxy::oauth::{Provider, Refresh, TokenClient, TokenEndpoint};
use crate::secrets::SecretBox;
use crate::store::{Account as AccountRow, AccountStatus, RefreshedTokens, SqlStore, StoreError};

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
    /// A refresh of it is running already (on this node or another).
    Busy,
    /// Not due any more (found so on the row as it is now; rounds only).
    NotDue,
    /// The database could not be read.
    Unavailable(String),
}

/// What started a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// A round: only if the account is still due.
    Round,
    /// An admin, through the API.
    ByHand,
    /// Authentication errors took the account out: its new tokens put it back, the errors
    /// being the old token's. No other refresh does: an account in `error` for another reason
    /// (an operator, a health check) is not made right by a new token.
    AuthErrors,
}

/// An account that authentication errors took out is refreshed at once, unless it was
/// refreshed this recently (then the new token is not what fails).
const AFTER_ERRORS_GAP_MS: i64 = 10 * 60 * 1000;
/// A token whose expiry is unknown is refreshed this long after its last refresh.
const UNKNOWN_LIFETIME_MS: i64 = 60 * 60 * 1000;
/// Attempts at storing refreshed tokens (the provider has rotated the refresh token by then).
const STORE_ATTEMPTS: u32 = 4;

/// Refreshes tokens and stores them; shared by the rounds and the admin API.
pub struct TokenRefresh {
    pub client: TokenClient,
    pub store: SqlStore,
    pub accounts: Arc<AccountCache>,
    pub secrets: Arc<SecretBox>,
    pub margin: Duration,
    /// Accounts being refreshed on this node.
    refreshing: InFlight,
}

/// Whether the account's tokens can be refreshed: an OAuth type with a refresh token.
pub fn refreshable(row: &AccountRow) -> bool {
    row.refresh_token_enc.is_some() && Provider::of(row.account_type).is_some()
}

/// Whether a round refreshes the account now: its token expires within `margin` (within half
/// its life, for a token that lives shorter than twice the margin: not every round), or its
/// expiry is unknown and it was not refreshed in the last hour.
pub fn due(row: &AccountRow, now_ms: i64, margin: Duration) -> bool {
    if !(row.enabled && refreshable(row) && !row.token_refresh_refused) {
        return false;
    }
    let margin = i64::try_from(margin.as_millis()).unwrap_or(i64::MAX);
    // An expiry at or before the last refresh says nothing (a provider's stale `exp`): as if
    // unknown, or the account would be refreshed every round.
    let expires_at = row
        .token_expires_at
        .filter(|e| row.token_refreshed_at.is_none_or(|at| *e > at));
    match (expires_at, row.token_refreshed_at) {
        (Some(expires), refreshed) => {
            let margin = match refreshed {
                Some(at) if expires > at => margin.min((expires - at) / 2),
                _ => margin,
            };
            expires.saturating_sub(now_ms) <= margin
        }
        (None, None) => true,
        (None, Some(at)) => now_ms.saturating_sub(at) >= UNKNOWN_LIFETIME_MS,
    }
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
            refreshing: InFlight::default(),
        }
    }

    /// Refreshes one account now and reloads this node's accounts when its tokens changed. Runs
    /// as a task of its own: a caller that goes away does not cut it.
    /// `done` runs in that task with the report (the audit record of a manual refresh).
    pub async fn refresh<F, Fut>(
        self: &Arc<Self>,
        id: &str,
        done: F,
    ) -> Result<RefreshReport, NotRefreshed>
    where
        F: FnOnce(RefreshReport) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let this = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let (report, stored) = this.refresh_one(&id, Trigger::ByHand).await?;
            if stored {
                this.reload().await;
            }
            done(report.clone()).await;
            Ok(report)
        })
        .await
        .map_err(|e| NotRefreshed::Unavailable(format!("the refresh stopped: {e}")))?
    }

    /// After authentication errors took the account out of scheduling: refreshes its tokens in
    /// the background, if it is an enabled OAuth account with a refresh token not refused and
    /// not refreshed in the last ten minutes. A new token puts it back.
    pub fn after_auth_errors(self: &Arc<Self>, id: &str) {
        let this = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let Ok(Some(row)) = this.store.account_by_id(&id).await else {
                return;
            };
            let recent = row
                .token_refreshed_at
                .is_some_and(|at| relay_filters::now_ms().saturating_sub(at) < AFTER_ERRORS_GAP_MS);
            if !row.enabled || !refreshable(&row) || row.token_refresh_refused || recent {
                return;
            }
            tracing::info!(account = %row.name, "refreshing the token of an account authentication errors took out");
            if let Ok((report, stored)) = this.refresh_one(&id, Trigger::AuthErrors).await {
                if stored {
                    this.reload().await;
                }
                tracing::info!(account = %row.name, result = report.result, "token refresh after authentication errors");
            }
        });
    }

    /// Refreshes one account (only if still due, for a round); whether new tokens were stored.
    async fn refresh_one(
        &self,
        id: &str,
        trigger: Trigger,
    ) -> Result<(RefreshReport, bool), NotRefreshed> {
        let _guard = self.refreshing.enter(id).ok_or(NotRefreshed::Busy)?;
        // The row as it is now: the refresh token a moment ago may have been used already.
        let row = match self.store.account_by_id(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(NotRefreshed::Gone),
            Err(e) => return Err(NotRefreshed::Unavailable(e.to_string())),
        };
        let (Some(expected), Some(provider)) = (
            row.refresh_token_enc.clone(),
            Provider::of(row.account_type),
        ) else {
            return Err(NotRefreshed::NotRefreshable);
        };
        let now = relay_filters::now_ms();
        if trigger == Trigger::Round && !due(&row, now, self.margin) {
            return Err(NotRefreshed::NotDue);
        }
        // The state the errors left, as the refresh starts: put back only if still so.
        let put_back = (trigger == Trigger::AuthErrors && row.status == AccountStatus::Error)
            .then_some((row.consecutive_error_count, row.status_set_at));
        let refresh_token = self.secrets.decrypt(&expected).map_err(|_| {
            tracing::warn!(account = %row.name, "refresh token cannot be decrypted with this node's key");
            NotRefreshed::Undecryptable
        })?;
        // The lease outlasts the longest refresh (the client's whole budget, then the store's
        // attempts) with room to spare for clocks of nodes that differ a little.
        let lease = i64::try_from(self.client.budget().as_millis()).unwrap_or(i64::MAX);
        match self
            .store
            .lease_token_refresh(
                id,
                &expected,
                now,
                now.saturating_add(lease).saturating_add(60_000),
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(NotRefreshed::Busy),
            Err(e) => return Err(NotRefreshed::Unavailable(e.to_string())),
        }
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
                match self
                    .store_tokens(id, &expected, refresh_token.expose_secret(), &new, put_back)
                    .await
                {
                    Ok(true) => {
                        tracing::info!(account = %row.name, expires_at = ?tokens.expires_at, "access token refreshed");
                        if put_back.is_some() {
                            // Back in scheduling on this node at once, if errors held it off.
                            self.accounts.end_hold_off(id);
                        }
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

    /// Stores refreshed tokens over the refresh token `used` (stored as `expected`), trying
    /// again while the database fails (the provider has rotated the token: a lost answer would
    /// leave a dead refresh token stored). An operator who saved the very same refresh token
    /// meanwhile does not overtake the refresh (its ciphertext differs, its token does not).
    ///
    /// A write whose answer was lost is known by the row: it holds this refresh's access token
    /// ciphertext (a fresh nonce each time: no one else's), or its rotated refresh token. A
    /// refresh token that was not rotated is the one sent, which an operator may have saved
    /// again: finding it says nothing of this write.
    async fn store_tokens(
        &self,
        id: &str,
        expected: &str,
        used: &str,
        new: &RefreshedTokens,
        put_back: Option<(i64, Option<i64>)>,
    ) -> Result<bool, StoreError> {
        let new_refresh = match &self.secrets.decrypt(&new.refresh_token_enc) {
            Ok(t) => t.expose_secret().to_string(),
            Err(_) => String::new(),
        };
        let mut expected = expected.to_string();
        let mut delay = Duration::from_millis(200);
        let mut failures = 0;
        let mut looked_again = false;
        loop {
            let attempt = async {
                if self
                    .store
                    .store_refreshed_token(id, &expected, new, put_back)
                    .await?
                {
                    return Ok(Some(true));
                }
                // Not stored over `expected`: what does the row hold now?
                let Some(row) = self.store.account_by_id(id).await? else {
                    return Ok(Some(false));
                };
                if row.credential_enc == new.credential_enc {
                    // A write that committed though its answer was lost.
                    return Ok(Some(true));
                }
                let current = row.refresh_token_enc;
                let plain = current.as_deref().and_then(|enc| {
                    self.secrets
                        .decrypt(enc)
                        .ok()
                        .map(|t| t.expose_secret().to_string())
                });
                Ok(match (current, plain) {
                    // Likewise: the refresh token the provider rotated to, which only this
                    // refresh got (an operator may have replaced the access token since).
                    (Some(_), Some(p)) if p == new_refresh && new_refresh != used => Some(true),
                    // The same refresh token saved again (new ciphertext): store over it.
                    (Some(enc), Some(p)) if p == used && !looked_again => {
                        expected = enc;
                        None
                    }
                    _ => Some(false),
                })
            };
            match attempt.await {
                Ok(Some(stored)) => return Ok(stored),
                Ok(None) => looked_again = true,
                Err(e) => {
                    failures += 1;
                    if failures >= STORE_ATTEMPTS {
                        return Err(e);
                    }
                    tracing::warn!(account = %id, error = %e, failures, "refreshed tokens not stored yet; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                }
            }
        }
    }

    /// Reloads this node's accounts (the new credential is used from the next request on) and
    /// publishes their states.
    async fn reload(&self) {
        reload::reload_and_publish_accounts(
            &self.store,
            &self.accounts,
            &self.secrets,
            "a token refresh",
        )
        .await;
    }

    /// Refreshes every account that is due, a few at a time; once `stop` turns true no more
    /// refreshes start (those started finish and are stored).
    pub async fn refresh_due(
        &self,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<Vec<RefreshReport>, StoreError> {
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
            .map(|id| async move {
                if *stop.borrow() {
                    return Err(NotRefreshed::NotDue);
                }
                self.refresh_one(&id, Trigger::Round).await
            })
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
        // Not cut by a shutdown: a refresh the provider answered must be stored.
        if claimed {
            match tokens.refresh_due(&shutdown).await {
                Ok(reports) if !reports.is_empty() => {
                    let refreshed = reports.iter().filter(|r| r.result == "refreshed").count();
                    tracing::debug!(due = reports.len(), refreshed, "token refresh round done");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "token refresh round could not list accounts"),
            }
        }
        if *shutdown.borrow() {
            return;
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
        // Unknown expiry: once, then hourly, not every round.
        let mut refreshed = row(t, true, None);
        refreshed.token_refreshed_at = Some(now - 59 * 60_000);
        assert!(!due(&refreshed, now, margin));
        refreshed.token_refreshed_at = Some(now - 61 * 60_000);
        assert!(due(&refreshed, now, margin));
        // A 10-minute token (shorter than the margin) halfway through its life, not at once.
        let mut short = row(t, true, Some(now + 540_000));
        short.token_refreshed_at = Some(now - 60_000);
        assert!(!due(&short, now, margin));
        short.token_refreshed_at = Some(now - 301_000);
        short.token_expires_at = Some(now + 299_000);
        assert!(due(&short, now, margin));
    }
}
