//! The OpenAPI document of the admin API, from a real relay: served without login, OpenAPI
//! 3.x, one operation per route of the router with the right method, request bodies for the
//! calls that take one, both security schemes; and every documented operation is routed.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

mod common;

use std::collections::BTreeSet;

use common::Relay;
use reqwest::Method;
use serde_json::Value;

/// Every (method, path) of `src/admin/routes/mod.rs`, in OpenAPI path syntax (`{*model}` is
/// `{model}`).
const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/openapi.json"),
    ("post", "/api/auth/login"),
    ("post", "/api/auth/logout"),
    ("get", "/api/auth/me"),
    ("get", "/api/keys"),
    ("post", "/api/keys"),
    ("patch", "/api/keys/{id}"),
    ("delete", "/api/keys/{id}"),
    ("get", "/api/usage/summary"),
    ("get", "/api/usage/daily"),
    ("get", "/api/usage/monthly"),
    ("get", "/api/usage/stats"),
    ("get", "/api/usage/records"),
    ("get", "/api/usage/records.csv"),
    ("get", "/api/usage/models"),
    ("get", "/api/admin/usage/summary"),
    ("post", "/api/admin/accounts/{id}/health-check"),
    ("post", "/api/admin/accounts/health-check"),
    ("post", "/api/admin/accounts/{id}/refresh-token"),
    ("get", "/api/admin/settings"),
    ("get", "/api/admin/sessions"),
    ("delete", "/api/admin/sessions/{session_key}"),
    ("patch", "/api/admin/settings"),
    ("get", "/api/admin/usage/breakdown"),
    ("get", "/api/admin/users"),
    ("post", "/api/admin/users"),
    ("post", "/api/admin/users/batch-price-rate"),
    ("post", "/api/admin/users/all-price-rate"),
    ("get", "/api/admin/users/{id}"),
    ("patch", "/api/admin/users/{id}"),
    ("delete", "/api/admin/users/{id}"),
    ("get", "/api/admin/users/{id}/usage/summary"),
    ("get", "/api/admin/api-keys"),
    ("post", "/api/admin/api-keys"),
    ("patch", "/api/admin/api-keys/{id}"),
    ("delete", "/api/admin/api-keys/{id}"),
    ("get", "/api/admin/api-keys/{id}/logs"),
    ("get", "/api/admin/accounts"),
    ("post", "/api/admin/accounts"),
    ("get", "/api/admin/accounts/{id}"),
    ("patch", "/api/admin/accounts/{id}"),
    ("delete", "/api/admin/accounts/{id}"),
    ("get", "/api/admin/pricing"),
    ("post", "/api/admin/pricing"),
    ("delete", "/api/admin/pricing/{model}"),
    ("get", "/api/admin/usage/records"),
    ("get", "/api/admin/usage/records.csv"),
    ("get", "/api/admin/audit"),
];

/// POST/PATCH calls that take no body.
const NO_BODY: &[(&str, &str)] = &[
    ("post", "/api/auth/logout"),
    ("post", "/api/admin/accounts/{id}/health-check"),
    ("post", "/api/admin/accounts/health-check"),
    ("post", "/api/admin/accounts/{id}/refresh-token"),
];

/// Calls that need no caller.
const PUBLIC: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/api/openapi.json",
    "/api/auth/login",
];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Follows a local `$ref` (`#/components/schemas/X`) to its schema.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            doc["components"]["schemas"]
                .get(name)
                .unwrap_or_else(|| panic!("dangling $ref {r}"))
        }
        None => schema,
    }
}

