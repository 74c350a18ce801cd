//! How upstream answers change an account's state: cooldowns from reset hints, error streaks,
//! automatic disabling (DESIGN §8).

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::accounts::Account;

/// The default of [`StateRules::cooldown_429_max`]: past the 5 hours of Anthropic's unified
/// window, with a margin. A reset further away (a weekly limit) costs one request every 6 hours
/// to find out; a mistaken or hostile hint (`retry-after: 1000000000`) costs no more than that.
pub const DEFAULT_COOLDOWN_429_MAX: Duration = Duration::from_secs(6 * 3600);

/// Thresholds and default cooldowns.
#[derive(Debug, Clone)]
pub struct StateRules {
    /// After a 429 without reset information.
    pub cooldown_429: Duration,
    /// The longest cooldown a 429's reset information may ask for; a later reset is cut to it.
    pub cooldown_429_max: Duration,
    pub cooldown_529: Duration,
    pub cooldown_5xx: Duration,
    pub server_error_threshold: u32,
    pub account_error_threshold: u32,
}

impl Default for StateRules {
    fn default() -> Self {
        StateRules {
            cooldown_429: Duration::from_secs(60),
            cooldown_429_max: DEFAULT_COOLDOWN_429_MAX,
            cooldown_529: Duration::from_secs(120),
            cooldown_5xx: Duration::from_secs(300),
            server_error_threshold: 3,
            account_error_threshold: 5,
        }
    }
}

/// What an upstream error answer's body says about the account that sent the request, beyond
/// its status ([`classify_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Nothing more: the status decides.
    #[default]
    ByStatus,
    /// The refusal is about something the request named (a file, a cached content, a tuned
    /// model), not the account: the client's matter, passed to it as it is.
    NotTheAccount,
    /// The organization or account is disabled for good: blocked at once.
    Disabled,
    /// The API key is invalid or expired: out of scheduling (status `error`) at once.
    KeyInvalid,
    /// The account's credit or quota is used up: a long cooldown.
    NoCredit,
}

/// What one attempt ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head with this status; `reset_at_ms` from the provider's reset hints, `fault`
    /// from its error body.
    Status {
        status: u16,
        reset_at_ms: Option<i64>,
        fault: Fault,
    },
    /// Connecting failed or timed out.
    ConnectError,
    /// No response head in time, or the connection broke before it.
    Timeout,
    /// The answer broke off after its head: the connection closed, was reset or stalled past
    /// the idle timeout inside the body.
    Cut,
    /// The answer's body arrived whole.
    Whole,
}

/// The state change to persist and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    None,
    /// Cooling until this epoch ms; `reason` is the metric label.
    Cooldown {
        reason: &'static str,
        until_ms: i64,
    },
    /// Taken out of scheduling (`status` error or blocked).
    Disabled {
        status: &'static str,
        reason: String,
    },
    /// Back to healthy after errors.
    Recovered,
}

/// How long an automatic disable holds against reloads that still show the account valid;
/// the database write it starts normally lands within milliseconds.
pub const DISABLE_HOLD_OFF: Duration = Duration::from_secs(60);

