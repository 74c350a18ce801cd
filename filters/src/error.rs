//! Client-facing errors, rendered in the shape of the client's own protocol (DESIGN §4).

use crate::Protocol;

/// Every way the relay itself can refuse or fail a request, with its stable `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No, unknown, disabled or expired key (401).
    Authentication,
    /// Platform or model not allowed for the key (403).
    Permission,
    /// Malformed JSON, missing `model`, bad field types (400).
    InvalidRequest,
    /// Body over `max_body_bytes` (413).
    RequestTooLarge,
    /// A request body in a content coding the relay does not read (415).
    UnsupportedEncoding,
    /// Rate or concurrency limit (429).
    RateLimit,
    /// Daily or total cost limit reached (402).
    InsufficientQuota,
    /// No account can serve the request (503).
    NoAvailableAccount,
    /// Every upstream attempt failed (502 unless an upstream status is passed through).
    Upstream,
    /// Unknown route (404).
    NotFound,
    /// A WebSocket asked for where the relay speaks plain HTTP (426).
    UpgradeRequired,
}

impl ErrorKind {
    /// The HTTP status the relay answers with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::Authentication => 401,
            ErrorKind::Permission => 403,
            ErrorKind::InvalidRequest => 400,
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::UnsupportedEncoding => 415,
            ErrorKind::RateLimit => 429,
            ErrorKind::InsufficientQuota => 402,
            ErrorKind::NoAvailableAccount => 503,
            ErrorKind::Upstream => 502,
            ErrorKind::NotFound => 404,
            ErrorKind::UpgradeRequired => 426,
        }
    }

    /// The stable error `type` clients and records see.
    pub fn type_name(self) -> &'static str {
        match self {
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Permission => "permission_error",
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::UnsupportedEncoding => "invalid_request_error",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::InsufficientQuota => "insufficient_quota",
            ErrorKind::NoAvailableAccount => "no_available_account",
            ErrorKind::Upstream => "upstream_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::UpgradeRequired => "invalid_request_error",
        }
    }

    /// OpenAI's `code` field.
    fn openai_code(self) -> &'static str {
        match self {
            ErrorKind::Authentication => "invalid_api_key",
            ErrorKind::Permission => "model_not_allowed",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::UnsupportedEncoding => "unsupported_content_encoding",
            ErrorKind::RateLimit => "rate_limit_exceeded",
            ErrorKind::InsufficientQuota => "insufficient_quota",
            ErrorKind::NoAvailableAccount => "no_available_account",
            ErrorKind::Upstream => "upstream_error",
            ErrorKind::NotFound => "not_found",
            ErrorKind::UpgradeRequired => "websocket_not_supported",
        }
    }

    /// Gemini's (Google RPC) `status` field.
    fn google_status(self) -> &'static str {
        match self {
            ErrorKind::Authentication => "UNAUTHENTICATED",
            ErrorKind::Permission => "PERMISSION_DENIED",
            ErrorKind::InvalidRequest
            | ErrorKind::RequestTooLarge
            | ErrorKind::UnsupportedEncoding => "INVALID_ARGUMENT",
            ErrorKind::RateLimit | ErrorKind::InsufficientQuota => "RESOURCE_EXHAUSTED",
            ErrorKind::NoAvailableAccount => "UNAVAILABLE",
            ErrorKind::Upstream => "UNAVAILABLE",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::UpgradeRequired => "FAILED_PRECONDITION",
        }
    }
}

/// A refusal: what the client gets instead of an upstream answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: ErrorKind,
    pub message: String,
    /// Seconds for a `Retry-After` header (rate limits).
    pub retry_after: Option<u64>,
    /// The limit of a key or its user that refused the request, for the refusal metric.
    pub limit: Option<LimitRefusal>,
}

/// Which limit refused a request: `limit` is `rpm`, `concurrency`, `daily_cost`,
/// `monthly_cost`, `total_cost` or `unpriced_model` (a model without a price, refused under a
/// cost limit), `whose` is `key` or `user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitRefusal {
    pub limit: &'static str,
    pub whose: &'static str,
}

