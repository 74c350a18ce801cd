//! Account health checks (DESIGN §11): one cheap authenticated `GET` per account to the
//! provider, through the same connector, TLS and HTTP/1.1 client as proxied requests. The check
//! passes on 2xx or 429 (the credential works; only the rate is spent), fails on 401 or 403 (but
//! not on a refusal of an OAuth token's scope, which says nothing of the token) and on Gemini's
//! 400 for a key not valid.
//!
//! | type | check |
//! |---|---|
//! | `claude-official` | `GET /api/oauth/usage` (OAuth token) |
//! | `openai-responses` | ChatGPT token: `GET /backend-api/accounts/check/v4-2023-04-27`; API key: `GET {base}/models` |
//! | `gemini` | `GET /v1beta/models` |
//! | `claude`, `openai` | not checked by the periodic job (the provider manages them); a manual check sends `GET /v1/models` and `GET {base}/models` |

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use relay_filters::account_state::{classify_error, Fault};
use relay_filters::accounts::Account;
use relay_filters::context::UpstreamRequest;
use relay_filters::AccountType;

use super::oneshot::OneShot;

/// Most bytes of an answer's body read for the check's detail.
const DETAIL_BODY_LIMIT: usize = 2048;
/// Most characters of the answer's body kept in the detail.
const DETAIL_CHARS: usize = 200;

/// How long the start of an answer's body is waited for, once its head is in.
const BODY_WAIT: Duration = Duration::from_secs(2);

/// `text` with every occurrence of `secret` masked (secrets shorter than 8 characters are
/// left: they would mask ordinary words).
pub(super) fn without(text: &str, secret: &str) -> String {
    if secret.len() < 8 {
        return text.to_string();
    }
    text.replace(secret, "[credential]")
}

/// The start of Anthropic's 403 to an OAuth token without the scope an endpoint needs: tokens
/// from `claude setup-token` carry only `user:inference`, and `/api/oauth/usage` asks for
/// `user:profile` ("OAuth token does not meet scope requirement user:profile"). The token
/// works for requests; the check just cannot tell.
const SCOPE_REFUSAL: &str = "OAuth token does not meet scope requirement";

/// Whether an answer is the refusal of a token's scope, not of the token.
fn is_scope_refusal(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(serde_json::Value::as_str)
        .is_some_and(|m| m.trim_start().starts_with(SCOPE_REFUSAL))
}

/// The ChatGPT backend's account check, at the host's root whatever the base URL's path.
const CHATGPT_CHECK_PATH: &str = "/backend-api/accounts/check/v4-2023-04-27";

/// What a check's answer says about the account's credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// 2xx, or 429 (the credential works; only its rate is spent).
    Passed,
    /// 401 or 403, or a 400 naming the key invalid: the provider refuses the credential (or it
    /// cannot be sent as a header).
    Refused,
    /// Anything else (an overloaded or failing provider, no connection, no answer in time):
    /// nothing about the credential, so it does not count toward the error threshold. The
    /// proxy's own cooldowns deal with providers that fail requests.
    Inconclusive,
}

impl CheckKind {
    /// The metric label and API name.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Passed => "pass",
            CheckKind::Refused => "fail",
            CheckKind::Inconclusive => "inconclusive",
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub kind: CheckKind,
    /// The answer's status, when one came.
    pub status: Option<u16>,
    /// Why it failed, or what passed, for operators: the status and the start of the answer,
    /// or the connection error. Never holds the credential.
    pub detail: String,
}

impl CheckOutcome {
    /// Whether the check passed.
    pub fn passed(&self) -> bool {
        self.kind == CheckKind::Passed
    }
}

/// Sends health checks.
pub struct HealthChecker {
    client: OneShot,
}

/// Whether the periodic job checks accounts of this type (manual checks take every type).
pub fn checked_by_default(t: AccountType) -> bool {
    matches!(
        t,
        AccountType::ClaudeOfficial | AccountType::OpenaiResponses | AccountType::Gemini
    )
}

