//! Header names read off the wire. `http::HeaderName::from_bytes` knows the standard names and
//! allocates a copy of every other one; LLM clients and providers send many of those on every
//! request (Claude Code about fifteen: `anthropic-*`, `x-stainless-*`, `x-app`, ...; an Anthropic
//! answer a dozen `anthropic-ratelimit-*`). The names such clients and providers send are kept
//! here as static names, found among the few of the same length by a comparison that ignores
//! ASCII case (a binary search on a lower-cased copy took about 500 instructions a name).

use std::sync::OnceLock;

use http::header::{HeaderName, InvalidHeaderName};

/// Names known to come often, sorted by their bytes (a test checks the order, which also keeps
/// them unique), none of them a standard name of the `http` crate (those allocate nothing
/// already; a test checks that too).
static KNOWN: [HeaderName; 79] = [
    HeaderName::from_static("anthropic-beta"),
    HeaderName::from_static("anthropic-dangerous-direct-browser-access"),
    HeaderName::from_static("anthropic-organization-id"),
    HeaderName::from_static("anthropic-ratelimit-input-tokens-limit"),
    HeaderName::from_static("anthropic-ratelimit-input-tokens-remaining"),
    HeaderName::from_static("anthropic-ratelimit-input-tokens-reset"),
    HeaderName::from_static("anthropic-ratelimit-output-tokens-limit"),
    HeaderName::from_static("anthropic-ratelimit-output-tokens-remaining"),
    HeaderName::from_static("anthropic-ratelimit-output-tokens-reset"),
    HeaderName::from_static("anthropic-ratelimit-requests-limit"),
    HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
    HeaderName::from_static("anthropic-ratelimit-requests-reset"),
    HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
    HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
    HeaderName::from_static("anthropic-ratelimit-unified-fallback-percentage"),
    HeaderName::from_static("anthropic-ratelimit-unified-reset"),
    HeaderName::from_static("anthropic-ratelimit-unified-status"),
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("cf-cache-status"),
    HeaderName::from_static("cf-ray"),
    HeaderName::from_static("chatgpt-account-id"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("openai-beta"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-processing-ms"),
    HeaderName::from_static("openai-project"),
    HeaderName::from_static("openai-version"),
    HeaderName::from_static("originator"),
    HeaderName::from_static("request-id"),
    HeaderName::from_static("retry-after-ms"),
    HeaderName::from_static("server-timing"),
    HeaderName::from_static("session-id"),
    HeaderName::from_static("session_id"),
    HeaderName::from_static("thread-id"),
    HeaderName::from_static("x-amzn-requestid"),
    HeaderName::from_static("x-amzn-trace-id"),
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("x-app"),
    HeaderName::from_static("x-claude-code-session-id"),
    HeaderName::from_static("x-client-request-id"),
    HeaderName::from_static("x-cloud-trace-context"),
    HeaderName::from_static("x-codex-beta-features"),
    HeaderName::from_static("x-codex-turn-metadata"),
    HeaderName::from_static("x-codex-window-id"),
    HeaderName::from_static("x-envoy-upstream-service-time"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-gemini-service-tier"),
    HeaderName::from_static("x-goog-api-client"),
    HeaderName::from_static("x-goog-api-key"),
    HeaderName::from_static("x-goog-request-params"),
    HeaderName::from_static("x-goog-user-project"),
    HeaderName::from_static("x-newrelic-id"),
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-runtime"),
    HeaderName::from_static("x-server-timeout"),
    HeaderName::from_static("x-should-retry"),
    HeaderName::from_static("x-stainless-arch"),
    HeaderName::from_static("x-stainless-async"),
    HeaderName::from_static("x-stainless-custom-poll-interval"),
    HeaderName::from_static("x-stainless-helper-method"),
    HeaderName::from_static("x-stainless-lang"),
    HeaderName::from_static("x-stainless-os"),
    HeaderName::from_static("x-stainless-package-version"),
    HeaderName::from_static("x-stainless-poll-helper"),
    HeaderName::from_static("x-stainless-read-timeout"),
    HeaderName::from_static("x-stainless-retry-count"),
    HeaderName::from_static("x-stainless-runtime"),
    HeaderName::from_static("x-stainless-runtime-version"),
    HeaderName::from_static("x-stainless-timeout"),
];

/// Longest name in `KNOWN`; a longer one cannot be there.
const LONGEST: usize = 48;

/// Indices into `KNOWN` by name length: a name is compared only with the few of its length.
fn by_length() -> &'static [Vec<u8>] {
    static TABLE: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = vec![Vec::new(); LONGEST + 1];
        for (i, name) in KNOWN.iter().enumerate() {
            // KNOWN has fewer than 256 names (its type says how many).
            table[name.as_str().len()].push(i as u8);
        }
        table
    })
}