/// Applies `outcome` to the account's live state and says what changed.
pub fn apply_outcome(
    account: &Account,
    outcome: Outcome,
    rules: &StateRules,
    now_ms: i64,
) -> StateChange {
    let st = &account.state;
    let after =
        |d: Duration| now_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let cooldown = |reason: &'static str, d: Duration, hint: Option<i64>| {
        let until = match hint.filter(|t| *t > now_ms) {
            Some(t) => t.min(after(rules.cooldown_429_max)),
            None => after(d),
        };
        let before = st.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
        if !matches!(reason, "overloaded" | "server_errors") {
            st.cooling_for_overload.store(false, Ordering::Relaxed);
        } else if before <= now_ms {
            // A new cooldown, for overload alone; one running keeps what it was for.
            st.cooling_for_overload.store(true, Ordering::Relaxed);
        }
        StateChange::Cooldown {
            reason,
            until_ms: until,
        }
    };
    let take_out_as = |status: &'static str, reason: String| {
        st.consecutive_errors.fetch_add(1, Ordering::Relaxed);
        take_out(account, now_ms);
        StateChange::Disabled { status, reason }
    };
    match outcome {
        Outcome::Status {
            fault: Fault::NotTheAccount,
            ..
        } => StateChange::None,
        Outcome::Status {
            fault: Fault::Disabled,
            ..
        } => take_out_as(
            "blocked",
            "the provider reports the organization or account disabled".into(),
        ),
        Outcome::Status {
            fault: Fault::KeyInvalid,
            ..
        } => take_out_as(
            "error",
            "the provider reports the API key invalid or expired".into(),
        ),
        // Credit does not come back by itself within minutes: as long as the longest hinted
        // cooldown. The answer's rate-limit headers (OpenAI sends its `x-ratelimit-reset-*`
        // on every 429) say when a rate comes back, not credit.
        Outcome::Status {
            fault: Fault::NoCredit,
            ..
        } => cooldown("no_credit", rules.cooldown_429_max, None),
        Outcome::Status {
            status: 200..=399, ..
        } => {
            st.consecutive_server_errors.store(0, Ordering::Relaxed);
            if st.consecutive_errors.swap(0, Ordering::Relaxed) > 0 {
                // The recovery is written to the database after the disable, if any.
                st.held_off_until_ms.store(0, Ordering::Relaxed);
                StateChange::Recovered
            } else {
                StateChange::None
            }
        }
        Outcome::Status {
            status: 429,
            reset_at_ms,
            ..
        } => cooldown("rate_limited", rules.cooldown_429, reset_at_ms),
        Outcome::Status { status: 529, .. } => cooldown("overloaded", rules.cooldown_529, None),
        Outcome::Status {
            status: 401 | 403, ..
        } => {
            let n = st.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= rules.account_error_threshold {
                take_out(account, now_ms);
                StateChange::Disabled {
                    status: "error",
                    reason: format!("{n} authentication errors in a row"),
                }
            } else {
                StateChange::None
            }
        }
        Outcome::Status {
            status: 500..=599, ..
        }
        | Outcome::ConnectError
        | Outcome::Timeout => {
            let n = st.consecutive_server_errors.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= rules.server_error_threshold {
                st.consecutive_server_errors.store(0, Ordering::Relaxed);
                cooldown("server_errors", rules.cooldown_5xx, None)
            } else {
                StateChange::None
            }
        }
        // A head that came in time says nothing of the body: an upstream that cuts every
        // answer cools as one that fails them, once as many in a row were cut.
        Outcome::Cut => {
            let n = st.consecutive_cuts.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= rules.server_error_threshold {
                st.consecutive_cuts.store(0, Ordering::Relaxed);
                cooldown("server_errors", rules.cooldown_5xx, None)
            } else {
                StateChange::None
            }
        }
        Outcome::Whole => {
            st.consecutive_cuts.store(0, Ordering::Relaxed);
            StateChange::None
        }
        Outcome::Status { .. } => StateChange::None,
    }
}

/// Takes an account out of scheduling on this node at once, held against reloads that still
/// show it valid for [`DISABLE_HOLD_OFF`] (its database write is on its way).
fn take_out(account: &Account, now_ms: i64) {
    let st = &account.state;
    st.held_off_until_ms.store(
        now_ms.saturating_add(DISABLE_HOLD_OFF.as_millis() as i64),
        Ordering::Relaxed,
    );
    st.schedulable.store(false, Ordering::Relaxed);
}

/// An account's health state after a health check (DESIGN §11), to store and publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthVerdict {
    /// Whether the check passed (2xx or 429).
    pub passed: bool,
    /// Out of scheduling for errors (status `error`) after the check.
    pub in_error: bool,
    /// Failed checks or auth errors in a row after the check.
    pub consecutive_errors: u32,
    /// Whether anything of the above changed.
    pub changed: bool,
}

/// Applies a health check's result to an enabled account's live state. A pass clears the
/// error count and puts back an account the errors took out (`in_error`: its status is
/// `error`); a refusal adds one to the larger of this node's count and the stored one
/// (`stored_errors`, counted on another node), and at `account_error_threshold` takes the
/// account out of scheduling.
pub fn apply_health_check(
    account: &Account,
    in_error: bool,
    stored_errors: u32,
    passed: bool,
    rules: &StateRules,
    now_ms: i64,
) -> HealthVerdict {
    let st = &account.state;
    if passed {
        let before = st.consecutive_errors.swap(0, Ordering::Relaxed);
        st.consecutive_server_errors.store(0, Ordering::Relaxed);
        if in_error {
            st.held_off_until_ms.store(0, Ordering::Relaxed);
            st.schedulable.store(true, Ordering::Relaxed);
        }
        return HealthVerdict {
            passed,
            in_error: false,
            consecutive_errors: 0,
            changed: in_error || before > 0 || stored_errors > 0,
        };
    }
    let n = st
        .consecutive_errors
        .fetch_max(stored_errors, Ordering::Relaxed)
        .max(stored_errors)
        + 1;
    st.consecutive_errors.store(n, Ordering::Relaxed);
    let take_out = !in_error && n >= rules.account_error_threshold;
    if take_out {
        self::take_out(account, now_ms);
    }
    HealthVerdict {
        passed,
        in_error: in_error || take_out,
        consecutive_errors: n,
        changed: true,
    }
}

