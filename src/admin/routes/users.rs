//! Users (admins only): create, list, get, change (role, enabled, password, price rate),
//! delete, and set price rates in bulk.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{audit, Deleted, PageQuery, Updated};
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult, ErrorBody};
use crate::admin::extract::{Json, Path, Query};
use crate::admin::AdminState;
use crate::secrets::hash_password;
use crate::store::{NewUser, Page, Role, UsageDim, User, UserCostLimits};

/// Ids per `UPDATE ... WHERE id IN (...)`.
const IDS_PER_UPDATE: usize = 500;

fn check_password(password: &str) -> AppResult<()> {
    if password.len() < 8 {
        return Err(AppError::BadRequest(
            "password must be at least 8 characters".into(),
        ));
    }
    Ok(())
}

fn check_rate(rate: i64) -> AppResult<()> {
    if rate < 0 {
        return Err(AppError::BadRequest(
            "price_rate must not be negative (ten-thousandths: 10000 = 1.0)".into(),
        ));
    }
    Ok(())
}

/// Refuses negative cost limits before anything is written.
fn check_cost_limits(limits: [(&str, Option<i64>); 3]) -> AppResult<()> {
    for (what, v) in limits {
        if v.is_some_and(|v| v < 0) {
            return Err(AppError::BadRequest(format!(
                "{what} must not be negative (micro-USD; leave it empty for no limit)"
            )));
        }
    }
    Ok(())
}

fn parse_role(r: &str) -> AppResult<Role> {
    Role::parse(r).ok_or_else(|| AppError::BadRequest("role must be admin or user".into()))
}

async fn hash(password: String) -> AppResult<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| AppError::Internal(e.to_string()))?
        .map_err(|e| AppError::Internal(e.to_string()))
}

/// A list's entries trimmed.
fn trimmed(list: Vec<String>) -> Vec<String> {
    list.into_iter().map(|s| s.trim().to_string()).collect()
}

/// A user's allow-lists, trimmed and checked as a key's are.
fn allow_lists(
    platforms: Vec<String>,
    models: Vec<String>,
) -> AppResult<(Vec<String>, Vec<String>)> {
    let (platforms, models) = (trimmed(platforms), trimmed(models));
    super::api_keys::check_platforms(&platforms)?;
    super::api_keys::check_model_patterns(&models)?;
    Ok((platforms, models))
}

/// A new user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    username: String,
    /// At least 8 characters.
    password: String,
    /// `admin` or `user` (default).
    #[serde(default)]
    role: Option<String>,
    /// Ten-thousandths (10000 = 1.0).
    #[serde(default)]
    price_rate: Option<i64>,
    /// Billed micro-USD per UTC day over all the user's keys (none: no limit).
    #[serde(default)]
    daily_cost_limit: Option<i64>,
    /// Billed micro-USD per UTC calendar month over all the user's keys (none: no limit).
    #[serde(default)]
    monthly_cost_limit: Option<i64>,
    /// Billed micro-USD in total over all the user's keys (none: no limit).
    #[serde(default)]
    total_cost_limit: Option<i64>,
    /// Platforms every key of the user may use (`claude`, `openai`, `gemini`); empty: all.
    #[serde(default)]
    allowed_platforms: Vec<String>,
    /// Models (exact or `*` / `?` globs) every key of the user may use; empty: all.
    #[serde(default)]
    allowed_models: Vec<String>,
}

