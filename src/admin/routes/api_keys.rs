//! Relay API keys. Admins create, list (with owners and usage), change and delete anybody's
//! keys under `/api/admin/api-keys`; every user manages its own under `/api/keys`. The
//! plaintext key is returned once, at creation.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::usage::BilledTotals;
use super::{audit, Deleted, PageQuery};
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult, ErrorBody};
use crate::admin::extract::{Json, Path, Query};
use crate::admin::AdminState;
use crate::secrets::{api_key_hash, api_key_prefix, generate_api_key};
use crate::store::{
    ApiKey, ApiKeyPatch, NewApiKey, Page, UsageDim, UsageTotals, DISABLED_BY_ADMIN,
};

/// A new key; limits are optional and only restrict it. Costs in micro-USD, times in epoch ms.
#[derive(Deserialize, ToSchema)]
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
    /// `claude`, `openai`, `gemini`; empty for all.
    #[serde(default)]
    allowed_platforms: Vec<String>,
    /// Empty for all.
    #[serde(default)]
    allowed_models: Vec<String>,
    #[serde(default)]
    rpm_limit: Option<i64>,
    #[serde(default)]
    max_concurrency: Option<i64>,
    #[serde(default)]
    daily_cost_limit: Option<i64>,
    /// Billed micro-USD per UTC calendar month.
    #[serde(default)]
    monthly_cost_limit: Option<i64>,
    #[serde(default)]
    total_cost_limit: Option<i64>,
}

const PLATFORMS: &[&str] = &["claude", "openai", "gemini"];

/// Checks a list of platforms (of a key or a user).
pub(super) fn check_platforms(p: &[String]) -> AppResult<()> {
    match p.iter().find(|x| !PLATFORMS.contains(&x.as_str())) {
        Some(bad) => Err(AppError::BadRequest(format!(
            "unknown platform {bad}: use claude, openai or gemini"
        ))),
        None => Ok(()),
    }
}

/// The longest key name, in characters.
const MAX_KEY_NAME_CHARS: usize = 128;
/// The most model patterns a key may list, and the longest of them in bytes: every request is
/// matched against them before any limit applies, so they are kept small.
const MAX_MODEL_PATTERNS: usize = 64;
const MAX_MODEL_PATTERN_LEN: usize = 128;

/// Checks a key's name (when given) and model patterns (when given).
fn check_key_text(name: Option<&str>, models: Option<&[String]>) -> AppResult<()> {
    check_model_patterns(models.unwrap_or_default())?;
    if let Some(name) = name {
        if name.trim().is_empty() {
            return Err(AppError::BadRequest("name must not be empty".into()));
        }
        if name.trim().chars().count() > MAX_KEY_NAME_CHARS {
            return Err(AppError::BadRequest(format!(
                "name is at most {MAX_KEY_NAME_CHARS} characters"
            )));
        }
    }
    Ok(())
}

