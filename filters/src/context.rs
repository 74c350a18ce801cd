//! The typed request context every filter reads and writes; filters talk to each other only
//! through it.

use std::sync::Arc;
use std::time::Instant;

use crate::accounts::{Account, Demand};
use crate::api_key_auth::KeyEntry;
use crate::route::ApiRoute;
use crate::sse_usage::UsageMeter;
use crate::{Protocol, TokenUsage};

/// Everything the chain learns about one request, grouped by the phase that fills it.
pub struct RequestCtx {
    /// The relay's own id of the request, a uuid v7: the usage record's id, answered as
    /// `x-relay-request-id`, and sent upstream as `x-request-id` when the client sent none.
    pub request_id: String,
    /// The client's own `x-request-id`, when it sent a usable one: sent upstream as it came,
    /// kept in the usage record, and echoed to the client when the upstream answers none.
    pub client_request_id: Option<String>,
    /// When the request arrived.
    pub started: Instant,
    /// Epoch milliseconds when the request arrived.
    pub started_ms: i64,
    pub route: ApiRoute,
    pub request: RequestInfo,
    /// Filled by `api_key_auth`.
    pub auth: Option<AuthInfo>,
    /// Filled by `session_hash`.
    pub session: SessionInfo,
    /// Filled by `sticky_upstream` and `header_rewrite`, once per attempt.
    pub upstream: UpstreamInfo,
    /// Filled by the response filters.
    pub usage: UsageInfo,
    /// Filled by `key_limits`: what must be given back at the end.
    pub limits: LimitsInfo,
}

/// Limit bookkeeping of one request.
#[derive(Debug, Default)]
pub struct LimitsInfo {
    pub slot: Option<crate::key_limits::SlotLease>,
    /// The estimated cost held against the key's cost limits until the request is booked.
    pub cost: Option<crate::key_limits::CostHold>,
    /// The same, held against the cost limits of the key's user (over all its keys).
    pub user_cost: Option<crate::key_limits::CostHold>,
    /// Taken in place of `slot` when the client left and the answer is drained (see
    /// `KeyLimits::hand_over_to_drain`).
    pub drain_slot: Option<crate::key_limits::SlotLease>,
}

/// What the body said (the few fields routing needs, owned).
#[derive(Debug, Default, Clone)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    pub previous_response_id: Option<String>,
    /// Chat: the client asked for the usage chunk itself.
    pub include_usage_requested: bool,
    /// Responses: `store: false`, the answer cannot be continued by `previous_response_id`.
    pub store_off: bool,
    pub body_len: usize,
    /// The service tier the body asks for (OpenAI `service_tier`, Anthropic `speed`): what a
    /// cut answer that never said which tier it ran at is billed at, as its cost was held.
    pub service_tier: crate::cost::ServiceTier,
}

/// The authenticated key and its owner.
#[derive(Debug, Clone)]
pub struct AuthInfo {
    pub key: Arc<KeyEntry>,
}

/// Session identity and the outcome of the sticky lookup.
#[derive(Debug, Default, Clone)]
pub struct SessionInfo {
    /// `{api_key_id}:{protocol}:{digest}`, or none when stickiness is off.
    pub key: Option<String>,
    pub sticky: Option<StickyResult>,
    /// The account the conversation is bound to, as this request left the binding.
    pub bound: Option<String>,
    /// The Responses answer's id is stored with its account.
    pub response_remembered: bool,
}

/// How the account was found (`relay_sticky_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickyResult {
    Hit,
    Miss,
    Rebind,
    /// The conversation's account could not take this one request (another model or
    /// protocol, or at its concurrency cap): served elsewhere, the binding kept.
    Detour,
    /// A continued Responses answer (`previous_response_id`), sent to the account holding it.
    Pinned,
}

impl StickyResult {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            StickyResult::Hit => "hit",
            StickyResult::Miss => "miss",
            StickyResult::Rebind => "rebind",
            StickyResult::Detour => "detour",
            StickyResult::Pinned => "pinned",
        }
    }
}