/// `POST /api/admin/users` `{"username", "password", "role"?, "price_rate"?,
/// "daily_cost_limit"?, "monthly_cost_limit"?, "total_cost_limit"?, "allowed_platforms"?,
/// "allowed_models"?}`.
#[utoipa::path(post, path = "/api/admin/users", tag = "users", request_body = CreateUser,
    responses(
        (status = 201, description = "The user (without its password)", body = serde_json::Value),
        (status = 400, description = "Bad user name, password, role or rate", body = ErrorBody),
        (status = 409, description = "User name taken", body = ErrorBody),
    ))]
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
    check_password(&body.password)?;
    let role = match body.role.as_deref() {
        None => Role::User,
        Some(r) => parse_role(r)?,
    };
    let price_rate = body.price_rate.unwrap_or(10_000);
    check_rate(price_rate)?;
    check_cost_limits([
        ("daily_cost_limit", body.daily_cost_limit),
        ("monthly_cost_limit", body.monthly_cost_limit),
        ("total_cost_limit", body.total_cost_limit),
    ])?;
    let (platforms, models) = allow_lists(body.allowed_platforms, body.allowed_models)?;
    let password_hash = hash(body.password).await?;
    let user = state
        .store
        .create_user(&NewUser {
            username,
            password_hash,
            role,
            price_rate,
            daily_cost_limit: body.daily_cost_limit,
            monthly_cost_limit: body.monthly_cost_limit,
            total_cost_limit: body.total_cost_limit,
            allowed_platforms: platforms,
            allowed_models: models,
        })
        .await?;
    let mut detail = serde_json::json!({
        "username": user.username,
        "role": user.role,
        "price_rate": user.price_rate,
        "daily_cost_limit": user.daily_cost_limit,
        "monthly_cost_limit": user.monthly_cost_limit,
        "total_cost_limit": user.total_cost_limit,
    });
    for (what, list) in [
        ("allowed_platforms", &user.allowed_platforms),
        ("allowed_models", &user.allowed_models),
    ] {
        if !list.is_empty() {
            detail[what] = serde_json::json!(list);
        }
    }
    audit(&state, &caller, "user.create", &user.id, detail).await;
    state.keys_changed().await;
    Ok((StatusCode::CREATED, Json(user)))
}

/// A user with what it was billed today, this month and in all (micro-USD, over all its keys):
/// what its cost limits are measured against.
#[derive(Debug, Serialize)]
pub struct UserWithSpend {
    #[serde(flatten)]
    pub user: User,
    pub billed_cost_today: i64,
    pub billed_cost_month: i64,
    pub billed_cost: i64,
}

