//! Upstream accounts (admins only): create, list, get, update, delete. The credential is
//! encrypted at rest and never returned: answers carry a mask of it (first and last four
//! characters of a long credential, nothing of a short one).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use relay_filters::accounts::BaseUrl;
use relay_filters::AccountType;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{audit, Deleted, PageQuery};
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult, ErrorBody};
use crate::admin::extract::{Json, Path, Query};
use crate::admin::AdminState;
use crate::background::health::NotChecked;
use crate::background::oauth_refresh::{NotRefreshed, RefreshReport};
use crate::proxy::oauth::Provider;
use crate::secrets::SecretBox;
use crate::store::{Account, AccountPatch, AccountStatus, NewAccount, Page};

/// Credentials shorter than this show no character at all in the mask.
const MASK_MIN_LEN: usize = 20;
/// The largest weight: a share relative to the other accounts of a tier, as fine as anyone
/// needs at this bound.
pub const MAX_WEIGHT: i64 = 10_000;
/// The largest `max_concurrency`: a limit far above what one upstream account takes.
pub const MAX_ACCOUNT_CONCURRENCY: i64 = 100_000;

/// An account as the API shows it.
#[derive(Debug, Serialize)]
pub struct AccountView {
    #[serde(flatten)]
    pub account: Account,
    /// `sk-a…wxyz` for a long credential, `…` for a short one; `null` when it cannot be
    /// decrypted (encrypted with another key).
    pub credential_masked: Option<String>,
}

/// The mask of a credential: enough to tell two apart, not enough to use one.
fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < MASK_MIN_LEN {
        return "…".into();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

fn view(account: Account, secrets: &SecretBox) -> AccountView {
    let credential_masked = secrets
        .decrypt(&account.credential_enc)
        .ok()
        .map(|c| mask(c.expose_secret()));
    AccountView {
        account,
        credential_masked,
    }
}

/// What `patch` did to an account, for the audit log: `{"from": old, "to": new}` of each
/// setting it changed (a change another writer made meanwhile, such as a token refresh, is
/// not its). Never a secret: the credential and refresh token are only flagged as changed
/// beside this, and whether a refresh token is stored.
fn changes(
    old: &Account,
    new: &Account,
    patch: &AccountPatch,
) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::json;
    let chatgpt = |a: &Account| {
        a.extra
            .get("chatgpt_account_id")
            .cloned()
            .unwrap_or_default()
    };
    // (field, set by the patch, old, new)
    let fields = [
        (
            "name",
            patch.name.is_some(),
            json!(old.name),
            json!(new.name),
        ),
        (
            "type",
            patch.account_type.is_some(),
            json!(old.account_type),
            json!(new.account_type),
        ),
        (
            "base_url",
            patch.base_url.is_some(),
            json!(old.base_url),
            json!(new.base_url),
        ),
        (
            "priority",
            patch.priority.is_some(),
            json!(old.priority),
            json!(new.priority),
        ),
        (
            "weight",
            patch.weight.is_some(),
            json!(old.weight),
            json!(new.weight),
        ),
        (
            "max_concurrency",
            patch.max_concurrency.is_some(),
            json!(old.max_concurrency),
            json!(new.max_concurrency),
        ),
        (
            "models",
            patch.models.is_some(),
            json!(old.models),
            json!(new.models),
        ),
        (
            "model_map",
            patch.model_map.is_some(),
            json!(old.model_map),
            json!(new.model_map),
        ),
        (
            "enabled",
            patch.enabled.is_some(),
            json!(old.enabled),
            json!(new.enabled),
        ),
        (
            "status",
            patch.status.is_some(),
            json!(old.status),
            json!(new.status),
        ),
        (
            "token_expires_at",
            patch.token_expires_at.is_some(),
            json!(old.token_expires_at),
            json!(new.token_expires_at),
        ),
        (
            "has_refresh_token",
            patch.refresh_token_enc.is_some(),
            json!(old.has_refresh_token),
            json!(new.has_refresh_token),
        ),
        (
            "chatgpt_account_id",
            patch.extra.is_some(),
            chatgpt(old),
            chatgpt(new),
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, set, from, to)| *set && from != to)
        .map(|(field, _, from, to)| (field.to_string(), json!({ "from": from, "to": to })))
        .collect()
}