impl Rejection {
    /// A rejection of `kind` with a human-readable message (never a secret).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Rejection {
            kind,
            message: message.into(),
            retry_after: None,
            limit: None,
        }
    }

    /// The same rejection, named as the refusal of a key's or user's limit.
    pub fn of_limit(mut self, limit: &'static str, whose: &'static str) -> Self {
        self.limit = Some(LimitRefusal { limit, whose });
        self
    }

    /// The JSON body in `protocol`'s own error shape.
    pub fn body(&self, protocol: Protocol) -> Vec<u8> {
        error_body(protocol, self.kind, self.kind.status(), &self.message)
    }
}

/// Renders an error body in the client protocol's shape.
pub fn error_body(protocol: Protocol, kind: ErrorKind, status: u16, message: &str) -> Vec<u8> {
    let value = match protocol {
        Protocol::Anthropic => serde_json::json!({
            "type": "error",
            "error": { "type": kind.type_name(), "message": message },
        }),
        Protocol::OpenaiChat | Protocol::OpenaiResponses => serde_json::json!({
            "error": {
                "message": message,
                "type": kind.type_name(),
                "param": null,
                "code": kind.openai_code(),
            }
        }),
        Protocol::Gemini => serde_json::json!({
            "error": { "code": status, "message": message, "status": kind.google_status() }
        }),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The SSE event that ends a stream the upstream cut off midway, in the protocol's shape.
pub fn stream_error_event(protocol: Protocol, message: &str) -> Vec<u8> {
    let kind = ErrorKind::Upstream;
    match protocol {
        Protocol::Anthropic => {
            let body = error_body(protocol, kind, 502, message);
            let mut out = b"event: error\ndata: ".to_vec();
            out.extend_from_slice(&body);
            out.extend_from_slice(b"\n\n");
            out
        }
        Protocol::OpenaiResponses => {
            let value = serde_json::json!({
                "type": "error",
                "code": kind.openai_code(),
                "message": message,
                "param": null,
            });
            let mut out = b"event: error\ndata: ".to_vec();
            out.extend_from_slice(&serde_json::to_vec(&value).unwrap_or_default());
            out.extend_from_slice(b"\n\n");
            out
        }
        Protocol::OpenaiChat | Protocol::Gemini => {
            let mut out = b"data: ".to_vec();
            out.extend_from_slice(&error_body(protocol, kind, 502, message));
            out.extend_from_slice(b"\n\n");
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_per_protocol() {
        let r = Rejection::new(ErrorKind::Authentication, "invalid api key");
        let a: serde_json::Value = serde_json::from_slice(&r.body(Protocol::Anthropic)).unwrap();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "authentication_error");
        assert_eq!(a["error"]["message"], "invalid api key");
        let o: serde_json::Value = serde_json::from_slice(&r.body(Protocol::OpenaiChat)).unwrap();
        assert_eq!(o["error"]["type"], "authentication_error");
        assert_eq!(o["error"]["code"], "invalid_api_key");
        let g: serde_json::Value = serde_json::from_slice(&r.body(Protocol::Gemini)).unwrap();
        assert_eq!(g["error"]["code"], 401);
        assert_eq!(g["error"]["status"], "UNAUTHENTICATED");
    }

    #[test]
    fn statuses() {
        let table = [
            (ErrorKind::Authentication, 401),
            (ErrorKind::Permission, 403),
            (ErrorKind::InvalidRequest, 400),
            (ErrorKind::RequestTooLarge, 413),
            (ErrorKind::RateLimit, 429),
            (ErrorKind::InsufficientQuota, 402),
            (ErrorKind::NoAvailableAccount, 503),
            (ErrorKind::Upstream, 502),
            (ErrorKind::UpgradeRequired, 426),
        ];
        for (kind, status) in table {
            assert_eq!(kind.status(), status, "{kind:?}");
        }
    }

    #[test]
    fn stream_error_is_one_sse_event() {
        let ev = stream_error_event(Protocol::Anthropic, "upstream cut");
        let text = String::from_utf8(ev).unwrap();
        assert!(text.starts_with("event: error\ndata: {"));
        assert!(text.ends_with("\n\n"));
    }
}
