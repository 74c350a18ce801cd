//! Runtime settings (admins only): the account health check job (DESIGN §11).

use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit;
use crate::admin::auth::Caller;
use crate::admin::error::{AppError, AppResult, ErrorBody};
use crate::admin::extract::Json;
use crate::admin::AdminState;
use crate::background::health::{
    HealthSettings, ENABLED_KEY, INTERVAL_KEY, MAX_INTERVAL_MINUTES, MIN_INTERVAL_MINUTES,
};

/// The settings, with the error threshold they work with.
#[derive(Debug, Serialize)]
pub struct SettingsView {
    #[serde(flatten)]
    pub health: HealthSettings,
    /// Failed checks (or authentication errors) in a row that take an account out of
    /// scheduling; set in the configuration (`scheduler.account_error_threshold`).
    pub account_error_threshold: u32,
}

/// Settings to change; absent ones stay.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSettings {
    /// Run the periodic account health checks.
    account_health_check_enabled: Option<bool>,
    /// Minutes between two rounds (0.05 to 1440).
    account_health_check_interval: Option<f64>,
}

async fn view(state: &AdminState) -> AppResult<SettingsView> {
    Ok(SettingsView {
        health: HealthSettings::load(&state.store).await?,
        account_error_threshold: state.health.rules.account_error_threshold,
    })
}

/// `GET /api/admin/settings`.
#[utoipa::path(get, path = "/api/admin/settings", tag = "settings",
    responses(
        (status = 200, description = "The settings", body = serde_json::Value),
        (status = 403, description = "Not an admin", body = ErrorBody),
    ))]
pub async fn get(State(state): State<AdminState>, caller: Caller) -> AppResult<Json<SettingsView>> {
    caller.require_admin()?;
    Ok(Json(view(&state).await?))
}

/// `PATCH /api/admin/settings` `{"account_health_check_enabled"?, "account_health_check_interval"?}`:
/// takes effect on this node at once, on the others within 30 s.
#[utoipa::path(patch, path = "/api/admin/settings", tag = "settings", request_body = UpdateSettings,
    responses(
        (status = 200, description = "The settings after the change", body = serde_json::Value),
        (status = 400, description = "A value out of range, or an unknown setting", body = ErrorBody),
    ))]
pub async fn update(
    State(state): State<AdminState>,
    caller: Caller,
    Json(body): Json<UpdateSettings>,
) -> AppResult<Json<SettingsView>> {
    caller.require_admin()?;
    if let Some(m) = body.account_health_check_interval {
        if !HealthSettings::interval_ok(m) {
            return Err(AppError::BadRequest(format!(
                "account_health_check_interval is in minutes, {MIN_INTERVAL_MINUTES} to {MAX_INTERVAL_MINUTES}"
            )));
        }
    }
    let mut changed = serde_json::Map::new();
    if let Some(on) = body.account_health_check_enabled {
        state
            .store
            .set_setting(ENABLED_KEY, &serde_json::Value::Bool(on))
            .await?;
        changed.insert(ENABLED_KEY.into(), on.into());
    }
    if let Some(m) = body.account_health_check_interval {
        state.store.set_setting(INTERVAL_KEY, &m.into()).await?;
        changed.insert(INTERVAL_KEY.into(), m.into());
    }
    if !changed.is_empty() {
        audit(
            &state,
            &caller,
            "settings.update",
            "",
            serde_json::Value::Object(changed),
        )
        .await;
        state.health.wake.notify_one();
    }
    Ok(Json(view(&state).await?))
}