/// A new upstream account; the credential is encrypted at rest and never returned.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    name: String,
    /// `claude`, `claude-official`, `openai`, `openai-responses` or `gemini`.
    #[serde(rename = "type", alias = "account_type")]
    account_type: String,
    #[serde(default)]
    base_url: Option<String>,
    credential: String,
    /// OAuth accounts: the refresh token, with which the relay renews the access token.
    #[serde(default)]
    refresh_token: Option<String>,
    /// OAuth accounts: when the access token expires (epoch ms; Claude Code's `expiresAt`).
    /// Unknown, it is refreshed at once (a ChatGPT token's own expiry is read from it).
    #[serde(default)]
    token_expires_at: Option<i64>,
    #[serde(default)]
    priority: Option<i64>,
    /// Share of the traffic inside a priority tier, 1 to 10 000 (default 1).
    #[serde(default)]
    weight: Option<i64>,
    /// Models it serves (each non-empty); empty = all.
    #[serde(default)]
    models: Vec<String>,
    /// Requested model → upstream model, neither empty.
    #[serde(default)]
    model_map: BTreeMap<String, String>,
    /// Requests in flight at once, 1 to 100 000; absent = no limit.
    #[serde(default)]
    max_concurrency: Option<i64>,
    #[serde(default)]
    enabled: Option<bool>,
    /// `openai-responses` accounts with a ChatGPT token: the ChatGPT account it belongs to,
    /// sent upstream as `chatgpt-account-id` (visible ASCII).
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

/// A ChatGPT account id as given, trimmed; it goes upstream as a header, so an empty one or
/// one with other than visible ASCII is refused.
fn chatgpt_account_id(id: &str) -> AppResult<String> {
    let id = id.trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(AppError::BadRequest(
            "chatgpt_account_id must be visible ASCII without spaces (null removes it)".into(),
        ));
    }
    Ok(id.to_string())
}

/// A refresh token as given, trimmed; an empty one is refused.
fn refresh_token(t: Option<String>) -> AppResult<Option<String>> {
    match t.map(|t| t.trim().to_string()) {
        Some(t) if t.is_empty() => Err(AppError::BadRequest(
            "refresh_token must not be empty (null removes it)".into(),
        )),
        other => Ok(other),
    }
}

/// Refuses a change that would leave a refresh token where the relay would send it to the
/// wrong token endpoint (the refresh picks it by the account's type, `Provider::of`): a refresh
/// token given for a type without OAuth refresh, or a change of type that keeps the stored
/// refresh token though the new type refreshes at another provider, or at none. With a type
/// change, `refresh_token` (a new one, or `null` to remove it) says what becomes of it.
/// `given`: absent (`None`), `null` (`Some(false)`) or a new token (`Some(true)`).
fn check_refresh_token_type(
    stored: AccountType,
    has_refresh_token: bool,
    new_type: Option<AccountType>,
    given: Option<bool>,
) -> AppResult<()> {
    let account_type = new_type.unwrap_or(stored);
    if given == Some(true) && Provider::of(account_type).is_none() {
        return Err(AppError::BadRequest(format!(
            "{} accounts have no OAuth refresh: refresh_token is for claude-official and \
             openai-responses accounts",
            account_type.as_str()
        )));
    }
    let other_provider =
        Provider::of(account_type).is_none() || Provider::of(account_type) != Provider::of(stored);
    if account_type != stored && has_refresh_token && given.is_none() && other_provider {
        return Err(AppError::BadRequest(format!(
            "the account's refresh token is one of a {} account: changing its type to {} needs \
             refresh_token too (a new one, or null to remove it)",
            stored.as_str(),
            account_type.as_str()
        )));
    }
    Ok(())
}

/// Refuses an expiry that is no epoch time in milliseconds (seconds given, or negative).
fn check_expiry(at: Option<i64>) -> AppResult<()> {
    if at.is_some_and(|at| !(100_000_000_000..10_000_000_000_000).contains(&at)) {
        return Err(AppError::BadRequest(
            "token_expires_at is in epoch milliseconds (e.g. 1764000000000)".into(),
        ));
    }
    Ok(())
}

/// A JWT credential's own expiry (a ChatGPT token's), in epoch ms.
fn jwt_expiry_ms(credential: &str) -> Option<i64> {
    crate::proxy::oauth::jwt_expiry(credential).map(|s| s.saturating_mul(1000))
}

