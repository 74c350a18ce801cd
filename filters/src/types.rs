//! Plain data shared by every filter: protocols, account types, token usage and the usage record.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Epoch milliseconds now (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The client-facing API a request speaks, decided by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Anthropic Messages (`/v1/messages`).
    Anthropic,
    /// OpenAI Chat Completions (`/v1/chat/completions`).
    OpenaiChat,
    /// OpenAI Responses (`/v1/responses`).
    OpenaiResponses,
    /// Google Gemini (`:generateContent`).
    Gemini,
}

impl Protocol {
    /// Stable lower-case name used in session keys, records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Anthropic => "anthropic",
            Protocol::OpenaiChat => "openai_chat",
            Protocol::OpenaiResponses => "openai_responses",
            Protocol::Gemini => "gemini",
        }
    }

    /// The platform name used in a key's allowed-platform list.
    pub fn platform(self) -> &'static str {
        match self {
            Protocol::Anthropic => "claude",
            Protocol::OpenaiChat | Protocol::OpenaiResponses => "openai",
            Protocol::Gemini => "gemini",
        }
    }
}

/// Kind of upstream account, as operators name them (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AccountType {
    #[serde(rename = "claude")]
    Claude,
    #[serde(rename = "claude-official")]
    ClaudeOfficial,
    #[serde(rename = "openai")]
    Openai,
    #[serde(rename = "openai-responses")]
    OpenaiResponses,
    #[serde(rename = "gemini")]
    Gemini,
}

impl AccountType {
    pub const ALL: [AccountType; 5] = [
        AccountType::Claude,
        AccountType::ClaudeOfficial,
        AccountType::Openai,
        AccountType::OpenaiResponses,
        AccountType::Gemini,
    ];

    /// The name stored in the database and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountType::Claude => "claude",
            AccountType::ClaudeOfficial => "claude-official",
            AccountType::Openai => "openai",
            AccountType::OpenaiResponses => "openai-responses",
            AccountType::Gemini => "gemini",
        }
    }

    /// Parses an operator-facing name.
    pub fn parse(s: &str) -> Option<AccountType> {
        AccountType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Whether accounts of this type can serve requests of `protocol`.
    pub fn serves(self, protocol: Protocol) -> bool {
        matches!(
            (self, protocol),
            (
                AccountType::Claude | AccountType::ClaudeOfficial,
                Protocol::Anthropic
            ) | (AccountType::Openai, Protocol::OpenaiChat)
                | (
                    AccountType::Openai | AccountType::OpenaiResponses,
                    Protocol::OpenaiResponses
                )
                | (AccountType::Gemini, Protocol::Gemini)
        )
    }

    /// The platform (a key's allowed-platform name) its accounts serve.
    pub fn platform(self) -> &'static str {
        match self {
            AccountType::Claude | AccountType::ClaudeOfficial => Protocol::Anthropic.platform(),
            AccountType::Openai | AccountType::OpenaiResponses => Protocol::OpenaiChat.platform(),
            AccountType::Gemini => Protocol::Gemini.platform(),
        }
    }

    /// Default upstream base URL of this account type.
    pub fn default_base_url(self) -> &'static str {
        match self {
            AccountType::Claude | AccountType::ClaudeOfficial => "https://api.anthropic.com",
            AccountType::Openai => "https://api.openai.com/v1",
            AccountType::OpenaiResponses => "https://chatgpt.com/backend-api/codex",
            AccountType::Gemini => "https://generativelanguage.googleapis.com",
        }
    }
}

