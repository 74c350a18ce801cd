//! Path → route: which protocol a request speaks and what the upstream path is (DESIGN §4).
//! Routing looks at the method and path only, never at the body.

use std::borrow::Cow;

use crate::Protocol;

/// What a request asks the relay to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Proxied to an upstream account.
    Api(ApiRoute),
    /// `GET /v1/models`: the models the key may use.
    ListModels,
    /// `GET /v1/responses`, `/responses`: a client opening a Responses WebSocket (Codex tries
    /// one first). The relay serves Responses over HTTP only and answers 426, which Codex
    /// takes as its cue to fall back to HTTP at once; a `GET` without a WebSocket upgrade is
    /// no route.
    ResponsesWebsocket,
    /// `GET /healthz` and Claude Code's `HEAD /` probe: answered at once, no auth.
    Health,
}

/// A proxied API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRoute {
    pub protocol: Protocol,
    /// Path appended to the account's base URL (without query); one of a few fixed ones except
    /// for Gemini, whose path names the model.
    pub upstream_path: Cow<'static, str>,
    /// Model named in the path (Gemini).
    pub path_model: Option<String>,
    /// Streaming decided by the path (Gemini `:streamGenerateContent`).
    pub path_stream: bool,
    /// Whether the call is billed (Anthropic's `count_tokens` and Gemini's `countTokens` are
    /// not).
    pub billed: bool,
}

/// The upstream path of a Responses call (`POST /v1/responses`, `/responses`).
pub const RESPONSES_PATH: &str = "/responses";

/// Matches a request line to a route; `None` is a 404.
pub fn match_route(method: &str, path: &str) -> Option<Route> {
    let path = path.split('?').next().unwrap_or(path);
    match (method, path) {
        ("GET", "/healthz") | ("HEAD", "/healthz") | ("HEAD", "/") => return Some(Route::Health),
        ("GET", "/v1/models") | ("GET", "/models") => return Some(Route::ListModels),
        ("GET", "/v1/responses") | ("GET", "/responses") => return Some(Route::ResponsesWebsocket),
        _ => {}
    }
    if method != "POST" {
        return None;
    }
    let api = |protocol, upstream_path: &'static str, billed| {
        Some(Route::Api(ApiRoute {
            protocol,
            upstream_path: Cow::Borrowed(upstream_path),
            path_model: None,
            path_stream: false,
            billed,
        }))
    };
    match path {
        "/v1/messages" | "/api/v1/messages" => api(Protocol::Anthropic, "/v1/messages", true),
        "/v1/messages/count_tokens" | "/api/v1/messages/count_tokens" => {
            api(Protocol::Anthropic, "/v1/messages/count_tokens", false)
        }
        "/v1/chat/completions" | "/chat/completions" => {
            api(Protocol::OpenaiChat, "/chat/completions", true)
        }
        "/v1/responses" | "/responses" => api(Protocol::OpenaiResponses, RESPONSES_PATH, true),
        "/v1/responses/compact" | "/responses/compact" => {
            api(Protocol::OpenaiResponses, "/responses/compact", true)
        }
        _ => gemini_route(path),
    }
}

/// Whether a request asks to switch its connection to WebSocket (`Upgrade: websocket`, RFC 6455
/// §4.1; the field is a list of protocols, each maybe with a version).
pub fn asks_websocket(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| {
            let name = p.trim().split('/').next().unwrap_or("");
            name.eq_ignore_ascii_case("websocket")
        })
}