/// When the provider says the limit that refused a request resets (epoch ms), from the
/// response headers: `retry-after` (delay seconds, or an HTTP date), the Anthropic unified limit's
/// `anthropic-ratelimit-unified-reset` while `anthropic-ratelimit-unified-status` is `rejected`,
/// and OpenAI's `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens`. Of several, the latest:
/// the account serves again only once every limit it hit has reset. Values that are no time
/// (negative, not finite, unparsable) are ignored; huge ones saturate, and the caller caps the
/// cooldown they ask for ([`StateRules::cooldown_429_max`]).
pub fn reset_hint(headers: &http::HeaderMap, now_ms: i64) -> Option<i64> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let mut latest: Option<i64> = None;
    let mut take = |t: Option<i64>| {
        if let Some(t) = t.filter(|t| *t > now_ms) {
            latest = Some(latest.map_or(t, |l| l.max(t)));
        }
    };
    take(get("retry-after").and_then(|v| retry_after_at(v, now_ms)));
    // Claude subscription (OAuth) accounts, headers outside Anthropic's public API reference:
    // every answer carries the unified limit's status and the end of its current window (epoch
    // seconds). Only a `rejected` status says that window is what
    // refused; with `allowed` or `allowed_warning` the reset is merely when the 5-hour window
    // rolls over, and a 429 then comes from elsewhere.
    if get("anthropic-ratelimit-unified-status").is_some_and(|s| s.eq_ignore_ascii_case("rejected"))
    {
        take(
            get("anthropic-ratelimit-unified-reset")
                .and_then(|v| v.parse::<i64>().ok())
                .map(|s| s.saturating_mul(1000)),
        );
    }
    // OpenAI: durations such as "1s", "6m0s", "20ms".
    for name in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        take(
            get(name)
                .and_then(parse_go_duration_ms)
                .map(|ms| now_ms.saturating_add(ms)),
        );
    }
    latest
}

/// When a 429's body says the limit resets (epoch ms), as [`reset_hint`] reads the headers: the
/// ChatGPT Codex backend's `error.resets_at` (epoch seconds) and `error.resets_in_seconds` (the
/// later of the two when both come), and Gemini's `google.rpc.RetryInfo` `retryDelay` in
/// `error.details` (a protobuf duration: "37s", "1.5s").
pub fn body_reset_hint(body: &[u8], now_ms: i64) -> Option<i64> {
    let e = ErrorDoc::parse(body)?.error?;
    let seconds = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .and_then(serde_json::Value::as_f64)
            .and_then(seconds_to_ms)
    };
    let at = seconds(&e.resets_at);
    let within = seconds(&e.resets_in_seconds).map(|ms| now_ms.saturating_add(ms));
    let retry = e
        .detail_fields("RetryInfo", "retryDelay")
        .filter_map(protobuf_duration_ms)
        .map(|ms| now_ms.saturating_add(ms))
        .max();
    [at, within, retry]
        .into_iter()
        .flatten()
        .filter(|t| *t > now_ms)
        .max()
}

/// The fields of a provider's error body the relay reads, in the shapes of Anthropic
/// (`{"type":"error","error":{"type","message"}}`), OpenAI (`{"error":{"message","type","code"}}`),
/// the ChatGPT backend (also `{"detail":{"code"}}`) and Google RPC
/// (`{"error":{"code","message","status","details"}}`). Every field optional.
#[derive(serde::Deserialize, Default)]
struct ErrorDoc {
    #[serde(default)]
    error: Option<ErrorFields>,
    #[serde(default)]
    detail: Option<serde_json::Value>,
}

#[derive(serde::Deserialize, Default)]
struct ErrorFields {
    #[serde(default, rename = "type")]
    kind: Option<serde_json::Value>,
    /// A string for OpenAI, a number for Google.
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    status: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<serde_json::Value>,
    /// Google RPC's typed details (`ErrorInfo`, `RetryInfo`...); `null` for Anthropic.
    #[serde(default)]
    details: Option<serde_json::Value>,
    #[serde(default)]
    resets_at: Option<serde_json::Value>,
    #[serde(default)]
    resets_in_seconds: Option<serde_json::Value>,
}

impl ErrorFields {
    /// The field `name` of each Google RPC detail of type `google.rpc.{kind}`.
    fn detail_fields<'a>(&'a self, kind: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.details
            .as_ref()
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter(move |d| {
                d.get("@type")
                    .and_then(serde_json::Value::as_str)
                    .and_then(|t| t.strip_suffix(kind))
                    .is_some_and(|t| t.ends_with("google.rpc."))
            })
            .filter_map(move |d| d.get(name).and_then(serde_json::Value::as_str))
    }
}

impl ErrorDoc {
    fn parse(body: &[u8]) -> Option<ErrorDoc> {
        // An error body that is an array (Gemini streams answer `[{"error":...}]`): its first.
        // (Not left to serde: a struct also reads from an array, field by position.)
        if body.trim_ascii_start().starts_with(b"[") {
            serde_json::from_slice::<Vec<ErrorDoc>>(body)
                .ok()?
                .into_iter()
                .next()
        } else {
            serde_json::from_slice(body).ok()
        }
    }
}

