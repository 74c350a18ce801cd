//! Relay API keys: create (the plaintext is returned once), list with owners, update.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::PageQuery;
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult};
use crate::admin::AdminState;
use crate::secrets::{api_key_hash, api_key_prefix, generate_api_key};
use crate::store::{ApiKey, ApiKeyPatch, NewApiKey, Page};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// Owner; defaults to the caller.
    #[serde(default)]
    user_id: Option<String>,
    /// Owner by name, instead of `user_id`.
    #[serde(default)]
    username: Option<String>,
    name: String,
    #[serde(default)]
    expires_at: Option<i64>,
    #[serde(default)]
    allowed_platforms: Vec<String>,
    #[serde(default)]
    allowed_models: Vec<String>,
    #[serde(default)]
    rpm_limit: Option<i64>,
    #[serde(default)]
    max_concurrency: Option<i64>,
    #[serde(default)]
    daily_cost_limit: Option<i64>,
    #[serde(default)]
    total_cost_limit: Option<i64>,
}

const PLATFORMS: &[&str] = &["claude", "openai", "gemini"];

fn check_platforms(p: &[String]) -> AppResult<()> {
    match p.iter().find(|x| !PLATFORMS.contains(&x.as_str())) {
        Some(bad) => Err(AppError::BadRequest(format!(
            "unknown platform {bad}: use claude, openai or gemini"
        ))),
        None => Ok(()),
    }
}

pub async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<CreateKey>,
) -> AppResult<(StatusCode, Json<serde_json::Value>)> {
    let user_id = match (&body.user_id, &body.username) {
        (Some(id), _) => id.clone(),
        (None, Some(name)) => {
            state
                .store
                .user_by_username(name)
                .await?
                .ok_or_else(|| AppError::BadRequest(format!("no user named {name}")))?
                .id
        }
        (None, None) => caller
            .user_id
            .clone()
            .ok_or_else(|| AppError::BadRequest("user_id or username is required".into()))?,
    };
    if caller.user_id.as_deref() != Some(user_id.as_str()) {
        caller.require_admin()?;
    }
    if state.store.user_by_id(&user_id).await?.is_none() {
        return Err(AppError::BadRequest("owner does not exist".into()));
    }
    if body.name.trim().is_empty() {
        return Err(AppError::BadRequest("name is required".into()));
    }
    check_platforms(&body.allowed_platforms)?;
    let key = generate_api_key();
    let created = state
        .store
        .create_api_key(
            &NewApiKey {
                user_id,
                name: body.name.trim().to_string(),
                key_hash: api_key_hash(&state.pepper, &key),
                key_prefix: api_key_prefix(&key),
                expires_at: body.expires_at,
                allowed_platforms: body.allowed_platforms,
                allowed_models: body.allowed_models,
                rpm_limit: body.rpm_limit,
                max_concurrency: body.max_concurrency,
                daily_cost_limit: body.daily_cost_limit,
                total_cost_limit: body.total_cost_limit,
            },
            i64::from(state.max_keys_per_user),
        )
        .await?;
    let _ = state
        .store
        .append_audit(
            &caller.name,
            "api_key.create",
            &created.id,
            &serde_json::json!({ "name": created.name, "user_id": created.user_id }),
        )
        .await;
    state.refresh.notify_one();
    let mut value =
        serde_json::to_value(&created).map_err(|e| AppError::Internal(e.to_string()))?;
    value["key"] = serde_json::Value::String(key);
    Ok((StatusCode::CREATED, Json(value)))
}

#[derive(Deserialize)]
pub struct KeyListQuery {
    page: Option<i64>,
    per_page: Option<i64>,
    user_id: Option<String>,
}

pub async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<KeyListQuery>,
) -> AppResult<Json<Page<ApiKey>>> {
    let (page, per_page) = PageQuery {
        page: q.page,
        per_page: q.per_page,
    }
    .get();
    let user = if caller.require_admin().is_ok() {
        q.user_id
    } else {
        caller.user_id.clone()
    };
    Ok(Json(
        state
            .store
            .list_api_keys(user.as_deref(), page, per_page)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    name: Option<String>,
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "super::nullable")]
    expires_at: Option<Option<i64>>,
    allowed_platforms: Option<Vec<String>>,
    allowed_models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "super::nullable")]
    rpm_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "super::nullable")]
    max_concurrency: Option<Option<i64>>,
    #[serde(default, deserialize_with = "super::nullable")]
    daily_cost_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "super::nullable")]
    total_cost_limit: Option<Option<i64>>,
}

pub async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<UpdateKey>,
) -> AppResult<Json<ApiKey>> {
    let existing = state
        .store
        .api_key_by_id(&id)
        .await?
        .ok_or(AppError::NotFound)?;
    if caller.user_id.as_deref() != Some(existing.user_id.as_str()) {
        caller.require_admin()?;
    }
    if let Some(p) = &body.allowed_platforms {
        check_platforms(p)?;
    }
    let patch = ApiKeyPatch {
        name: body.name,
        enabled: body.enabled,
        expires_at: body.expires_at,
        allowed_platforms: body.allowed_platforms,
        allowed_models: body.allowed_models,
        rpm_limit: body.rpm_limit,
        max_concurrency: body.max_concurrency,
        daily_cost_limit: body.daily_cost_limit,
        total_cost_limit: body.total_cost_limit,
    };
    let updated = state.store.update_api_key(&id, &patch).await?;
    let _ = state
        .store
        .append_audit(
            &caller.name,
            "api_key.update",
            &id,
            &serde_json::json!({ "enabled": updated.enabled }),
        )
        .await;
    state.refresh.notify_one();
    Ok(Json(updated))
}
