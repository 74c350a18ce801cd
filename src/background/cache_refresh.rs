//! Keeps the in-process caches in step with the database: a cheap change fingerprint is polled
//! (default every 500 ms) and the caches reload when it moves, or at once after a change made
//! through this node's admin API.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::{AccountCache, KeyCache, PriceCache};
use crate::secrets::SecretBox;
use crate::store::{ChangeMarker, RedisCooldowns, SqlStore};

use crate::store::StoreError;

/// Loads everything once; used at start-up and on every change.
pub async fn load_all(
    store: &SqlStore,
    keys: &KeyCache,
    accounts: &AccountCache,
    prices: &PriceCache,
    secrets: &SecretBox,
) -> Result<(), StoreError> {
    reload_keys(store, keys).await?;
    reload_accounts(store, accounts, secrets).await?;
    reload_prices(store, prices).await
}

/// Reloads the API keys. A reload that began before another one already applied is dropped,
/// so an overlapping older reload never undoes a newer one.
pub async fn reload_keys(store: &SqlStore, keys: &KeyCache) -> Result<(), StoreError> {
    let ticket = keys.begin_load();
    let rows = store.load_api_keys_with_users().await?;
    keys.replace_loaded(ticket, rows);
    Ok(())
}

/// Reloads the accounts (live state is kept), ordered like [`reload_keys`].
pub async fn reload_accounts(
    store: &SqlStore,
    accounts: &AccountCache,
    secrets: &SecretBox,
) -> Result<(), StoreError> {
    let ticket = accounts.begin_load();
    let rows = store.load_accounts().await?;
    accounts.replace_loaded(ticket, rows, secrets);
    Ok(())
}

/// Reloads the price overrides, ordered like [`reload_keys`].
pub async fn reload_prices(store: &SqlStore, prices: &PriceCache) -> Result<(), StoreError> {
    let ticket = prices.begin_load();
    let rows = store.list_price_overrides().await?;
    prices.replace_loaded(ticket, rows);
    Ok(())
}

/// Runs until shutdown.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    store: SqlStore,
    keys: Arc<KeyCache>,
    accounts: Arc<AccountCache>,
    prices: Arc<PriceCache>,
    secrets: Arc<SecretBox>,
    interval: Duration,
    wake: Arc<tokio::sync::Notify>,
    cooldowns: Option<Arc<RedisCooldowns>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut last: Option<ChangeMarker> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = wake.notified() => { last = None; }
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
            }
        }
        if let Some(c) = &cooldowns {
            apply_shared_cooldowns(c, &accounts).await;
        }
        match store.change_marker().await {
            Ok(marker) if Some(marker) != last => {
                match load_all(&store, &keys, &accounts, &prices, &secrets).await {
                    Ok(()) => last = Some(marker),
                    Err(e) => tracing::warn!(error = %e, "cache reload failed"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "change poll failed"),
        }
        // Cooldowns end by themselves: the gauge follows the clock, not only reloads.
        publish_account_states(&accounts);
    }
}

/// Every `every`, raises this node's cost-limit counters to the spend the database holds for
/// each key and user with a cost limit (booked by every node). Without Redis they are what the limits count
/// against; with Redis they seed counters Redis lost, so either way a node's limits include the
/// other nodes' spend, up to `every` ago.
pub async fn raise_spend(
    store: SqlStore,
    memory: Arc<relay_filters::key_limits::MemoryLimits>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
            }
        }
        let today = relay_filters::key_limits::utc_day(relay_filters::now_ms());
        match store.limit_spend(&today, true).await {
            Ok(spend) => {
                for s in spend {
                    memory.raise_cost(&s.subject, &today, s.spent);
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading the stored spend failed"),
        }
    }
}

/// Takes the cooldowns other nodes published in Redis, unless an operator's clear was applied
/// while they were read (they may predate it).
async fn apply_shared_cooldowns(cooldowns: &RedisCooldowns, accounts: &AccountCache) {
    let mark = accounts.shared_cooldowns_mark();
    let ids: Vec<String> = accounts.snapshot().iter().map(|a| a.id.clone()).collect();
    let shared = cooldowns.fetch_all(&ids).await;
    accounts.apply_shared_cooldowns(mark, &shared);
}

/// Reloads this node's accounts after a change made on it (`after`, for the log) and publishes
/// their states; the live state of each account is kept.
pub async fn reload_and_publish_accounts(
    store: &SqlStore,
    accounts: &AccountCache,
    secrets: &SecretBox,
    after: &str,
) {
    match reload_accounts(store, accounts, secrets).await {
        Ok(()) => publish_account_states(accounts),
        Err(e) => tracing::warn!(error = %e, "account cache reload after {after} failed"),
    }
}

/// Sets `relay_account_state{state}` from the cache.
pub fn publish_account_states(accounts: &AccountCache) {
    use std::sync::atomic::Ordering;
    const PLATFORMS: [&str; 3] = ["claude", "openai", "gemini"];
    let now = relay_filters::now_ms();
    // Per platform: available, cooling, disabled. Every platform is published, 0 when it has
    // no account, so a platform whose accounts all left shows as such.
    let mut counts = [[0_i64; 3]; 3];
    for a in accounts.snapshot().iter() {
        let platform = a.account_type.platform();
        let Some(row) = PLATFORMS.iter().position(|p| *p == platform) else {
            continue;
        };
        let state = if !a.state.schedulable.load(Ordering::Relaxed) {
            2
        } else if a.state.cooldown_until_ms.load(Ordering::Relaxed) > now {
            1
        } else {
            0
        };
        counts[row][state] += 1;
    }
    let g = &crate::metrics::metrics().account_state;
    for (platform, row) in PLATFORMS.iter().zip(counts) {
        for (state, n) in ["available", "cooling", "disabled"].iter().zip(row) {
            g.with_label_values(&[platform, state]).set(n);
        }
    }
}