/// `GET /api/admin/users?page=&per_page=`: oldest first, each with what it was billed today,
/// this month and in all.
#[utoipa::path(get, path = "/api/admin/users", tag = "users", params(PageQuery),
    responses(
        (status = 200, description = "A page of users", body = super::openapi::ListPage),
        (status = 400, description = "Bad query", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> AppResult<Json<Page<UserWithSpend>>> {
    caller.require_admin()?;
    let (page, per_page) = q.get();
    let users = state.store.list_users(page, per_page).await?;
    let ids: Vec<String> = users.items.iter().map(|u| u.id.clone()).collect();
    let recent = super::usage::billed_recently(&state, UsageDim::User, &ids).await?;
    let all = state
        .store
        .usage_totals_by_ids(UsageDim::User, &ids, None, None)
        .await?;
    Ok(Json(Page {
        items: users
            .items
            .into_iter()
            .map(|user| UserWithSpend {
                billed_cost_today: recent.today(&user.id),
                billed_cost_month: recent.month(&user.id),
                billed_cost: all.get(&user.id).map_or(0, |t| t.billed_cost),
                user,
            })
            .collect(),
        total: users.total,
        page: users.page,
        per_page: users.per_page,
    }))
}

/// `GET /api/admin/users/{id}`.
#[utoipa::path(get, path = "/api/admin/users/{id}", tag = "users", params(("id" = String, Path, description = "User id")),
    responses(
        (status = 200, description = "The user", body = serde_json::Value),
        (status = 404, description = "No such user", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<User>> {
    caller.require_admin()?;
    Ok(Json(
        state
            .store
            .user_by_id(&id)
            .await?
            .ok_or(AppError::NotFound)?,
    ))
}

/// Fields to change; absent ones stay.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    role: Option<String>,
    enabled: Option<bool>,
    password: Option<String>,
    /// Ten-thousandths (10000 = 1.0).
    price_rate: Option<i64>,
    /// Billed micro-USD per UTC day over all the user's keys; `null` removes the limit.
    #[serde(default, deserialize_with = "super::nullable")]
    daily_cost_limit: Option<Option<i64>>,
    /// Billed micro-USD per UTC calendar month over all the user's keys; `null` removes the
    /// limit.
    #[serde(default, deserialize_with = "super::nullable")]
    monthly_cost_limit: Option<Option<i64>>,
    /// Billed micro-USD in total over all the user's keys; `null` removes the limit.
    #[serde(default, deserialize_with = "super::nullable")]
    total_cost_limit: Option<Option<i64>>,
    /// Platforms every key of the user may use; `[]`: all.
    allowed_platforms: Option<Vec<String>>,
    /// Models (exact or `*` / `?` globs) every key of the user may use; `[]`: all.
    allowed_models: Option<Vec<String>>,
}

/// `PATCH /api/admin/users/{id}` `{"role"?, "enabled"?, "password"?, "price_rate"?,
/// "daily_cost_limit"?, "monthly_cost_limit"?, "total_cost_limit"?, "allowed_platforms"?,
/// "allowed_models"?}`.
/// Disabling a user or setting its password ends its login sessions. Admins cannot demote or
/// disable themselves (so the last admin cannot lock everybody out by mistake).
#[utoipa::path(patch, path = "/api/admin/users/{id}", tag = "users", params(("id" = String, Path, description = "User id")), request_body = UpdateUser,
    responses(
        (status = 200, description = "The user as changed", body = serde_json::Value),
        (status = 400, description = "Bad field, or a change of oneself that is refused", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
    ))]
pub async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<UpdateUser>,
) -> AppResult<Json<User>> {
    caller.require_admin()?;
    let role = body.role.as_deref().map(parse_role).transpose()?;
    if let Some(p) = &body.password {
        check_password(p)?;
    }
    if let Some(rate) = body.price_rate {
        check_rate(rate)?;
    }
    let cost_limits = UserCostLimits {
        daily: body.daily_cost_limit,
        monthly: body.monthly_cost_limit,
        total: body.total_cost_limit,
    };
    let named_limits = [
        ("daily_cost_limit", cost_limits.daily),
        ("monthly_cost_limit", cost_limits.monthly),
        ("total_cost_limit", cost_limits.total),
    ];
    check_cost_limits(named_limits.map(|(what, v)| (what, v.flatten())))?;
    let platforms = body.allowed_platforms.map(trimmed);
    let models = body.allowed_models.map(trimmed);
    if let Some(p) = &platforms {
        super::api_keys::check_platforms(p)?;
    }
    if let Some(m) = &models {
        super::api_keys::check_model_patterns(m)?;
    }
    let is_self = caller.user_id.as_deref() == Some(id.as_str());
    if is_self && (role == Some(Role::User) || body.enabled == Some(false)) {
        return Err(AppError::BadRequest(
            "you cannot demote or disable yourself".into(),
        ));
    }
    if state.store.user_by_id(&id).await?.is_none() {
        return Err(AppError::NotFound);
    }
    if let Some(role) = role {
        state.store.set_user_role(&id, role).await?;
    }
    if let Some(enabled) = body.enabled {
        state.store.set_user_enabled(&id, enabled).await?;
    }
    let password_changed = body.password.is_some();
    if let Some(password) = body.password {
        let password_hash = hash(password).await?;
        state.store.set_user_password(&id, &password_hash).await?;
    }
    if let Some(rate) = body.price_rate {
        state
            .store
            .set_price_rate(std::slice::from_ref(&id), rate)
            .await?;
    }
    state.store.set_user_cost_limits(&id, &cost_limits).await?;
    state
        .store
        .set_user_allow_lists(&id, platforms.as_deref(), models.as_deref())
        .await?;
    if body.enabled == Some(false) || password_changed {
        state.store.delete_admin_sessions_of_user(&id).await?;
    }
    let mut detail = serde_json::json!({
        "role": role,
        "enabled": body.enabled,
        "password_changed": password_changed,
        "price_rate": body.price_rate,
    });
    // A cost limit is named only when changed: `null` there means it was removed.
    for (what, value) in named_limits {
        if let Some(value) = value {
            detail[what] = serde_json::json!(value);
        }
    }
    for (what, list) in [
        ("allowed_platforms", &platforms),
        ("allowed_models", &models),
    ] {
        if let Some(list) = list {
            detail[what] = serde_json::json!(list);
        }
    }
    audit(&state, &caller, "user.update", &id, detail).await;
    state.keys_changed().await;
    Ok(Json(
        state
            .store
            .user_by_id(&id)
            .await?
            .ok_or(AppError::NotFound)?,
    ))
}

/// `DELETE /api/admin/users/{id}`: with its keys and sessions; its usage records stay.
#[utoipa::path(delete, path = "/api/admin/users/{id}", tag = "users", params(("id" = String, Path, description = "User id")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 400, description = "Admins cannot delete themselves", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<Deleted>> {
    caller.require_admin()?;
    if caller.user_id.as_deref() == Some(id.as_str()) {
        return Err(AppError::BadRequest("you cannot delete yourself".into()));
    }
    let user = state
        .store
        .user_by_id(&id)
        .await?
        .ok_or(AppError::NotFound)?;
    state.store.delete_user(&id).await?;
    audit(
        &state,
        &caller,
        "user.delete",
        &id,
        serde_json::json!({ "username": user.username }),
    )
    .await;
    state.keys_changed().await;
    Ok(Json(Deleted { deleted: id }))
}