/// The account of the current attempt and the request prepared for it.
#[derive(Default)]
pub struct UpstreamInfo {
    pub account: Option<Arc<Account>>,
    /// Accounts tried already in this request (never tried twice).
    pub tried: Vec<String>,
    pub request: Option<UpstreamRequest>,
    pub failovers: u32,
    /// Model sent upstream after the account's model map.
    pub model: Option<String>,
    /// The slot taken on `account` when it was picked (its concurrency cap holds atomically).
    pub lease: Option<crate::accounts::InflightLease>,
}

/// Everything needed to send the request to one account.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub tls: bool,
    pub host: std::sync::Arc<str>,
    pub port: u16,
    pub method: &'static str,
    pub path_and_query: String,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// A rewritten body (model mapped, usage requested); `None` sends the client's body as is.
    pub body: Option<bytes::Bytes>,
}

/// Metering and cost, settled at the end.
#[derive(Default)]
pub struct UsageInfo {
    pub meter: Option<UsageMeter>,
    pub tokens: TokenUsage,
    pub upstream_model: Option<String>,
    pub response_id: Option<String>,
    /// The provider's id of the request, from the head of the answer passed on.
    pub upstream_request_id: Option<String>,
    pub base_cost: i64,
    pub billed_cost: i64,
    pub unpriced: bool,
    pub estimated: bool,
    /// The kind of an error the upstream reported inside a successful answer.
    pub upstream_error: Option<String>,
    /// The service tier the upstream says it served the request at, when it named one.
    pub service_tier: Option<crate::cost::ServiceTier>,
    /// Tokens spent on other models than the request's (an advisor's), priced at theirs.
    pub sub_usage: Vec<crate::types::SubUsage>,
    /// Chat: the relay asked upstream for the usage chunk the client did not ask for, and
    /// removes it from the stream (DESIGN §9).
    pub strip_usage_chunk: Option<crate::sse_usage::UsageChunkStripper>,
}

impl RequestCtx {
    /// The id that goes upstream in `x-request-id` (see `header_rewrite`): the client's, else
    /// the relay's own.
    pub fn sent_request_id(&self) -> &str {
        self.client_request_id
            .as_deref()
            .unwrap_or(&self.request_id)
    }

    /// A fresh context for a proxied route.
    pub fn new(request_id: String, route: ApiRoute, started_ms: i64) -> Self {
        RequestCtx {
            request_id,
            client_request_id: None,
            started: Instant::now(),
            started_ms,
            route,
            request: RequestInfo::default(),
            auth: None,
            session: SessionInfo::default(),
            upstream: UpstreamInfo::default(),
            usage: UsageInfo::default(),
            limits: LimitsInfo::default(),
        }
    }

    /// The `x-request-id` the relay answers with when the upstream gave none: the client's
    /// own, else the relay's.
    pub fn echoed_request_id(&self) -> &str {
        self.client_request_id
            .as_deref()
            .unwrap_or(&self.request_id)
    }

    /// The client protocol.
    pub fn protocol(&self) -> Protocol {
        self.route.protocol
    }

    /// The model the client asked for (body, or path for Gemini).
    pub fn requested_model(&self) -> Option<&str> {
        requested_model(&self.route, &self.request)
    }

    /// What this request needs of the account that serves it.
    pub fn demand(&self) -> Demand<'_> {
        Demand {
            protocol: self.route.protocol,
            model: self.requested_model(),
            unstreamed_response: self.route.protocol == Protocol::OpenaiResponses
                && self.route.upstream_path == crate::route::RESPONSES_PATH
                && !self.request.stream,
        }
    }
}

/// The model a request asks for. A Gemini request names it in its path, which is what the
/// upstream runs: a `model` its body names too is never taken instead, or a key allowed one
/// model could ask the path for another.
pub fn requested_model<'a>(route: &'a ApiRoute, request: &'a RequestInfo) -> Option<&'a str> {
    route.path_model.as_deref().or(request.model.as_deref())
}
