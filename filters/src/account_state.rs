//! How upstream answers change an account's state: cooldowns from reset hints, error streaks,
//! automatic disabling (DESIGN §8).

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::accounts::Account;

/// Thresholds and default cooldowns.
#[derive(Debug, Clone)]
pub struct StateRules {
    pub cooldown_429: Duration,
    pub cooldown_529: Duration,
    pub cooldown_5xx: Duration,
    pub server_error_threshold: u32,
    pub account_error_threshold: u32,
}

impl Default for StateRules {
    fn default() -> Self {
        StateRules {
            cooldown_429: Duration::from_secs(60),
            cooldown_529: Duration::from_secs(120),
            cooldown_5xx: Duration::from_secs(300),
            server_error_threshold: 3,
            account_error_threshold: 5,
        }
    }
}

/// What one attempt ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response head with this status; `reset_at_ms` from the provider's reset hints.
    Status {
        status: u16,
        reset_at_ms: Option<i64>,
        blocked: bool,
    },
    /// Connecting failed or timed out.
    ConnectError,
    /// No response head in time, or the connection broke before it.
    Timeout,
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
    let cooldown = |reason: &'static str, d: Duration, hint: Option<i64>| {
        let until = hint
            .filter(|t| *t > now_ms)
            .unwrap_or(now_ms + d.as_millis() as i64);
        st.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
        StateChange::Cooldown {
            reason,
            until_ms: until,
        }
    };
    match outcome {
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
            status: 401 | 403,
            blocked,
            ..
        } => {
            let n = st.consecutive_errors.fetch_add(1, Ordering::Relaxed) + 1;
            if blocked {
                take_out(account, now_ms);
                StateChange::Disabled {
                    status: "blocked",
                    reason: "the provider reports the organization or account disabled".into(),
                }
            } else if n >= rules.account_error_threshold {
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

/// The earliest time the provider says the limit resets, from response headers
/// (`retry-after`, `anthropic-ratelimit-unified-reset`, `x-ratelimit-reset-*`).
pub fn reset_hint(headers: &http::HeaderMap, now_ms: i64) -> Option<i64> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let mut best: Option<i64> = None;
    let mut take = |t: Option<i64>| {
        if let Some(t) = t.filter(|t| *t > now_ms) {
            best = Some(best.map_or(t, |b| b.max(t)));
        }
    };
    // Retry-After: delta seconds (an HTTP date is rare from these providers; ignored).
    take(
        get("retry-after")
            .and_then(|v| v.parse::<f64>().ok())
            .map(|s| now_ms + (s * 1000.0) as i64),
    );
    // Anthropic unified limits: epoch seconds.
    take(
        get("anthropic-ratelimit-unified-reset")
            .and_then(|v| v.parse::<i64>().ok())
            .map(|s| s * 1000),
    );
    // OpenAI: durations such as "1s", "6m0s", "20ms".
    for name in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        take(
            get(name)
                .and_then(parse_go_duration_ms)
                .map(|ms| now_ms + ms),
        );
    }
    best
}

/// `error.resets_in_seconds` from a 429 body (ChatGPT Codex backend).
pub fn body_reset_hint(body: &[u8], now_ms: i64) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Outer {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        resets_in_seconds: Option<f64>,
    }
    let o: Outer = serde_json::from_slice(body).ok()?;
    o.error
        .resets_in_seconds
        .map(|s| now_ms + (s * 1000.0) as i64)
}

/// Whether a 401/403 body says the organization or account is disabled for good.
pub fn is_blocking_error(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]).to_ascii_lowercase();
    [
        "organization has been disabled",
        "organization is disabled",
        "account has been disabled",
        "account is disabled",
        "deactivated",
    ]
    .iter()
    .any(|p| text.contains(p))
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

    #[test]
    fn hints() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", "30".parse().unwrap());
        assert_eq!(reset_hint(&h, 1000), Some(31_000));
        h.insert("anthropic-ratelimit-unified-reset", "100".parse().unwrap());
        assert_eq!(reset_hint(&h, 1000), Some(100_000));
        assert_eq!(
            body_reset_hint(
                br#"{"error":{"type":"usage_limit_reached","resets_in_seconds":12}}"#,
                0
            ),
            Some(12_000)
        );
        assert!(is_blocking_error(
            br#"{"error":{"message":"This organization has been disabled."}}"#
        ));
    }

    #[test]
    fn transitions() {
        let rules = StateRules::default();
        let a = account("a", AccountType::Claude, 50, 1);
        let s429 = Outcome::Status {
            status: 429,
            reset_at_ms: None,
            blocked: false,
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
            blocked: false,
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
            blocked: false,
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
            blocked: false,
        };
        assert_eq!(apply_outcome(&b, ok, &rules, 0), StateChange::Recovered);
        // A success ends the hold of an automatic disable: its recovery is persisted after it.
        assert_eq!(apply_outcome(&a, ok, &rules, 0), StateChange::Recovered);
        assert_eq!(a.state.held_off_until_ms.load(Ordering::Relaxed), 0);
        let blocked = Outcome::Status {
            status: 403,
            reset_at_ms: None,
            blocked: true,
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
