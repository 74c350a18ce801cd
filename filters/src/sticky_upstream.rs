//! `sticky_upstream`: keeps a conversation on the account it started on, else picks one by
//! priority and strategy and binds it (DESIGN §7, §8). Also picks the next account on failover.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::accounts::{select_account, Account, AccountDirectory, InflightLease, PickStrategy};
use crate::chain::{Flow, RequestFilter, RequestView};
use crate::context::{RequestCtx, StickyResult};
use crate::error::{ErrorKind, Rejection};
use crate::session_store::{Binding, SessionStore};
use crate::Protocol;

/// Binding lifetimes and the pick strategy.
#[derive(Debug, Clone)]
pub struct StickyConfig {
    /// Binding TTL for every protocol but Responses.
    pub ttl: Duration,
    /// Binding TTL for OpenAI Responses.
    pub responses_ttl: Duration,
    /// A hit renews the binding when less than this is left.
    pub renew_threshold: Duration,
    pub strategy: PickStrategy,
}

impl Default for StickyConfig {
    fn default() -> Self {
        StickyConfig {
            ttl: Duration::from_secs(3600),
            responses_ttl: Duration::from_secs(1800),
            renew_threshold: Duration::from_secs(300),
            strategy: PickStrategy::Weighted,
        }
    }
}

/// The filter.
pub struct StickyUpstream {
    accounts: Arc<dyn AccountDirectory>,
    sessions: Arc<dyn SessionStore>,
    config: StickyConfig,
    round_robin: AtomicU64,
}

impl StickyUpstream {
    /// A scheduler over `accounts` keeping bindings in `sessions`.
    pub fn new(
        accounts: Arc<dyn AccountDirectory>,
        sessions: Arc<dyn SessionStore>,
        config: StickyConfig,
    ) -> Self {
        StickyUpstream {
            accounts,
            sessions,
            config,
            round_robin: AtomicU64::new(0),
        }
    }

    fn ttl(&self, protocol: Protocol) -> Duration {
        if protocol == Protocol::OpenaiResponses {
            self.config.responses_ttl
        } else {
            self.config.ttl
        }
    }

    fn pick(&self, ctx: &RequestCtx) -> Option<Arc<Account>> {
        self.pick_excluding(ctx, &[])
    }

    fn pick_excluding(&self, ctx: &RequestCtx, also: &[String]) -> Option<Arc<Account>> {
        let all = self.accounts.accounts();
        let exclude: Vec<String>;
        let exclude = if also.is_empty() {
            &ctx.upstream.tried
        } else {
            exclude = ctx.upstream.tried.iter().chain(also).cloned().collect();
            &exclude
        };
        select_account(
            &all,
            ctx.protocol(),
            ctx.requested_model(),
            exclude,
            self.config.strategy,
            ctx.started_ms,
            &self.round_robin,
        )
    }

    /// Takes a slot on `account`; `false` when it filled up since it was picked.
    fn reserve(&self, ctx: &mut RequestCtx, account: &Account) -> bool {
        match InflightLease::try_acquire(account, ctx.started_ms) {
            Some(lease) => {
                ctx.upstream.lease = Some(lease);
                true
            }
            None => false,
        }
    }

    /// Another account than `skipped` (full ones), reserved and bound to the session.
    async fn reserve_another(
        &self,
        ctx: &mut RequestCtx,
        mut skipped: Vec<String>,
    ) -> Option<Arc<Account>> {
        loop {
            let account = self.pick_excluding(ctx, &skipped)?;
            if self.reserve(ctx, &account) {
                if let Some(key) = ctx.session.key.clone() {
                    let _ = self
                        .sessions
                        .put(
                            &key,
                            &self.binding_for(ctx, &account),
                            self.ttl(ctx.protocol()),
                        )
                        .await;
                    ctx.session.sticky = Some(StickyResult::Rebind);
                }
                return Some(account);
            }
            skipped.push(account.id.clone());
        }
    }

    fn binding_for(&self, ctx: &RequestCtx, account: &Account) -> Binding {
        let (user_id, api_key_id) = ctx
            .auth
            .as_ref()
            .map(|a| (a.key.user_id.clone(), a.key.id.clone()))
            .unwrap_or_default();
        Binding {
            account_id: account.id.clone(),
            account_type: account.account_type.as_str().to_string(),
            platform: ctx.protocol().platform().to_string(),
            model: ctx.requested_model().map(str::to_string),
            user_id,
            api_key_id,
            created_at: ctx.started_ms,
            last_used_at: ctx.started_ms,
            request_count: 1,
        }
    }

    fn usable_for(&self, ctx: &RequestCtx, id: &str) -> Option<Arc<Account>> {
        self.accounts.get(id).filter(|a| {
            a.serves(ctx.protocol(), ctx.requested_model())
                && a.usable(ctx.started_ms)
                && !ctx.upstream.tried.iter().any(|t| t == id)
        })
    }

