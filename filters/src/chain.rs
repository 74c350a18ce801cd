//! The filter chain: the phase traits every filter implements, what a filter answers, and the
//! one place that builds the chain from config.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::accounts::AccountDirectory;
use crate::api_key_auth::{ApiKeyAuth, KeyStore};
use crate::context::RequestCtx;
use crate::cost::{CostFilter, PriceSource};
use crate::error::Rejection;
use crate::header_rewrite::{HeaderRewrite, HeaderRules};
use crate::key_limits::{KeyLimits, LimitStore};
use crate::request_body::RequestBody;
use crate::session_hash::{SessionHash, SessionStrategy};
use crate::session_store::SessionStore;
use crate::sse_usage::SseUsage;
use crate::sticky_upstream::{StickyConfig, StickyUpstream};

/// What a request filter decides.
#[derive(Debug)]
pub enum Flow {
    /// Go on with the next filter.
    Continue,
    /// Stop and answer the client with this error.
    Reject(Rejection),
}

/// What a response filter does with a body chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkAction {
    /// Forward the chunk unchanged.
    Forward,
    /// Forward these bytes instead.
    Replace(bytes::Bytes),
}

/// The parts of the client request a filter may read.
pub struct RequestView<'a> {
    pub headers: &'a http::HeaderMap,
    pub query: Option<&'a str>,
    pub body: &'a [u8],
    pub parsed: &'a RequestBody<'a>,
}

/// A filter of the request phase (before the upstream exchange).
#[async_trait]
pub trait RequestFilter: Send + Sync {
    /// The filter's `kind` in config.
    fn name(&self) -> &'static str;
    /// Runs once per request; may fill the context or reject.
    async fn on_request(&self, ctx: &mut RequestCtx, req: &RequestView<'_>) -> Flow;
}

/// A filter of the response phase: synchronous and incremental, it must never block or buffer
/// the stream.
pub trait ResponseFilter: Send + Sync {
    /// The filter's `kind` in config.
    fn name(&self) -> &'static str;
    /// The upstream answered with this head (after failover settled).
    fn on_response_head(&self, _ctx: &mut RequestCtx, _status: u16, _headers: &http::HeaderMap) {}
    /// One body chunk on its way to the client. Chunks are cut wherever the relay found the
    /// bytes ready (several upstream chunks may come as one): a filter must treat every split
    /// of the body alike.
    fn on_body_chunk(&self, _ctx: &mut RequestCtx, _chunk: &[u8]) -> ChunkAction {
        ChunkAction::Forward
    }
    /// The upstream body ended cleanly: bytes still held back by the filter, to send last.
    fn on_body_end(&self, _ctx: &mut RequestCtx) -> Option<bytes::Bytes> {
        None
    }
    /// The exchange ended (completely or not); runs for every request that reached an upstream.
    fn on_end(&self, _ctx: &mut RequestCtx) {}
}

/// One `[[filters]]` entry of the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FilterConfig {
    ApiKeyAuth {},
    KeyLimits {},
    SessionHash {
        #[serde(default)]
        strategy: Option<SessionStrategy>,
        #[serde(default)]
        message_count: Option<usize>,
    },
    StickyUpstream {},
    HeaderRewrite {
        #[serde(flatten)]
        rules: HeaderRules,
    },
    SseUsage {},
    Cost {},
}

impl FilterConfig {
    /// The chain used when the config names none.
    pub fn default_chain() -> Vec<FilterConfig> {
        vec![
            FilterConfig::ApiKeyAuth {},
            FilterConfig::KeyLimits {},
            FilterConfig::SessionHash {
                strategy: None,
                message_count: None,
            },
            FilterConfig::StickyUpstream {},
            FilterConfig::HeaderRewrite {
                rules: HeaderRules::default(),
            },
            FilterConfig::SseUsage {},
            FilterConfig::Cost {},
        ]
    }

    /// The `kind` this entry is written with.
    pub fn kind(&self) -> &'static str {
        match self {
            FilterConfig::ApiKeyAuth {} => "api_key_auth",
            FilterConfig::KeyLimits {} => "key_limits",
            FilterConfig::SessionHash { .. } => "session_hash",
            FilterConfig::StickyUpstream {} => "sticky_upstream",
            FilterConfig::HeaderRewrite { .. } => "header_rewrite",
            FilterConfig::SseUsage {} => "sse_usage",
            FilterConfig::Cost {} => "cost",
        }
    }

    /// Checks a configured chain: every filter at most once, the ones a served request needs
    /// present, and each after the ones it reads from. A chain that breaks these would still
    /// serve, but book nothing (no key, so no record), cost 0 (cost before the meter), count
    /// every chunk twice, or schedule without a session key.
    pub fn check_chain(configs: &[FilterConfig]) -> Result<(), String> {
        let at = |kind: &str| configs.iter().position(|c| c.kind() == kind);
        for (i, c) in configs.iter().enumerate() {
            if configs[..i].iter().any(|d| d.kind() == c.kind()) {
                return Err(format!("filter {} is listed twice", c.kind()));
            }
        }
        for kind in REQUIRED_FILTERS {
            if at(kind).is_none() {
                return Err(format!(
                    "the filter chain needs {kind} (required: {})",
                    REQUIRED_FILTERS.join(", ")
                ));
            }
        }
        for (first, then) in FILTER_ORDER {
            if let (Some(a), Some(b)) = (at(first), at(then)) {
                if a > b {
                    return Err(format!("filter {first} must come before {then}"));
                }
            }
        }
        Ok(())
    }
}

