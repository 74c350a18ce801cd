//! The relay's own model list, as each client protocol asks for it: `GET /v1/models` in the
//! OpenAI or Anthropic shape, Gemini's `models.list` / `models.get`. It lists what a key can be
//! served: models of an account in operation, on a platform the key may use, that the key may
//! call.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::accounts::Account;
use crate::api_key_auth::KeyEntry;
use crate::error::{ErrorKind, Rejection};
use crate::route::ModelsRoute;
use crate::Protocol;

/// Whose list shape a client expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"object":"list","data":[{"id","object":"model","created","owned_by"}]}`; every platform.
    Openai,
    /// Anthropic's `ModelInfo` page (`anthropic-version` sent); Claude models only, the only
    /// ones served through its Messages API.
    Anthropic,
    /// Gemini's `{"models":[{"name":"models/..."}]}`; Gemini models only.
    Gemini,
}

impl Dialect {
    /// The shape a request to `route` expects: Gemini's under Gemini's own paths; else
    /// Anthropic's when `anthropic-version` is sent; else Gemini's when the key comes as Gemini
    /// sends it (`x-goog-api-key`, `?key=`: google-genai with API version `v1` lists at
    /// `/v1/models`); else OpenAI's.
    pub fn of(route: &ModelsRoute, headers: &http::HeaderMap, query: Option<&str>) -> Dialect {
        let gemini_key = headers.contains_key("x-goog-api-key")
            || crate::api_key_auth::query_key(query).is_some();
        if route.gemini {
            Dialect::Gemini
        } else if headers.contains_key("anthropic-version") {
            Dialect::Anthropic
        } else if gemini_key {
            Dialect::Gemini
        } else {
            Dialect::Openai
        }
    }

    /// The protocol whose error shape its refusals take.
    pub fn protocol(self) -> Protocol {
        match self {
            Dialect::Openai => Protocol::OpenaiChat,
            Dialect::Anthropic => Protocol::Anthropic,
            Dialect::Gemini => Protocol::Gemini,
        }
    }

    fn lists(self, platform: &str) -> bool {
        match self {
            Dialect::Openai => true,
            Dialect::Anthropic => platform == Protocol::Anthropic.platform(),
            Dialect::Gemini => platform == Protocol::Gemini.platform(),
        }
    }
}

/// The platform a model name belongs to, for price-table names (`claude-*`, `gemini-*`, else
/// OpenAI's).
fn platform_of_name(model: &str) -> &'static str {
    if model.starts_with("claude") {
        Protocol::Anthropic.platform()
    } else if model.starts_with("gemini") {
        Protocol::Gemini.platform()
    } else {
        Protocol::OpenaiChat.platform()
    }
}

/// The models `key` can be served, listed for `dialect`, by name, each with its platform. A
/// model is named by an account in operation (enabled and valid, cooling down or not): its
/// `models` and its model map's names; an account that serves every model (an empty list)
/// also serves the price table's models of its platform. Models of a platform the key may not
/// use, or that the key may not call, are left out, as is a priced model no account serves.
pub fn servable_models(
    accounts: &[Arc<Account>],
    priced: &[&str],
    key: &KeyEntry,
    dialect: Dialect,
) -> Vec<(String, &'static str)> {
    let mut listed: BTreeMap<String, &'static str> = BTreeMap::new();
    for a in accounts.iter().filter(|a| a.in_operation()) {
        let platform = a.account_type.platform();
        if !dialect.lists(platform) || !key.allows_platform(platform) {
            continue;
        }
        let mut add = |m: &str| {
            if key.allows_model(m) && !listed.contains_key(m) {
                listed.insert(m.to_string(), platform);
            }
        };
        a.models
            .iter()
            .chain(a.model_map.keys())
            .for_each(|m| add(m));
        if a.models.is_empty() {
            priced
                .iter()
                .filter(|m| platform_of_name(m) == platform)
                .for_each(|m| add(m));
        }
    }
    listed.into_iter().collect()
}