/// Token counts of one request, normalised across protocols, and the server-side tool calls
/// the provider bills apart from tokens.
///
/// `input_tokens` counts only uncached input (billed at the input price); cache writes and
/// cache reads are counted apart, so that the sum of the token fields is the whole prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Cache writes with the 5-minute TTL (Anthropic `ephemeral_5m_input_tokens`, or the whole
    /// `cache_creation_input_tokens` when the split is absent).
    pub cache_write_5m_tokens: u64,
    /// Cache writes with the 1-hour TTL (Anthropic `ephemeral_1h_input_tokens`).
    pub cache_write_1h_tokens: u64,
    pub cache_read_tokens: u64,
    /// Reasoning tokens, already included in `output_tokens` (informational).
    pub reasoning_tokens: u64,
    /// Web searches the provider ran for the answer, billed per search (Anthropic
    /// `usage.server_tool_use.web_search_requests`, OpenAI Responses `web_search_call` items).
    /// Absent from records spooled before it existed.
    #[serde(default)]
    pub web_search_requests: u64,
}

/// A sampling pass a request ran besides its answer, which the provider reports and bills
/// apart (Anthropic `usage.iterations`): a compaction's summary, on the request's own model, or
/// an advisor's sub-inference, on the advisor's. Each is priced on its own (its own prompt
/// against a long-context threshold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubUsage {
    /// The model that ran it; `None`: the request's own.
    pub model: Option<String>,
    pub tokens: TokenUsage,
}

/// Most tokens (or searches) one field of one request may count. No request comes near it; an upstream that
/// reports more is wrong, and sums of such counts would overflow the daily rollups (PostgreSQL
/// then refuses the whole batch of records).
pub const MAX_TOKENS: u64 = 1_000_000_000_000;

impl TokenUsage {
    /// The prompt's length in tokens: uncached input, cache reads and cache writes (what a
    /// long-context price tier is chosen by).
    pub fn prompt_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_read_tokens)
            .saturating_add(self.cache_write_5m_tokens)
            .saturating_add(self.cache_write_1h_tokens)
    }

    /// Both counts added, field by field (saturating).
    pub fn plus(&self, other: &TokenUsage) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
            cache_write_5m_tokens: self
                .cache_write_5m_tokens
                .saturating_add(other.cache_write_5m_tokens),
            cache_write_1h_tokens: self
                .cache_write_1h_tokens
                .saturating_add(other.cache_write_1h_tokens),
            cache_read_tokens: self
                .cache_read_tokens
                .saturating_add(other.cache_read_tokens),
            reasoning_tokens: self.reasoning_tokens.saturating_add(other.reasoning_tokens),
            web_search_requests: self
                .web_search_requests
                .saturating_add(other.web_search_requests),
        }
        .clamped()
        .0
    }

    /// The counts, each at most [`MAX_TOKENS`]; `true` when one was cut down.
    pub fn clamped(self) -> (TokenUsage, bool) {
        let mut cut = false;
        let mut clamp = |n: u64| {
            cut |= n > MAX_TOKENS;
            n.min(MAX_TOKENS)
        };
        let u = TokenUsage {
            input_tokens: clamp(self.input_tokens),
            output_tokens: clamp(self.output_tokens),
            cache_write_5m_tokens: clamp(self.cache_write_5m_tokens),
            cache_write_1h_tokens: clamp(self.cache_write_1h_tokens),
            cache_read_tokens: clamp(self.cache_read_tokens),
            reasoning_tokens: clamp(self.reasoning_tokens),
            web_search_requests: clamp(self.web_search_requests),
        };
        (u, cut)
    }

    /// Whether the upstream reported any usage at all.
    pub fn is_empty(&self) -> bool {
        *self == TokenUsage::default()
    }
}

