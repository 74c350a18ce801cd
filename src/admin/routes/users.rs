//! Users: create and list (admins only).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::PageQuery;
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult};
use crate::admin::AdminState;
use crate::secrets::hash_password;
use crate::store::{NewUser, Page, Role, User};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    username: String,
    password: String,
    #[serde(default)]
    role: Option<String>,
    /// Ten-thousandths (10000 = 1.0).
    #[serde(default)]
    price_rate: Option<i64>,
}

pub async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<CreateUser>,
) -> AppResult<(StatusCode, Json<User>)> {
    caller.require_admin()?;
    let username = body.username.trim().to_string();
    if username.is_empty() || username.len() > 64 {
        return Err(AppError::BadRequest(
            "username must be 1 to 64 characters".into(),
        ));
    }
    if body.password.len() < 8 {
        return Err(AppError::BadRequest(
            "password must be at least 8 characters".into(),
        ));
    }
    let role = match body.role.as_deref() {
        None => Role::User,
        Some(r) => Role::parse(r)
            .ok_or_else(|| AppError::BadRequest("role must be admin or user".into()))?,
    };
    let password = body.password;
    let password_hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))?;
    let user = state
        .store
        .create_user(&NewUser {
            username,
            password_hash,
            role,
            price_rate: body.price_rate.unwrap_or(10_000),
        })
        .await?;
    let _ = state
        .store
        .append_audit(
            &caller.name,
            "user.create",
            &user.id,
            &serde_json::json!({ "username": user.username, "role": user.role }),
        )
        .await;
    state.refresh.notify_one();
    Ok((StatusCode::CREATED, Json(user)))
}

pub async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> AppResult<Json<Page<User>>> {
    caller.require_admin()?;
    let (page, per_page) = q.get();
    Ok(Json(state.store.list_users(page, per_page).await?))
}
