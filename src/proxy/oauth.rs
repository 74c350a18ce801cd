//! OAuth token refresh: a new access token for an account from its refresh token, at the
//! provider's token endpoint (`grant_type=refresh_token`, the public client id of the provider's
//! own CLI), through the proxy's connector like every other call to a provider.
//!
//! | account | endpoint (default) | client |
//! |---|---|---|
//! | `claude-official` | `https://console.anthropic.com/v1/oauth/token` | Claude Code's |
//! | `openai-responses` with a ChatGPT token | `https://auth.openai.com/oauth/token` | the Codex CLI's |
//!
//! Providers rotate refresh tokens: the answer's `refresh_token`, when there is one, replaces
//! the old one, which no longer works.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use relay_filters::accounts::BaseUrl;
use relay_filters::context::UpstreamRequest;
use relay_filters::AccountType;
use serde::Deserialize;

use super::health::without;
use super::oneshot::OneShot;

/// Largest token answer read.
const ANSWER_LIMIT: usize = 64 * 1024;
/// Most characters of a failed answer kept in the detail.
const DETAIL_CHARS: usize = 200;

/// Where and as whom one provider's tokens are refreshed.
#[derive(Debug, Clone)]
pub struct TokenEndpoint {
    pub url: BaseUrl,
    pub client_id: String,
}

impl TokenEndpoint {
    /// `url` is the endpoint's full URL (`https://host/path`).
    pub fn parse(url: &str, client_id: &str) -> Result<TokenEndpoint, String> {
        Ok(TokenEndpoint {
            url: BaseUrl::parse(url)?,
            client_id: client_id.to_string(),
        })
    }
}

/// Which provider's OAuth an account uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Claude,
    OpenAi,
}

impl Provider {
    /// The provider whose tokens an account of this type holds, if its tokens are refreshable.
    pub fn of(account_type: AccountType) -> Option<Provider> {
        match account_type {
            AccountType::ClaudeOfficial => Some(Provider::Claude),
            // An API key has no refresh token; one stored beside a credential means ChatGPT.
            AccountType::OpenaiResponses => Some(Provider::OpenAi),
            _ => None,
        }
    }
}

/// New tokens from the provider.
#[derive(Clone, PartialEq, Eq)]
pub struct NewTokens {
    pub access_token: String,
    /// The rotated refresh token, when the provider sent one.
    pub refresh_token: Option<String>,
    /// When the access token expires (epoch ms), from `expires_in` or a JWT's `exp`.
    pub expires_at: Option<i64>,
}

impl std::fmt::Debug for NewTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewTokens")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// What a refresh came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    Refreshed(NewTokens),
    /// The provider said the refresh token is dead (400, 401 or 403 with `invalid_grant` or
    /// the like): trying it again will not help; new tokens from an operator will.
    Refused(String),
    /// No usable answer (an unreachable or failing provider, a timeout, an answer without a
    /// token): worth another try later.
    Failed(String),
}

impl Refresh {
    /// The metric label and API name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refresh::Refreshed(_) => "refreshed",
            Refresh::Refused(_) => "refused",
            Refresh::Failed(_) => "failed",
        }
    }
}

/// Refreshes tokens.
pub struct TokenClient {
    client: OneShot,
    claude: TokenEndpoint,
    openai: TokenEndpoint,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<f64>,
}

/// The `exp` claim of a JWT (seconds), read without checking the signature: it only says when
/// to refresh.
pub fn jwt_expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_i64()
        .or_else(|| exp.as_f64().filter(|e| e.is_finite()).map(|e| e as i64))
}

/// Whether a refused refresh says the refresh token itself is dead (RFC 6749 §5.2
/// `invalid_grant`, or OpenAI's own codes), as opposed to a refusal of something else (a wrong
/// client id, a firewall, a region): only a dead token stops the rounds.
fn token_is_dead(answer: &[u8]) -> bool {
    const DEAD: [&str; 4] = [
        "invalid_grant",
        "refresh_token_expired",
        "refresh_token_reused",
        "refresh_token_invalidated",
    ];
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(answer) else {
        return false;
    };
    ["/error", "/error/code", "/error/type", "/code"]
        .into_iter()
        .filter_map(|at| v.pointer(at).and_then(|c| c.as_str()))
        .any(|code| DEAD.contains(&code))
}

impl TokenClient {
    pub fn new(timeout: Duration, claude: TokenEndpoint, openai: TokenEndpoint) -> Self {
        TokenClient {
            client: OneShot::new(timeout),
            claude,
            openai,
        }
    }

    /// The longest a refresh can take, answer included.
    pub fn budget(&self) -> Duration {
        self.client.timeout() * 3
    }

    /// The refresh request of `provider` for `refresh_token`, and its JSON body.
    fn request(
        &self,
        provider: Provider,
        refresh_token: &str,
    ) -> Result<(UpstreamRequest, Vec<u8>), String> {
        let endpoint = match provider {
            Provider::Claude => &self.claude,
            Provider::OpenAi => &self.openai,
        };
        let mut body = serde_json::json!({
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": endpoint.client_id,
        });
        if provider == Provider::OpenAi {
            body["scope"] = "openid profile email".into();
        }
        let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let url = &endpoint.url;
        let path = if url.path_prefix.is_empty() {
            "/".to_string()
        } else {
            url.path_prefix.clone()
        };
        let req = UpstreamRequest {
            tls: url.tls,
            host: url.host.clone(),
            port: url.port,
            method: "POST",
            path_and_query: path,
            headers: vec![
                (http::header::HOST, url.authority.clone()),
                (
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    http::header::ACCEPT,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    http::header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                ),
                (
                    http::header::USER_AGENT,
                    HeaderValue::from_static("llm-relay-token-refresh"),
                ),
                (
                    HeaderName::from_static("x-request-id"),
                    HeaderValue::from_str(&crate::store::new_id())
                        .map_err(|_| "request id is not a header value")?,
                ),
            ],
            body: None,
        };
        Ok((req, body))
    }

