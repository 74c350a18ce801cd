//! `api_key_auth`: relay API key → key entry and user, with the key's platform and model rules.

use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::chain::{Flow, RequestFilter, RequestView};
use crate::context::{AuthInfo, RequestCtx};
use crate::error::{ErrorKind, Rejection};

/// What the in-process key cache holds for one key (no secret: only the hash is known).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyEntry {
    pub id: String,
    pub name: String,
    pub user_id: String,
    pub username: String,
    /// Key and owner are both enabled.
    pub enabled: bool,
    /// Epoch ms after which the key is refused.
    pub expires_at: Option<i64>,
    /// Platforms (`claude`, `openai`, `gemini`) the key may use; empty = all.
    pub allowed_platforms: Vec<String>,
    /// Models (exact or glob with `*` / `?`) the key may use; empty = all.
    pub allowed_models: Vec<String>,
    pub rpm_limit: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub daily_cost_limit: Option<i64>,
    /// Per UTC calendar month.
    pub monthly_cost_limit: Option<i64>,
    pub total_cost_limit: Option<i64>,
    /// The owner's price rate, ten-thousandths (10000 = 1.0).
    pub price_rate: i64,
    /// The owner's cost limits over all its keys (billed micro-USD): per UTC day, per UTC
    /// calendar month, in total.
    pub user_daily_cost_limit: Option<i64>,
    pub user_monthly_cost_limit: Option<i64>,
    pub user_total_cost_limit: Option<i64>,
    /// The owner's platforms and models, which hold for every key of the owner (a key's own
    /// lists only restrict it further); empty = all.
    pub user_allowed_platforms: Vec<String>,
    pub user_allowed_models: Vec<String>,
}

impl KeyEntry {
    /// Whether the key, and its owner, may call `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        let allows = |list: &[String]| list.is_empty() || list.iter().any(|p| glob_match(p, model));
        allows(&self.allowed_models) && allows(&self.user_allowed_models)
    }

    /// Whether the key, and its owner, may use `platform`.
    pub fn allows_platform(&self, platform: &str) -> bool {
        let allows = |list: &[String]| list.is_empty() || list.iter().any(|p| p == platform);
        allows(&self.allowed_platforms) && allows(&self.user_allowed_platforms)
    }
}

/// Lookup of keys by their peppered hash; implemented by the binary's cache.
pub trait KeyStore: Send + Sync {
    /// The key entry for a hash, from memory (never a database round trip).
    fn lookup(&self, key_hash: &str) -> Option<Arc<KeyEntry>>;
    /// The server secret mixed into every key hash.
    fn pepper(&self) -> &[u8];
}

/// Hex SHA-256 of `pepper || key`: what is stored instead of the key.
pub fn hash_api_key(pepper: &[u8], key: &str) -> String {
    hash_api_key_into(pepper, key, &mut [0u8; 64]).to_owned()
}

/// [`hash_api_key`] written into `out` on the caller's stack, for a lookup on every request.
pub fn hash_api_key_into<'o>(pepper: &[u8], key: &str, out: &'o mut [u8; 64]) -> &'o str {
    let mut h = Sha256::new();
    h.update(pepper);
    h.update(key.as_bytes());
    hex_into(&h.finalize(), out)
}

/// Lower-case hex digits.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of as much of `bytes` as `out` holds (two bytes of it for each), as text.
pub(crate) fn hex_into<'o>(bytes: &[u8], out: &'o mut [u8]) -> &'o str {
    let mut len = 0;
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 15)];
        len += 2;
    }
    // Hex digits only: always UTF-8.
    std::str::from_utf8(&out[..len]).unwrap_or_default()
}