/// One served request, as booked (DESIGN §9). Money is integer micro-USD.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Record id: a uuid v7 the relay made, unique; the client got it as
    /// `x-relay-request-id`.
    pub id: String,
    /// The client's `x-request-id`, when it sent one (passed upstream, and echoed unless the
    /// upstream answered with its own). Neither unique nor trusted: a client may send the same
    /// one twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Epoch milliseconds when the request arrived.
    pub created_at: i64,
    pub user_id: Option<String>,
    pub api_key_id: Option<String>,
    pub account_id: Option<String>,
    pub session_key: Option<String>,
    /// `Protocol::as_str()` (borrowed when booked, owned when read back).
    pub protocol: Cow<'static, str>,
    pub requested_model: Option<String>,
    pub upstream_model: Option<String>,
    pub stream: bool,
    /// HTTP status sent to the client.
    pub status: u16,
    pub usage: TokenUsage,
    /// Cost before the user's price rate.
    pub base_cost: i64,
    /// Cost the user is charged: `base_cost` × price rate.
    pub billed_cost: i64,
    /// The user's price rate in ten-thousandths (10000 = 1.0) at the time of the request.
    pub price_rate: i64,
    pub latency_ms: i64,
    /// Milliseconds until the first response byte reached the client.
    pub ttfb_ms: Option<i64>,
    pub failover_count: u32,
    /// Stable error type when the request failed (`upstream_error`, `rate_limit_error`, ...).
    pub error_type: Option<Cow<'static, str>>,
    /// The model had no price: cost 0.
    pub unpriced: bool,
    /// Token counts are incomplete (client went away and the upstream was not drained).
    pub estimated: bool,
    /// The service tier the provider says it served the request at (`priority`, `flex`,
    /// `standard`), which priced it; for an answer cut before it named one, the tier the
    /// request asked for (as its cost was held); absent when neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<crate::cost::ServiceTier>,
    /// The id the provider knows the request by, from its answer's head (Anthropic
    /// `request-id`, OpenAI `x-request-id`): what its support asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_request_id: Option<String>,
    /// The id of the answer itself, from its body (`msg_…`, `chatcmpl-…`, `resp_…`, Gemini's
    /// `responseId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_id: Option<String>,
    /// The passes it ran on other models than its own (an advisor's), as a JSON array of
    /// `{"model", "input_tokens", "output_tokens", "cache_write_5m_tokens",
    /// "cache_write_1h_tokens", "cache_read_tokens"}` ([`passes_json`]): their tokens are in
    /// the costs, not in `usage` (its own model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passes: Option<String>,
}

/// The passes of `subs` on other models, as [`UsageRecord::passes`] holds them; `None` when
/// there are none.
pub fn passes_json(subs: &[SubUsage]) -> Option<String> {
    let passes: Vec<serde_json::Value> = subs
        .iter()
        .filter_map(|p| {
            let model = p.model.as_deref()?;
            let t = &p.tokens;
            Some(serde_json::json!({
                "model": model,
                "input_tokens": t.input_tokens,
                "output_tokens": t.output_tokens,
                "cache_write_5m_tokens": t.cache_write_5m_tokens,
                "cache_write_1h_tokens": t.cache_write_1h_tokens,
                "cache_read_tokens": t.cache_read_tokens,
            }))
        })
        .collect();
    (!passes.is_empty()).then(|| serde_json::Value::Array(passes).to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    /// A record spooled before web searches were counted still reads (as none).
    #[test]
    fn a_record_spooled_without_web_searches_reads() {
        let line = r#"{"id":"r1","created_at":1,"user_id":null,"api_key_id":null,"account_id":null,"session_key":null,"protocol":"anthropic","requested_model":null,"upstream_model":null,"stream":false,"status":200,"usage":{"input_tokens":3,"output_tokens":4,"cache_write_5m_tokens":0,"cache_write_1h_tokens":0,"cache_read_tokens":0,"reasoning_tokens":0},"base_cost":5,"billed_cost":5,"price_rate":10000,"latency_ms":1,"ttfb_ms":null,"failover_count":0,"error_type":null,"unpriced":false,"estimated":false}"#;
        let record: UsageRecord = serde_json::from_str(line).unwrap();
        assert_eq!(record.usage.input_tokens, 3);
        assert_eq!(record.usage.web_search_requests, 0);
        let again: UsageRecord =
            serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        assert_eq!(again, record);
    }

    #[test]
    fn web_searches_are_clamped_like_tokens() {
        let (u, cut) = TokenUsage {
            web_search_requests: u64::MAX,
            ..TokenUsage::default()
        }
        .clamped();
        assert!(cut);
        assert_eq!(u.web_search_requests, MAX_TOKENS);
    }
}