/// Gemini: `/v1beta/models/{model}:{method}` (`generateContent`, `streamGenerateContent`,
/// `countTokens`), also under `/v1/models/` and the `/gemini` prefix.
fn gemini_route(path: &str) -> Option<Route> {
    let path = path.strip_prefix("/gemini").unwrap_or(path);
    let rest = path
        .strip_prefix("/v1beta/models/")
        .or_else(|| path.strip_prefix("/v1/models/"))?;
    let (model, method) = rest.rsplit_once(':')?;
    if model.is_empty() || model.contains('/') {
        return None;
    }
    // `countTokens` (google-genai's `models.count_tokens`) is not billed, as Anthropic's
    // `count_tokens` is not.
    let (path_stream, billed) = match method {
        "generateContent" => (false, true),
        "streamGenerateContent" => (true, true),
        "countTokens" => (false, false),
        _ => return None,
    };
    Some(Route::Api(ApiRoute {
        protocol: Protocol::Gemini,
        upstream_path: Cow::Owned(format!("/v1beta/models/{model}:{method}")),
        path_model: Some(model.to_string()),
        path_stream,
        billed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(method: &str, path: &str) -> ApiRoute {
        match match_route(method, path) {
            Some(Route::Api(r)) => r,
            other => panic!("{method} {path}: {other:?}"),
        }
    }

    #[test]
    fn anthropic_paths() {
        for p in ["/v1/messages", "/v1/messages?beta=true", "/api/v1/messages"] {
            let r = api("POST", p);
            assert_eq!(r.protocol, Protocol::Anthropic);
            assert_eq!(r.upstream_path, "/v1/messages");
            assert!(r.billed);
        }
        assert!(!api("POST", "/v1/messages/count_tokens").billed);
    }

    #[test]
    fn openai_paths() {
        assert_eq!(
            api("POST", "/v1/chat/completions").protocol,
            Protocol::OpenaiChat
        );
        for p in ["/v1/responses", "/responses"] {
            assert_eq!(api("POST", p).upstream_path, "/responses");
        }
        for p in ["/v1/responses/compact", "/responses/compact"] {
            assert_eq!(api("POST", p).upstream_path, "/responses/compact");
        }
    }

    #[test]
    fn gemini_paths() {
        let r = api(
            "POST",
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse",
        );
        assert_eq!(r.protocol, Protocol::Gemini);
        assert_eq!(r.path_model.as_deref(), Some("gemini-2.5-pro"));
        assert!(r.path_stream);
        assert_eq!(
            r.upstream_path,
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
        );
        let r = api("POST", "/gemini/v1/models/gemini-2.5-flash:generateContent");
        assert!(!r.path_stream);
        assert_eq!(
            r.upstream_path,
            "/v1beta/models/gemini-2.5-flash:generateContent"
        );
        assert!(r.billed);
        for p in [
            "/v1beta/models/gemini-2.5-flash:countTokens",
            "/v1/models/gemini-2.5-flash:countTokens",
            "/gemini/v1beta/models/gemini-2.5-flash:countTokens?key=k",
        ] {
            let r = api("POST", p);
            assert_eq!(r.protocol, Protocol::Gemini);
            assert!(!r.billed && !r.path_stream, "{p}");
            assert_eq!(
                r.upstream_path,
                "/v1beta/models/gemini-2.5-flash:countTokens"
            );
        }
        assert!(match_route("POST", "/v1beta/models/x:deleteEverything").is_none());
    }

    #[test]
    fn websocket_upgrades() {
        let asks = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(http::header::UPGRADE, v.parse().unwrap());
            }
            asks_websocket(&h)
        };
        assert!(asks(&["websocket"]));
        assert!(asks(&["WebSocket"]));
        assert!(asks(&["h2c, websocket/13"]));
        assert!(asks(&["h2c", "websocket"]));
        assert!(!asks(&[]));
        assert!(!asks(&["h2c"]));
        assert!(!asks(&["websockets"]));
    }

    #[test]
    fn others() {
        assert_eq!(match_route("HEAD", "/"), Some(Route::Health));
        assert_eq!(match_route("GET", "/healthz"), Some(Route::Health));
        assert_eq!(match_route("GET", "/v1/models"), Some(Route::ListModels));
        assert_eq!(match_route("GET", "/v1/messages"), None);
        for p in ["/v1/responses", "/responses"] {
            assert_eq!(match_route("GET", p), Some(Route::ResponsesWebsocket));
        }
        assert_eq!(match_route("GET", "/v1/responses/compact"), None);
        assert_eq!(match_route("POST", "/nope"), None);
    }
}
