//! Login, logout and the current caller.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::now_ms;
use crate::admin::auth::{token_hash, Caller, SESSION_COOKIE};
use crate::admin::error::{AppError, AppResult, ErrorBody};
use crate::admin::extract::Json;
use crate::admin::AdminState;
use crate::secrets::{random_token, verify_password};
use moka::ops::compute::{CompResult, Op};

/// Sessions last 12 hours.
const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// Failed attempts per user name and address before logins are refused for a while.
const MAX_FAILURES: u32 = 5;
/// Failed attempts from one address, whatever the user names, before its logins are refused
/// for a while: guessing across many names (credential stuffing) meets a limit too.
const MAX_ADDRESS_FAILURES: u32 = 30;
/// The longest user name a user can have.
const MAX_USERNAME_LEN: usize = 64;
/// How long a login waits for a password check permit before it is told to retry (429).
const PASSWORD_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The cookie attribute that keeps the session cookie to HTTPS, when configured.
fn secure(state: &AdminState) -> &'static str {
    if state.secure_cookie {
        "; Secure"
    } else {
        ""
    }
}

/// Permits for password checks at the same time: one per core, at least two.
fn password_checks() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        tokio::sync::Semaphore::new(cores.max(2))
    })
}

/// Who logged in; the price rate is not shown (users never see theirs).
#[derive(Serialize, ToSchema)]
pub struct LoggedIn {
    id: String,
    username: String,
    /// `admin` or `user`.
    #[schema(value_type = String, example = "user")]
    role: crate::store::Role,
}

/// Answer of a login.
#[derive(Serialize, ToSchema)]
pub struct LoginAnswer {
    user: LoggedIn,
    /// Send it in `x-csrf-token` on every state-changing call made with the cookie.
    csrf_token: String,
}

/// Answer of a logout.
#[derive(Serialize, ToSchema)]
pub struct LoggedOut {
    ok: bool,
}

/// The caller.
#[derive(Serialize, ToSchema)]
pub struct Me {
    /// `null` for the static admin token.
    user_id: Option<String>,
    name: String,
    /// `admin` or `user`.
    #[schema(value_type = String, example = "admin")]
    role: crate::store::Role,
    /// The login session's CSRF token, as the login answered it (so a reloaded page can go
    /// on making changes); `null` for the static admin token.
    csrf_token: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct Login {
    username: String,
    password: String,
}

/// `POST /api/auth/login` `{"username", "password"}`: sets the session cookie (HttpOnly,
/// SameSite=Strict) and answers `{"user", "csrf_token"}`; state-changing calls made with the
/// cookie must send the token in `x-csrf-token`. Five failures of a user name from an address
/// refuse that name there, thirty from an address refuse the address, for 15 minutes after the
/// last (429).
#[utoipa::path(post, path = "/api/auth/login", tag = "session", request_body = Login,
    responses(
        (status = 200, description = "Logged in; sets the `relay_session` cookie", body = LoginAnswer),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Wrong user name or password, or user disabled", body = ErrorBody),
        (status = 429, description = "Too many failed attempts", body = ErrorBody),
    ))]