/// A base URL as given, trimmed and checked; empty means the type's default (`None`).
fn base_url(url: Option<String>) -> AppResult<Option<String>> {
    match url.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(u) => {
            BaseUrl::parse(u).map_err(AppError::BadRequest)?;
            Ok(Some(u.to_string()))
        }
    }
}

/// An account name, trimmed; an empty one is refused.
fn account_name(name: &str) -> AppResult<String> {
    match name.trim() {
        "" => Err(AppError::BadRequest("name is required".into())),
        n => Ok(n.to_string()),
    }
}

/// Refuses a weight outside 1..=[`MAX_WEIGHT`].
fn check_weight(weight: Option<i64>) -> AppResult<()> {
    match weight {
        Some(w) if w < 1 => Err(AppError::BadRequest("weight must be at least 1".into())),
        Some(w) if w > MAX_WEIGHT => Err(AppError::BadRequest(format!(
            "weight is at most {MAX_WEIGHT}"
        ))),
        _ => Ok(()),
    }
}

/// Refuses a concurrency limit outside 1..=[`MAX_ACCOUNT_CONCURRENCY`] (0 would make an
/// account that never serves).
fn check_max_concurrency(limit: Option<i64>) -> AppResult<()> {
    match limit {
        Some(c) if !(1..=MAX_ACCOUNT_CONCURRENCY).contains(&c) => {
            Err(AppError::BadRequest(format!(
                "max_concurrency is 1 to {MAX_ACCOUNT_CONCURRENCY} (null or absent for no limit)"
            )))
        }
        _ => Ok(()),
    }
}

/// A model list, each entry trimmed; an empty entry is refused (it would match no model).
fn model_list(models: Vec<String>) -> AppResult<Vec<String>> {
    models
        .into_iter()
        .map(|m| match m.trim() {
            "" => Err(AppError::BadRequest(
                "models must not hold an empty name (an empty list serves all models)".into(),
            )),
            m => Ok(m.to_string()),
        })
        .collect()
}

/// A model map, keys and values trimmed; an empty one, or a key given twice once trimmed, is
/// refused.
fn model_map(map: BTreeMap<String, String>) -> AppResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (from, to) in map {
        let (from, to) = (from.trim(), to.trim());
        if from.is_empty() || to.is_empty() {
            return Err(AppError::BadRequest(
                "model_map keys and values must not be empty".into(),
            ));
        }
        if out.insert(from.to_string(), to.to_string()).is_some() {
            return Err(AppError::BadRequest(format!(
                "model_map has {from:?} twice"
            )));
        }
    }
    Ok(out)
}