/// The header name `raw` spells (any case), as `HeaderName::from_bytes` makes it, without an
/// allocation when it is a standard or a known name.
pub(super) fn header_name(raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    if let Some(same_length) = by_length().get(raw.len()) {
        for &i in same_length {
            let known = &KNOWN[usize::from(i)];
            // Only ASCII letters fold: any other byte of `raw` must be the name's own.
            if known.as_str().as_bytes().eq_ignore_ascii_case(raw) {
                return Ok(known.clone());
            }
        }
    }
    HeaderName::from_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_known_names_are_sorted_custom_and_short_enough() {
        for pair in KNOWN.windows(2) {
            assert!(
                pair[0].as_str() < pair[1].as_str(),
                "{} must come before {}",
                pair[0],
                pair[1]
            );
        }
        for name in &KNOWN {
            assert!(
                name.as_str().len() <= LONGEST,
                "{name} is longer than LONGEST"
            );
            assert_eq!(
                &HeaderName::from_bytes(name.as_str().as_bytes()).unwrap(),
                name
            );
            assert!(
                !is_standard(name.as_str()),
                "{name} is a standard name already"
            );
        }
        assert!(is_standard("content-type") && is_standard("authorization"));
        assert!(!is_standard("x-some-new-header"));
    }

    /// Whether `http` knows the name: its standard names are static strings, while each parse
    /// of another name makes a copy of its own.
    fn is_standard(name: &str) -> bool {
        let a = HeaderName::from_bytes(name.as_bytes()).unwrap();
        let b = HeaderName::from_bytes(name.as_bytes()).unwrap();
        std::ptr::eq(a.as_str().as_ptr(), b.as_str().as_ptr())
    }

    #[test]
    fn names_come_out_as_from_bytes_makes_them() {
        let inputs: &[&[u8]] = &[
            b"x-api-key",
            b"X-Api-Key",
            b"X-Stainless-Lang",
            b"anthropic-version",
            b"Anthropic-Ratelimit-Tokens-Reset",
            b"content-type",
            b"Content-Length",
            b"x-some-new-header",
            b"x-stainless-lan",
            b"x-stainless-langs",
            b"a",
            b"session_id",
            b"x-custom-header-whose-name-is-much-longer-than-any-of-the-known-ones",
        ];
        for raw in inputs {
            let ours = header_name(raw).unwrap();
            let theirs = HeaderName::from_bytes(raw).unwrap();
            assert_eq!(ours, theirs, "{}", String::from_utf8_lossy(raw));
            assert_eq!(ours.as_str(), theirs.as_str());
        }
    }

    #[test]
    fn invalid_names_are_refused_as_from_bytes_refuses_them() {
        let inputs: &[&[u8]] = &[b"", b"x api-key", b"x-api-key:", b"x-\xffapi", b"(x)"];
        for raw in inputs {
            assert!(
                header_name(raw).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
            assert!(HeaderName::from_bytes(raw).is_err());
        }
    }
}