/// Matches `*` (any run) and `?` (one char) globs.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// The credentials a request carries, in the order they are tried: `x-api-key`,
/// `Authorization: Bearer`, `x-goog-api-key`, `?key=` (Gemini). Clients may send more than one:
/// the anthropic Python SDK sends `x-api-key` from `ANTHROPIC_API_KEY` beside the relay key as
/// `Authorization: Bearer`. Each place is read only when the iterator gets that far.
pub fn client_keys<'a>(
    headers: &'a http::HeaderMap,
    query: Option<&'a str>,
) -> impl Iterator<Item = &'a str> + 'a {
    let header = move |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    std::iter::once_with(move || header("x-api-key"))
        .chain(std::iter::once_with(move || {
            header("authorization").and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
        }))
        .chain(std::iter::once_with(move || header("x-goog-api-key")))
        .chain(std::iter::once_with(move || {
            query_key(query).filter(|v| !v.is_empty())
        }))
        .flatten()
}

/// The value of a query's `key=` parameter (Gemini's way to send its API key), empty or not.
pub fn query_key(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("key="))
}

/// The filter: authenticates the key and checks its platform and model rules.
pub struct ApiKeyAuth {
    keys: Arc<dyn KeyStore>,
}

impl ApiKeyAuth {
    /// A filter reading keys from `keys`.
    pub fn new(keys: Arc<dyn KeyStore>) -> Self {
        ApiKeyAuth { keys }
    }

    /// Resolves and checks the key; the same rules as the filter, usable without a chain.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
        now_ms: i64,
    ) -> Result<Arc<KeyEntry>, Rejection> {
        // The first credential that is a usable relay key wins; the others are someone else's
        // (a provider key left in the client's environment). Each distinct one is hashed once.
        let mut tried: [&str; 4] = [""; 4];
        let mut tried_count = 0;
        let mut refused = None;
        for key in client_keys(headers, query) {
            if tried[..tried_count].contains(&key) {
                continue;
            }
            if let Some(slot) = tried.get_mut(tried_count) {
                *slot = key;
                tried_count += 1;
            }
            let mut hash = [0u8; 64];
            let hash = hash_api_key_into(self.keys.pepper(), key, &mut hash);
            let Some(entry) = self.keys.lookup(hash) else {
                continue;
            };
            match refusal(&entry, now_ms) {
                None => return Ok(entry),
                Some(message) => refused = refused.or(Some(message)),
            }
        }
        let message = match refused {
            Some(message) => message,
            None if tried_count == 0 => {
                "missing API key: send it as x-api-key or Authorization: Bearer"
            }
            None => "invalid API key",
        };
        Err(Rejection::new(ErrorKind::Authentication, message))
    }
}

/// Why a known key is refused, if it is.
fn refusal(entry: &KeyEntry, now_ms: i64) -> Option<&'static str> {
    if !entry.enabled {
        Some("API key is disabled")
    } else if entry.expires_at.is_some_and(|t| t <= now_ms) {
        Some("API key has expired")
    } else {
        None
    }
}