/// The answer to `route` for `dialect`, from the servable `models`: the list, or the one model
/// the route names (404 in the dialect's shape when it is not among them).
pub fn render(
    route: &ModelsRoute,
    dialect: Dialect,
    models: &[(String, &'static str)],
) -> Result<Value, Rejection> {
    let Some(wanted) = route.model.as_deref() else {
        return Ok(list(dialect, models));
    };
    // Gemini names a model `models/{id}`; its SDKs send either.
    let wanted = wanted.strip_prefix("models/").unwrap_or(wanted);
    models
        .iter()
        .find(|(m, _)| m == wanted)
        .map(|(m, platform)| one(dialect, m, platform))
        .ok_or_else(|| {
            let shown: String = wanted.chars().take(256).collect();
            let message = match dialect {
                Dialect::Gemini => format!("models/{shown} is not found for this API key"),
                _ => format!("model {shown} is not found for this API key"),
            };
            Rejection::new(ErrorKind::NotFound, message)
        })
}

fn list(dialect: Dialect, models: &[(String, &'static str)]) -> Value {
    let items: Vec<Value> = models.iter().map(|(m, p)| one(dialect, m, p)).collect();
    match dialect {
        Dialect::Openai => json!({"object": "list", "data": items}),
        // A single page (`has_more` false ends the SDK's paging).
        Dialect::Anthropic => json!({
            "data": items,
            "has_more": false,
            "first_id": models.first().map(|(m, _)| m),
            "last_id": models.last().map(|(m, _)| m),
        }),
        Dialect::Gemini => json!({"models": items}),
    }
}

fn one(dialect: Dialect, model: &str, platform: &str) -> Value {
    match dialect {
        Dialect::Openai => json!({
            "id": model,
            "object": "model",
            "created": 0,
            "owned_by": owner(platform),
        }),
        // anthropic-sdk-python `ModelInfo`: `created_at` is RFC 3339, the epoch when the
        // release date is unknown.
        Dialect::Anthropic => json!({
            "type": "model",
            "id": model,
            "display_name": model,
            "created_at": "1970-01-01T00:00:00Z",
            "lifecycle": "active",
        }),
        // The methods the relay serves for it.
        Dialect::Gemini => json!({
            "name": format!("models/{model}"),
            "baseModelId": model,
            "displayName": model,
            "supportedGenerationMethods": ["generateContent", "streamGenerateContent", "countTokens"],
        }),
    }
}

/// The provider a platform's models come from (OpenAI's `owned_by`).
fn owner(platform: &str) -> &'static str {
    match platform {
        "claude" => "anthropic",
        "gemini" => "google",
        _ => "openai",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::accounts::tests::account;
    use crate::AccountType;

    const PRICED: [&str; 5] = [
        "claude-opus-4-1",
        "claude-sonnet-4-5",
        "gemini-2.5-flash",
        "gpt-4.1",
        "gpt-5",
    ];

    fn with_models(id: &str, t: AccountType, models: &[&str]) -> Arc<Account> {
        let Ok(mut a) = Arc::try_unwrap(account(id, t, 50, 1)) else {
            panic!("fresh account");
        };
        a.models = models.iter().map(|m| m.to_string()).collect();
        Arc::new(a)
    }

    fn names(models: &[(String, &'static str)]) -> Vec<String> {
        models.iter().map(|(m, _)| m.clone()).collect()
    }

    #[test]
    fn only_what_an_account_in_operation_serves_is_listed() {
        let claude = with_models("claude", AccountType::Claude, &[]);
        let openai = with_models("openai", AccountType::Openai, &["gpt-custom-1"]);
        let open = KeyEntry::default();
        let all = [claude.clone(), openai];
        let listed = servable_models(&all, &PRICED, &open, Dialect::Openai);
        // The claude account serves every Claude model; the openai one only its own; nothing
        // serves Gemini.
        assert_eq!(
            names(&listed),
            ["claude-opus-4-1", "claude-sonnet-4-5", "gpt-custom-1"]
        );
        assert_eq!(listed[0].1, "claude");
        // Taken out of service: its models go.
        claude.state.schedulable.store(false, Ordering::Relaxed);
        let listed = servable_models(&all, &PRICED, &open, Dialect::Openai);
        assert_eq!(names(&listed), ["gpt-custom-1"]);
    }

    #[test]
    fn the_keys_platforms_and_models_and_the_dialect_narrow_the_list() {
        let all = [
            with_models("claude", AccountType::ClaudeOfficial, &[]),
            with_models("gemini", AccountType::Gemini, &[]),
            with_models("codex", AccountType::OpenaiResponses, &["gpt-5"]),
        ];
        let open = KeyEntry::default();
        let list = |key: &KeyEntry, d: Dialect| names(&servable_models(&all, &PRICED, key, d));
        assert_eq!(
            list(&open, Dialect::Openai),
            [
                "claude-opus-4-1",
                "claude-sonnet-4-5",
                "gemini-2.5-flash",
                "gpt-5"
            ]
        );
        assert_eq!(
            list(&open, Dialect::Anthropic),
            ["claude-opus-4-1", "claude-sonnet-4-5"]
        );
        assert_eq!(list(&open, Dialect::Gemini), ["gemini-2.5-flash"]);
        let no_claude = KeyEntry {
            allowed_platforms: vec!["openai".into(), "gemini".into()],
            ..KeyEntry::default()
        };
        assert_eq!(
            list(&no_claude, Dialect::Openai),
            ["gemini-2.5-flash", "gpt-5"]
        );
        assert!(list(&no_claude, Dialect::Anthropic).is_empty());
        let sonnet_only = KeyEntry {
            allowed_models: vec!["claude-sonnet-*".into()],
            ..KeyEntry::default()
        };
        assert_eq!(list(&sonnet_only, Dialect::Openai), ["claude-sonnet-4-5"]);
    }

    #[test]
    fn a_model_maps_names_are_listed() {
        let Ok(mut a) = Arc::try_unwrap(account("gemini", AccountType::Gemini, 50, 1)) else {
            panic!("fresh account");
        };
        a.models = vec!["gemini-2.5-pro".into()];
        a.model_map
            .insert("gemini-fast".into(), "gemini-2.5-flash".into());
        let listed = servable_models(
            &[Arc::new(a)],
            &PRICED,
            &KeyEntry::default(),
            Dialect::Gemini,
        );
        assert_eq!(names(&listed), ["gemini-2.5-pro", "gemini-fast"]);
    }

    #[test]
    fn shapes_per_dialect() {
        let models = vec![
            ("claude-haiku-4-5".to_string(), "claude"),
            ("claude-sonnet-4-5".to_string(), "claude"),
        ];
        let route = ModelsRoute::default();
        let v = render(&route, Dialect::Anthropic, &models).unwrap();
        assert_eq!(v["has_more"], false);
        assert_eq!(v["first_id"], "claude-haiku-4-5");
        assert_eq!(v["last_id"], "claude-sonnet-4-5");
        let m = &v["data"][1];
        assert_eq!(
            (&m["type"], &m["id"], &m["display_name"]),
            (
                &json!("model"),
                &json!("claude-sonnet-4-5"),
                &json!("claude-sonnet-4-5")
            )
        );
        assert_eq!(m["created_at"], "1970-01-01T00:00:00Z");
        let empty = render(&route, Dialect::Anthropic, &[]).unwrap();
        assert_eq!(empty["first_id"], Value::Null);

        let v = render(&route, Dialect::Openai, &models).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["owned_by"], "anthropic");
        assert_eq!(v["data"][0]["object"], "model");

        let gemini = vec![("gemini-2.5-flash".to_string(), "gemini")];
        let v = render(&route, Dialect::Gemini, &gemini).unwrap();
        assert_eq!(v["models"][0]["name"], "models/gemini-2.5-flash");
        assert_eq!(v["models"][0]["displayName"], "gemini-2.5-flash");
        assert!(v["models"][0]["supportedGenerationMethods"]
            .as_array()
            .unwrap()
            .contains(&json!("generateContent")));
    }

    #[test]
    fn one_model_or_not_found() {
        let gemini = vec![("gemini-2.5-flash".to_string(), "gemini")];
        for name in ["gemini-2.5-flash", "models/gemini-2.5-flash"] {
            let route = ModelsRoute {
                model: Some(name.into()),
                gemini: true,
            };
            let v = render(&route, Dialect::Gemini, &gemini).unwrap();
            assert_eq!(v["name"], "models/gemini-2.5-flash");
        }
        let route = ModelsRoute {
            model: Some("gemini-1.0-pro".into()),
            gemini: true,
        };
        let err = render(&route, Dialect::Gemini, &gemini).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        let body: Value = serde_json::from_slice(&err.body(Protocol::Gemini)).unwrap();
        assert_eq!(body["error"]["status"], "NOT_FOUND");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("models/gemini-1.0-pro"));
    }

    #[test]
    fn the_dialect_follows_the_path_and_headers() {
        let list = ModelsRoute::default();
        let gemini_path = ModelsRoute {
            model: None,
            gemini: true,
        };
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let none = headers(&[]);
        assert_eq!(Dialect::of(&list, &none, None), Dialect::Openai);
        assert_eq!(Dialect::of(&gemini_path, &none, None), Dialect::Gemini);
        let anthropic = headers(&[("anthropic-version", "2023-06-01"), ("x-api-key", "k")]);
        assert_eq!(Dialect::of(&list, &anthropic, None), Dialect::Anthropic);
        let goog = headers(&[("x-goog-api-key", "k")]);
        assert_eq!(Dialect::of(&list, &goog, None), Dialect::Gemini);
        assert_eq!(Dialect::of(&list, &none, Some("key=k")), Dialect::Gemini);
        assert_eq!(Dialect::of(&list, &none, Some("limit=20")), Dialect::Openai);
    }
}
