//! Account state changes seen by the proxy (cooldowns, automatic disabling), persisted to the
//! database off the request path so every node and the admin UI see them.

use relay_filters::account_state::StateChange;
use relay_filters::accounts::Account;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

use crate::metrics::metrics;
use crate::store::{AccountStatus, RedisCooldowns, SqlStore};

/// One change to persist.
#[derive(Debug)]
pub struct AccountEvent {
    pub account_id: String,
    pub status: AccountStatus,
    pub consecutive_errors: i64,
    pub cooldown_until: Option<i64>,
    pub kind: EventKind,
    /// Epoch ms when the proxy saw it: a cooldown seen before an operator ended the account's
    /// cooldown is not stored after that.
    pub observed_at: i64,
    /// The account's `status_set_at` as the request that saw the change had it: a status is
    /// stored only while it is still so (the operator set neither status nor credential since
    /// the request's account was loaded).
    pub status_set_at: Option<i64>,
}

/// What kind of change an event stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Only the cooldown: status and error count are left as stored (a cooldown must not put
    /// back an account that errors or a health check took out meanwhile).
    Cooldown,
    /// Taken out of scheduling (`error` or `blocked`).
    Disabled,
    /// A success after errors: `valid` again, unless it was reported blocked meanwhile.
    Recovered,
}

/// The proxy's end.
#[derive(Clone)]
pub struct AccountEvents {
    tx: mpsc::UnboundedSender<AccountEvent>,
}

impl AccountEvents {
    /// Creates the channel.
    pub fn channel() -> (AccountEvents, mpsc::UnboundedReceiver<AccountEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (AccountEvents { tx }, rx)
    }

    /// Counts a change and hands it to the persister; `None` changes cost nothing.
    pub fn send(&self, account: &Account, change: StateChange) {
        let kind = match change {
            StateChange::None => return,
            StateChange::Cooldown { .. } => EventKind::Cooldown,
            StateChange::Disabled { .. } => EventKind::Disabled,
            StateChange::Recovered => EventKind::Recovered,
        };
        let (status, cooldown_until) = match &change {
            StateChange::None => return,
            StateChange::Cooldown { reason, until_ms } => {
                metrics()
                    .account_cooldowns
                    .with_label_values(&[reason])
                    .inc();
                tracing::warn!(account = %account.name, reason, until_ms, "account cooling down");
                (AccountStatus::Valid, Some(*until_ms))
            }
            StateChange::Disabled { status, reason } => {
                tracing::warn!(account = %account.name, reason = %reason, "account taken out of scheduling");
                (
                    AccountStatus::parse(status).unwrap_or(AccountStatus::Error),
                    None,
                )
            }
            StateChange::Recovered => (AccountStatus::Valid, None),
        };
        let _ = self.tx.send(AccountEvent {
            account_id: account.id.clone(),
            status,
            consecutive_errors: i64::from(account.state.consecutive_errors.load(Ordering::Relaxed)),
            cooldown_until,
            kind,
            observed_at: crate::store::now_ms(),
            status_set_at: account.status_set_at,
        });
    }
}

/// Persists events until the channel closes; cooldowns also go to Redis when configured, so
/// other nodes see them without waiting for the database poll.
pub async fn persist(
    store: SqlStore,
    mut rx: mpsc::UnboundedReceiver<AccountEvent>,
    cooldowns: Option<std::sync::Arc<RedisCooldowns>>,
    tokens: std::sync::Arc<crate::background::oauth_refresh::TokenRefresh>,
    accounts: std::sync::Arc<crate::cache::AccountCache>,
    reload: std::sync::Arc<tokio::sync::Notify>,
) {
    while let Some(ev) = rx.recv().await {
        if let (Some(c), Some(until)) = (&cooldowns, ev.cooldown_until) {
            let _ = c.publish(&ev.account_id, until, ev.observed_at).await;
        }
        // Whether the event's status was stored (an operator's later word wins).
        let stored = match (ev.kind, ev.cooldown_until) {
            (EventKind::Cooldown, Some(until)) => store
                .record_account_cooldown(&ev.account_id, until, ev.observed_at)
                .await
                .map(|()| true),
            (EventKind::Recovered, _) => store
                .record_account_recovered(&ev.account_id, ev.status_set_at)
                .await
                .map(|()| true),
            _ => {
                store
                    .record_account_state(
                        &ev.account_id,
                        ev.status,
                        ev.consecutive_errors,
                        ev.cooldown_until,
                        ev.status_set_at,
                    )
                    .await
            }
        };
        match stored {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(account = %ev.account_id, "an operator set the account's status or credential after the requests that changed it were sent; the operator's word stands");
                // This node took the account out at once; the stored row is the word now, read
                // again by a reload (the refused write changed nothing a poll would notice).
                accounts.end_hold_off(&ev.account_id);
                reload.notify_one();
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "account state could not be stored"),
        }
        // Authentication errors took an OAuth account out: its access token may have died
        // before its time; a refresh (if it has a refresh token) brings it back.
        if ev.kind == EventKind::Disabled && ev.status == AccountStatus::Error {
            tokens.after_auth_errors(&ev.account_id);
        }
    }
}