/// Checks a list of models and patterns (of a key or a user).
pub(super) fn check_model_patterns(models: &[String]) -> AppResult<()> {
    if models.len() > MAX_MODEL_PATTERNS {
        return Err(AppError::BadRequest(format!(
            "allowed_models lists at most {MAX_MODEL_PATTERNS} models or patterns"
        )));
    }
    if let Some(bad) = models
        .iter()
        .find(|m| m.trim().is_empty() || m.len() > MAX_MODEL_PATTERN_LEN)
    {
        return Err(AppError::BadRequest(format!(
            "allowed_models entries are 1 to {MAX_MODEL_PATTERN_LEN} bytes: {:?} is not",
            bad.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// The highest rpm limit a key can have: the limiter paces requests a millisecond apart at
/// most (1 000 a second); no limit at all is an empty field.
const MAX_RPM_LIMIT: i64 = 60_000;

/// Checks the request-count limits: an rpm of 1 to [`MAX_RPM_LIMIT`], a concurrency of at
/// least 1. No limit is an empty field; 0 is refused rather than read as "none" or "blocked"
/// (disabling the key is what blocks it).
fn check_counts(rpm: Option<i64>, max_concurrency: Option<i64>) -> AppResult<()> {
    match rpm {
        Some(r) if r > MAX_RPM_LIMIT => Err(AppError::BadRequest(format!(
            "rpm_limit is at most {MAX_RPM_LIMIT} (leave it empty for no limit)"
        ))),
        Some(r) if r < 1 => Err(AppError::BadRequest(
            "rpm_limit is at least 1 (leave it empty for no limit; disable the key to block it)"
                .into(),
        )),
        _ if max_concurrency.is_some_and(|c| c < 1) => Err(AppError::BadRequest(
            "max_concurrency is at least 1 (leave it empty for no limit; disable the key to \
             block it)"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Issues a key to `owner`; the answer holds the plaintext under `key`.
async fn issue(
    state: &AdminState,
    caller: &Caller,
    owner: String,
    body: CreateKey,
) -> AppResult<(StatusCode, Json<serde_json::Value>)> {
    if state.store.user_by_id(&owner).await?.is_none() {
        return Err(AppError::BadRequest("owner does not exist".into()));
    }
    if body.name.trim().is_empty() {
        return Err(AppError::BadRequest("name is required".into()));
    }
    check_key_text(Some(&body.name), Some(&body.allowed_models))?;
    check_platforms(&body.allowed_platforms)?;
    check_counts(body.rpm_limit, body.max_concurrency)?;
    if body.expires_at.is_some_and(|at| at <= super::now_ms()) {
        return Err(AppError::BadRequest(
            "expires_at is in the past: the key could never be used".into(),
        ));
    }
    let key = generate_api_key();
    // The store counts the owner's keys and inserts in one transaction: the cap holds under
    // concurrent creations, and its refusal names the cap.
    let created = state
        .store
        .create_api_key(
            &NewApiKey {
                user_id: owner,
                name: body.name.trim().to_string(),
                key_hash: api_key_hash(&state.pepper, &key),
                key_prefix: api_key_prefix(&key),
                expires_at: body.expires_at,
                allowed_platforms: body.allowed_platforms,
                allowed_models: body.allowed_models,
                rpm_limit: body.rpm_limit,
                max_concurrency: body.max_concurrency,
                daily_cost_limit: body.daily_cost_limit,
                monthly_cost_limit: body.monthly_cost_limit,
                total_cost_limit: body.total_cost_limit,
            },
            i64::from(state.max_keys_per_user),
        )
        .await?;
    audit(
        state,
        caller,
        "api_key.create",
        &created.id,
        serde_json::json!({ "name": created.name, "user_id": created.user_id }),
    )
    .await;
    state.keys_changed().await;
    let mut value =
        serde_json::to_value(&created).map_err(|e| AppError::Internal(e.to_string()))?;
    value["key"] = serde_json::Value::String(key);
    Ok((StatusCode::CREATED, Json(value)))
}

/// `POST /api/admin/api-keys`: a key for any user (`user_id` or `username`; the caller's own
/// user by default).
#[utoipa::path(post, path = "/api/admin/api-keys", tag = "api-keys", request_body = CreateKey,
    responses(
        (status = 201, description = "The key, with its plaintext under `key` (shown this once)", body = serde_json::Value),
        (status = 400, description = "Bad field, unknown owner or key cap reached", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<CreateKey>,
) -> AppResult<(StatusCode, Json<serde_json::Value>)> {
    caller.require_admin()?;
    let owner = match (&body.user_id, &body.username) {
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
    issue(&state, &caller, owner, body).await
}

/// `POST /api/keys`: a key for the caller. Limits may be set (they only restrict the key).
#[utoipa::path(post, path = "/api/keys", tag = "own", request_body = CreateKey,
    responses(
        (status = 201, description = "The key, with its plaintext under `key` (shown this once)", body = serde_json::Value),
        (status = 400, description = "Bad field, owner given, or key cap reached", body = ErrorBody),
    ))]
pub async fn own_create(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<CreateKey>,
) -> AppResult<(StatusCode, Json<serde_json::Value>)> {
    let owner = caller.own_user_id()?.to_string();
    if body.user_id.is_some() || body.username.is_some() {
        return Err(AppError::BadRequest(
            "keys created here belong to you: leave out user_id and username".into(),
        ));
    }
    issue(&state, &caller, owner, body).await
}
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeyListQuery {
    /// 1-based page number (default 1).
    page: Option<i64>,
    /// Rows per page (default 50, at most 500).
    per_page: Option<i64>,
    /// Only this user's keys.
    user_id: Option<String>,
}

/// A key with its usage over its life; admins see `base_cost` too.
#[derive(Debug, Serialize)]
pub struct KeyWithUsage<T> {
    #[serde(flatten)]
    pub key: ApiKey,
    #[serde(flatten)]
    pub usage: T,
    /// Micro-USD billed today (UTC): what `daily_cost_limit` is measured against, booked
    /// requests only.
    pub billed_cost_today: i64,
    /// Micro-USD billed this month (UTC): what `monthly_cost_limit` is measured against.
    pub billed_cost_month: i64,
}

/// Adds each key's life-time totals and the billed cost of today and of this month, from the
/// per-key daily rollups, in three queries per page.
async fn with_usage(
    state: &AdminState,
    page: Page<ApiKey>,
) -> AppResult<Page<KeyWithUsage<UsageTotals>>> {
    let ids: Vec<String> = page.items.iter().map(|k| k.id.clone()).collect();
    let mut usage: HashMap<String, UsageTotals> = state
        .store
        .usage_totals_by_ids(UsageDim::Key, &ids, None, None)
        .await?;
    let recent = super::usage::billed_recently(state, UsageDim::Key, &ids).await?;
    Ok(Page {
        items: page
            .items
            .into_iter()
            .map(|key| KeyWithUsage {
                usage: usage.remove(&key.id).unwrap_or_default(),
                billed_cost_today: recent.today(&key.id),
                billed_cost_month: recent.month(&key.id),
                key,
            })
            .collect(),
        total: page.total,
        page: page.page,
        per_page: page.per_page,
    })
}

/// `GET /api/admin/api-keys?user_id=&page=&per_page=`: every key (or one user's), newest
/// first, with its owner's name, request count and costs.
#[utoipa::path(get, path = "/api/admin/api-keys", tag = "api-keys", params(KeyListQuery),
    responses(
        (status = 200, description = "A page of keys with usage", body = super::openapi::ListPage),
        (status = 400, description = "Bad query", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<KeyListQuery>,
) -> AppResult<Json<Page<KeyWithUsage<UsageTotals>>>> {
    caller.require_admin()?;
    let (page, per_page) = PageQuery {
        page: q.page,
        per_page: q.per_page,
    }
    .get();
    let keys = state
        .store
        .list_api_keys(q.user_id.as_deref(), page, per_page)
        .await?;
    Ok(Json(with_usage(&state, keys).await?))
}

/// `GET /api/keys?page=&per_page=`: the caller's keys, newest first, with their request count
/// and billed cost.
#[utoipa::path(get, path = "/api/keys", tag = "own", params(PageQuery),
    responses(
        (status = 200, description = "A page of the caller's keys with usage", body = super::openapi::ListPage),
        (status = 400, description = "Bad query, or the static admin token (no user)", body = ErrorBody),
    ))]
pub async fn own_list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> AppResult<Json<Page<KeyWithUsage<BilledTotals>>>> {
    let (page, per_page) = q.get();
    let keys = state
        .store
        .list_api_keys(Some(caller.own_user_id()?), page, per_page)
        .await?;
    let page = with_usage(&state, keys).await?;
    Ok(Json(Page {
        items: page
            .items
            .into_iter()
            .map(|k| KeyWithUsage {
                key: k.key,
                usage: k.usage.into(),
                billed_cost_today: k.billed_cost_today,
                billed_cost_month: k.billed_cost_month,
            })
            .collect(),
        total: page.total,
        page: page.page,
        per_page: page.per_page,
    }))
}
/// Fields to change; absent ones stay, `null` clears a limit.
#[derive(Deserialize, ToSchema)]
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
    monthly_cost_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "super::nullable")]
    total_cost_limit: Option<Option<i64>>,
}

/// `PATCH /api/admin/api-keys/{id}`: changes any field of any key.
#[utoipa::path(patch, path = "/api/admin/api-keys/{id}", tag = "api-keys", params(("id" = String, Path, description = "API key id")), request_body = UpdateKey,
    responses(
        (status = 200, description = "The key as changed", body = serde_json::Value),
        (status = 400, description = "Bad field", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
    ))]
pub async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<UpdateKey>,
) -> AppResult<Json<ApiKey>> {
    caller.require_admin()?;
    check_key_text(body.name.as_deref(), body.allowed_models.as_deref())?;
    if let Some(p) = &body.allowed_platforms {
        check_platforms(p)?;
    }
    check_counts(body.rpm_limit.flatten(), body.max_concurrency.flatten())?;
    let patch = ApiKeyPatch {
        name: body.name,
        enabled: body.enabled,
        expires_at: body.expires_at,
        allowed_platforms: body.allowed_platforms,
        allowed_models: body.allowed_models,
        rpm_limit: body.rpm_limit,
        max_concurrency: body.max_concurrency,
        daily_cost_limit: body.daily_cost_limit,
        monthly_cost_limit: body.monthly_cost_limit,
        total_cost_limit: body.total_cost_limit,
        by_admin: true,
    };
    apply(&state, &caller, &id, &patch).await
}

async fn apply(
    state: &AdminState,
    caller: &Caller,
    id: &str,
    patch: &ApiKeyPatch,
) -> AppResult<Json<ApiKey>> {
    let updated = state.store.update_api_key(id, patch).await?;
    audit(
        state,
        caller,
        "api_key.update",
        id,
        serde_json::json!({
            "user_id": updated.user_id,
            "name": patch.name,
            "enabled": patch.enabled,
            "limits_changed": patch.expires_at.is_some()
                || patch.allowed_platforms.is_some()
                || patch.allowed_models.is_some()
                || patch.rpm_limit.is_some()
                || patch.max_concurrency.is_some()
                || patch.daily_cost_limit.is_some()
                || patch.monthly_cost_limit.is_some()
                || patch.total_cost_limit.is_some(),
        }),
    )
    .await;
    state.keys_changed().await;
    Ok(Json(updated))
}

/// What a user may change on its own key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateOwnKey {
    name: Option<String>,
    enabled: Option<bool>,
}

/// The caller's key `id`; somebody else's key is "not found", so ids cannot be probed.
async fn own_key(state: &AdminState, caller: &Caller, id: &str) -> AppResult<ApiKey> {
    let user_id = caller.own_user_id()?;
    state
        .store
        .api_key_by_id(id)
        .await?
        .filter(|k| k.user_id == user_id)
        .ok_or(AppError::NotFound)
}

/// `PATCH /api/keys/{id}` `{"name"?, "enabled"?}`: renames, enables or disables an own key;
/// a key an administrator disabled stays disabled (403).
#[utoipa::path(patch, path = "/api/keys/{id}", tag = "own", params(("id" = String, Path, description = "API key id")), request_body = UpdateOwnKey,
    responses(
        (status = 200, description = "The key as changed", body = serde_json::Value),
        (status = 400, description = "Empty name", body = ErrorBody),
        (status = 403, description = "Enabling a key an administrator disabled", body = ErrorBody),
        (status = 404, description = "No such key of the caller", body = ErrorBody),
    ))]