fn as_str(v: &Option<serde_json::Value>) -> &str {
    v.as_ref().and_then(serde_json::Value::as_str).unwrap_or("")
}

/// OpenAI error codes for an account or organization deactivated for good (401 and the ChatGPT
/// backend's 402 `{"detail":{"code":"deactivated_workspace"}}`).
const DEACTIVATED_CODES: &[&str] = &["account_deactivated", "deactivated_workspace"];

/// Whole messages (trimmed, any case) that say the organization is disabled for good; matched
/// whole, never as part of a longer text, which may quote the request.
const DISABLED_MESSAGES: &[&str] = &[
    // Anthropic, as 400 invalid_request_error and 403 permission_error.
    "this organization has been disabled.",
    "this organization has been disabled",
];

/// The start of Anthropic's 400 for an API account without credit: "Your credit balance is too
/// low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase
/// credits."
const NO_CREDIT_PREFIX: &str = "your credit balance is too low";

/// The start of Anthropic's 400 for an organization or workspace past the spend limit its
/// owner set: "You have reached your specified API usage limits. You will regain access on
/// 2026-12-01 at 00:00 UTC."
const SPEND_LIMIT_PREFIX: &str = "you have reached your specified api usage limits";

/// The starts of Gemini 403 PERMISSION_DENIED messages about a resource the request names (its
/// name follows, chosen by the client): "You do not have permission to access the File abc or it
/// may not exist.", "CachedContent not found (or permission denied)", tuned models.
const RESOURCE_DENIED_PREFIXES: &[&str] = &[
    "you do not have permission to access the file ",
    "you do not have permission to access file ",
    "you do not have permission to access the cachedcontent",
    "you do not have permission to access cachedcontent",
    "cachedcontent not found",
    "you do not have permission to access tuned model",
    "you do not have permission to access the tuned model",
    "permission denied on tuned model",
];