/// `POST /api/admin/accounts`.
#[utoipa::path(post, path = "/api/admin/accounts", tag = "accounts", request_body = CreateAccount,
    responses(
        (status = 201, description = "The account, credential masked (`credential_masked`)", body = serde_json::Value),
        (status = 400, description = "Bad type, URL, name, credential, weight, max_concurrency, models or model map", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<CreateAccount>,
) -> AppResult<(StatusCode, Json<AccountView>)> {
    caller.require_admin()?;
    let account_type = parse_type(&body.account_type)?;
    let url = base_url(body.base_url)?;
    let name = account_name(&body.name)?;
    if body.credential.trim().is_empty() {
        return Err(AppError::BadRequest("credential is required".into()));
    }
    check_weight(body.weight)?;
    check_max_concurrency(body.max_concurrency)?;
    let models = model_list(body.models)?;
    let model_map = model_map(body.model_map)?;
    let mut new = NewAccount::new(
        name,
        account_type,
        state.secrets.encrypt(body.credential.trim()),
        state.secrets.key_id().to_string(),
    );
    new.base_url = url;
    check_expiry(body.token_expires_at)?;
    let refresh = refresh_token(body.refresh_token)?;
    check_refresh_token_type(account_type, false, None, refresh.as_ref().map(|_| true))?;
    new.refresh_token_enc = refresh.map(|t| state.secrets.encrypt(&t));
    new.token_expires_at = body
        .token_expires_at
        .or_else(|| jwt_expiry_ms(body.credential.trim()));
    new.priority = body.priority.unwrap_or(50);
    new.weight = body.weight.unwrap_or(1);
    new.models = models;
    new.model_map = model_map;
    new.max_concurrency = body.max_concurrency;
    new.enabled = body.enabled.unwrap_or(true);
    if let Some(id) = body.chatgpt_account_id {
        new.extra = serde_json::json!({ "chatgpt_account_id": chatgpt_account_id(&id)? });
    }
    let account = state.store.create_account(&new).await?;
    audit(
        &state,
        &caller,
        "account.create",
        &account.id,
        serde_json::json!({
            "name": account.name,
            "type": account.account_type,
            "base_url": account.base_url,
        }),
    )
    .await;
    state.accounts_changed().await;
    Ok((StatusCode::CREATED, Json(view(account, &state.secrets))))
}

/// `GET /api/admin/accounts?page=&per_page=`: oldest first.
#[utoipa::path(get, path = "/api/admin/accounts", tag = "accounts", params(PageQuery),
    responses(
        (status = 200, description = "A page of accounts, credentials masked", body = super::openapi::ListPage),
        (status = 400, description = "Bad query", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AdminState>,
    caller: Caller,
    Query(q): Query<PageQuery>,
) -> AppResult<Json<Page<AccountView>>> {
    caller.require_admin()?;
    let (page, per_page) = q.get();
    let page = state.store.list_accounts(page, per_page).await?;
    Ok(Json(Page {
        items: page
            .items
            .into_iter()
            .map(|a| view(a, &state.secrets))
            .collect(),
        total: page.total,
        page: page.page,
        per_page: page.per_page,
    }))
}

/// The stored account `id`, or 404.
async fn stored(state: &AdminState, id: &str) -> AppResult<Account> {
    state
        .store
        .account_by_id(id)
        .await?
        .ok_or(AppError::NotFound)
}

impl From<NotChecked> for AppError {
    fn from(e: NotChecked) -> Self {
        AppError::Conflict(
            match e {
                NotChecked::NotLoaded => {
                    "the account is not loaded on this node (its credential cannot be decrypted here)"
                }
                NotChecked::Busy => "a check of this account is running: try again in a moment",
            }
            .into(),
        )
    }
}

/// `GET /api/admin/accounts/{id}`.
#[utoipa::path(get, path = "/api/admin/accounts/{id}", tag = "accounts", params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, description = "The account, credential masked", body = serde_json::Value),
        (status = 404, description = "No such account", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<AccountView>> {
    caller.require_admin()?;
    let account = stored(&state, &id).await?;
    Ok(Json(view(account, &state.secrets)))
}

/// `DELETE /api/admin/accounts/{id}`: its usage records stay; sessions bound to it are moved
/// to another account on their next request.
#[utoipa::path(delete, path = "/api/admin/accounts/{id}", tag = "accounts", params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "No such account", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<Deleted>> {
    caller.require_admin()?;
    let account = stored(&state, &id).await?;
    state.store.delete_account(&id).await?;
    audit(
        &state,
        &caller,
        "account.delete",
        &id,
        serde_json::json!({ "name": account.name, "type": account.account_type }),
    )
    .await;
    state.accounts_changed().await;
    Ok(Json(Deleted { deleted: id }))
}

/// Fields to change; absent ones stay, `null` clears `base_url` or `max_concurrency`. The
/// same rules as on creation hold (names and models trimmed and non-empty, weight and
/// max_concurrency in bounds).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAccount {
    name: Option<String>,
    #[serde(rename = "type", alias = "account_type")]
    account_type: Option<String>,
    #[serde(default, deserialize_with = "super::nullable")]
    base_url: Option<Option<String>>,
    credential: Option<String>,
    /// A new refresh token; `null` removes it. The one stored already changes nothing (a
    /// refresh of it running keeps its hold on it).
    #[serde(default, deserialize_with = "super::nullable")]
    refresh_token: Option<Option<String>>,
    /// When the access token expires (epoch ms); `null`: unknown.
    #[serde(default, deserialize_with = "super::nullable")]
    token_expires_at: Option<Option<i64>>,
    priority: Option<i64>,
    weight: Option<i64>,
    models: Option<Vec<String>>,
    model_map: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "super::nullable")]
    max_concurrency: Option<Option<i64>>,
    enabled: Option<bool>,
    /// `valid` clears an error state (and the error count) and ends a cooldown, on every node.
    status: Option<String>,
    /// The ChatGPT account of a ChatGPT token (`openai-responses`); `null` removes it.
    #[serde(default, deserialize_with = "super::nullable")]
    chatgpt_account_id: Option<Option<String>>,
}

