//! `header_rewrite`: turns the client's request into the request for the chosen account:
//! client credentials and hop-by-hop / client-IP headers out, the account's credential, host,
//! path and model in (DESIGN §8).

use std::borrow::Cow;

use async_trait::async_trait;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::accounts::Account;
use crate::chain::{Flow, RequestFilter, RequestView};
use crate::context::{RequestCtx, UpstreamRequest};
use crate::error::{ErrorKind, Rejection};
use crate::request_body::rewrite_model;
use crate::{AccountType, Protocol};

/// Headers never forwarded upstream. The account's credential replaces the client's, so what
/// scopes the client's credential goes too: `openai-organization` and `openai-project` (the
/// openai SDKs send them from `OPENAI_ORG_ID` / `OPENAI_PROJECT_ID`; a foreign organization
/// makes OpenAI answer 401 to the account) and `chatgpt-account-id` (set from the account).
const DROPPED: &[&str] = &[
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "openai-organization",
    "openai-project",
    "chatgpt-account-id",
    "cookie",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "forwarded",
    "x-real-ip",
    "accept-encoding",
];

/// Anthropic's beta flag for OAuth tokens (`claude-official` accounts).
const OAUTH_BETA: &str = "oauth-2025-04-20";

/// Operator rules applied after the built-in rewriting.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    /// Set (replace) these headers.
    #[serde(default)]
    pub set: Vec<(String, String)>,
    /// Append these headers.
    #[serde(default)]
    pub add: Vec<(String, String)>,
    /// Remove these headers.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// The filter.
