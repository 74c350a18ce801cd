//! Usage record retention: records older than the configured number of days are removed in
//! small batches, so the usage writer and the admin's reads wait for one batch at most. The
//! daily totals they were counted into stay, and with them the summaries, key costs and cost
//! limits. Every node may run it: a record is removed once, whichever node gets to it.

use std::time::Duration;

use pingora::server::ShutdownWatch;

use crate::metrics::metrics;
use crate::store::SqlStore;

/// Records removed per statement.
const BATCH: i64 = 5_000;

/// Pause between batches, for the writes and reads waiting on the database.
const BETWEEN_BATCHES: Duration = Duration::from_millis(50);

/// The first pass starts this long after the node (or `interval`, if shorter).
const FIRST_PASS_AFTER: Duration = Duration::from_secs(60);

const DAY_MS: i64 = 86_400_000;

/// Removes records older than `days` now and then every `interval`, until shutdown.
pub async fn run(store: SqlStore, days: u32, interval: Duration, mut shutdown: ShutdownWatch) {
    let mut wait = interval.min(FIRST_PASS_AFTER);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        wait = interval;
        let cutoff = crate::store::now_ms().saturating_sub(i64::from(days) * DAY_MS);
        let removed = prune(&store, cutoff, &mut shutdown).await;
        if removed > 0 {
            tracing::info!(removed, days, "usage records past their retention removed");
        }
    }
}

/// Removes every record that arrived before `cutoff` (epoch ms), batch by batch; how many.
/// Stops early at shutdown, or on an error (logged; the next pass goes on).
async fn prune(store: &SqlStore, cutoff: i64, shutdown: &mut ShutdownWatch) -> u64 {
    let mut removed = 0;
    loop {
        if *shutdown.borrow() {
            return removed;
        }
        match store.prune_usage_records(cutoff, BATCH).await {
            Ok(n) => {
                removed += n;
                metrics().usage_pruned.inc_by(n);
                if n < BATCH.unsigned_abs() {
                    return removed;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "usage records past their retention could not be removed");
                return removed;
            }
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
}