pub async fn login(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(body): Json<Login>,
) -> AppResult<impl IntoResponse> {
    // No user has a longer name (users are created with 1 to 64 bytes): a longer one is
    // refused before it costs a password check or a place in the throttle's memory.
    if body.username.is_empty() || body.username.len() > MAX_USERNAME_LEN {
        return Err(AppError::Unauthorized);
    }
    let throttle_key = format!("{}|{}", body.username, peer.ip());
    // An address's failures, whatever the names (a user name holds no `|` at its start, so
    // the keys cannot meet). Only failed checks count here, and nothing is taken back: the
    // block ends 15 minutes after the address's last failure. Attempts checked at the same
    // time may pass it by the few password checks that run at once.
    let address_key = format!("|{}", peer.ip());
    if state
        .login_failures
        .get(&address_key)
        .is_some_and(|n| n >= MAX_ADDRESS_FAILURES)
    {
        return Err(AppError::TooManyRequests);
    }
    // Every attempt is counted for its name at the address before the password is checked,
    // in one step: attempts made at the same time cannot all read a count under the limit.
    // An attempt refused here changes nothing (the block ends 15 minutes after the last
    // counted failure, however often a client retries); a success, or an attempt whose
    // password was never checked, takes its count back.
    let counted = state
        .login_failures
        .entry(throttle_key.clone())
        .and_compute_with(|n| match n.map(|n| n.into_value()) {
            Some(n) if n >= MAX_FAILURES => Op::Nop,
            n => Op::Put(n.unwrap_or(0) + 1),
        });
    if !matches!(
        counted,
        CompResult::Inserted(_) | CompResult::ReplacedWith(_)
    ) {
        return Err(AppError::TooManyRequests);
    }
    let give_back = || {
        state
            .login_failures
            .entry(throttle_key.clone())
            .and_compute_with(|n| match n.map(|n| n.into_value()) {
                Some(n) if n > 1 => Op::Put(n - 1),
                _ => Op::Remove,
            });
    };
    // Password checks (about 19 MiB and tens of milliseconds each) wait for one of a few
    // permits, so a flood of logins cannot take the memory or every blocking thread.
    let permit = tokio::time::timeout(PASSWORD_CHECK_WAIT, password_checks().acquire()).await;
    let Ok(Ok(_permit)) = permit else {
        give_back();
        return Err(AppError::TooManyRequests);
    };
    let user = match state.store.user_by_username(&body.username).await {
        Ok(user) => user,
        Err(e) => {
            give_back();
            return Err(e.into());
        }
    };
    let password = body.password;
    let (ok, user) = match user {
        Some(u) => {
            let hash = u.password_hash.clone();
            let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
                .await
                .unwrap_or(false);
            (ok && u.enabled, Some(u))
        }
        None => {
            // Spend the same time as a real check, so user names cannot be probed by timing.
            let _ =
                tokio::task::spawn_blocking(move || crate::secrets::hash_password(&password)).await;
            (false, None)
        }
    };
    let Some(user) = user.filter(|_| ok) else {
        state
            .login_failures
            .entry(address_key)
            .and_upsert_with(|n| n.map_or(1, |n| n.into_value().saturating_add(1)));
        return Err(AppError::Unauthorized);
    };
    state.login_failures.invalidate(&throttle_key);
    let token = random_token();
    let csrf = random_token();
    let now = now_ms();
    state
        .store
        .create_admin_session(&token_hash(&token), &user.id, &csrf, now + SESSION_TTL_MS)
        .await?;
    if let Err(e) = state
        .store
        .append_audit(&user.username, "login", &user.id, &serde_json::json!({}))
        .await
    {
        tracing::error!(error = %e, "audit log write failed");
    }
    let cookie = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_TTL_MS / 1000,
        secure(&state)
    );
    Ok((
        [
            (header::SET_COOKIE, cookie),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
        Json(LoginAnswer {
            user: LoggedIn {
                id: user.id,
                username: user.username,
                role: user.role,
            },
            csrf_token: csrf,
        }),
    ))
}

/// `POST /api/auth/logout`: ends the session and clears the cookie.
#[utoipa::path(post, path = "/api/auth/logout", tag = "session",
    responses((status = 200, description = "Logged out; the cookie is cleared", body = LoggedOut)))]
pub async fn logout(
    State(state): State<AdminState>,
    headers: HeaderMap,
    caller: Caller,
) -> AppResult<impl IntoResponse> {
    if let Some(token) = crate::admin::auth::request_cookie(&headers, SESSION_COOKIE) {
        state.store.delete_admin_session(&token_hash(token)).await?;
    }
    super::audit(
        &state,
        &caller,
        "logout",
        caller.user_id.as_deref().unwrap_or(""),
        serde_json::json!({}),
    )
    .await;
    Ok((
        [(
            header::SET_COOKIE,
            format!(
                "{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
                secure(&state)
            ),
        )],
        Json(LoggedOut { ok: true }),
    ))
}

/// `GET /api/auth/me`: the caller.
#[utoipa::path(get, path = "/api/auth/me", tag = "session",
    responses((status = 200, description = "The caller", body = Me)))]
pub async fn me(caller: Caller) -> AppResult<impl IntoResponse> {
    // It carries the session's CSRF token: never kept by a cache.
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(Me {
            user_id: caller.user_id,
            name: caller.name,
            role: caller.role,
            csrf_token: caller.csrf_token,
        }),
    ))
}
