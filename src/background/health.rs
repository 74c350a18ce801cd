//! Account health checks (DESIGN §11): the periodic job, off by default, and the checks an
//! admin starts by hand. A check's result changes the account like the proxy's own
//! observations do: a pass clears the error count and puts back an account the errors took out
//! of scheduling; a failure counts, and at `scheduler.account_error_threshold` takes it out.
//! The new state is stored (every node follows it through the cache refresh) and applied to
//! this node's live state at once.
//!
//! Settings (admin API `/api/admin/settings`, stored in `settings`): whether the job runs
//! (`account_health_check_enabled`, default false) and how often (`account_health_check_interval`,
//! minutes, default 5). The job reads them again whenever they change and at least every
//! [`SETTINGS_POLL`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use relay_filters::account_state::{apply_health_check, HealthVerdict, StateRules};
use relay_filters::accounts::AccountDirectory;
use serde::Serialize;
use tokio::sync::Notify;

use crate::background::cache_refresh as reload;
use crate::cache::AccountCache;
use crate::metrics::metrics;
use crate::proxy::health::{checked_by_default, HealthChecker};
use crate::secrets::SecretBox;
use crate::store::{Account as AccountRow, AccountStatus, SqlStore, StoreError};

/// Setting: whether the periodic job runs.
pub const ENABLED_KEY: &str = "account_health_check_enabled";
/// Setting: minutes between two rounds of the periodic job.
pub const INTERVAL_KEY: &str = "account_health_check_interval";
/// Default minutes between rounds.
pub const DEFAULT_INTERVAL_MINUTES: f64 = 5.0;
/// Shortest interval accepted (3 s), longest (a day).
pub const MIN_INTERVAL_MINUTES: f64 = 0.05;
pub const MAX_INTERVAL_MINUTES: f64 = 1440.0;
/// Settings changed on another node reach this one within this time.
const SETTINGS_POLL: Duration = Duration::from_secs(30);
/// One check waits at most this long.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(15);
/// Accounts checked at once in a round.
const PARALLEL_CHECKS: usize = 8;

/// The job's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HealthSettings {
    pub account_health_check_enabled: bool,
    /// Minutes.
    pub account_health_check_interval: f64,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            account_health_check_enabled: false,
            account_health_check_interval: DEFAULT_INTERVAL_MINUTES,
        }
    }
}

impl HealthSettings {
    /// The stored settings; defaults for those not set or unreadable.
    pub async fn load(store: &SqlStore) -> Result<HealthSettings, StoreError> {
        let mut s = HealthSettings::default();
        if let Some(v) = store
            .get_setting(ENABLED_KEY)
            .await?
            .and_then(|v| v.as_bool())
        {
            s.account_health_check_enabled = v;
        }
        if let Some(v) = store
            .get_setting(INTERVAL_KEY)
            .await?
            .and_then(|v| v.as_f64())
            .filter(|v| (MIN_INTERVAL_MINUTES..=MAX_INTERVAL_MINUTES).contains(v))
        {
            s.account_health_check_interval = v;
        }
        Ok(s)
    }

    fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.account_health_check_interval * 60.0)
    }
}

/// One account's check, as the admin API answers it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub account_id: String,
    pub name: String,
    pub passed: bool,
    /// The provider's answer status, when one came.
    pub http_status: Option<u16>,
    pub detail: String,
    /// The account's state after the check: `valid`, `error` (out of scheduling) or `blocked`.
    pub status: AccountStatus,
    pub consecutive_error_count: i64,
    /// Epoch ms.
    pub checked_at: i64,
}

/// Runs checks and applies their results; shared by the periodic job and the admin API.
pub struct Health {
    pub checker: Arc<HealthChecker>,
    pub store: SqlStore,
    pub accounts: Arc<AccountCache>,
    pub secrets: Arc<SecretBox>,
    pub rules: StateRules,
    /// Wakes the periodic job after its settings changed.
    pub wake: Notify,
}

