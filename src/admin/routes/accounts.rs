//! Upstream accounts: create (credential encrypted at rest, never returned), list, update.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use relay_filters::accounts::BaseUrl;
use relay_filters::AccountType;
use serde::Deserialize;

use super::PageQuery;
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult};
use crate::admin::AdminState;
use crate::store::{Account, AccountPatch, AccountStatus, NewAccount, Page};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    name: String,
    #[serde(rename = "type", alias = "account_type")]
    account_type: String,
    #[serde(default)]
    base_url: Option<String>,
    credential: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    weight: Option<i64>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    model_map: BTreeMap<String, String>,
    #[serde(default)]
    max_concurrency: Option<i64>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    chatgpt_account_id: Option<String>,
}

fn parse_type(t: &str) -> AppResult<AccountType> {
    AccountType::parse(t).ok_or_else(|| {
        AppError::BadRequest(format!(
            "unknown account type {t}: use claude, claude-official, openai, openai-responses or gemini"
        ))
    })
}

fn check_url(url: &Option<String>) -> AppResult<()> {
    if let Some(u) = url.as_deref().filter(|u| !u.is_empty()) {
        BaseUrl::parse(u).map_err(AppError::BadRequest)?;
    }
    Ok(())
}

pub async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<CreateAccount>,
) -> AppResult<(StatusCode, Json<Account>)> {
    caller.require_admin()?;
    let account_type = parse_type(&body.account_type)?;
    check_url(&body.base_url)?;
    if body.name.trim().is_empty() {
        return Err(AppError::BadRequest("name is required".into()));
    }
    if body.credential.trim().is_empty() {
        return Err(AppError::BadRequest("credential is required".into()));
    }
    if body.weight.is_some_and(|w| w < 1) {
        return Err(AppError::BadRequest("weight must be at least 1".into()));
    }
    let mut new = NewAccount::new(
        body.name.trim(),
        account_type,
        state.secrets.encrypt(body.credential.trim()),
        state.secrets.key_id().to_string(),
    );
    new.base_url = body.base_url.filter(|u| !u.is_empty());
    new.refresh_token_enc = body.refresh_token.map(|t| state.secrets.encrypt(&t));
    new.priority = body.priority.unwrap_or(50);
    new.weight = body.weight.unwrap_or(1);
    new.models = body.models;
    new.model_map = body.model_map;
    new.max_concurrency = body.max_concurrency;
    new.enabled = body.enabled.unwrap_or(true);
    if let Some(id) = body.chatgpt_account_id {
        new.extra = serde_json::json!({ "chatgpt_account_id": id });
    }
    let account = state.store.create_account(&new).await?;
    let _ = state
        .store
        .append_audit(
            &caller.name,
            "account.create",
            &account.id,
            &serde_json::json!({ "name": account.name, "type": account.account_type }),
        )
        .await;
    state.refresh.notify_one();
    Ok((StatusCode::CREATED, Json(account)))
}

pub async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> AppResult<Json<Page<Account>>> {
    caller.require_admin()?;
    let (page, per_page) = q.get();
    Ok(Json(state.store.list_accounts(page, per_page).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateAccount {
    name: Option<String>,
    #[serde(rename = "type", alias = "account_type")]
    account_type: Option<String>,
    #[serde(default, deserialize_with = "super::nullable")]
    base_url: Option<Option<String>>,
    credential: Option<String>,
    priority: Option<i64>,
    weight: Option<i64>,
    models: Option<Vec<String>>,
    model_map: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "super::nullable")]
    max_concurrency: Option<Option<i64>>,
    enabled: Option<bool>,
    /// `valid` clears an error state (and the error count).
    status: Option<String>,
}

pub async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<UpdateAccount>,
) -> AppResult<Json<Account>> {
    caller.require_admin()?;
    if let Some(Some(u)) = &body.base_url {
        check_url(&Some(u.clone()))?;
    }
    let status = match body.status.as_deref() {
        None => None,
        Some(s) => Some(AccountStatus::parse(s).ok_or_else(|| {
            AppError::BadRequest("status must be valid, error or blocked".into())
        })?),
    };
    let patch = AccountPatch {
        name: body.name,
        account_type: body.account_type.as_deref().map(parse_type).transpose()?,
        base_url: body.base_url,
        credential: body.credential.map(|c| {
            (
                state.secrets.encrypt(c.trim()),
                state.secrets.key_id().to_string(),
            )
        }),
        priority: body.priority,
        weight: body.weight,
        models: body.models,
        model_map: body.model_map,
        max_concurrency: body.max_concurrency,
        enabled: body.enabled,
        consecutive_error_count: status.filter(|s| *s == AccountStatus::Valid).map(|_| 0),
        cooldown_until: status.filter(|s| *s == AccountStatus::Valid).map(|_| None),
        status,
        ..Default::default()
    };
    let account = state.store.update_account(&id, &patch).await?;
    let _ = state
        .store
        .append_audit(
            &caller.name,
            "account.update",
            &id,
            &serde_json::json!({ "enabled": account.enabled, "status": account.status }),
        )
        .await;
    state.refresh.notify_one();
    Ok(Json(account))
}