#[derive(Default)]
pub struct HeaderRewrite {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderRewrite {
    /// Validates `rules` into a filter.
    pub fn new(rules: &HeaderRules) -> Result<Self, String> {
        let pair = |(k, v): &(String, String)| -> Result<(HeaderName, HeaderValue), String> {
            Ok((
                HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name {k}"))?,
                HeaderValue::from_str(v).map_err(|_| format!("bad value for header {k}"))?,
            ))
        };
        Ok(HeaderRewrite {
            set: rules.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: rules.add.iter().map(pair).collect::<Result<_, _>>()?,
            remove: rules
                .remove
                .iter()
                .map(|k| {
                    HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name {k}"))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// Builds the upstream request for `account`.
    pub fn build(
        &self,
        ctx: &mut RequestCtx,
        account: &Account,
        headers: &HeaderMap,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<UpstreamRequest, Rejection> {
        let mut out: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(headers.len() + 4);
        for (name, value) in headers {
            let n = name.as_str();
            if DROPPED.contains(&n) || n.starts_with("x-forwarded-") {
                continue;
            }
            // A client id the relay did not take (not a plain token) does not go upstream
            // either: the relay's own goes in its place, so upstream logs match the record.
            if n == "x-request-id" && ctx.client_request_id.is_none() {
                continue;
            }
            out.push((name.clone(), value.clone()));
        }
        let invalid = || {
            Rejection::new(
                ErrorKind::Upstream,
                "account credential is not a valid header value",
            )
        };
        let value = |s: &str| HeaderValue::from_str(s).map_err(|_| invalid());
        let credential = &account.credential;
        match account.account_type {
            AccountType::Claude => {
                let v = credential.header_value().ok_or_else(invalid)?;
                out.push((HeaderName::from_static("x-api-key"), v));
            }
            AccountType::ClaudeOfficial => {
                let v = credential.bearer_value().ok_or_else(invalid)?;
                out.push((http::header::AUTHORIZATION, v));
                out.retain(|(n, _)| n.as_str() != "anthropic-beta");
                let betas = value(&merged_betas(headers))?;
                out.push((HeaderName::from_static("anthropic-beta"), betas));
            }
            AccountType::Openai | AccountType::OpenaiResponses => {
                let v = credential.bearer_value().ok_or_else(invalid)?;
                out.push((http::header::AUTHORIZATION, v));
                // Only a ChatGPT token (a JWT) goes with the account id header.
                if let Some(id) = account
                    .chatgpt_account_id
                    .as_ref()
                    .filter(|_| credential.is_jwt())
                {
                    out.push((HeaderName::from_static("chatgpt-account-id"), value(id)?));
                }
            }
            AccountType::Gemini => {
                let v = credential.header_value().ok_or_else(invalid)?;
                out.push((HeaderName::from_static("x-goog-api-key"), v));
            }
        }
        if ctx.protocol() == Protocol::Anthropic && !headers.contains_key("anthropic-version") {
            out.push((
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static("2023-06-01"),
            ));
        }
        out.push((
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        ));
        if ctx.client_request_id.is_none() {
            out.push((
                HeaderName::from_static("x-request-id"),
                value(&ctx.request_id)?,
            ));
        }
        out.push((http::header::HOST, account.base_url.authority.clone()));
        for name in &self.remove {
            out.retain(|(n, _)| n != name);
        }
        for (name, v) in &self.set {
            out.retain(|(n, _)| n != name);
            out.push((name.clone(), v.clone()));
        }
        out.extend(self.add.iter().cloned());

        // Model map: rewrite the body's model (or the Gemini path's) when the account renames it.
        let mut path: Cow<'_, str> = Cow::Borrowed(&ctx.route.upstream_path);
        let mut new_body = None;
        // The fields `requested_model()` reads, borrowed apart from the ones written below.
        let requested = crate::context::requested_model(&ctx.route, &ctx.request);
        let mut upstream_model = requested.map(str::to_string);
        if let Some(model) = requested {
            let mapped = account.map_model(model);
            if mapped != model {
                if ctx.route.protocol == Protocol::Gemini {
                    path = Cow::Owned(path.replacen(
                        &format!("/models/{model}:"),
                        &format!("/models/{mapped}:"),
                        1,
                    ));
                } else {
                    new_body = rewrite_model(body, mapped).map(bytes::Bytes::from);
                }
                upstream_model = Some(mapped.to_string());
            }
        }
        ctx.upstream.model = upstream_model;
        // Chat streams carry usage only when asked: ask for it, and hide the extra chunk from a
        // client that did not (DESIGN §9).
        if ctx.protocol() == Protocol::OpenaiChat
            && ctx.request.stream
            && !ctx.request.include_usage_requested
        {
            let base: &[u8] = new_body.as_deref().unwrap_or(body);
            if let Some(b) = crate::request_body::add_stream_include_usage(base) {
                new_body = Some(bytes::Bytes::from(b));
                ctx.usage.strip_usage_chunk = Some(Default::default());
            }
        }
        let mut path_and_query = format!("{}{}", account.base_url.path_prefix, path);
        if let Some(q) = query {
            // The client's `?key=` is a relay credential: never forwarded.
            let kept: Vec<&str> = q
                .split('&')
                .filter(|kv| !kv.is_empty() && !kv.starts_with("key="))
                .collect();
            if !kept.is_empty() {
                path_and_query.push('?');
                path_and_query.push_str(&kept.join("&"));
            }
        }
        Ok(UpstreamRequest {
            tls: account.base_url.tls,
            host: account.base_url.host.clone(),
            port: account.base_url.port,
            method: "POST",
            path_and_query,
            headers: out,
            body: new_body,
        })
    }
}

/// One `anthropic-beta` value: every beta of the client's lines (a client may send several
/// lines, each a comma-separated list), trimmed, each once and in order, and `OAUTH_BETA` at the
/// end unless the client named it. Values that are not visible ASCII name no beta.
fn merged_betas(headers: &HeaderMap) -> String {
    let mut joined = String::new();
    // Looked up in a set, not in `joined`: a head of thousands of tiny betas stays linear.
    let mut seen = std::collections::HashSet::new();
    let lines = headers.get_all("anthropic-beta").iter();
    for beta in lines
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        if !seen.insert(beta) {
            continue;
        }
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(beta);
    }
    if !seen.contains(OAUTH_BETA) {
        if !joined.is_empty() {
            joined.push(',');
        }
        joined.push_str(OAUTH_BETA);
    }
    joined
}

#[async_trait]
impl RequestFilter for HeaderRewrite {
    fn name(&self) -> &'static str {
        "header_rewrite"
    }

    async fn on_request(&self, ctx: &mut RequestCtx, req: &RequestView<'_>) -> Flow {
        let Some(account) = ctx.upstream.account.clone() else {
            return Flow::Continue;
        };
        match self.build(ctx, &account, req.headers, req.query, req.body) {
            Ok(r) => {
                ctx.upstream.request = Some(r);
                Flow::Continue
            }
            Err(r) => Flow::Reject(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::{tests::account, BaseUrl, Credential};
    use crate::route::ApiRoute;
    use std::sync::Arc;

    fn ctx(protocol: Protocol, path: &str) -> RequestCtx {
        let route = ApiRoute {
            protocol,
            upstream_path: path.to_string().into(),
            path_model: None,
            path_stream: false,
            billed: true,
        };
        let mut c = RequestCtx::new("req-1".into(), route, 0);
        c.request.model = Some("claude-sonnet-4-5".into());
        c
    }

    fn client_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-api-key", "sk-relay-client"),
            ("authorization", "Bearer sk-relay-client"),
            ("cookie", "a=b"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("expect", "100-continue"),
            ("accept-encoding", "gzip, br"),
            ("anthropic-beta", "claude-code-20250219"),
            ("x-claude-code-session-id", "abc"),
            ("connection", "keep-alive"),
            ("host", "relay.example"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        h
    }

    fn get<'a>(r: &'a UpstreamRequest, name: &str) -> Vec<&'a str> {
        r.headers
            .iter()
            .filter(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn claude_api_key_account() {
        let acc = account("a", AccountType::Claude, 50, 1);
        let mut c = ctx(Protocol::Anthropic, "/v1/messages");
        let r = HeaderRewrite::default()
            .build(&mut c, &acc, &client_headers(), Some("beta=true"), b"{}")
            .unwrap();
        assert_eq!(get(&r, "x-api-key"), ["secret-a"]);
        assert!(get(&r, "authorization").is_empty());
        for gone in [
            "cookie",
            "x-forwarded-for",
            "x-real-ip",
            "forwarded",
            "expect",
            "connection",
        ] {
            assert!(get(&r, gone).is_empty(), "{gone} forwarded");
        }
        assert_eq!(get(&r, "accept-encoding"), ["identity"]);
        assert_eq!(get(&r, "anthropic-version"), ["2023-06-01"]);
        assert_eq!(get(&r, "x-request-id"), ["req-1"]);
        assert_eq!(get(&r, "host"), ["127.0.0.1:9"]);
        // The client's id goes upstream as it came when the proxy took it; one it did not take
        // (not a plain token) is replaced by the relay's own.
        let mut with_id = client_headers();
        with_id.insert("x-request-id", "client-1".parse().unwrap());
        c.client_request_id = Some("client-1".into());
        let sent = HeaderRewrite::default()
            .build(&mut c, &acc, &with_id, None, b"{}")
            .unwrap();
        assert_eq!(get(&sent, "x-request-id"), ["client-1"]);
        with_id.insert("x-request-id", "a b=c".parse().unwrap());
        c.client_request_id = None;
        let sent = HeaderRewrite::default()
            .build(&mut c, &acc, &with_id, None, b"{}")
            .unwrap();
        assert_eq!(get(&sent, "x-request-id"), ["req-1"]);
        assert_eq!(get(&r, "x-claude-code-session-id"), ["abc"]);
        assert_eq!(r.path_and_query, "/v1/messages?beta=true");
        assert!(r.body.is_none());
    }

    #[test]
    fn oauth_account_gets_bearer_and_beta() {
        let acc = account("o", AccountType::ClaudeOfficial, 50, 1);
        let mut c = ctx(Protocol::Anthropic, "/v1/messages");
        let r = HeaderRewrite::default()
            .build(&mut c, &acc, &client_headers(), None, b"{}")
            .unwrap();
        assert_eq!(get(&r, "authorization"), ["Bearer secret-o"]);
        assert!(get(&r, "x-api-key").is_empty());
        assert_eq!(
            get(&r, "anthropic-beta"),
            ["claude-code-20250219,oauth-2025-04-20"]
        );
    }

    #[test]
    fn oauth_account_merges_every_beta_line() {
        let acc = account("o", AccountType::ClaudeOfficial, 50, 1);
        // (client's anthropic-beta lines, the one line sent upstream)
        let cases: &[(&[&str], &str)] = &[
            (&[], "oauth-2025-04-20"),
            (&[""], "oauth-2025-04-20"),
            (
                &["claude-code-20250219", "context-1m-2025-08-07"],
                "claude-code-20250219,context-1m-2025-08-07,oauth-2025-04-20",
            ),
            (
                &[
                    " claude-code-20250219 , interleaved-thinking-2025-05-14",
                    "oauth-2025-04-20,claude-code-20250219",
                    ",fine-grained-tool-streaming-2025-05-14,",
                ],
                "claude-code-20250219,interleaved-thinking-2025-05-14,oauth-2025-04-20,\
                 fine-grained-tool-streaming-2025-05-14",
            ),
            (
                &["oauth-2025-04-20", "context-1m-2025-08-07"],
                "oauth-2025-04-20,context-1m-2025-08-07",
            ),
        ];
        for (lines, want) in cases {
            let mut h = client_headers();
            h.remove("anthropic-beta");
            for l in *lines {
                h.append("anthropic-beta", l.parse().unwrap());
            }
            let mut c = ctx(Protocol::Anthropic, "/v1/messages");
            let r = HeaderRewrite::default()
                .build(&mut c, &acc, &h, None, b"{}")
                .unwrap();
            assert_eq!(get(&r, "anthropic-beta"), [*want], "{lines:?}");
        }
    }

    #[test]
    fn openai_prefix_and_gemini_key_query() {
        let mut acc = Arc::try_unwrap(account("x", AccountType::Openai, 50, 1)).unwrap();
        acc.base_url = BaseUrl::parse("https://example.com/openai").unwrap();
        let mut c = ctx(Protocol::OpenaiResponses, "/responses");
        let r = HeaderRewrite::default()
            .build(&mut c, &acc, &client_headers(), None, b"{}")
            .unwrap();
        assert_eq!(r.path_and_query, "/openai/responses");
        assert!(r.tls);
        assert_eq!(get(&r, "host"), ["example.com"]);
        let g = account("g", AccountType::Gemini, 50, 1);
        let mut c = ctx(Protocol::Gemini, "/v1beta/models/m:streamGenerateContent");
        let r = HeaderRewrite::default()
            .build(
                &mut c,
                &g,
                &HeaderMap::new(),
                Some("alt=sse&key=sk-relay-x"),
                b"{}",
            )
            .unwrap();
        assert_eq!(
            r.path_and_query,
            "/v1beta/models/m:streamGenerateContent?alt=sse"
        );
        assert_eq!(get(&r, "x-goog-api-key"), ["secret-g"]);
    }

    #[test]
    fn openai_scoping_headers_of_the_client_are_dropped() {
        let mut h = client_headers();
        h.insert("openai-organization", "org-client".parse().unwrap());
        h.insert("openai-project", "proj_client".parse().unwrap());
        h.insert("chatgpt-account-id", "client-account".parse().unwrap());
        for t in [AccountType::Openai, AccountType::OpenaiResponses] {
            let acc = account("x", t, 50, 1);
            let mut c = ctx(Protocol::OpenaiResponses, "/responses");
            let r = HeaderRewrite::default()
                .build(&mut c, &acc, &h, None, b"{}")
                .unwrap();
            assert_eq!(get(&r, "authorization"), ["Bearer secret-x"]);
            for gone in [
                "openai-organization",
                "openai-project",
                "chatgpt-account-id",
            ] {
                assert!(get(&r, gone).is_empty(), "{gone} forwarded to {t:?}");
            }
        }
    }

    #[test]
    fn chatgpt_account_id_of_the_account_replaces_the_clients() {
        let mut acc = Arc::try_unwrap(account("c", AccountType::OpenaiResponses, 50, 1)).unwrap();
        acc.credential = Credential::new("eyJhbGciOi.payload.sig".into());
        acc.chatgpt_account_id = Some("account-of-relay".into());
        let mut h = client_headers();
        h.append("chatgpt-account-id", "client-account".parse().unwrap());
        h.append("chatgpt-account-id", "client-account-2".parse().unwrap());
        let mut c = ctx(Protocol::OpenaiResponses, "/responses");
        let r = HeaderRewrite::default()
            .build(&mut c, &acc, &h, None, b"{}")
            .unwrap();
        assert_eq!(get(&r, "chatgpt-account-id"), ["account-of-relay"]);
        assert_eq!(get(&r, "authorization"), ["Bearer eyJhbGciOi.payload.sig"]);
    }

    #[test]
    fn operator_rules() {
        let rules = HeaderRules {
            set: vec![("user-agent".into(), "relay".into())],
            add: vec![("x-extra".into(), "1".into())],
            remove: vec!["x-claude-code-session-id".into()],
        };
        let acc = account("a", AccountType::Claude, 50, 1);
        let mut c = ctx(Protocol::Anthropic, "/v1/messages");
        let mut h = client_headers();
        h.insert("user-agent", "claude-cli".parse().unwrap());
        let r = HeaderRewrite::new(&rules)
            .unwrap()
            .build(&mut c, &acc, &h, None, b"{}")
            .unwrap();
        assert_eq!(get(&r, "user-agent"), ["relay"]);
        assert_eq!(get(&r, "x-extra"), ["1"]);
        assert!(get(&r, "x-claude-code-session-id").is_empty());
    }
}