impl Health {
    /// Checks one account (a stored row; its live twin must be in this node's cache) and stores
    /// what changed. `None`: the account is not in the cache (its credential cannot be
    /// decrypted here, or it was deleted meanwhile).
    pub async fn check(&self, row: &AccountRow) -> Option<CheckReport> {
        let live = self.accounts.get(&row.id)?;
        let outcome = self.checker.check(&live).await;
        let now = relay_filters::now_ms();
        metrics()
            .health_checks
            .with_label_values(&[if outcome.passed { "pass" } else { "fail" }])
            .inc();
        let blocked = row.status == AccountStatus::Blocked;
        let (status, errors) = if blocked {
            // The provider said the organization is disabled: only an operator clears that.
            (AccountStatus::Blocked, row.consecutive_error_count)
        } else {
            let in_error = row.status == AccountStatus::Error;
            let HealthVerdict {
                in_error,
                consecutive_errors,
                changed,
                ..
            } = apply_health_check(&live, in_error, outcome.passed, &self.rules, now);
            let status = if in_error {
                AccountStatus::Error
            } else {
                AccountStatus::Valid
            };
            if changed {
                if in_error != (row.status == AccountStatus::Error) {
                    tracing::warn!(
                        account = %row.name,
                        passed = outcome.passed,
                        detail = %outcome.detail,
                        errors = consecutive_errors,
                        "health check {}",
                        if in_error { "took the account out of scheduling" } else { "put the account back" }
                    );
                }
                let cooldown = row.cooldown_until.filter(|t| *t > now);
                match self
                    .store
                    .record_account_state(&row.id, status, i64::from(consecutive_errors), cooldown)
                    .await
                {
                    Ok(()) => {
                        if let Err(e) =
                            reload::reload_accounts(&self.store, &self.accounts, &self.secrets)
                                .await
                        {
                            tracing::warn!(error = %e, "account reload after a health check failed");
                        }
                        reload::publish_account_states(&self.accounts);
                    }
                    Err(e) => {
                        tracing::warn!(account = %row.name, error = %e, "health check result could not be stored")
                    }
                }
            }
            (status, i64::from(consecutive_errors))
        };
        if !outcome.passed {
            tracing::info!(account = %row.name, detail = %outcome.detail, "account health check failed");
        }
        Some(CheckReport {
            account_id: row.id.clone(),
            name: row.name.clone(),
            passed: outcome.passed,
            http_status: outcome.status,
            detail: outcome.detail,
            status,
            consecutive_error_count: errors,
            checked_at: now,
        })
    }

    /// Checks every enabled account (of the types checked by default unless `every_type`), a
    /// few at a time, in name order.
    pub async fn check_all(&self, every_type: bool) -> Result<Vec<CheckReport>, StoreError> {
        let rows: Vec<AccountRow> = self
            .store
            .load_accounts()
            .await?
            .into_iter()
            .filter(|a| a.enabled && (every_type || checked_by_default(a.account_type)))
            .collect();
        let mut reports = Vec::with_capacity(rows.len());
        for group in rows.chunks(PARALLEL_CHECKS) {
            let done = futures::future::join_all(group.iter().map(|r| self.check(r))).await;
            reports.extend(done.into_iter().flatten());
        }
        Ok(reports)
    }
}

/// The periodic job: a round of checks every interval while enabled.
pub async fn run(health: Arc<Health>, mut shutdown: pingora::server::ShutdownWatch) {
    let mut last_round: Option<Instant> = None;
    loop {
        let settings = match HealthSettings::load(&health.store).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "health check settings unreadable");
                HealthSettings::default()
            }
        };
        let mut wait = SETTINGS_POLL;
        if settings.account_health_check_enabled {
            let due = last_round.is_none_or(|t| t.elapsed() >= settings.interval());
            if due {
                last_round = Some(Instant::now());
                match health.check_all(false).await {
                    Ok(reports) => {
                        let failed = reports.iter().filter(|r| !r.passed).count();
                        tracing::debug!(checked = reports.len(), failed, "health check round done");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "health check round could not list accounts")
                    }
                }
            }
            let next = last_round
                .map(|t| settings.interval().saturating_sub(t.elapsed()))
                .unwrap_or_default();
            wait = wait.min(next.max(Duration::from_millis(100)));
        } else {
            last_round = None;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = health.wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