pub async fn own_update(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<UpdateOwnKey>,
) -> AppResult<Json<ApiKey>> {
    let key = own_key(&state, &caller, &id).await?;
    if key.disabled_by_admin && body.enabled == Some(true) {
        return Err(AppError::Forbidden(DISABLED_BY_ADMIN.into()));
    }
    check_key_text(body.name.as_deref(), None)?;
    let patch = ApiKeyPatch {
        name: body.name.map(|n| n.trim().to_string()),
        enabled: body.enabled,
        ..ApiKeyPatch::default()
    };
    // An admin's disabling that came after the check above is not undone by the store.
    apply(&state, &caller, &id, &patch)
        .await
        .map_err(|e| match e {
            AppError::BadRequest(m) if m == DISABLED_BY_ADMIN => AppError::Forbidden(m),
            other => other,
        })
}

async fn remove(state: &AdminState, caller: &Caller, key: &ApiKey) -> AppResult<()> {
    state.store.delete_api_key(&key.id).await?;
    audit(
        state,
        caller,
        "api_key.delete",
        &key.id,
        serde_json::json!({ "name": key.name, "user_id": key.user_id }),
    )
    .await;
    state.keys_changed().await;
    Ok(())
}

/// `DELETE /api/admin/api-keys/{id}`; its usage records stay.
#[utoipa::path(delete, path = "/api/admin/api-keys/{id}", tag = "api-keys", params(("id" = String, Path, description = "API key id")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No such key", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<Deleted>> {
    caller.require_admin()?;
    let key = state
        .store
        .api_key_by_id(&id)
        .await?
        .ok_or(AppError::NotFound)?;
    remove(&state, &caller, &key).await?;
    Ok(Json(Deleted { deleted: id }))
}

/// `DELETE /api/keys/{id}`: deletes an own key.
#[utoipa::path(delete, path = "/api/keys/{id}", tag = "own", params(("id" = String, Path, description = "API key id")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No such key of the caller", body = ErrorBody),
    ))]
pub async fn own_delete(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<Deleted>> {
    let key = own_key(&state, &caller, &id).await?;
    remove(&state, &caller, &key).await?;
    Ok(Json(Deleted { deleted: id }))
}