/// `PATCH /api/admin/accounts/{id}`: a new `credential` replaces the stored one.
#[utoipa::path(patch, path = "/api/admin/accounts/{id}", tag = "accounts", params(("id" = String, Path, description = "Account id")), request_body = UpdateAccount,
    responses(
        (status = 200, description = "The account as changed, credential masked", body = serde_json::Value),
        (status = 400, description = "Bad field", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    ))]
pub async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<UpdateAccount>,
) -> AppResult<Json<AccountView>> {
    caller.require_admin()?;
    let current = stored(&state, &id).await?;
    if body
        .credential
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return Err(AppError::BadRequest("credential must not be empty".into()));
    }
    check_weight(body.weight)?;
    check_max_concurrency(body.max_concurrency.flatten())?;
    let name = body.name.as_deref().map(account_name).transpose()?;
    let url = body.base_url.map(base_url).transpose()?;
    let models = body.models.map(model_list).transpose()?;
    let model_map = body.model_map.map(model_map).transpose()?;
    // The other keys of `extra` stay as they are.
    let extra = match body.chatgpt_account_id {
        None => None,
        Some(given) => {
            let mut extra = current.extra.as_object().cloned().unwrap_or_default();
            match given {
                Some(given) => {
                    let given = chatgpt_account_id(&given)?;
                    extra.insert("chatgpt_account_id".into(), given.into());
                }
                None => {
                    extra.remove("chatgpt_account_id");
                }
            }
            Some(serde_json::Value::Object(extra))
        }
    };
    let status = match body.status.as_deref() {
        None => None,
        Some(s) => Some(AccountStatus::parse(s).ok_or_else(|| {
            AppError::BadRequest("status must be valid, error or blocked".into())
        })?),
    };
    check_expiry(body.token_expires_at.flatten())?;
    let account_type = body.account_type.as_deref().map(parse_type).transpose()?;
    check_refresh_token_type(
        current.account_type,
        current.refresh_token_enc.is_some(),
        account_type,
        body.refresh_token.as_ref().map(Option::is_some),
    )?;
    // The refresh token the account has already (saved again: another ciphertext, the same
    // token) is no change. Writing it would end the lease of a refresh running over it and let
    // a second refresh send that token again, which a provider answers by revoking the chain.
    let stored_refresh = current
        .refresh_token_enc
        .as_deref()
        .and_then(|enc| state.secrets.decrypt(enc).ok());
    let refresh_token_enc = match body.refresh_token.map(refresh_token).transpose()? {
        None => None,
        Some(None) if current.refresh_token_enc.is_none() => None,
        Some(Some(t))
            if stored_refresh
                .as_ref()
                .is_some_and(|s| s.expose_secret() == t) =>
        {
            None
        }
        Some(t) => Some(t.map(|t| state.secrets.encrypt(&t))),
    };
    // Likewise the credential the account has already: no new tokens, so its expiry and what
    // was said of its refresh stay.
    let credential = body.credential.as_deref().map(str::trim).filter(|c| {
        state
            .secrets
            .decrypt(&current.credential_enc)
            .map_or(true, |stored| stored.expose_secret() != *c)
    });
    // A new ChatGPT token tells its own expiry; a new credential of unknown expiry makes the
    // old expiry wrong.
    let token_expires_at = body
        .token_expires_at
        .or_else(|| credential.map(jwt_expiry_ms));
    let patch = AccountPatch {
        name,
        refresh_token_enc,
        token_expires_at,
        account_type,
        base_url: url,
        credential: credential
            .map(|c| (state.secrets.encrypt(c), state.secrets.key_id().to_string())),
        priority: body.priority,
        weight: body.weight,
        models,
        model_map,
        max_concurrency: body.max_concurrency,
        enabled: body.enabled,
        consecutive_error_count: status.filter(|s| *s == AccountStatus::Valid).map(|_| 0),
        clear_cooldown: status == Some(AccountStatus::Valid),
        status,
        extra,
        ..Default::default()
    };
    let credential_changed = patch.credential.is_some();
    let refresh_token_changed = patch.refresh_token_enc.is_some();
    // Setting the account valid or switching it on is the operator's word, also over this
    // node's automatic disable; taking it out needs no help (its row says so).
    let puts_back = patch.status == Some(AccountStatus::Valid) || patch.enabled == Some(true);
    if patch.clear_cooldown {
        // Redis first: what a node still reads there was read before the row changed, so the
        // reload that finds the clear comes after it and ends the cooldown (see
        // `AccountCache::apply_shared_cooldowns`).
        if let Some(cooldowns) = &state.cooldowns {
            if let Err(e) = cooldowns.clear(&id).await {
                tracing::warn!(account = %id, error = %e.0, "the shared cooldown could not be cleared: other nodes take it again from Redis until it expires");
            }
        }
    }
    let account = state.store.update_account(&id, &patch).await?;
    if puts_back {
        state.accounts.end_hold_off(&id);
    }
    let mut detail = serde_json::json!({
        "name": account.name,
        "changes": changes(&current, &account, &patch),
        "credential_changed": credential_changed,
        "refresh_token_changed": refresh_token_changed,
    });
    // The cooldown an operator ended, when one was running (its end, epoch ms).
    if let Some(until) = current
        .cooldown_until
        .filter(|until| patch.clear_cooldown && *until > super::now_ms())
    {
        detail["cooldown_ended"] = serde_json::json!(until);
    }
    audit(&state, &caller, "account.update", &id, detail).await;
    state.accounts_changed().await;
    Ok(Json(view(account, &state.secrets)))
}