/// What an upstream error answer with `status` says about the account, from the provider's
/// error codes and types and whole known messages, never from words inside free text (which
/// may quote what the client sent).
pub fn classify_error(status: u16, body: &[u8]) -> Fault {
    if !matches!(status, 400..=403 | 429) {
        return Fault::ByStatus;
    }
    let Some(doc) = ErrorDoc::parse(body) else {
        return Fault::ByStatus;
    };
    let detail_code = doc
        .detail
        .as_ref()
        .and_then(|d| d.get("code"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    if DEACTIVATED_CODES.contains(&detail_code) {
        return Fault::Disabled;
    }
    let Some(e) = doc.error else {
        return Fault::ByStatus;
    };
    let (kind, code) = (as_str(&e.kind), as_str(&e.code));
    let message = as_str(&e.message).trim().to_ascii_lowercase();
    if DEACTIVATED_CODES.contains(&code) || DISABLED_MESSAGES.contains(&message.as_str()) {
        return Fault::Disabled;
    }
    // OpenAI: 429 with type and code `insufficient_quota` when the credit is used up.
    if code == "insufficient_quota"
        || kind == "insufficient_quota"
        || (status == 400
            && (message.starts_with(NO_CREDIT_PREFIX) || message.starts_with(SPEND_LIMIT_PREFIX)))
    {
        return Fault::NoCredit;
    }
    // Google RPC: the key itself, named in an ErrorInfo reason (a 400 INVALID_ARGUMENT, for a
    // key not valid and for one expired alike).
    if e.detail_fields("ErrorInfo", "reason")
        .any(|r| r == "API_KEY_INVALID")
    {
        return Fault::KeyInvalid;
    }
    if status == 403
        && as_str(&e.status) == "PERMISSION_DENIED"
        && RESOURCE_DENIED_PREFIXES
            .iter()
            .any(|p| message.starts_with(p))
    {
        return Fault::NotTheAccount;
    }
    Fault::ByStatus
}

/// A protobuf `Duration` in JSON ("37s", "1.5s", "0.000001s") as whole ms.
fn protobuf_duration_ms(value: &str) -> Option<i64> {
    seconds_to_ms(value.trim().strip_suffix('s')?.parse::<f64>().ok()?)
}

/// A `Retry-After` value (RFC 9110 §10.2.3) as epoch ms: delay seconds (fractions accepted, as
/// some OpenAI-compatible servers send them) or an HTTP date.
fn retry_after_at(value: &str, now_ms: i64) -> Option<i64> {
    if let Ok(seconds) = value.parse::<f64>() {
        return Some(now_ms.saturating_add(seconds_to_ms(seconds)?));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    Some(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// Seconds as whole ms, saturating; `None` for what is no delay (negative, NaN, infinite).
fn seconds_to_ms(seconds: f64) -> Option<i64> {
    // `as` saturates at the bounds of i64.
    (seconds.is_finite() && seconds >= 0.0).then_some((seconds * 1000.0) as i64)
}

fn parse_go_duration_ms(s: &str) -> Option<i64> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let v: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3_600_000.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1.0
            }
            'm' => 60_000.0,
            's' => 1000.0,
            _ => return None,
        };
        total += v * unit;
        any = true;
    }
    if !num.is_empty() {
        total += num.parse::<f64>().ok()? * 1000.0;
        any = true;
    }
    // `as` saturates: a duration of 400 digits is i64::MAX ms, not an overflow.
    any.then_some(total as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::tests::account;
    use crate::AccountType;

    #[test]
    fn health_checks_count_failures_take_out_at_the_threshold_and_a_pass_puts_back() {
        let rules = StateRules {
            account_error_threshold: 3,
            ..StateRules::default()
        };
        let a = account("a", AccountType::ClaudeOfficial, 50, 1);
        a.state.schedulable.store(true, Ordering::Relaxed);
        let pass = apply_health_check(&a, false, 0, true, &rules, 0);
        assert_eq!(
            (pass.in_error, pass.changed),
            (false, false),
            "nothing to change"
        );
        for n in 1..=2 {
            let v = apply_health_check(&a, false, 0, false, &rules, 0);
            assert_eq!(
                (v.in_error, v.consecutive_errors, v.changed),
                (false, n, true)
            );
            assert!(a.state.schedulable.load(Ordering::Relaxed));
        }
        let out = apply_health_check(&a, false, 0, false, &rules, 1_000);
        assert_eq!((out.in_error, out.consecutive_errors), (true, 3));
        assert!(!a.state.schedulable.load(Ordering::Relaxed));
        assert!(a.state.held_off_until_ms.load(Ordering::Relaxed) > 1_000);
        // Still failing: counted on, still out.
        let again = apply_health_check(&a, true, 3, false, &rules, 2_000);
        assert_eq!((again.in_error, again.consecutive_errors), (true, 4));
        assert!(!a.state.schedulable.load(Ordering::Relaxed));
        // A pass puts it back at once, whatever the hold.
        let back = apply_health_check(&a, true, 4, true, &rules, 3_000);
        assert_eq!(
            back,
            HealthVerdict {
                passed: true,
                in_error: false,
                consecutive_errors: 0,
                changed: true
            }
        );
        assert!(a.state.schedulable.load(Ordering::Relaxed));
        assert_eq!(a.state.held_off_until_ms.load(Ordering::Relaxed), 0);
        assert_eq!(a.state.consecutive_errors.load(Ordering::Relaxed), 0);

        // Counted on another node (stored 2): one refusal here reaches the threshold.
        let elsewhere = apply_health_check(&a, false, 2, false, &rules, 4_000);
        assert_eq!(
            (elsewhere.in_error, elsewhere.consecutive_errors),
            (true, 3)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration_ms("1s"), Some(1000));
        assert_eq!(parse_go_duration_ms("6m0s"), Some(360_000));
        assert_eq!(parse_go_duration_ms("20ms"), Some(20));
        assert_eq!(parse_go_duration_ms("1.5s"), Some(1500));
        assert_eq!(parse_go_duration_ms("x"), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, value.parse().unwrap());
        }
        h
    }

    #[test]
    fn hints() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", "30".parse().unwrap());
        assert_eq!(reset_hint(&h, 1000), Some(31_000));
        h.insert("anthropic-ratelimit-unified-reset", "100".parse().unwrap());
        h.insert(
            "anthropic-ratelimit-unified-status",
            "rejected".parse().unwrap(),
        );
        assert_eq!(reset_hint(&h, 1000), Some(100_000), "the latest of the two");
        assert_eq!(
            body_reset_hint(
                br#"{"error":{"type":"usage_limit_reached","resets_in_seconds":12}}"#,
                0
            ),
            Some(12_000)
        );
    }

    #[test]
    fn error_bodies_are_read_by_code_type_and_whole_message() {
        let table: &[(u16, &str, Fault)] = &[
            // Anthropic.
            (
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"This organization has been disabled."}}"#,
                Fault::Disabled,
            ),
            (
                403,
                r#"{"type":"error","error":{"type":"permission_error","message":"This organization has been disabled."},"request_id":"req_1"}"#,
                Fault::Disabled,
            ),
            (
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#,
                Fault::NoCredit,
            ),
            (
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"You have reached your specified API usage limits. You will regain access on 2026-12-01 at 00:00 UTC."}}"#,
                Fault::NoCredit,
            ),
            (
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages.0.content: Field required"}}"#,
                Fault::ByStatus,
            ),
            // A client's text that quotes the known messages is no verdict.
            (
                400,
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"model: this organization has been disabled. not found"}}"#,
                Fault::ByStatus,
            ),
            (
                401,
                r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#,
                Fault::ByStatus,
            ),
            // OpenAI.
            (
                401,
                r#"{"error":{"message":"This key is associated with a deactivated account.","type":"invalid_request_error","param":null,"code":"account_deactivated"}}"#,
                Fault::Disabled,
            ),
            (
                402,
                r#"{"detail":{"code":"deactivated_workspace"}}"#,
                Fault::Disabled,
            ),
            (
                429,
                r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
                Fault::NoCredit,
            ),
            (
                429,
                r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
                Fault::ByStatus,
            ),
            (
                400,
                r#"{"error":{"message":"Invalid 'input': the account is deactivated","type":"invalid_request_error","param":"input","code":null}}"#,
                Fault::ByStatus,
            ),
            // Gemini.
            (
                400,
                r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#,
                Fault::KeyInvalid,
            ),
            (
                400,
                r#"{"error":{"code":400,"message":"API key expired. Please renew the API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#,
                Fault::KeyInvalid,
            ),
            (
                400,
                r#"{"error":{"code":400,"message":"* GenerateContentRequest.contents: contents is not specified\n","status":"INVALID_ARGUMENT"}}"#,
                Fault::ByStatus,
            ),
            (
                403,
                r#"{"error":{"code":403,"message":"You do not have permission to access the File deactivated or it may not exist.","status":"PERMISSION_DENIED"}}"#,
                Fault::NotTheAccount,
            ),
            (
                403,
                r#"{"error":{"code":403,"message":"CachedContent not found (or permission denied)","status":"PERMISSION_DENIED"}}"#,
                Fault::NotTheAccount,
            ),
            (
                403,
                r#"{"error":{"code":403,"message":"You do not have permission to access tuned model tunedModels/this-organization-has-been-disabled","status":"PERMISSION_DENIED"}}"#,
                Fault::NotTheAccount,
            ),
            (
                403,
                r#"{"error":{"code":403,"message":"Method doesn't allow unregistered callers","status":"PERMISSION_DENIED"}}"#,
                Fault::ByStatus,
            ),
            (
                403,
                r#"[{"error":{"code":403,"message":"You do not have permission to access the File x or it may not exist.","status":"PERMISSION_DENIED"}}]"#,
                Fault::NotTheAccount,
            ),
            // Not JSON, or a status the body does not speak for.
            (403, "deactivated", Fault::ByStatus),
            (
                500,
                r#"{"error":{"code":"insufficient_quota"}}"#,
                Fault::ByStatus,
            ),
        ];
        for (status, body, want) in table {
            assert_eq!(
                classify_error(*status, body.as_bytes()),
                *want,
                "{status} {body}"
            );
        }
    }

    #[test]
    fn body_hints_read_every_provider_shape() {
        // Codex: both fields, the later wins.
        let at = NOW / 1000 + 600;
        let codex = format!(
            r#"{{"error":{{"type":"usage_limit_reached","message":"The usage limit has been reached","resets_at":{at},"resets_in_seconds":30}}}}"#
        );
        assert_eq!(body_reset_hint(codex.as_bytes(), NOW), Some(at * 1000));
        let only_at = format!(r#"{{"error":{{"type":"usage_limit_reached","resets_at":{at}}}}}"#);
        assert_eq!(body_reset_hint(only_at.as_bytes(), NOW), Some(at * 1000));
        let past = r#"{"error":{"type":"usage_limit_reached","resets_at":1}}"#;
        assert_eq!(body_reset_hint(past.as_bytes(), NOW), None);
        // Gemini's RetryInfo.
        let gemini = |delay: &str| {
            format!(
                r#"{{"error":{{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]}},{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay}"}}]}}}}"#
            )
        };
        assert_eq!(
            body_reset_hint(gemini("37s").as_bytes(), NOW),
            Some(NOW + 37_000)
        );
        assert_eq!(
            body_reset_hint(gemini("1.5s").as_bytes(), NOW),
            Some(NOW + 1_500)
        );
        assert_eq!(body_reset_hint(gemini("soon").as_bytes(), NOW), None);
        assert_eq!(body_reset_hint(gemini("-3s").as_bytes(), NOW), None);
        assert_eq!(body_reset_hint(b"not json", NOW), None);
    }

    #[test]
    fn account_faults_change_the_account_whatever_the_status() {
        let rules = StateRules::default();
        let with = |status: u16, fault: Fault, reset_at_ms: Option<i64>| Outcome::Status {
            status,
            reset_at_ms,
            fault,
        };
        let a = account("a", AccountType::Claude, 50, 1);
        a.state.schedulable.store(true, Ordering::Relaxed);
        assert!(matches!(
            apply_outcome(&a, with(400, Fault::Disabled, None), &rules, NOW),
            StateChange::Disabled {
                status: "blocked",
                ..
            }
        ));
        assert!(!a.in_operation());
        let g = account("g", AccountType::Gemini, 50, 1);
        g.state.schedulable.store(true, Ordering::Relaxed);
        assert!(matches!(
            apply_outcome(&g, with(400, Fault::KeyInvalid, None), &rules, NOW),
            StateChange::Disabled {
                status: "error",
                ..
            }
        ));
        assert!(!g.in_operation());
        // Out of credit: the long cooldown, whatever rate-limit reset the answer carried.
        let c = account("c", AccountType::Claude, 50, 1);
        let cap = NOW + DEFAULT_COOLDOWN_429_MAX.as_millis() as i64;
        assert_eq!(
            apply_outcome(&c, with(400, Fault::NoCredit, None), &rules, NOW),
            StateChange::Cooldown {
                reason: "no_credit",
                until_ms: cap
            }
        );
        let o = account("o", AccountType::Openai, 50, 1);
        assert_eq!(
            apply_outcome(
                &o,
                with(429, Fault::NoCredit, Some(NOW + 5_000)),
                &rules,
                NOW
            ),
            StateChange::Cooldown {
                reason: "no_credit",
                until_ms: cap
            }
        );
        // About the request's own resource: nothing counted.
        let r = account("r", AccountType::Gemini, 50, 1);
        for _ in 0..10 {
            assert_eq!(
                apply_outcome(&r, with(403, Fault::NotTheAccount, None), &rules, NOW),
                StateChange::None
            );
        }
        assert_eq!(r.state.consecutive_errors.load(Ordering::Relaxed), 0);
        // A client error by status alone counts nothing either.
        assert_eq!(
            apply_outcome(&r, with(400, Fault::ByStatus, None), &rules, NOW),
            StateChange::None
        );
    }

    /// 2024-01-01T00:00:00Z in epoch ms.
    const NOW: i64 = 1_704_067_200_000;

    #[test]
    fn retry_after_takes_seconds_and_http_dates_and_ignores_what_is_no_delay() {
        let hint = |v: &str| reset_hint(&headers(&[("retry-after", v)]), NOW);
        let table: &[(&str, Option<i64>)] = &[
            ("0", None),
            ("2", Some(NOW + 2_000)),
            (" 1.5 ", Some(NOW + 1_500)),
            // Huge: saturates (the cooldown is capped by the caller), never overflows.
            ("1000000000", Some(NOW + 1_000_000_000_000)),
            ("99999999999999999999", Some(i64::MAX)),
            ("1e300", Some(i64::MAX)),
            // No delay at all: ignored, the default cooldown applies.
            ("inf", None),
            ("-inf", None),
            ("Infinity", None),
            ("NaN", None),
            ("-5", None),
            ("-0.001", None),
            ("soon", None),
            ("", None),
            // HTTP dates: a future one holds, a past one says nothing.
            ("Mon, 01 Jan 2024 00:01:00 GMT", Some(NOW + 60_000)),
            ("Sun, 31 Dec 2023 23:00:00 GMT", None),
            ("Fri, 31 Dec 9999 23:59:59 GMT", Some(253_402_300_799_000)),
        ];
        for (value, want) in table {
            assert_eq!(hint(value), *want, "retry-after: {value:?}");
        }
    }

    #[test]
    fn the_unified_reset_counts_only_when_its_limit_refused() {
        let in_an_hour = (NOW / 1000 + 3600).to_string();
        let hint = |status: &str, reset: &str| {
            reset_hint(
                &headers(&[
                    ("anthropic-ratelimit-unified-status", status),
                    ("anthropic-ratelimit-unified-reset", reset),
                ]),
                NOW,
            )
        };
        assert_eq!(hint("rejected", &in_an_hour), Some(NOW + 3_600_000));
        // The 5-hour window's end, sent on every answer: not why this 429 came.
        assert_eq!(hint("allowed", &in_an_hour), None);
        assert_eq!(hint("allowed_warning", &in_an_hour), None);
        let no_status = headers(&[("anthropic-ratelimit-unified-reset", in_an_hour.as_str())]);
        assert_eq!(reset_hint(&no_status, NOW), None);
        // 17 digits of epoch seconds, and more than i64 holds: saturate, never overflow.
        assert_eq!(hint("rejected", "12345678901234567"), Some(i64::MAX));
        assert_eq!(hint("rejected", "99999999999999999999"), None);
        assert_eq!(hint("rejected", "-1700000000"), None);
        assert_eq!(hint("rejected", "soon"), None);
    }

    #[test]
    fn duration_and_body_hints_saturate() {
        let h = headers(&[
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(reset_hint(&h, NOW), Some(NOW + 360_000), "the latest");
        let huge = "9".repeat(400) + "h";
        let h = headers(&[("x-ratelimit-reset-tokens", huge.as_str())]);
        assert_eq!(reset_hint(&h, NOW), Some(i64::MAX));
        let h = headers(&[("x-ratelimit-reset-tokens", "-1s")]);
        assert_eq!(reset_hint(&h, NOW), None);

        let body = |s: &str| {
            body_reset_hint(
                format!(r#"{{"error":{{"resets_in_seconds":{s}}}}}"#).as_bytes(),
                NOW,
            )
        };
        assert_eq!(body("12"), Some(NOW + 12_000));
        assert_eq!(body("1e308"), Some(i64::MAX));
        assert_eq!(body("-3"), None);
        assert_eq!(body("null"), None);
    }

    #[test]
    fn a_hinted_cooldown_is_capped() {
        let rules = StateRules::default();
        let cap = NOW + DEFAULT_COOLDOWN_429_MAX.as_millis() as i64;
        for reset_at_ms in [NOW + 1_000_000_000_000, i64::MAX] {
            let a = account("a", AccountType::Claude, 50, 1);
            let hinted = Outcome::Status {
                status: 429,
                reset_at_ms: Some(reset_at_ms),
                fault: Fault::ByStatus,
            };
            assert_eq!(
                apply_outcome(&a, hinted, &rules, NOW),
                StateChange::Cooldown {
                    reason: "rate_limited",
                    until_ms: cap
                }
            );
            assert_eq!(a.state.cooldown_until_ms.load(Ordering::Relaxed), cap);
        }
        // Within the cap, the provider's word holds.
        let a = account("a", AccountType::Claude, 50, 1);
        let soon = Outcome::Status {
            status: 429,
            reset_at_ms: Some(NOW + 7_200_000),
            fault: Fault::ByStatus,
        };
        assert!(matches!(
            apply_outcome(&a, soon, &rules, NOW),
            StateChange::Cooldown { until_ms, .. } if until_ms == NOW + 7_200_000
        ));
        // Near the end of time, the default cooldowns saturate too.
        let b = account("b", AccountType::Claude, 50, 1);
        let plain = Outcome::Status {
            status: 429,
            reset_at_ms: None,
            fault: Fault::ByStatus,
        };
        assert!(matches!(
            apply_outcome(&b, plain, &rules, i64::MAX - 1),
            StateChange::Cooldown {
                until_ms: i64::MAX,
                ..
            }
        ));
    }

    #[test]
    fn transitions() {
        let rules = StateRules::default();
        let a = account("a", AccountType::Claude, 50, 1);
        let s429 = Outcome::Status {
            status: 429,
            reset_at_ms: None,
            fault: Fault::ByStatus,
        };
        assert_eq!(
            apply_outcome(&a, s429, &rules, 0),
            StateChange::Cooldown {
                reason: "rate_limited",
                until_ms: 60_000
            }
        );
        assert!(!a.usable(59_999));
        assert!(a.usable(60_000));
        let hinted = Outcome::Status {
            status: 429,
            reset_at_ms: Some(90_000),
            fault: Fault::ByStatus,
        };
        assert_eq!(
            apply_outcome(&a, hinted, &rules, 0),
            StateChange::Cooldown {
                reason: "rate_limited",
                until_ms: 90_000
            }
        );
        for _ in 0..2 {
            assert_eq!(
                apply_outcome(&a, Outcome::Timeout, &rules, 0),
                StateChange::None
            );
        }
        assert!(matches!(
            apply_outcome(&a, Outcome::ConnectError, &rules, 0),
            StateChange::Cooldown {
                reason: "server_errors",
                ..
            }
        ));
        let auth = Outcome::Status {
            status: 401,
            reset_at_ms: None,
            fault: Fault::ByStatus,
        };
        for _ in 0..4 {
            assert_eq!(apply_outcome(&a, auth, &rules, 0), StateChange::None);
        }
        assert!(matches!(
            apply_outcome(&a, auth, &rules, 0),
            StateChange::Disabled {
                status: "error",
                ..
            }
        ));
        assert!(!a.usable(i64::MAX));
        assert_eq!(a.state.held_off_until_ms.load(Ordering::Relaxed), 60_000);
        let b = account("b", AccountType::Claude, 50, 1);
        apply_outcome(&b, auth, &rules, 0);
        let ok = Outcome::Status {
            status: 200,
            reset_at_ms: None,
            fault: Fault::ByStatus,
        };
        assert_eq!(apply_outcome(&b, ok, &rules, 0), StateChange::Recovered);
        // A success ends the hold of an automatic disable: its recovery is persisted after it.
        assert_eq!(apply_outcome(&a, ok, &rules, 0), StateChange::Recovered);
        assert_eq!(a.state.held_off_until_ms.load(Ordering::Relaxed), 0);
        let blocked = Outcome::Status {
            status: 403,
            reset_at_ms: None,
            fault: Fault::Disabled,
        };
        assert!(matches!(
            apply_outcome(&b, blocked, &rules, 0),
            StateChange::Disabled {
                status: "blocked",
                ..
            }
        ));
    }
}
