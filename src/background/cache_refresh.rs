//! Keeps the in-process caches in step with the database: a cheap change fingerprint is polled
//! (default every 500 ms) and the caches reload when it moves, or at once after a change made
//! through this node's admin API.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::{AccountCache, KeyCache, PriceCache};
use crate::secrets::SecretBox;
use crate::store::{ChangeMarker, RedisCooldowns, SqlStore};

/// Loads everything once; used at start-up and on every change.
pub async fn load_all(
    store: &SqlStore,
    keys: &KeyCache,
    accounts: &AccountCache,
    prices: &PriceCache,
    secrets: &SecretBox,
) -> Result<(), crate::store::StoreError> {
    keys.replace(store.load_api_keys_with_users().await?);
    accounts.replace(store.load_accounts().await?, secrets);
    prices.replace(store.list_prices().await?);
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

/// Takes the cooldowns other nodes published in Redis.
async fn apply_shared_cooldowns(cooldowns: &RedisCooldowns, accounts: &AccountCache) {
    use std::sync::atomic::Ordering;
    let snapshot = accounts.snapshot();
    let ids: Vec<String> = snapshot.iter().map(|a| a.id.clone()).collect();
    let shared = cooldowns.fetch_all(&ids).await;
    for a in snapshot.iter() {
        if let Some(until) = shared.get(&a.id) {
            a.state
                .cooldown_until_ms
                .fetch_max(*until, Ordering::Relaxed);
        }
    }
}

/// Sets `relay_account_state{state}` from the cache.
pub fn publish_account_states(accounts: &AccountCache) {
    use std::sync::atomic::Ordering;
    let now = relay_filters::now_ms();
    let (mut ok, mut cooling, mut off) = (0, 0, 0);
    for a in accounts.snapshot().iter() {
        if !a.state.schedulable.load(Ordering::Relaxed) {
            off += 1;
        } else if a.state.cooldown_until_ms.load(Ordering::Relaxed) > now {
            cooling += 1;
        } else {
            ok += 1;
        }
    }
    let g = &crate::metrics::metrics().account_state;
    g.with_label_values(&["available"]).set(ok);
    g.with_label_values(&["cooling"]).set(cooling);
    g.with_label_values(&["disabled"]).set(off);
}