    /// Remembers which account produced a Responses answer, so a later request naming it in
    /// `previous_response_id` goes back there (DESIGN §7).
    pub async fn remember_response(&self, ctx: &RequestCtx) {
        if ctx.protocol() != Protocol::OpenaiResponses {
            return;
        }
        let (Some(id), Some(account)) = (&ctx.usage.response_id, &ctx.upstream.account) else {
            return;
        };
        let binding = self.binding_for(ctx, account);
        let _ = self
            .sessions
            .put(
                &response_key(&binding.api_key_id, id),
                &binding,
                self.config.responses_ttl,
            )
            .await;
    }

    /// Chooses the account of the first attempt, honouring and updating the binding, and takes
    /// a slot on it (`ctx.upstream.lease`). An account that filled up between the pick and the
    /// slot counts as unusable: another is picked and bound.
    pub async fn choose(&self, ctx: &mut RequestCtx) -> Result<Arc<Account>, Rejection> {
        let account = self.choose_binding(ctx).await?;
        if self.reserve(ctx, &account) {
            return Ok(account);
        }
        self.reserve_another(ctx, vec![account.id.clone()])
            .await
            .ok_or_else(no_account)
    }

    async fn choose_binding(&self, ctx: &mut RequestCtx) -> Result<Arc<Account>, Rejection> {
        let ttl = self.ttl(ctx.protocol());
        // A continued response must go to the account that holds it, whatever the session says.
        if let Some(prev) = ctx.request.previous_response_id.clone() {
            let key_id = ctx.auth.as_ref().map(|a| a.key.id.as_str()).unwrap_or("");
            if let Ok(Some(stored)) = self.sessions.get(&response_key(key_id, &prev)).await {
                if let Some(account) = self.usable_for(ctx, &stored.binding.account_id) {
                    ctx.session.sticky = Some(StickyResult::Hit);
                    return Ok(account);
                }
            }
        }
        let Some(key) = ctx.session.key.clone() else {
            return self.pick(ctx).ok_or_else(no_account);
        };
        let existing = self.sessions.get(&key).await.ok().flatten();
        if let Some(stored) = existing {
            if let Some(account) = self.usable_for(ctx, &stored.binding.account_id) {
                if stored.remaining < self.config.renew_threshold {
                    let mut b = Binding::clone(&stored.binding);
                    b.last_used_at = ctx.started_ms;
                    b.request_count += 1;
                    let _ = self.sessions.put(&key, &b, ttl).await;
                }
                ctx.session.sticky = Some(StickyResult::Hit);
                return Ok(account);
            }
            let account = self.pick(ctx).ok_or_else(no_account)?;
            let _ = self
                .sessions
                .put(&key, &self.binding_for(ctx, &account), ttl)
                .await;
            ctx.session.sticky = Some(StickyResult::Rebind);
            return Ok(account);
        }
        let account = self.pick(ctx).ok_or_else(no_account)?;
        ctx.session.sticky = Some(StickyResult::Miss);
        match self
            .sessions
            .set_if_absent(&key, &self.binding_for(ctx, &account), ttl)
            .await
        {
            // Another node bound this session first: follow it when that account can serve.
            Ok(winner) if winner.account_id != account.id => {
                Ok(self.usable_for(ctx, &winner.account_id).unwrap_or(account))
            }
            _ => Ok(account),
        }
    }

    /// Picks another account after a failed attempt (never one already tried) and rebinds
    /// the session to it.
    pub async fn failover(&self, ctx: &mut RequestCtx) -> Option<Arc<Account>> {
        ctx.upstream.lease = None;
        self.reserve_another(ctx, Vec::new()).await
    }
}

/// Scoped per API key like every binding: another tenant naming the id gets no say.
fn response_key(api_key_id: &str, response_id: &str) -> String {
    format!("response:{api_key_id}:{response_id}")
}

fn no_account() -> Rejection {
    Rejection::new(
        ErrorKind::NoAvailableAccount,
        "no upstream account is available for this request",
    )
}