/// `POST /api/admin/accounts/{id}/health-check`: checks the account now, whatever its type
/// (DESIGN §11), and applies the result: a pass clears its error count and puts it back if
/// errors took it out; a failure counts toward the error threshold.
#[utoipa::path(post, path = "/api/admin/accounts/{id}/health-check", tag = "accounts", params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, description = "What the check found and the account's state after it", body = serde_json::Value),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "The account is disabled, its credential cannot be read on this node, or a check of it is running", body = ErrorBody),
    ))]
pub async fn health_check(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<crate::background::health::CheckReport>> {
    caller.require_admin()?;
    let account = stored(&state, &id).await?;
    if !account.enabled {
        return Err(AppError::Conflict(
            "the account is disabled: enable it to check it".into(),
        ));
    }
    let report = state.health.check(&account).await?;
    audit(
        &state,
        &caller,
        "account.health_check",
        &id,
        serde_json::json!({ "name": account.name, "passed": report.passed, "http_status": report.http_status }),
    )
    .await;
    Ok(Json(report))
}

/// Every enabled account's check, as `POST /api/admin/accounts/health-check` answers.
#[derive(Debug, Serialize)]
pub struct CheckAll {
    pub checked: usize,
    /// Checks that did not pass: refused (`fail`) or `inconclusive`.
    pub failed: usize,
    pub accounts: Vec<crate::background::health::CheckReport>,
}

/// `POST /api/admin/accounts/health-check`: checks every enabled account now, of every type,
/// a few at a time, and applies the results.
#[utoipa::path(post, path = "/api/admin/accounts/health-check", tag = "accounts",
    responses((status = 200, description = "Each account's check and state after it", body = serde_json::Value)))]
pub async fn health_check_all(
    State(state): State<AdminState>,
    caller: Caller,
) -> AppResult<Json<CheckAll>> {
    caller.require_admin()?;
    let accounts = state.health.check_all(true).await?;
    let failed = accounts.iter().filter(|r| !r.passed).count();
    audit(
        &state,
        &caller,
        "account.health_check_all",
        "",
        serde_json::json!({ "checked": accounts.len(), "failed": failed }),
    )
    .await;
    Ok(Json(CheckAll {
        checked: accounts.len(),
        failed,
        accounts,
    }))
}

impl From<NotRefreshed> for AppError {
    fn from(e: NotRefreshed) -> Self {
        match e {
            NotRefreshed::NotRefreshable => AppError::BadRequest(
                "only claude-official and openai-responses accounts with a refresh token can be refreshed"
                    .into(),
            ),
            NotRefreshed::Gone => AppError::NotFound,
            NotRefreshed::Undecryptable => AppError::Conflict(
                "the refresh token cannot be decrypted on this node (encrypted with another key)"
                    .into(),
            ),
            NotRefreshed::Busy => AppError::Conflict(
                "a refresh of this account is running: try again in a moment".into(),
            ),
            NotRefreshed::NotDue => AppError::Conflict("the refresh was not started".into()),
            NotRefreshed::Unavailable(e) => {
                AppError::Unavailable(format!("the account could not be read: {e}"))
            }
        }
    }
}