/// Filters every chain has: the key (whose user a record is booked to), the account choice and
/// its credentials, the meter and the cost.
const REQUIRED_FILTERS: [&str; 5] = [
    "api_key_auth",
    "sticky_upstream",
    "header_rewrite",
    "sse_usage",
    "cost",
];

/// Pairs of filters of which the first must run before the second, when both are listed.
const FILTER_ORDER: [(&str, &str); 5] = [
    ("api_key_auth", "key_limits"),
    ("session_hash", "sticky_upstream"),
    ("api_key_auth", "sticky_upstream"),
    ("sticky_upstream", "header_rewrite"),
    ("sse_usage", "cost"),
];

/// What the filters need from the outside world.
pub struct ChainDeps {
    pub keys: Arc<dyn KeyStore>,
    pub accounts: Arc<dyn AccountDirectory>,
    pub sessions: Arc<dyn SessionStore>,
    pub prices: Arc<dyn PriceSource>,
    pub limits: Arc<dyn LimitStore>,
    /// Concurrency leases expire after this when never released.
    pub lease_ttl: std::time::Duration,
    /// `limits` is shared by several nodes (Redis): an account's concurrency cap is counted
    /// there too, so it holds across nodes and not per node.
    pub shared_account_caps: bool,
    pub sticky: StickyConfig,
    /// Default session strategy and message count (per-filter config overrides).
    pub session_strategy: SessionStrategy,
    pub session_message_count: usize,
}

/// The built chain. The scheduler and rewriter are kept apart as well, for failover.
pub struct Chain {
    pub request: Vec<Arc<dyn RequestFilter>>,
    pub response: Vec<Arc<dyn ResponseFilter>>,
    pub sticky: Option<Arc<StickyUpstream>>,
    pub rewrite: Option<Arc<HeaderRewrite>>,
    pub auth: Option<Arc<ApiKeyAuth>>,
    pub limits: Option<Arc<KeyLimits>>,
}

impl Chain {
    /// Builds the chain in config order. Reading this match tells the whole list of filters.
    pub fn build(configs: &[FilterConfig], deps: &ChainDeps) -> Result<Chain, String> {
        FilterConfig::check_chain(configs)?;
        let mut chain = Chain {
            request: Vec::new(),
            response: Vec::new(),
            sticky: None,
            rewrite: None,
            auth: None,
            limits: None,
        };
        for config in configs {
            match config {
                FilterConfig::ApiKeyAuth {} => {
                    let f = Arc::new(ApiKeyAuth::new(deps.keys.clone()));
                    chain.auth = Some(f.clone());
                    chain.request.push(f);
                }
                FilterConfig::KeyLimits {} => {
                    let f = Arc::new(
                        KeyLimits::new(deps.limits.clone(), deps.lease_ttl, deps.prices.clone())
                            .with_accounts(deps.accounts.clone()),
                    );
                    chain.limits = Some(f.clone());
                    chain.request.push(f);
                }
                FilterConfig::SessionHash {
                    strategy,
                    message_count,
                } => chain.request.push(Arc::new(SessionHash::new(
                    strategy.unwrap_or(deps.session_strategy),
                    message_count.unwrap_or(deps.session_message_count),
                ))),
                FilterConfig::StickyUpstream {} => {
                    let mut sticky = StickyUpstream::new(
                        deps.accounts.clone(),
                        deps.sessions.clone(),
                        deps.sticky.clone(),
                    );
                    if deps.shared_account_caps {
                        sticky = sticky.with_shared_caps(deps.limits.clone(), deps.lease_ttl);
                    }
                    let f = Arc::new(sticky);
                    chain.sticky = Some(f.clone());
                    chain.request.push(f);
                }
                FilterConfig::HeaderRewrite { rules } => {
                    let f = Arc::new(HeaderRewrite::new(rules)?);
                    chain.rewrite = Some(f.clone());
                    chain.request.push(f);
                }
                FilterConfig::SseUsage {} => chain.response.push(Arc::new(SseUsage)),
                FilterConfig::Cost {} => chain
                    .response
                    .push(Arc::new(CostFilter::new(deps.prices.clone()))),
            }
        }
        Ok(chain)
    }

    /// Runs the request filters in order; the first rejection wins.
    pub async fn run_request(&self, ctx: &mut RequestCtx, req: &RequestView<'_>) -> Flow {
        for f in &self.request {
            if let Flow::Reject(r) = f.on_request(ctx, req).await {
                return Flow::Reject(r);
            }
        }
        Flow::Continue
    }
}