/// The check request for `account`: its path and the credential's header fields.
pub fn check_request(account: &Account) -> Result<UpstreamRequest, String> {
    let base = &account.base_url;
    let prefix = base.path_prefix.as_str();
    let credential = &account.credential;
    let invalid = || "the credential is not a valid header value".to_string();
    let mut headers: Vec<(HeaderName, HeaderValue)> = vec![
        (http::header::HOST, base.authority.clone()),
        (
            http::header::USER_AGENT,
            HeaderValue::from_static("llm-relay-health-check"),
        ),
        (
            http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        ),
        (
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        ),
    ];
    let path = match account.account_type {
        AccountType::Claude => {
            let v = credential.header_value().ok_or_else(invalid)?;
            headers.push((HeaderName::from_static("x-api-key"), v));
            headers.push((
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static("2023-06-01"),
            ));
            format!("{prefix}/v1/models")
        }
        AccountType::ClaudeOfficial => {
            let v = credential.bearer_value().ok_or_else(invalid)?;
            headers.push((http::header::AUTHORIZATION, v));
            headers.push((
                HeaderName::from_static("anthropic-beta"),
                HeaderValue::from_static("oauth-2025-04-20"),
            ));
            format!("{prefix}/api/oauth/usage")
        }
        AccountType::Openai | AccountType::OpenaiResponses => {
            let v = credential.bearer_value().ok_or_else(invalid)?;
            headers.push((http::header::AUTHORIZATION, v));
            // A ChatGPT token (a JWT) is checked at the ChatGPT backend's account check.
            if credential.is_jwt() {
                if let Some(id) = &account.chatgpt_account_id {
                    let id = HeaderValue::from_str(id)
                        .map_err(|_| "the ChatGPT account id is not a valid header value")?;
                    headers.push((HeaderName::from_static("chatgpt-account-id"), id));
                }
                CHATGPT_CHECK_PATH.to_string()
            } else {
                format!("{prefix}/models")
            }
        }
        AccountType::Gemini => {
            let v = credential.header_value().ok_or_else(invalid)?;
            headers.push((HeaderName::from_static("x-goog-api-key"), v));
            format!("{prefix}/v1beta/models")
        }
    };
    Ok(UpstreamRequest {
        tls: base.tls,
        host: base.host.clone(),
        port: base.port,
        method: "GET",
        path_and_query: path,
        headers,
        body: None,
    })
}