async fn fetch_doc(relay: &Relay) -> Value {
    // No token, no cookie: the document is public.
    let r = relay
        .http
        .get(format!("{}/api/openapi.json", relay.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn openapi_document_describes_every_route() {
    let relay = Relay::start().await;
    let doc = fetch_doc(&relay).await;

    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3."), "openapi {version}");

    // Exactly the router's operations.
    let paths = doc["paths"].as_object().unwrap();
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (m.to_string(), path.clone()))
        })
        .collect();
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = expected.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, not in the router {extra:?}"
    );

    // Operation ids are unique (generators name functions after them).
    let ids: Vec<&str> = ROUTES
        .iter()
        .map(|(m, p)| doc["paths"][p][m]["operationId"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate operationId in {ids:?}");

    // Both ways to authenticate are declared.
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["session_cookie"]["type"], "apiKey");
    assert_eq!(schemes["session_cookie"]["in"], "cookie");
    assert_eq!(schemes["session_cookie"]["name"], "relay_session");
    assert_eq!(schemes["csrf_token"]["in"], "header");
    assert_eq!(schemes["csrf_token"]["name"], "x-csrf-token");
    assert_eq!(schemes["admin_token"]["type"], "http");
    assert_eq!(schemes["admin_token"]["scheme"], "bearer");

    for (method, path) in ROUTES {
        let op = &doc["paths"][path][method];
        let what = format!("{} {path}", method.to_uppercase());

        // Request bodies of the calls that change state.
        if matches!(*method, "post" | "patch") && !NO_BODY.contains(&(*method, *path)) {
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            assert!(schema.is_object(), "{what}: no JSON request body schema");
            let schema = resolve(&doc, schema);
            assert_eq!(schema["type"], "object", "{what}: request body {schema}");
            assert!(
                schema["properties"]
                    .as_object()
                    .is_some_and(|p| !p.is_empty()),
                "{what}: request body without properties"
            );
        }

        // Main status codes: a success answer, and 401 where a caller is needed.
        let responses = op["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{what}: no success response"
        );
        for schema in responses
            .values()
            .filter_map(|r| r["content"]["application/json"].get("schema"))
        {
            resolve(&doc, schema);
        }

        // Path parameters are declared.
        for name in path.split('{').skip(1).filter_map(|s| s.split('}').next()) {
            let declared = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true);
            assert!(declared, "{what}: path parameter {name} not declared");
        }

        // Security: the cookie (with the CSRF header on state-changing calls) or the token.
        let security = op.get("security").and_then(Value::as_array);
        if PUBLIC.contains(path) {
            assert!(security.is_none(), "{what}: public call with security");
            continue;
        }
        let security = security.unwrap_or_else(|| panic!("{what}: no security"));
        assert!(responses.contains_key("401"), "{what}: no 401");
        let session = security
            .iter()
            .find(|s| s.get("session_cookie").is_some())
            .unwrap_or_else(|| panic!("{what}: session cookie not accepted"));
        assert_eq!(
            session.get("csrf_token").is_some(),
            *method != "get",
            "{what}: CSRF requirement"
        );
        assert!(
            security.iter().any(|s| s.get("admin_token").is_some()),
            "{what}: admin token not accepted"
        );
    }

    // Query parameters of lists and filters.
    let params = |method: &str, path: &str| -> Vec<String> {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "query")
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(params("get", "/api/admin/users"), ["page", "per_page"]);
    assert_eq!(
        params("get", "/api/admin/api-keys"),
        ["page", "per_page", "user_id"]
    );
    for p in ["user_id", "api_key_id", "account_id", "from", "to"] {
        assert!(
            params("get", "/api/admin/usage/records")
                .iter()
                .any(|q| q == p),
            "records filter {p} not documented"
        );
    }
    assert_eq!(params("get", "/api/usage/monthly"), ["month"]);

    // Records come with names beside their ids: the item schemas the list pages name.
    let properties = |schema: &Value| -> BTreeSet<String> {
        let own = schema["properties"].as_object().into_iter().flatten();
        let parts = schema["allOf"].as_array().into_iter().flatten();
        own.map(|(k, _)| k.clone())
            .chain(parts.flat_map(|p| {
                resolve(&doc, p)["properties"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.clone())
            }))
            .collect()
    };
    let admin_record = properties(&doc["components"]["schemas"]["AdminRecord"]);
    for field in [
        "user_id",
        "user_name",
        "api_key_id",
        "api_key_name",
        "account_id",
        "account_name",
        "base_cost",
    ] {
        assert!(
            admin_record.contains(field),
            "AdminRecord lacks {field}: {admin_record:?}"
        );
    }
    let own_record = properties(&doc["components"]["schemas"]["OwnRecord"]);
    assert!(own_record.contains("api_key_name"), "{own_record:?}");
    assert!(!own_record.contains("account_name"), "{own_record:?}");
    for (path, item) in [
        ("/api/admin/usage/records", "AdminRecord"),
        ("/api/admin/api-keys/{id}/logs", "AdminRecord"),
        ("/api/usage/records", "OwnRecord"),
    ] {
        let said = doc["paths"][path]["get"]["responses"]["200"]["description"]
            .as_str()
            .unwrap();
        assert!(said.contains(&format!("`{item}` items")), "{path}: {said}");
    }

    // A request body as the handler reads it: required fields and renamed ones.
    let create_user = resolve(&doc, &doc["components"]["schemas"]["CreateUser"]);
    let required: BTreeSet<&str> = create_user["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(required, BTreeSet::from(["username", "password"]));
    assert!(doc["components"]["schemas"]["CreateAccount"]["properties"]
        .get("type")
        .is_some());
}

/// The other direction: every documented operation reaches a handler (an unrouted one would
/// answer 404 or 405 before any check).
#[tokio::test]
async fn every_documented_operation_is_routed() {
    let relay = Relay::start().await;
    let doc = fetch_doc(&relay).await;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in METHODS.iter().filter(|m| item.get(**m).is_some()) {
            let url = format!(
                "{}{}",
                relay.admin,
                path.replace("{id}", "no-such-id")
                    .replace("{model}", "models/no-such-model")
            );
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let status = relay.http.request(m, &url).send().await.unwrap().status();
            assert!(
                status != 404 && status != 405,
                "{} {path}: {status} (not routed?)",
                method.to_uppercase()
            );
        }
    }
}
