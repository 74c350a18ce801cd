//! Queries behind the per-key limits: what each key has spent, to seed the limit counters.

use sqlx::Row;

use super::{Result, SqlStore};

/// Billed micro-USD of one key: on one day and in total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpend {
    pub key_id: String,
    pub today: i64,
    pub total: i64,
}

impl SqlStore {
    /// Spend of every key that has any, from the daily rollups; `day` is `YYYY-MM-DD` (UTC).
    pub async fn key_spend(&self, day: &str) -> Result<Vec<KeySpend>> {
        let rows = sqlx::query(
            "SELECT dim_id, \
                    CAST(COALESCE(SUM(CASE WHEN day = $1 THEN billed_cost ELSE 0 END), 0) AS BIGINT) AS today, \
                    CAST(COALESCE(SUM(billed_cost), 0) AS BIGINT) AS total \
             FROM usage_daily WHERE dim = 'key' GROUP BY dim_id",
        )
        .bind(day)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(KeySpend {
                    key_id: r.try_get("dim_id")?,
                    today: r.try_get("today")?,
                    total: r.try_get("total")?,
                })
            })
            .collect()
    }
}