impl HealthChecker {
    /// A checker with its own connector (default TLS settings); each check waits at most
    /// `timeout` in all.
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(HealthChecker {
            client: OneShot::new(timeout),
        })
    }

    /// Checks one account; the connection is closed afterwards.
    pub async fn check(&self, account: &Account) -> CheckOutcome {
        let req = match check_request(account) {
            Ok(r) => r,
            Err(detail) => {
                return CheckOutcome {
                    kind: CheckKind::Refused,
                    status: None,
                    detail,
                }
            }
        };
        let timeout = self.client.timeout();
        // The status decides; the body only adds detail, read for a short while at most.
        let exchange = self
            .client
            .exchange(&req, &[], DETAIL_BODY_LIMIT, BODY_WAIT);
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(super::oneshot::Answer { status, body, .. })) => {
                let kind = match status {
                    200..=299 | 429 => CheckKind::Passed,
                    403 if is_scope_refusal(&body) => CheckKind::Inconclusive,
                    401 | 403 => CheckKind::Refused,
                    // Gemini answers a key not valid or expired with 400 INVALID_ARGUMENT.
                    400 if classify_error(status, &body) == Fault::KeyInvalid => CheckKind::Refused,
                    _ => CheckKind::Inconclusive,
                };
                let passed = kind == CheckKind::Passed;
                // An upstream that echoes what it was sent must not show the credential: masked
                // before the excerpt is cut, so a credential cut in two is masked too.
                let text = without(&String::from_utf8_lossy(&body), account.credential.expose());
                let mut detail = format!("HTTP {status}");
                let excerpt: String = text.trim().chars().take(DETAIL_CHARS).collect();
                if !passed && !excerpt.is_empty() {
                    detail.push_str(": ");
                    detail.push_str(&excerpt);
                }
                CheckOutcome {
                    kind,
                    status: Some(status),
                    detail,
                }
            }
            Ok(Err(detail)) => CheckOutcome {
                kind: CheckKind::Inconclusive,
                status: None,
                detail,
            },
            Err(_) => CheckOutcome {
                kind: CheckKind::Inconclusive,
                status: None,
                detail: format!("no answer within {} s", timeout.as_secs_f32()),
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;
    use relay_filters::accounts::{BaseUrl, Credential};

    fn account(t: AccountType, base: &str, credential: &str) -> Account {
        Account {
            id: "a".into(),
            name: "a".into(),
            account_type: t,
            base_url: BaseUrl::parse(base).unwrap(),
            credential: Credential::new(credential.into()),
            priority: 50,
            weight: 1,
            models: Vec::new(),
            model_map: Default::default(),
            max_concurrency: None,
            chatgpt_account_id: Some("acct-1".into()),
            token_expires_ms: None,
            status_set_at: None,
            state: Default::default(),
        }
    }

    fn header<'a>(r: &'a UpstreamRequest, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.to_str().ok())
    }

    #[test]
    fn each_type_is_checked_where_its_credential_shows_whether_it_works() {
        let oauth = check_request(&account(
            AccountType::ClaudeOfficial,
            "https://api.anthropic.com",
            "sk-ant-oat01-x",
        ))
        .unwrap();
        assert_eq!(oauth.path_and_query, "/api/oauth/usage");
        assert_eq!(
            header(&oauth, "authorization"),
            Some("Bearer sk-ant-oat01-x")
        );
        assert_eq!(header(&oauth, "anthropic-beta"), Some("oauth-2025-04-20"));
        assert_eq!(header(&oauth, "host"), Some("api.anthropic.com"));
        assert!(oauth.tls);

        let chatgpt = check_request(&account(
            AccountType::OpenaiResponses,
            "https://chatgpt.com/backend-api/codex",
            "eyJhbGciOi.x.y",
        ))
        .unwrap();
        assert_eq!(chatgpt.path_and_query, CHATGPT_CHECK_PATH);
        assert_eq!(header(&chatgpt, "chatgpt-account-id"), Some("acct-1"));
        let api_key = check_request(&account(
            AccountType::OpenaiResponses,
            "https://api.openai.com/v1",
            "sk-proj-x",
        ))
        .unwrap();
        assert_eq!(api_key.path_and_query, "/v1/models");
        assert_eq!(header(&api_key, "chatgpt-account-id"), None);

        let gemini = check_request(&account(
            AccountType::Gemini,
            "http://127.0.0.1:9000/google",
            "g-key",
        ))
        .unwrap();
        assert_eq!(gemini.path_and_query, "/google/v1beta/models");
        assert_eq!(header(&gemini, "x-goog-api-key"), Some("g-key"));
        assert_eq!(header(&gemini, "host"), Some("127.0.0.1:9000"));
        assert!(!gemini.tls);

        let claude = check_request(&account(
            AccountType::Claude,
            "https://api.anthropic.com",
            "sk-ant-api03-x",
        ))
        .unwrap();
        assert_eq!(claude.path_and_query, "/v1/models");
        assert_eq!(header(&claude, "x-api-key"), Some("sk-ant-api03-x"));

        assert!(checked_by_default(AccountType::Gemini));
        assert!(!checked_by_default(AccountType::Claude));
        assert!(!checked_by_default(AccountType::Openai));
    }

    #[test]
    fn a_credential_echoed_back_is_masked_in_the_detail() {
        assert_eq!(
            without(
                "HTTP 401: bad key sk-ant-api03-secret-1",
                "sk-ant-api03-secret-1"
            ),
            "HTTP 401: bad key [credential]"
        );
        assert_eq!(without("HTTP 401: no", "no"), "HTTP 401: no");
    }

    #[test]
    fn a_credential_that_is_no_header_value_fails_without_a_request() {
        let bad = account(AccountType::Gemini, "https://x.example", "line\nbreak");
        assert!(check_request(&bad).is_err());
    }
}