#[async_trait]
impl RequestFilter for StickyUpstream {
    fn name(&self) -> &'static str {
        "sticky_upstream"
    }

    async fn on_request(&self, ctx: &mut RequestCtx, _req: &RequestView<'_>) -> Flow {
        match self.choose(ctx).await {
            Ok(account) => {
                ctx.upstream.tried.push(account.id.clone());
                ctx.upstream.account = Some(account);
                Flow::Continue
            }
            Err(r) => Flow::Reject(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::tests::account;
    use crate::route::ApiRoute;
    use crate::session_store::MemorySessionStore;
    use crate::AccountType;
    use std::sync::atomic::Ordering;

    struct Dir(Arc<Vec<Arc<Account>>>);
    impl AccountDirectory for Dir {
        fn accounts(&self) -> Arc<Vec<Arc<Account>>> {
            self.0.clone()
        }
        fn get(&self, id: &str) -> Option<Arc<Account>> {
            self.0.iter().find(|a| a.id == id).cloned()
        }
    }

    fn ctx(session: Option<&str>) -> RequestCtx {
        let route = ApiRoute {
            protocol: Protocol::Anthropic,
            upstream_path: "/v1/messages".into(),
            path_model: None,
            path_stream: false,
            billed: true,
        };
        let mut c = RequestCtx::new("r".into(), route, 1_000);
        c.session.key = session.map(str::to_string);
        c
    }

    #[tokio::test]
    async fn sticky_then_rebind_when_unusable() {
        let a = account("a", AccountType::Claude, 50, 1);
        let b = account("b", AccountType::Claude, 50, 1);
        let dir = Arc::new(Dir(Arc::new(vec![a.clone(), b.clone()])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        let mut c1 = ctx(Some("s1"));
        let first = s.choose(&mut c1).await.unwrap();
        assert_eq!(c1.session.sticky, Some(StickyResult::Miss));
        for _ in 0..10 {
            let mut c = ctx(Some("s1"));
            assert_eq!(s.choose(&mut c).await.unwrap().id, first.id);
            assert_eq!(c.session.sticky, Some(StickyResult::Hit));
        }
        first
            .state
            .cooldown_until_ms
            .store(i64::MAX, Ordering::Relaxed);
        let mut c = ctx(Some("s1"));
        let second = s.choose(&mut c).await.unwrap();
        assert_ne!(second.id, first.id);
        assert_eq!(c.session.sticky, Some(StickyResult::Rebind));
        first.state.cooldown_until_ms.store(0, Ordering::Relaxed);
        let mut c = ctx(Some("s1"));
        assert_eq!(
            s.choose(&mut c).await.unwrap().id,
            second.id,
            "new binding holds"
        );
    }

    #[tokio::test]
    async fn failover_excludes_tried_and_rebinds() {
        let a = account("a", AccountType::Claude, 50, 1);
        let b = account("b", AccountType::Claude, 50, 1);
        let dir = Arc::new(Dir(Arc::new(vec![a, b])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        let mut c = ctx(Some("s"));
        let first = s.choose(&mut c).await.unwrap();
        c.upstream.tried.push(first.id.clone());
        let next = s.failover(&mut c).await.unwrap();
        assert_ne!(next.id, first.id);
        c.upstream.tried.push(next.id.clone());
        assert!(s.failover(&mut c).await.is_none());
        let mut again = ctx(Some("s"));
        assert_eq!(s.choose(&mut again).await.unwrap().id, next.id);
    }

    #[tokio::test]
    async fn previous_response_id_goes_back_to_its_account() {
        let a = account("a", AccountType::Openai, 50, 1);
        let b = account("b", AccountType::Openai, 50, 1);
        let dir = Arc::new(Dir(Arc::new(vec![a, b])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        let responses = |session: Option<&str>| {
            let mut c = ctx(session);
            c.route.protocol = Protocol::OpenaiResponses;
            c
        };
        let mut first = responses(None);
        let acc = s.choose(&mut first).await.unwrap();
        first.upstream.account = Some(acc.clone());
        first.usage.response_id = Some("resp_1".into());
        s.remember_response(&first).await;
        for i in 0..20 {
            // Different (or no) session keys: the response id wins.
            let key = format!("other-{i}");
            let mut next = responses(Some(&key));
            next.request.previous_response_id = Some("resp_1".into());
            assert_eq!(s.choose(&mut next).await.unwrap().id, acc.id);
        }
    }

    #[tokio::test]
    async fn response_ids_are_scoped_per_key() {
        use crate::api_key_auth::KeyEntry;
        use crate::context::AuthInfo;
        let a = account("a", AccountType::Openai, 50, 1);
        let b = account("b", AccountType::Openai, 50, 1);
        let dir = Arc::new(Dir(Arc::new(vec![a, b])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        let with_key = |key: &str| {
            let mut c = ctx(None);
            c.route.protocol = Protocol::OpenaiResponses;
            c.auth = Some(AuthInfo {
                key: Arc::new(KeyEntry {
                    id: key.into(),
                    ..Default::default()
                }),
            });
            c
        };
        let mut first = with_key("tenant-1");
        let acc = s.choose(&mut first).await.unwrap();
        first.upstream.account = Some(acc.clone());
        first.usage.response_id = Some("resp_x".into());
        s.remember_response(&first).await;
        let mut elsewhere = 0;
        for _ in 0..40 {
            let mut other = with_key("tenant-2");
            other.request.previous_response_id = Some("resp_x".into());
            if s.choose(&mut other).await.unwrap().id != acc.id {
                elsewhere += 1;
            }
        }
        assert!(
            elsewhere > 0,
            "another tenant's response id steered the pick"
        );
    }

    #[tokio::test]
    async fn no_account_is_503() {
        let dir = Arc::new(Dir(Arc::new(vec![account(
            "o",
            AccountType::Openai,
            50,
            1,
        )])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(10), StickyConfig::default());
        let err = s.choose(&mut ctx(None)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::NoAvailableAccount);
    }
}
