//! Path → route: which protocol a request speaks and what the upstream path is (DESIGN §4).
//! Routing looks at the method and path only, never at the body.

use std::borrow::Cow;

use crate::Protocol;

/// What a request asks the relay to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Proxied to an upstream account.
    Api(ApiRoute),
    /// The models the key may use, or one of them: `GET /v1/models[/{model}]`,
    /// `/models[/{model}]`, and Gemini's `GET /v1beta/models[/{model}]` (also under the
    /// `/gemini` prefix).
    Models(ModelsRoute),
    /// `GET /v1/responses`, `/responses`: a client opening a Responses WebSocket (Codex tries
    /// one first). The relay serves Responses over HTTP only and answers 426, which Codex
    /// takes as its cue to fall back to HTTP at once; a `GET` without a WebSocket upgrade is
    /// no route.
    ResponsesWebsocket,
    /// `GET /healthz` and Claude Code's `HEAD /` probe: answered at once, no auth.
    Health,
}

/// A model list or lookup, answered by the relay itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelsRoute {
    /// The one model asked for (`.../models/{model}`); `None` lists them.
    pub model: Option<String>,
    /// Asked under Gemini's own paths (`/v1beta/models`, `/gemini/...`): answered in
    /// Gemini's shape whatever the headers.
    pub gemini: bool,
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
        ("GET", "/v1/responses") | ("GET", "/responses") => return Some(Route::ResponsesWebsocket),
        _ => {}
    }
    if method == "GET" {
        if let Some(r) = models_route(path) {
            return Some(Route::Models(r));
        }
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

/// `GET` of a model list or of one model: `/v1/models`, `/models` and, Gemini's,
/// `/v1beta/models`, each maybe followed by `/{model}`; Gemini's also under `/gemini` (with
/// `/v1/models` as well).
fn models_route(path: &str) -> Option<ModelsRoute> {
    let (path, prefixed) = match path.strip_prefix("/gemini") {
        Some(rest) => (rest, true),
        None => (path, false),
    };
    let (rest, gemini) = if let Some(rest) = path.strip_prefix("/v1beta/models") {
        (rest, true)
    } else if let Some(rest) = path.strip_prefix("/v1/models") {
        (rest, prefixed)
    } else if !prefixed {
        (path.strip_prefix("/models")?, false)
    } else {
        return None;
    };
    let model = match rest {
        "" | "/" => None,
        rest => {
            let model = rest.strip_prefix('/')?;
            if model.contains('/') {
                return None;
            }
            Some(model.to_string())
        }
    };
    Some(ModelsRoute { model, gemini })
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
        let models = |model: Option<&str>, gemini| {
            Some(Route::Models(ModelsRoute {
                model: model.map(str::to_string),
                gemini,
            }))
        };
        assert_eq!(match_route("GET", "/v1/models"), models(None, false));
        assert_eq!(match_route("GET", "/models?limit=20"), models(None, false));
        assert_eq!(
            match_route("GET", "/v1/models/claude-sonnet-4-5"),
            models(Some("claude-sonnet-4-5"), false)
        );
        assert_eq!(match_route("GET", "/v1beta/models"), models(None, true));
        assert_eq!(
            match_route("GET", "/v1beta/models/gemini-2.5-flash?key=k"),
            models(Some("gemini-2.5-flash"), true)
        );
        assert_eq!(match_route("GET", "/gemini/v1/models/"), models(None, true));
        assert_eq!(
            match_route("GET", "/gemini/v1beta/models/gemini-2.5-pro"),
            models(Some("gemini-2.5-pro"), true)
        );
        assert_eq!(match_route("GET", "/gemini/models"), None);
        assert_eq!(match_route("GET", "/v1/models/a/b"), None);
        assert_eq!(match_route("GET", "/v1/modelsx"), None);
        assert_eq!(match_route("POST", "/v1/models"), None);
        assert_eq!(match_route("GET", "/v1/messages"), None);
        for p in ["/v1/responses", "/responses"] {
            assert_eq!(match_route("GET", p), Some(Route::ResponsesWebsocket));
        }
        assert_eq!(match_route("GET", "/v1/responses/compact"), None);
        assert_eq!(match_route("POST", "/nope"), None);
    }
}