    /// Asks the provider for new tokens; `now_ms` dates an `expires_in`.
    pub async fn refresh(&self, provider: Provider, refresh_token: &str, now_ms: i64) -> Refresh {
        let (req, body) = match self.request(provider, refresh_token) {
            Ok(r) => r,
            Err(e) => return Refresh::Failed(e),
        };
        // `timeout` bounds each step up to the answer's head; the body may take what is left
        // of the budget.
        let exchange = self
            .client
            .exchange(&req, &body, ANSWER_LIMIT, self.budget());
        let (status, answer) = match tokio::time::timeout(self.budget(), exchange).await {
            Ok(Ok(a)) if a.complete || !(200..300).contains(&a.status) => (a.status, a.body),
            Ok(Ok(a)) => {
                return Refresh::Failed(format!(
                    "HTTP {}, but the answer was cut: the provider may have rotated the refresh token",
                    a.status
                ))
            }
            Ok(Err(e)) => return Refresh::Failed(e),
            Err(_) => {
                return Refresh::Failed(format!(
                    "no whole answer within {} s (if the provider answered, it may have rotated the refresh token)",
                    self.budget().as_secs_f32()
                ))
            }
        };
        if (200..300).contains(&status) {
            return match serde_json::from_slice::<TokenAnswer>(&answer) {
                Ok(TokenAnswer {
                    access_token: Some(access_token),
                    refresh_token: rotated,
                    expires_in,
                }) if !access_token.is_empty() => {
                    let expires_at = expires_in
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .map(|s| now_ms.saturating_add((s * 1000.0) as i64))
                        .or_else(|| jwt_expiry(&access_token).map(|s| s.saturating_mul(1000)));
                    Refresh::Refreshed(NewTokens {
                        access_token,
                        refresh_token: rotated.filter(|t| !t.is_empty()),
                        expires_at,
                    })
                }
                _ => Refresh::Failed(format!("HTTP {status}: the answer holds no access_token")),
            };
        }
        // What the provider said, without any token it may echo.
        let text = without(&String::from_utf8_lossy(&answer), refresh_token);
        let mut detail = format!("HTTP {status}");
        let excerpt: String = text.trim().chars().take(DETAIL_CHARS).collect();
        if !excerpt.is_empty() {
            detail.push_str(": ");
            detail.push_str(&excerpt);
        }
        match status {
            400 | 401 | 403 if token_is_dead(&answer) => Refresh::Refused(detail),
            _ => Refresh::Failed(detail),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;

    fn client() -> TokenClient {
        TokenClient::new(
            Duration::from_secs(1),
            TokenEndpoint::parse("https://console.example/v1/oauth/token", "claude-client")
                .unwrap(),
            TokenEndpoint::parse("http://127.0.0.1:9/oauth/token", "openai-client").unwrap(),
        )
    }

    #[test]
    fn each_provider_gets_its_grant_with_its_client() {
        let c = client();
        let (req, body) = c.request(Provider::Claude, "rt-1").unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path_and_query, "/v1/oauth/token");
        assert!(req.tls);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"grant_type": "refresh_token", "refresh_token": "rt-1", "client_id": "claude-client"})
        );
        let (req, body) = c.request(Provider::OpenAi, "rt-2").unwrap();
        assert_eq!(req.path_and_query, "/oauth/token");
        assert!(!req.tls);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["client_id"], "openai-client");
        assert_eq!(body["scope"], "openid profile email");
        assert_eq!(Provider::of(AccountType::Claude), None);
        assert_eq!(Provider::of(AccountType::Gemini), None);
    }

    #[test]
    fn a_jwt_tells_its_expiry() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"exp":1764000000,"sub":"x"}"#);
        assert_eq!(
            jwt_expiry(&format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig")),
            Some(1_764_000_000)
        );
        let float = URL_SAFE_NO_PAD.encode(br#"{"exp":1764000000.5}"#);
        assert_eq!(jwt_expiry(&format!("h.{float}.s")), Some(1_764_000_000));
        assert_eq!(jwt_expiry("sk-ant-oat01-opaque"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
    }

    #[test]
    fn only_a_dead_refresh_token_is_a_refusal() {
        assert!(token_is_dead(
            br#"{"error":"invalid_grant","error_description":"x"}"#
        ));
        assert!(token_is_dead(
            br#"{"error":{"code":"refresh_token_reused","message":"x"}}"#
        ));
        assert!(token_is_dead(br#"{"error":{"type":"invalid_grant"}}"#));
        assert!(!token_is_dead(br#"{"error":"invalid_client"}"#));
        assert!(!token_is_dead(b"<html>403 Forbidden</html>"));
        assert!(!token_is_dead(
            br#"{"error":{"type":"permission_error","message":"region"}}"#
        ));
    }

    #[test]
    fn tokens_do_not_print() {
        let t = NewTokens {
            access_token: "sk-ant-oat01-secret".into(),
            refresh_token: Some("sk-ant-ort01-secret".into()),
            expires_at: Some(1),
        };
        assert!(!format!("{t:?}").contains("secret"));
    }
}
