//! Request and response policy of llm-relay: every filter of the chain, the request context
//! they share and the storage traits they reach the outside world through.
//!
//! Nothing here opens a socket or a database: the binary implements the traits.

pub mod account_state;
pub mod accounts;
pub mod api_key_auth;
pub mod chain;
pub mod context;
pub mod cost;
pub mod error;
pub mod header_rewrite;
mod json_scan;
pub mod key_limits;
pub mod model_list;
pub mod request_body;
pub mod route;
pub mod session_hash;
pub mod session_store;
pub mod sse_usage;
pub mod sticky_upstream;
pub mod types;

pub use types::{now_ms, AccountType, Protocol, TokenUsage, UsageRecord, MAX_TOKENS};

/// Locks `m`, also after a panic elsewhere poisoned it: the data behind these locks (counters,
/// sets of ids) stays consistent through any single operation on it.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
