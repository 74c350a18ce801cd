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

use futures::StreamExt;

use relay_filters::account_state::{apply_health_check, StateRules};
use relay_filters::accounts::AccountDirectory;
use serde::Serialize;
use tokio::sync::Notify;

use crate::background::cache_refresh as reload;
use crate::background::InFlight;
use crate::cache::AccountCache;
use crate::metrics::metrics;
use crate::proxy::health::{checked_by_default, CheckKind, HealthChecker};
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
/// The setting whose `updated_at` is the last claimed round (one node runs each round).
const ROUND_KEY: &str = "account_health_check_last_round";

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
            .filter(|v| HealthSettings::interval_ok(*v))
        {
            s.account_health_check_interval = v;
        }
        Ok(s)
    }

    /// Whether `minutes` is an interval the job takes.
    pub fn interval_ok(minutes: f64) -> bool {
        (MIN_INTERVAL_MINUTES..=MAX_INTERVAL_MINUTES).contains(&minutes)
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
    /// `pass`, `fail` (the provider refuses the credential: counts toward the threshold) or
    /// `inconclusive` (the provider failed or could not be reached: does not count).
    pub result: &'static str,
    /// The provider's answer status, when one came.
    pub http_status: Option<u16>,
    pub detail: String,
    /// The account's state after the check: `valid`, `error` (out of scheduling) or `blocked`.
    pub status: AccountStatus,
    pub consecutive_error_count: i64,
    /// Epoch ms.
    pub checked_at: i64,
}

/// Why an account was not checked.
#[derive(Debug)]
pub enum NotChecked {
    /// Not in this node's cache (deleted meanwhile, or its credential cannot be decrypted here).
    NotLoaded,
    /// A check of it is running already.
    Busy,
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
    /// Accounts being checked: one check per account at a time, so two rounds (the job and
    /// an admin's) never count one refusal twice.
    pub checking: InFlight,
}

impl Health {
    /// A health service; its job runs once [`run`] is spawned.
    pub fn new(
        checker: Arc<HealthChecker>,
        store: SqlStore,
        accounts: Arc<AccountCache>,
        secrets: Arc<SecretBox>,
        rules: StateRules,
    ) -> Self {
        Health {
            checker,
            store,
            accounts,
            secrets,
            rules,
            wake: Notify::new(),
            checking: InFlight::default(),
        }
    }

    /// Checks one account now and stores what changed; the caches of this node follow at once.
    pub async fn check(&self, row: &AccountRow) -> Result<CheckReport, NotChecked> {
        let (report, changed) = self.check_one(row).await?;
        if changed {
            self.reload().await;
        }
        Ok(report)
    }

