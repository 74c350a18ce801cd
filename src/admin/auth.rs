//! Admin authentication: session cookie (HttpOnly, SameSite=Strict) with a CSRF token for
//! state-changing calls, or a static bearer token for automation.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::Method;
use sha2::{Digest, Sha256};

use super::error::AppError;
use super::AdminState;
use crate::store::Role;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "relay_session";
/// Header carrying the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// User id; `None` for the static admin token.
    pub user_id: Option<String>,
    /// Name written to the audit log.
    pub name: String,
    pub role: Role,
    /// The login session's CSRF token; `None` for the static admin token.
    pub csrf_token: Option<String>,
}

impl Caller {
    /// Refuses callers that are not admins.
    pub fn require_admin(&self) -> Result<(), AppError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(AppError::Forbidden("admin role required".into()))
        }
    }

    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// The caller's own user id, for the calls about "my" keys and usage; the static admin
    /// token belongs to no user.
    pub fn own_user_id(&self) -> Result<&str, AppError> {
        self.user_id.as_deref().ok_or_else(|| {
            AppError::BadRequest(
                "the admin token belongs to no user: log in as a user, or use the \
                 /api/admin/... calls"
                    .into(),
            )
        })
    }
}

/// Hex SHA-256 of a session token (only the hash is stored).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer` header, trimmed.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    request_cookie(&parts.headers, name)
}

/// The value of cookie `name`, looked for in every `Cookie` header of a request.
pub(crate) fn request_cookie<'a>(
    headers: &'a axum::http::HeaderMap,
    name: &str,
) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

impl FromRequestParts<AdminState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(bearer) = bearer(&parts.headers) {
            return match &state.admin_token {
                Some(t) if constant_time_eq(t.as_bytes(), bearer.as_bytes()) => Ok(Caller {
                    user_id: None,
                    name: "admin-token".into(),
                    role: Role::Admin,
                    csrf_token: None,
                }),
                _ => Err(AppError::Unauthorized),
            };
        }
        let token = cookie(parts, SESSION_COOKIE).ok_or(AppError::Unauthorized)?;
        let session = state
            .store
            .admin_session(&token_hash(token))
            .await?
            .ok_or(AppError::Unauthorized)?;
        if !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
            let sent = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !constant_time_eq(sent.as_bytes(), session.csrf_token.as_bytes()) {
                return Err(AppError::Forbidden("missing or wrong CSRF token".into()));
            }
        }
        let user = state
            .store
            .user_by_id(&session.user_id)
            .await?
            .filter(|u| u.enabled)
            .ok_or(AppError::Unauthorized)?;
        Ok(Caller {
            user_id: Some(user.id),
            name: user.username,
            role: user.role,
            csrf_token: Some(session.csrf_token),
        })
    }
}
