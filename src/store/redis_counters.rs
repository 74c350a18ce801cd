//! Usage and cost counters in Redis (DESIGN §9): per user in total, per day and per month, per
//! key, in one pipelined round trip per request. They serve fast reads; the database rollups
//! stay the record of truth.

use std::sync::Arc;

use relay_filters::key_limits::utc_day;
use relay_filters::session_store::StoreUnavailable;
use relay_filters::UsageRecord;

use super::redis_sessions::RedisLink;

/// Daily counters are kept 3 days, monthly ones 40.
const DAY_TTL_SECS: i64 = 3 * 86_400;
const MONTH_TTL_SECS: i64 = 40 * 86_400;

/// Books every served request into Redis counters.
pub struct RedisUsageCounters {
    link: Arc<RedisLink>,
    prefix: String,
}

impl RedisUsageCounters {
    /// Counters under `{prefix}usage:...` and `{prefix}cost:...`.
    pub fn new(link: Arc<RedisLink>, prefix: &str) -> Self {
        RedisUsageCounters {
            link,
            prefix: prefix.to_string(),
        }
    }

    /// Adds one record to `usage:total:{user}`, `usage:daily:{user}:{date}`,
    /// `usage:monthly:{user}:{month}`, `usage:apikey:{key}` (hashes of requests, token kinds and
    /// billed cost), `cost:total:{user}` and `cost:daily:{user}:{date}` (integer micro-USD).
    pub async fn book(&self, r: &UsageRecord) -> Result<(), StoreUnavailable> {
        let (Some(user), Some(key)) = (&r.user_id, &r.api_key_id) else {
            return Ok(());
        };
        let p = &self.prefix;
        let day = utc_day(r.created_at);
        let month = day.get(..7).unwrap_or(&day).to_string();
        let u = &r.usage;
        let fields: [(&str, i64); 6] = [
            ("requests", 1),
            ("input_tokens", u.input_tokens as i64),
            ("output_tokens", u.output_tokens as i64),
            (
                "cache_write_tokens",
                (u.cache_write_5m_tokens + u.cache_write_1h_tokens) as i64,
            ),
            ("cache_read_tokens", u.cache_read_tokens as i64),
            ("cost", r.billed_cost),
        ];
        let hashes = [
            (format!("{p}usage:total:{user}"), None),
            (format!("{p}usage:daily:{user}:{day}"), Some(DAY_TTL_SECS)),
            (
                format!("{p}usage:monthly:{user}:{month}"),
                Some(MONTH_TTL_SECS),
            ),
            (format!("{p}usage:apikey:{key}"), None),
        ];
        let mut pipe = redis::pipe();
        for (hash, ttl) in &hashes {
            for (field, n) in fields {
                if n != 0 {
                    pipe.hincr(hash, field, n).ignore();
                }
            }
            if let Some(t) = ttl {
                pipe.expire(hash, *t).ignore();
            }
        }
        pipe.incr(format!("{p}cost:total:{user}"), r.billed_cost)
            .ignore();
        let daily_cost = format!("{p}cost:daily:{user}:{day}");
        pipe.incr(&daily_cost, r.billed_cost).ignore();
        pipe.expire(&daily_cost, DAY_TTL_SECS).ignore();
        self.link
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }
}