#[async_trait]
impl RequestFilter for ApiKeyAuth {
    fn name(&self) -> &'static str {
        "api_key_auth"
    }

    async fn on_request(&self, ctx: &mut RequestCtx, req: &RequestView<'_>) -> Flow {
        // The proxy may have authenticated from the headers already, before reading the body.
        let entry = match ctx.auth.as_ref() {
            Some(a) => a.key.clone(),
            None => match self.authenticate(req.headers, req.query, ctx.started_ms) {
                Ok(e) => e,
                Err(r) => return Flow::Reject(r),
            },
        };
        let platform = ctx.protocol().platform();
        if !entry.allows_platform(platform) {
            return Flow::Reject(Rejection::new(
                ErrorKind::Permission,
                format!("this API key may not use the {platform} platform"),
            ));
        }
        if let Some(model) = ctx.requested_model() {
            if !entry.allows_model(model) {
                return Flow::Reject(Rejection::new(
                    ErrorKind::Permission,
                    format!("this API key may not use model {model}"),
                ));
            }
        }
        ctx.auth = Some(AuthInfo { key: entry });
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex_into(&[], &mut []), "");
        assert_eq!(
            hex_into(&[0x00, 0x0f, 0xa5, 0xff], &mut [0u8; 8]),
            "000fa5ff"
        );
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_into(&all, &mut [0u8; 512]), hex::encode(&all));
    }

    #[test]
    fn stored_key_hashes_stay_the_hex_sha256_of_pepper_and_key() {
        // Keys stored by any earlier version are found by this hash: it must never change.
        let expected = hex::encode(Sha256::digest(b"pepperrk-some-key"));
        assert_eq!(hash_api_key(b"pepper", "rk-some-key"), expected);
        assert_eq!(
            hash_api_key_into(b"pepper", "rk-some-key", &mut [0u8; 64]),
            expected
        );
        assert_eq!(
            hash_api_key(b"", ""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    struct Keys(HashMap<String, Arc<KeyEntry>>);
    impl KeyStore for Keys {
        fn lookup(&self, h: &str) -> Option<Arc<KeyEntry>> {
            self.0.get(h).cloned()
        }
        fn pepper(&self) -> &[u8] {
            b"pepper"
        }
    }

    fn store(entries: &[(&str, KeyEntry)]) -> Arc<dyn KeyStore> {
        Arc::new(Keys(
            entries
                .iter()
                .map(|(k, e)| (hash_api_key(b"pepper", k), Arc::new(e.clone())))
                .collect(),
        ))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn key_sources() {
        type Case<'a> = (
            &'a [(&'static str, &'a str)],
            Option<&'a str>,
            Option<&'a str>,
        );
        let cases: &[Case] = &[
            (&[("x-api-key", "a")], None, Some("a")),
            (&[("authorization", "Bearer b")], None, Some("b")),
            (&[("authorization", "bearer  c ")], None, Some("c")),
            (&[("authorization", "Basic x")], None, None),
            (&[("x-goog-api-key", "d")], None, Some("d")),
            (&[], Some("alt=sse&key=e"), Some("e")),
            (&[], Some("key="), None),
            (&[("x-api-key", "")], None, None),
        ];
        for (h, q, want) in cases {
            assert_eq!(client_keys(&headers(h), *q).next(), *want, "{h:?} {q:?}");
        }
        let all = headers(&[
            ("x-api-key", "a"),
            ("authorization", "Bearer b"),
            ("x-goog-api-key", "c"),
        ]);
        assert_eq!(
            client_keys(&all, Some("alt=sse&key=d")).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("claude-*", "claude-sonnet-4-5"));
        assert!(glob_match("*sonnet*", "claude-sonnet-4-5"));
        assert!(glob_match("gpt-?o", "gpt-4o"));
        assert!(!glob_match("claude-*", "gpt-5"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    #[test]
    fn authenticate_rules() {
        let live = KeyEntry {
            id: "k1".into(),
            enabled: true,
            ..Default::default()
        };
        let disabled = KeyEntry {
            enabled: false,
            ..live.clone()
        };
        let expired = KeyEntry {
            expires_at: Some(1000),
            ..live.clone()
        };
        let auth = ApiKeyAuth::new(store(&[
            ("live", live),
            ("off", disabled),
            ("old", expired),
        ]));
        let try_key = |k: &str| auth.authenticate(&headers(&[("x-api-key", k)]), None, 2000);
        assert!(try_key("live").is_ok());
        for (k, msg) in [
            ("off", "API key is disabled"),
            ("old", "API key has expired"),
            ("nope", "invalid API key"),
        ] {
            let r = try_key(k).unwrap_err();
            assert_eq!(r.kind, ErrorKind::Authentication);
            assert_eq!(r.message, msg);
        }
        assert!(auth.authenticate(&headers(&[]), None, 0).is_err());
    }

    /// A key store that counts its lookups, i.e. the hashes computed.
    struct CountingKeys {
        keys: Arc<dyn KeyStore>,
        lookups: std::sync::atomic::AtomicUsize,
    }
    impl KeyStore for CountingKeys {
        fn lookup(&self, h: &str) -> Option<Arc<KeyEntry>> {
            self.lookups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.keys.lookup(h)
        }
        fn pepper(&self) -> &[u8] {
            self.keys.pepper()
        }
    }

    #[test]
    fn every_credential_is_tried_until_one_is_a_relay_key() {
        let live = KeyEntry {
            id: "k1".into(),
            enabled: true,
            ..Default::default()
        };
        let disabled = KeyEntry {
            id: "k2".into(),
            enabled: false,
            ..Default::default()
        };
        let counting = Arc::new(CountingKeys {
            keys: store(&[("live", live), ("off", disabled)]),
            lookups: Default::default(),
        });
        let auth = ApiKeyAuth::new(counting.clone());
        // (headers, query, key id or error message, lookups)
        type Case<'a> = (
            &'a [(&'static str, &'a str)],
            Option<&'a str>,
            Result<&'a str, &'a str>,
            usize,
        );
        let cases: &[Case] = &[
            // The anthropic SDK with ANTHROPIC_API_KEY set and the relay key as auth_token.
            (
                &[
                    ("x-api-key", "sk-ant-api03-foreign"),
                    ("authorization", "Bearer live"),
                ],
                None,
                Ok("k1"),
                2,
            ),
            (
                &[
                    ("x-api-key", "live"),
                    ("authorization", "Bearer sk-proj-foreign"),
                ],
                None,
                Ok("k1"),
                1,
            ),
            (
                &[("x-api-key", "foreign"), ("x-goog-api-key", "live")],
                None,
                Ok("k1"),
                2,
            ),
            (
                &[("x-goog-api-key", "foreign")],
                Some("alt=sse&key=live"),
                Ok("k1"),
                2,
            ),
            // One credential in several places is hashed once.
            (
                &[
                    ("x-api-key", "foreign"),
                    ("authorization", "Bearer foreign"),
                    ("x-goog-api-key", "foreign"),
                ],
                Some("key=foreign"),
                Err("invalid API key"),
                1,
            ),
            (
                &[("x-api-key", "foreign"), ("authorization", "Bearer other")],
                None,
                Err("invalid API key"),
                2,
            ),
            // A usable key wins over a refused one; with none, the refused key's reason.
            (
                &[("x-api-key", "off"), ("authorization", "Bearer live")],
                None,
                Ok("k1"),
                2,
            ),
            (
                &[("x-api-key", "foreign"), ("authorization", "Bearer off")],
                None,
                Err("API key is disabled"),
                2,
            ),
            (
                &[("authorization", "Basic live")],
                None,
                Err("missing API key: send it as x-api-key or Authorization: Bearer"),
                0,
            ),
        ];
        for (h, q, want, lookups) in cases {
            counting
                .lookups
                .store(0, std::sync::atomic::Ordering::Relaxed);
            let got = auth
                .authenticate(&headers(h), *q, 0)
                .map(|e| e.id.clone())
                .map_err(|r| (r.kind, r.message));
            let want = want
                .map(str::to_string)
                .map_err(|m| (ErrorKind::Authentication, m.to_string()));
            assert_eq!(got, want, "{h:?} {q:?}");
            assert_eq!(
                counting.lookups.load(std::sync::atomic::Ordering::Relaxed),
                *lookups,
                "{h:?} {q:?}"
            );
        }
    }

    #[test]
    fn model_and_platform_rules() {
        let e = KeyEntry {
            allowed_models: vec!["claude-sonnet-*".into()],
            allowed_platforms: vec!["claude".into()],
            ..Default::default()
        };
        assert!(e.allows_model("claude-sonnet-4-5"));
        assert!(!e.allows_model("claude-opus-4-1"));
        assert!(e.allows_platform("claude"));
        assert!(!e.allows_platform("openai"));
        assert!(KeyEntry::default().allows_model("anything"));
    }
}