    /// Checks one account; whether its stored state changed.
    async fn check_one(&self, row: &AccountRow) -> Result<(CheckReport, bool), NotChecked> {
        let live = self.accounts.get(&row.id).ok_or(NotChecked::NotLoaded)?;
        let _guard = self.checking.enter(&row.id).ok_or(NotChecked::Busy)?;
        let outcome = self.checker.check(&live).await;
        let now = relay_filters::now_ms();
        metrics()
            .health_checks
            .with_label_values(&[outcome.kind.as_str()])
            .inc();
        // Decided on the row as it is now, not as it was when the check began (it may have
        // waited for the provider for seconds): an operator's or the proxy's change meanwhile
        // wins, and the write below happens only if the status is still the one decided on.
        let fresh = match self.store.account_by_id(&row.id).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(NotChecked::NotLoaded),
            Err(e) => {
                tracing::warn!(account = %row.name, error = %e, "account unreadable after its health check");
                row.clone()
            }
        };
        let mut status = fresh.status;
        let mut errors = fresh.consecutive_error_count;
        let mut changed = false;
        let counts = matches!(outcome.kind, CheckKind::Passed | CheckKind::Refused);
        if fresh.enabled && fresh.status != AccountStatus::Blocked && counts {
            let in_error = fresh.status == AccountStatus::Error;
            let stored = u32::try_from(fresh.consecutive_error_count.max(0)).unwrap_or(u32::MAX);
            let verdict =
                apply_health_check(&live, in_error, stored, outcome.passed(), &self.rules, now);
            if verdict.changed {
                let new_status = if verdict.in_error {
                    AccountStatus::Error
                } else {
                    AccountStatus::Valid
                };
                match self
                    .store
                    .record_health_state(
                        &row.id,
                        // The generation of the account the check ran on (this node's
                        // snapshot, whose credential it used): an operator's status or
                        // credential set since is not overwritten by it.
                        (
                            fresh.status,
                            fresh.consecutive_error_count,
                            live.status_set_at,
                        ),
                        new_status,
                        i64::from(verdict.consecutive_errors),
                    )
                    .await
                {
                    Ok(true) => {
                        if verdict.in_error != in_error {
                            tracing::warn!(
                                account = %row.name,
                                detail = %outcome.detail,
                                errors = verdict.consecutive_errors,
                                "health check {}",
                                if verdict.in_error {
                                    "took the account out of scheduling"
                                } else {
                                    "put the account back"
                                }
                            );
                        }
                        status = new_status;
                        errors = i64::from(verdict.consecutive_errors);
                        changed = true;
                    }
                    // Changed meanwhile: that change stands; the next reload brings this
                    // node's live state in line with it.
                    Ok(false) => changed = true,
                    Err(e) => {
                        tracing::warn!(account = %row.name, error = %e, "health check result could not be stored")
                    }
                }
            }
        }
        if !outcome.passed() {
            tracing::info!(account = %row.name, result = outcome.kind.as_str(), detail = %outcome.detail, "account health check did not pass");
        }
        Ok((
            CheckReport {
                account_id: row.id.clone(),
                name: row.name.clone(),
                passed: outcome.passed(),
                result: outcome.kind.as_str(),
                http_status: outcome.status,
                detail: outcome.detail,
                status,
                consecutive_error_count: errors,
                checked_at: now,
            },
            changed,
        ))
    }

    /// Reloads this node's accounts from the database and publishes their states.
    async fn reload(&self) {
        reload::reload_and_publish_accounts(
            &self.store,
            &self.accounts,
            &self.secrets,
            "a health check",
        )
        .await;
    }

    /// Checks every enabled account (of the types checked by default unless `every_type`),
    /// [`PARALLEL_CHECKS`] at a time; accounts being checked already are left to that check.
    /// Reports in name order.
    pub async fn check_all(&self, every_type: bool) -> Result<Vec<CheckReport>, StoreError> {
        let rows: Vec<AccountRow> = self
            .store
            .load_accounts()
            .await?
            .into_iter()
            .filter(|a| a.enabled && (every_type || checked_by_default(a.account_type)))
            .collect();
        let done: Vec<_> = futures::stream::iter(rows)
            .map(|r| async move { self.check_one(&r).await })
            .buffer_unordered(PARALLEL_CHECKS)
            .collect()
            .await;
        let mut reports = Vec::with_capacity(done.len());
        let mut changed = false;
        for (report, c) in done.into_iter().flatten() {
            changed |= c;
            reports.push(report);
        }
        if changed {
            self.reload().await;
        }
        reports.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(reports)
    }
}

/// The periodic job: a round of checks every interval while enabled. Of several nodes on one
/// database, the one that claims a round runs it (see [`SqlStore::claim_round`]).
pub async fn run(health: Arc<Health>, mut shutdown: pingora::server::ShutdownWatch) {
    let mut last_round: Option<Instant> = None;
    let mut settings = HealthSettings::default();
    loop {
        match HealthSettings::load(&health.store).await {
            Ok(s) => settings = s,
            // The last settings read stay in force.
            Err(e) => tracing::warn!(error = %e, "health check settings unreadable"),
        }
        let mut wait = SETTINGS_POLL;
        if settings.account_health_check_enabled {
            let due = last_round.is_none_or(|t| t.elapsed() >= settings.interval());
            if due {
                last_round = Some(Instant::now());
                let gap =
                    i64::try_from(settings.interval().as_millis() * 9 / 10).unwrap_or(i64::MAX);
                let claimed = health
                    .store
                    .claim_round(ROUND_KEY, relay_filters::now_ms(), gap)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "health check round could not be claimed");
                        false
                    });
                if claimed {
                    tokio::select! {
                        done = health.check_all(false) => match done {
                            Ok(reports) => {
                                let failed = reports.iter().filter(|r| !r.passed).count();
                                tracing::debug!(checked = reports.len(), failed, "health check round done");
                            }
                            Err(e) => tracing::warn!(error = %e, "health check round could not list accounts"),
                        },
                        _ = shutdown.changed() => return,
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