/// `POST /api/admin/accounts/{id}/refresh-token`: asks the provider for a new access token
/// now, with the account's refresh token, and stores it (with the rotated refresh token). A
/// refusal is stored on the account (`token_refresh_refused`): the rounds leave it until new
/// tokens are set.
#[utoipa::path(post, path = "/api/admin/accounts/{id}/refresh-token", tag = "accounts", params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, description = "What the refresh came to: `refreshed`, `refused`, `failed` or `superseded`, and the token's expiry", body = serde_json::Value),
        (status = 400, description = "Not an OAuth account with a refresh token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "A refresh of it is running on this node or another (a refresh holds the account for at most three times `oauth.timeout` and a minute), or its refresh token cannot be decrypted on this node", body = ErrorBody),
        (status = 503, description = "The database could not be read", body = ErrorBody),
    ))]
pub async fn refresh_token_now(
    State(state): State<AdminState>,
    caller: Caller,
    Path(id): Path<String>,
) -> AppResult<Json<RefreshReport>> {
    caller.require_admin()?;
    let account = stored(&state, &id).await?;
    // Audited in the refresh's own task: it also ends if the caller goes away.
    let (audit_state, target) = (state.clone(), id.clone());
    let report = state
        .tokens
        .refresh(&id, move |report| async move {
            audit(
                &audit_state,
                &caller,
                "account.token_refresh",
                &target,
                serde_json::json!({ "name": account.name, "result": report.result }),
            )
            .await;
        })
        .await?;
    Ok(Json(report))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;
    use AccountType::{Claude, ClaudeOfficial, Gemini, Openai, OpenaiResponses};

    #[test]
    fn changes_are_the_patchs_own_old_to_new() {
        let old =
            NewAccount::new("a", ClaudeOfficial, "c1".into(), "k".into()).into_account("id", 0);
        let mut new = old.clone();
        new.priority = 7;
        new.credential_enc = "c2".into();
        // A token refresh meanwhile: not this change's.
        new.token_expires_at = Some(1_900_000_000_000);
        let patch = AccountPatch {
            priority: Some(7),
            weight: Some(1),
            credential: Some(("c2".into(), "k".into())),
            ..Default::default()
        };
        assert_eq!(
            serde_json::Value::Object(changes(&old, &new, &patch)),
            serde_json::json!({"priority": {"from": 50, "to": 7}})
        );
    }

    #[test]
    fn a_refresh_token_stays_with_its_provider() {
        // (stored type, has a refresh token, new type, refresh_token given, allowed)
        let cases = [
            // A new refresh token only where the relay refreshes.
            (ClaudeOfficial, false, None, Some(true), true),
            (OpenaiResponses, false, None, Some(true), true),
            (Claude, false, None, Some(true), false),
            (Openai, true, None, Some(true), false),
            (ClaudeOfficial, false, Some(Gemini), Some(true), false),
            // Removing one is always allowed.
            (Claude, true, None, Some(false), true),
            // A type change keeps a stored refresh token only at the same provider.
            (ClaudeOfficial, true, Some(OpenaiResponses), None, false),
            (OpenaiResponses, true, Some(ClaudeOfficial), None, false),
            (ClaudeOfficial, true, Some(Claude), None, false),
            (Claude, true, Some(Openai), None, false),
            (ClaudeOfficial, true, Some(ClaudeOfficial), None, true),
            (
                ClaudeOfficial,
                true,
                Some(OpenaiResponses),
                Some(true),
                true,
            ),
            (ClaudeOfficial, true, Some(Claude), Some(false), true),
            // Nothing stored: nothing to send anywhere.
            (ClaudeOfficial, false, Some(OpenaiResponses), None, true),
            (Claude, false, Some(ClaudeOfficial), None, true),
            // No type change: other fields may change as before.
            (ClaudeOfficial, true, None, None, true),
            (Claude, true, None, None, true),
        ];
        for (stored, has, new_type, given, allowed) in cases {
            let r = check_refresh_token_type(stored, has, new_type, given);
            assert_eq!(
                r.is_ok(),
                allowed,
                "{stored:?} {has} {new_type:?} {given:?}: {r:?}"
            );
        }
    }
}
