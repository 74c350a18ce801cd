//! The OpenAPI 3.1 document of the admin API (`GET /api/openapi.json`, no login), generated
//! from the handlers' `#[utoipa::path]` attributes and the body types' `ToSchema` derives.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::{
    accounts, api_keys, audit, pricing, records_csv, session, sessions, settings, system, usage,
    users,
};
use crate::admin::auth::{CSRF_HEADER, SESSION_COOKIE};

/// Names of the security schemes in the document.
const SCHEME_SESSION: &str = "session_cookie";
const SCHEME_CSRF: &str = "csrf_token";
const SCHEME_TOKEN: &str = "admin_token";

/// Paths under `/api/` that need no caller (their handlers take no `Caller`).
const PUBLIC_API_PATHS: &[&str] = &["/api/auth/login", "/api/openapi.json"];

/// One page of a list. The items' shape is the one the operation describes; store rows carry
/// no schema of their own yet.
#[derive(ToSchema)]
#[schema(as = Page)]
#[allow(dead_code)] // schema only: the handlers serialize `crate::store::Page`
pub struct ListPage {
    /// Rows of this page, in the list's order.
    items: Vec<serde_json::Value>,
    /// Rows matching the query across all pages.
    total: i64,
    /// 1-based page number actually served (after clamping).
    page: i64,
    /// Page size actually served (after clamping to 1..=500).
    per_page: i64,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "llm-relay admin API",
        description = "Accounts, users, API keys, prices, usage and the audit log. Log in with \
            `POST /api/auth/login` (session cookie; send the returned CSRF token in \
            `x-csrf-token` on state-changing calls), or send the static admin token as a \
            bearer token."
    ),
    paths(
        system::healthz,
        system::readyz,
        system::metrics,
        document,
        session::login,
        session::logout,
        session::me,
        api_keys::own_list,
        api_keys::own_create,
        api_keys::own_update,
        api_keys::own_delete,
        usage::summary,
        usage::daily,
        usage::monthly,
        usage::stats,
        usage::own_records,
        records_csv::own_records_csv,
        usage::models,
        users::list,
        users::create,
        users::batch_price_rate,
        users::all_price_rate,
        users::get,
        users::update,
        users::delete,
        usage::user_summary,
        api_keys::list,
        api_keys::create,
        api_keys::update,
        api_keys::delete,
        usage::key_logs,
        accounts::list,
        accounts::create,
        accounts::get,
        accounts::update,
        accounts::delete,
        accounts::health_check,
        accounts::health_check_all,
        accounts::refresh_token_now,
        settings::get,
        settings::update,
        sessions::list,
        sessions::delete,
        pricing::list,
        pricing::upsert,
        pricing::delete,
        usage::records,
        records_csv::records_csv,
        usage::admin_summary,
        usage::breakdown,
        audit::list,
    ),
    components(schemas(usage::OwnRecord, usage::AdminRecord)),
    modifiers(&Security, &OperationIds),
    tags(
        (name = "system", description = "Liveness, readiness, metrics and this document"),
        (name = "session", description = "Login sessions"),
        (name = "own", description = "Every user's own keys and usage (billed cost only)"),
        (name = "users", description = "Users (admins)"),
        (name = "api-keys", description = "Everybody's API keys (admins)"),
        (name = "accounts", description = "Upstream accounts (admins)"),
        (name = "settings", description = "Runtime settings: account health checks (admins)"),
        (name = "sessions", description = "Active session bindings (admins)"),
        (name = "pricing", description = "Model prices (admins)"),
        (name = "usage", description = "Usage records and statistics of all traffic (admins)"),
        (name = "audit", description = "Audit log (admins)"),
    )
)]
pub struct ApiDoc;

/// Adds the two ways to authenticate and, on every operation that needs a caller, which of
/// them it accepts: the session cookie (with the CSRF header unless the method is GET, as
/// `auth.rs` checks) or the admin bearer token; and the 401/403 answers that go with them.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SCHEME_SESSION,
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                SESSION_COOKIE,
                "Session cookie set by POST /api/auth/login (HttpOnly, SameSite=Strict)",
            ))),
        );
        components.add_security_scheme(
            SCHEME_CSRF,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                CSRF_HEADER,
                "CSRF token from the login answer; required with the cookie on every \
                 state-changing call",
            ))),
        );
        components.add_security_scheme(
            SCHEME_TOKEN,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The static admin token (`Authorization: Bearer ...`)"))
                    .build(),
            ),
        );

        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        let no_scopes = Vec::<String>::new;
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/api/") || PUBLIC_API_PATHS.contains(&path.as_str()) {
                continue;
            }
            let ops = [
                (item.get.as_mut(), false),
                (item.post.as_mut(), true),
                (item.put.as_mut(), true),
                (item.patch.as_mut(), true),
                (item.delete.as_mut(), true),
            ];
            for (op, changes_state) in ops {
                let Some(op) = op else { continue };
                let session = if changes_state {
                    SecurityRequirement::new(SCHEME_SESSION, no_scopes())
                        .add(SCHEME_CSRF, no_scopes())
                } else {
                    SecurityRequirement::new(SCHEME_SESSION, no_scopes())
                };
                op.security = Some(vec![
                    session,
                    SecurityRequirement::new(SCHEME_TOKEN, no_scopes()),
                ]);
                let responses = &mut op.responses.responses;
                responses
                    .entry("401".into())
                    .or_insert_with(|| error("No valid session or token").into());
                if changes_state || path.starts_with("/api/admin/") {
                    responses.entry("403".into()).or_insert_with(|| {
                        error("Not an admin, or missing or wrong CSRF token").into()
                    });
                }
            }
        }
    }
}

/// Gives every operation a unique `operationId` from its method and path
/// (`PATCH /api/keys/{id}` → `patch_keys_by_id`): utoipa takes the handler's name, and many
/// resources have a `list` or a `delete`.
struct OperationIds;

impl Modify for OperationIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let words: Vec<String> = path
                .trim_start_matches("/api/")
                .split(['/', '.', '-'])
                .filter(|w| !w.is_empty())
                .map(
                    |w| match w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                        Some(param) => format!("by_{param}"),
                        None => w.replace('*', ""),
                    },
                )
                .collect();
            let ops = [
                ("get", item.get.as_mut()),
                ("post", item.post.as_mut()),
                ("put", item.put.as_mut()),
                ("patch", item.patch.as_mut()),
                ("delete", item.delete.as_mut()),
            ];
            for (method, op) in ops {
                if let Some(op) = op {
                    op.operation_id = Some(format!("{method}_{}", words.join("_")));
                }
            }
        }
    }
}

/// `GET /api/openapi.json`: this document. Built once; it only changes with the code.
#[utoipa::path(get, path = "/api/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn document() -> impl IntoResponse {
    static DOC: OnceLock<String> = OnceLock::new();
    let json = DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string())
    });
    ([(header::CONTENT_TYPE, "application/json")], json.as_str())
}