/// One price rate for a list of users.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchPriceRate {
    user_ids: Vec<String>,
    /// Ten-thousandths (10000 = 1.0).
    price_rate: i64,
}

/// `POST /api/admin/users/batch-price-rate` `{"user_ids": [...], "price_rate": 15000}` →
/// `{"updated": n}`. Requests priced after the answer use the new rate.
#[utoipa::path(post, path = "/api/admin/users/batch-price-rate", tag = "users", request_body = BatchPriceRate,
    responses(
        (status = 200, description = "Users changed", body = Updated),
        (status = 400, description = "Negative rate or no ids", body = ErrorBody),
    ))]
pub async fn batch_price_rate(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<BatchPriceRate>,
) -> AppResult<Json<Updated>> {
    caller.require_admin()?;
    check_rate(body.price_rate)?;
    if body.user_ids.is_empty() {
        return Err(AppError::BadRequest("user_ids must not be empty".into()));
    }
    let mut updated = 0;
    for chunk in body.user_ids.chunks(IDS_PER_UPDATE) {
        updated += state.store.set_price_rate(chunk, body.price_rate).await?;
    }
    audit(
        &state,
        &caller,
        "user.price_rate",
        "batch",
        serde_json::json!({
            "user_ids": body.user_ids,
            "price_rate": body.price_rate,
            "updated": updated,
        }),
    )
    .await;
    state.keys_changed().await;
    Ok(Json(Updated { updated }))
}

/// One price rate for every user.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllPriceRate {
    /// Ten-thousandths (10000 = 1.0).
    price_rate: i64,
}

/// `POST /api/admin/users/all-price-rate` `{"price_rate": 10000}` → `{"updated": n}`: every
/// user, admins included.
#[utoipa::path(post, path = "/api/admin/users/all-price-rate", tag = "users", request_body = AllPriceRate,
    responses(
        (status = 200, description = "Users changed", body = Updated),
        (status = 400, description = "Negative rate", body = ErrorBody),
    ))]
pub async fn all_price_rate(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<AllPriceRate>,
) -> AppResult<Json<Updated>> {
    caller.require_admin()?;
    check_rate(body.price_rate)?;
    let updated = state.store.set_all_price_rates(body.price_rate).await?;
    audit(
        &state,
        &caller,
        "user.price_rate",
        "all",
        serde_json::json!({ "price_rate": body.price_rate, "updated": updated }),
    )
    .await;
    state.keys_changed().await;
    Ok(Json(Updated { updated }))
}
