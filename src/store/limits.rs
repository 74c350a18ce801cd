//! Queries behind the cost limits: what each key, and each user over all its keys, has spent,
//! to seed the limit counters.

use relay_filters::key_limits::{month_start, user_subject, Spent};
use sqlx::Row;

use super::{Result, SqlStore};

/// Billed micro-USD of one limit subject (a key id, or `user_subject` of a user id): on one
/// day, in its month and in total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    pub subject: String,
    pub spent: Spent,
}

/// The subjects with a cost limit of any kind.
const LIMITED: &str = "daily_cost_limit IS NOT NULL OR monthly_cost_limit IS NOT NULL \
     OR total_cost_limit IS NOT NULL";

impl SqlStore {
    /// Spend of every key and every user that has any (`limited`: only of those with a cost
    /// limit), from the daily rollups; `day` is `YYYY-MM-DD` (UTC).
    pub async fn limit_spend(&self, day: &str, limited: bool) -> Result<Vec<Spend>> {
        let only_limited = if limited {
            format!(
                " AND ((dim = 'key' AND dim_id IN (SELECT id FROM api_keys WHERE {LIMITED})) \
                 OR (dim = 'user' AND dim_id IN (SELECT id FROM users WHERE {LIMITED})))"
            )
        } else {
            String::new()
        };
        // Days are `YYYY-MM-DD`: the month's are those from its first to `day` (a later one
        // of the month holds bookings of requests that started after `day`, not counted yet).
        let sql = format!(
            "SELECT dim, dim_id, \
                    CAST(COALESCE(SUM(CASE WHEN day = $1 THEN billed_cost ELSE 0 END), 0) AS BIGINT) AS today, \
                    CAST(COALESCE(SUM(CASE WHEN day >= $2 AND day <= $1 THEN billed_cost ELSE 0 END), 0) AS BIGINT) AS month, \
                    CAST(COALESCE(SUM(billed_cost), 0) AS BIGINT) AS total \
             FROM usage_daily WHERE dim IN ('key', 'user'){only_limited} GROUP BY dim, dim_id"
        );
        let rows = sqlx::query(&sql)
            .bind(day)
            .bind(month_start(day))
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let dim: String = r.try_get("dim")?;
                let id: String = r.try_get("dim_id")?;
                Ok(Spend {
                    subject: if dim == "user" { user_subject(&id) } else { id },
                    spent: Spent::new(
                        r.try_get("today")?,
                        r.try_get("month")?,
                        r.try_get("total")?,
                    ),
                })
            })
            .collect()
    }
}
