//! `sticky_upstream`: keeps a conversation on the account it started on, else picks one by
//! priority and strategy and binds it (DESIGN §7, §8). Also picks the next account on failover.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::accounts::{
    account_slots_name, select_account, select_account_for_key, Account, AccountDirectory,
    InflightLease, PickStrategy,
};
use crate::chain::{Flow, RequestFilter, RequestView};
use crate::context::{RequestCtx, StickyResult};
use crate::error::{ErrorKind, Rejection};
use crate::key_limits::LimitStore;
use crate::session_store::{Binding, SessionStore};
use crate::Protocol;

/// Binding lifetimes and the pick strategy.
#[derive(Debug, Clone)]
pub struct StickyConfig {
    /// Binding TTL for every protocol but Responses.
    pub ttl: Duration,
    /// Binding TTL for OpenAI Responses.
    pub responses_ttl: Duration,
    /// A hit renews the binding once this long has passed since it was last written, so a
    /// binding lasts its TTL after the last renewal (at most this much less than after the last
    /// request) and costs a store write at most this often.
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
    /// Where capped accounts' slots are counted across nodes, and the lease lifetime there.
    shared_caps: Option<(Arc<dyn LimitStore>, Duration)>,
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
            shared_caps: None,
        }
    }

    /// Counts the slots of accounts with a concurrency cap in `store` as well (shared by
    /// several nodes), leases running out after `lease_ttl` if their node dies.
    pub fn with_shared_caps(mut self, store: Arc<dyn LimitStore>, lease_ttl: Duration) -> Self {
        self.shared_caps = Some((store, lease_ttl));
        self
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
            .or_else(|| self.past_overload(ctx, None))
    }

    /// When every account that could serve the request is in operation and cooling for
    /// overload or server errors alone, one of them with room for the request, taken in turn:
    /// a provider's overload may be over before the cooldowns it set, and the client then gets
    /// the provider's own answer rather than a refusal for minutes, while the pool's traffic
    /// stays spread over its accounts. None as soon as one of them cools for another reason (a
    /// rate limit, used-up credit, a cooldown from another node) or is only full. `bound`, the
    /// conversation's account, when it is one of them: its cache is there.
    fn past_overload(&self, ctx: &RequestCtx, bound: Option<&str>) -> Option<Arc<Account>> {
        let all = self.accounts.accounts();
        let mut open: Vec<&Arc<Account>> = Vec::new();
        for a in all.iter().filter(|a| {
            a.could_serve(&ctx.demand()) && !ctx.upstream.tried.iter().any(|t| *t == a.id)
        }) {
            let left = a.cooldown_left_ms(ctx.started_ms);
            if left == 0 || !a.state.cooling_for_overload.load(Ordering::Relaxed) {
                return None;
            }
            if a.has_room() {
                open.push(a);
            }
        }
        if let Some(own) = open.iter().find(|a| Some(a.id.as_str()) == bound) {
            return Some(Arc::clone(own));
        }
        if open.is_empty() {
            return None;
        }
        let turn = self.round_robin.fetch_add(1, Ordering::Relaxed);
        let at = usize::try_from(turn % open.len() as u64).unwrap_or(0);
        open.get(at).map(|a| Arc::clone(a))
    }

    /// A new account for the request, none of `also` nor those it tried. With the `weighted`
    /// strategy a conversation's picks are keyed by it and its model (see [`Self::pick_key`]);
    /// the other strategies pick by their own measure.
    fn pick_excluding(&self, ctx: &RequestCtx, also: &[String]) -> Option<Arc<Account>> {
        self.pick_among(ctx, also, self.config.strategy == PickStrategy::Weighted)
    }

    /// Another account for one request of a conversation whose own account cannot take it:
    /// always keyed, so that the conversation's requests of this model keep going to one
    /// account (and its prompt cache) while its own account cannot take them.
    fn detour(&self, ctx: &RequestCtx, bound: &str) -> Option<Arc<Account>> {
        self.pick_among(ctx, &[bound.to_owned()], true)
    }

    fn pick_among(&self, ctx: &RequestCtx, also: &[String], keyed: bool) -> Option<Arc<Account>> {
        let all = self.accounts.accounts();
        let exclude: Vec<String>;
        let exclude = if also.is_empty() {
            &ctx.upstream.tried
        } else {
            exclude = ctx.upstream.tried.iter().chain(also).cloned().collect();
            &exclude
        };
        match Self::pick_key(ctx).filter(|_| keyed) {
            Some(key) => select_account_for_key(&all, &ctx.demand(), exclude, ctx.started_ms, &key),
            None => select_account(
                &all,
                &ctx.demand(),
                exclude,
                self.config.strategy,
                ctx.started_ms,
                &self.round_robin,
            ),
        }
    }

    /// What keyed picks are keyed by: the conversation and the model asked for. The same
    /// conversation and model get the same account as long as the accounts that could take it
    /// stay the same: on every node (two nodes binding a new conversation at once agree), after
    /// its binding was lost (a store restarted empty), and for each detour of one model.
    fn pick_key(ctx: &RequestCtx) -> Option<String> {
        let session = ctx.session.key.as_deref()?;
        Some(format!(
            "{session}\n{}",
            ctx.requested_model().unwrap_or_default()
        ))
    }

    /// Takes a slot on `account`; `false` when it filled up since it was picked (on this node,
    /// or on all of them together when they share the count).
    async fn reserve(&self, ctx: &mut RequestCtx, account: &Account) -> bool {
        let Some(mut lease) = InflightLease::try_acquire(account) else {
            return false;
        };
        if let (Some(cap), Some((store, ttl))) = (account.max_concurrency, &self.shared_caps) {
            let name = account_slots_name(&account.id);
            match store.acquire_slot(&name, cap, *ttl).await {
                Some(shared) => lease.share(store.clone(), shared),
                // Full across the nodes: this node's slot goes back with `lease`.
                None => return false,
            }
        }
        lease.mark_used(ctx.started_ms);
        ctx.upstream.lease = Some(lease);
        true
    }

    /// Another account than `skipped` (full ones), reserved. With `moving_from`, the
    /// conversation moves to it off that account (unless another request moved it first);
    /// without, the binding stays as it is.
    async fn reserve_another(
        &self,
        ctx: &mut RequestCtx,
        mut skipped: Vec<String>,
        moving_from: Option<String>,
    ) -> Option<Arc<Account>> {
        // A request that leaves the binding alone is a detour, keyed as detours are.
        let keyed = moving_from.is_none() || self.config.strategy == PickStrategy::Weighted;
        loop {
            let account = self.pick_among(ctx, &skipped, keyed)?;
            if self.reserve(ctx, &account).await {
                if let (Some(key), Some(from)) = (ctx.session.key.clone(), moving_from) {
                    let binding = self.binding_for(ctx, &account);
                    if let Ok(held) = self
                        .sessions
                        .replace(&key, &from, &binding, self.ttl(ctx.protocol()))
                        .await
                    {
                        ctx.session.bound = Some(held.account_id);
                    }
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

    /// The account `id` when it can serve this request now.
    fn usable_for(&self, ctx: &RequestCtx, id: &str) -> Option<Arc<Account>> {
        self.in_service(ctx, id)
            .filter(|a| a.has_room() && a.serves(&ctx.demand()))
    }

    /// The account `id` when a conversation bound to it can stay: it exists, is in service
    /// and was not tried by this request. Whether it serves this request's model and has room
    /// for it is the request's matter, not the conversation's.
    fn in_service(&self, ctx: &RequestCtx, id: &str) -> Option<Arc<Account>> {
        self.accounts
            .get(id)
            .filter(|a| a.available(ctx.started_ms) && !ctx.upstream.tried.iter().any(|t| t == id))
    }

    /// Remembers which account produced a Responses answer, so a later request naming it in
    /// `previous_response_id` goes back there (DESIGN §7). Once per request, as soon as the
    /// answer's id is known: the returned write owns what it needs, to run apart while the
    /// answer streams on (a tool loop's next turn can follow right after the last event).
    /// Not for an answer the request asked not to store (`store: false`, as Codex sends):
    /// nothing can continue it, and its entry would only crowd the session store.
    pub fn remember_response(
        &self,
        ctx: &mut RequestCtx,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if ctx.protocol() != Protocol::OpenaiResponses
            || ctx.session.response_remembered
            || ctx.request.store_off
        {
            return None;
        }
        let (Some(id), Some(account)) = (&ctx.usage.response_id, &ctx.upstream.account) else {
            return None;
        };
        let binding = self.binding_for(ctx, account);
        let key = response_key(&binding.api_key_id, id);
        ctx.session.response_remembered = true;
        let (sessions, ttl) = (self.sessions.clone(), self.config.responses_ttl);
        Some(async move {
            let _ = sessions.put(&key, &binding, ttl).await;
        })
    }

    /// Chooses the account of the first attempt, honouring and updating the binding, and takes
    /// a slot on it (`ctx.upstream.lease`). When the account filled up between the pick and
    /// the slot, another serves the request: a conversation bound to the full account stays
    /// bound to it, one this request just bound moves with it.
    pub async fn choose(&self, ctx: &mut RequestCtx) -> Result<Arc<Account>, Rejection> {
        let account = self.choose_binding(ctx).await?;
        if self.reserve(ctx, &account).await {
            return Ok(account);
        }
        match ctx.session.sticky {
            Some(StickyResult::Pinned) => return Err(pinned_busy(1)),
            Some(StickyResult::Hit) => ctx.session.sticky = Some(StickyResult::Detour),
            _ => {}
        }
        let moving_from = matches!(
            ctx.session.sticky,
            Some(StickyResult::Miss | StickyResult::Rebind)
        )
        .then(|| account.id.clone());
        self.reserve_another(ctx, vec![account.id.clone()], moving_from)
            .await
            .ok_or_else(|| self.no_account(ctx))
    }

    async fn choose_binding(&self, ctx: &mut RequestCtx) -> Result<Arc<Account>, Rejection> {
        let ttl = self.ttl(ctx.protocol());
        // A continued response must go to the account that holds it, whatever the session
        // says: no other account knows it. While that account cools down the client is told
        // to come back; gone or out of service, the response went with it, and the request
        // takes its normal course (the upstream says it does not know the id).
        if let Some(prev) = ctx.request.previous_response_id.clone() {
            let key_id = ctx.auth.as_ref().map(|a| a.key.id.as_str()).unwrap_or("");
            if let Ok(Some(stored)) = self.sessions.get(&response_key(key_id, &prev)).await {
                if let Some(account) = self
                    .accounts
                    .get(&stored.binding.account_id)
                    .filter(|a| a.could_serve(&ctx.demand()))
                {
                    let cooling_ms = account.cooldown_left_ms(ctx.started_ms);
                    if cooling_ms > 0 {
                        return Err(pinned_busy(
                            u64::try_from(cooling_ms).unwrap_or(1).div_ceil(1000),
                        ));
                    }
                    ctx.session.sticky = Some(StickyResult::Pinned);
                    return Ok(account);
                }
            }
        }
        let Some(key) = ctx.session.key.clone() else {
            return self.pick(ctx).ok_or_else(|| self.no_account(ctx));
        };
        let existing = self.sessions.get(&key).await.ok().flatten();
        if let Some(stored) = existing {
            let bound = &stored.binding.account_id;
            // The conversation moves when its account left service, or no longer serves the
            // model the conversation was bound with (the account's models changed). A request
            // its account cannot take in the form it comes (a Responses call without a stream
            // to a ChatGPT account) leaves the conversation where it is.
            let staying = self.in_service(ctx, bound).filter(|a| {
                a.serves_model(ctx.protocol(), ctx.requested_model())
                    || ctx.requested_model() != stored.binding.model.as_deref()
            });
            if let Some(account) = staying {
                ctx.session.bound = Some(bound.clone());
                if !account.serves(&ctx.demand()) || !account.has_room() {
                    // This request only: the conversation stays where its cache is.
                    ctx.session.sticky = Some(StickyResult::Detour);
                    return self.detour(ctx, bound).ok_or_else(|| self.no_account(ctx));
                }
                // At most half the TTL: a threshold as long as the TTL would never renew.
                let threshold = self.config.renew_threshold.min(ttl / 2);
                if ttl.saturating_sub(stored.remaining) >= threshold {
                    let mut b = Binding::clone(&stored.binding);
                    b.last_used_at = ctx.started_ms;
                    b.request_count += 1;
                    // On the same account only: one another node moved it to since stays.
                    let _ = self.sessions.replace(&key, bound, &b, ttl).await;
                }
                ctx.session.sticky = Some(StickyResult::Hit);
                return Ok(account);
            }
            let account = match self.pick_excluding(ctx, &[]) {
                Some(account) => account,
                None => {
                    let account = self
                        .past_overload(ctx, Some(bound))
                        .ok_or_else(|| self.no_account(ctx))?;
                    if account.id == *bound {
                        // Every account cools for overload alone: the conversation's own is
                        // tried, and it stays bound there.
                        ctx.session.bound = Some(bound.clone());
                        ctx.session.sticky = Some(StickyResult::Hit);
                        return Ok(account);
                    }
                    account
                }
            };
            ctx.session.sticky = Some(StickyResult::Rebind);
            let held = self
                .sessions
                .replace(&key, bound, &self.binding_for(ctx, &account), ttl)
                .await;
            return Ok(self.follow(ctx, held, account));
        }
        let account = self.pick(ctx).ok_or_else(|| self.no_account(ctx))?;
        ctx.session.sticky = Some(StickyResult::Miss);
        let held = self
            .sessions
            .set_if_absent(&key, &self.binding_for(ctx, &account), ttl)
            .await;
        Ok(self.follow(ctx, held, account))
    }

    /// After binding `picked`: the account the binding holds when another request bound the
    /// conversation first and that account can serve this one, else `picked`.
    fn follow(
        &self,
        ctx: &mut RequestCtx,
        held: Result<Binding, crate::session_store::StoreUnavailable>,
        picked: Arc<Account>,
    ) -> Arc<Account> {
        let Ok(held) = held else {
            return picked;
        };
        let chosen = if held.account_id == picked.id {
            picked
        } else if let Some(theirs) = self.usable_for(ctx, &held.account_id) {
            // Following the binding another request made: this one is a hit on it (and a
            // detour, should that account fill up before its slot is taken).
            ctx.session.sticky = Some(StickyResult::Hit);
            theirs
        } else {
            picked
        };
        ctx.session.bound = Some(held.account_id);
        chosen
    }

    /// No account can serve the request now: 503, with a `Retry-After` for when the first of
    /// the accounts that could serve it ends its cooldown (at least 1 s; 1 s when some are
    /// only full or tried). None when no account that serves it is in operation at all; the
    /// message then says when only ChatGPT accounts serve the model and the request asks for
    /// no stream, which those never take.
    fn no_account(&self, ctx: &RequestCtx) -> Rejection {
        let all = self.accounts.accounts();
        let soonest_ms = all
            .iter()
            .filter(|a| a.could_serve(&ctx.demand()))
            .map(|a| a.cooldown_left_ms(ctx.started_ms))
            .min();
        let demand = ctx.demand();
        let streams_only = soonest_ms.is_none()
            && demand.unstreamed_response
            && all.iter().any(|a| {
                a.in_operation()
                    && a.has_chatgpt_token()
                    && a.serves_model(demand.protocol, demand.model)
            });
        let message = if streams_only {
            "no upstream account is available for this request: the accounts serving this \
             model are ChatGPT accounts, which answer streamed requests only; send \"stream\": true"
        } else {
            "no upstream account is available for this request"
        };
        let mut r = Rejection::new(ErrorKind::NoAvailableAccount, message);
        r.retry_after = soonest_ms.map(|ms| u64::try_from(ms).unwrap_or(0).div_ceil(1000).max(1));
        r
    }

    /// Picks another account after a failed attempt (never one already tried). When the one
    /// that failed is the conversation's and is out of service since (its failure started a
    /// cooldown or put it in error), or this request only just bound it there, the
    /// conversation moves to the new one. A single failure that left the account in service
    /// (one server error, a timeout) makes this request a detour and the conversation stays
    /// with its cache; a detour's failure leaves it alone, and a continued response has
    /// nowhere else to go.
    pub async fn failover(&self, ctx: &mut RequestCtx) -> Option<Arc<Account>> {
        ctx.upstream.lease = None;
        if ctx.session.sticky == Some(StickyResult::Pinned) {
            return None;
        }
        let failed = ctx.upstream.account.clone();
        let own = failed
            .as_ref()
            .filter(|f| ctx.session.bound.as_deref() == Some(f.id.as_str()));
        let just_bound = matches!(
            ctx.session.sticky,
            Some(StickyResult::Miss | StickyResult::Rebind)
        );
        let moving_from = own
            .filter(|f| just_bound || !f.available(ctx.started_ms))
            .map(|f| f.id.clone());
        if own.is_some() && moving_from.is_none() {
            ctx.session.sticky = Some(StickyResult::Detour);
        }
        self.reserve_another(ctx, Vec::new(), moving_from).await
    }
}

/// Scoped per API key like every binding: another tenant naming the id gets no say.
fn response_key(api_key_id: &str, response_id: &str) -> String {
    format!("response:{api_key_id}:{response_id}")
}

/// The account holding a continued response cannot take it now.
fn pinned_busy(retry_after_secs: u64) -> Rejection {
    let mut r = Rejection::new(
        ErrorKind::RateLimit,
        "the upstream account holding previous_response_id is busy or rate limited; retry later",
    );
    r.retry_after = Some(retry_after_secs.max(1));
    r
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

    /// An upstream answer of `status` that says nothing more.
    fn answered(status: u16) -> crate::account_state::Outcome {
        crate::account_state::Outcome::Status {
            status,
            reset_at_ms: None,
            fault: crate::account_state::Fault::ByStatus,
        }
    }

    /// Two accounts alike, `a` and `b`, in one directory.
    fn pair() -> (Arc<Account>, Arc<Account>, Arc<Dir>) {
        let (a, b) = (
            account("a", AccountType::Claude, 50, 1),
            account("b", AccountType::Claude, 50, 1),
        );
        let dir = Arc::new(Dir(Arc::new(vec![a.clone(), b.clone()])));
        (a, b, dir)
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
        c.upstream.account = Some(first.clone());
        let next = s.failover(&mut c).await.unwrap();
        assert_ne!(next.id, first.id);
        assert_eq!(c.session.bound.as_deref(), Some(next.id.as_str()));
        c.upstream.tried.push(next.id.clone());
        c.upstream.account = Some(next.clone());
        assert!(s.failover(&mut c).await.is_none());
        let mut again = ctx(Some("s"));
        assert_eq!(s.choose(&mut again).await.unwrap().id, next.id);
    }

    /// `a` with `f` applied (a fresh account, not shared yet).
    fn with(a: Arc<Account>, f: impl FnOnce(&mut Account)) -> Arc<Account> {
        let Ok(mut a) = Arc::try_unwrap(a) else {
            panic!("not a fresh account");
        };
        f(&mut a);
        Arc::new(a)
    }

    fn for_model(session: &str, model: &str) -> RequestCtx {
        let mut c = ctx(Some(session));
        c.request.model = Some(model.into());
        c
    }

    #[tokio::test]
    async fn a_request_the_bound_account_cannot_take_goes_elsewhere_and_keeps_the_binding() {
        let opus = with(account("opus", AccountType::Claude, 10, 1), |a| {
            a.models = vec!["claude-opus-4-1".into()];
            a.max_concurrency = Some(1);
        });
        let any = account("any", AccountType::Claude, 50, 1);
        let spare = account("spare", AccountType::Claude, 60, 1);
        let dir = Arc::new(Dir(Arc::new(vec![opus.clone(), any.clone(), spare])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        let mut c = for_model("conv", "claude-opus-4-1");
        assert_eq!(s.choose(&mut c).await.unwrap().id, "opus");
        assert_eq!(c.session.sticky, Some(StickyResult::Miss));
        drop(c);

        // A side request on a model the account does not serve, same conversation.
        let mut side = for_model("conv", "claude-haiku-4-5");
        assert_eq!(s.choose(&mut side).await.unwrap().id, "any");
        assert_eq!(side.session.sticky, Some(StickyResult::Detour));
        assert_eq!(side.session.bound.as_deref(), Some("opus"));
        // Its failure does not move the conversation either.
        side.upstream.tried.push("any".into());
        side.upstream.account = Some(any.clone());
        assert_eq!(s.failover(&mut side).await.unwrap().id, "spare");
        assert_eq!(side.session.bound.as_deref(), Some("opus"));
        drop(side);
        let mut main = for_model("conv", "claude-opus-4-1");
        assert_eq!(s.choose(&mut main).await.unwrap().id, "opus");
        drop(main);

        // The account is full: the next request goes elsewhere, the conversation stays.
        let mut main = for_model("conv", "claude-opus-4-1");
        assert_eq!(s.choose(&mut main).await.unwrap().id, "opus");
        assert_eq!(main.session.sticky, Some(StickyResult::Hit));
        let mut parallel = for_model("conv", "claude-opus-4-1");
        assert_eq!(s.choose(&mut parallel).await.unwrap().id, "any");
        assert_eq!(parallel.session.sticky, Some(StickyResult::Detour));
        drop((main, parallel));
        let mut after = for_model("conv", "claude-opus-4-1");
        assert_eq!(s.choose(&mut after).await.unwrap().id, "opus");
        assert_eq!(after.session.sticky, Some(StickyResult::Hit));
    }

    #[tokio::test]
    async fn a_responses_call_without_a_stream_detours_off_a_chatgpt_account() {
        use crate::accounts::Credential;
        let chatgpt = with(
            account("chatgpt", AccountType::OpenaiResponses, 10, 1),
            |a| {
                a.credential = Credential::new("eyJhbGciOi.payload.sig".into());
            },
        );
        let api = account("api", AccountType::Openai, 50, 1);
        let dir = Arc::new(Dir(Arc::new(vec![chatgpt, api])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        let responses = |stream: bool| {
            let mut c = for_model("conv", "gpt-5");
            c.route.protocol = Protocol::OpenaiResponses;
            c.route.upstream_path = crate::route::RESPONSES_PATH.into();
            c.request.stream = stream;
            c
        };
        let mut first = responses(true);
        assert_eq!(s.choose(&mut first).await.unwrap().id, "chatgpt");
        drop(first);
        // The next turn asks for one JSON answer: served by the API-key account, once.
        let mut json = responses(false);
        assert_eq!(s.choose(&mut json).await.unwrap().id, "api");
        assert_eq!(json.session.sticky, Some(StickyResult::Detour));
        assert_eq!(json.session.bound.as_deref(), Some("chatgpt"));
        drop(json);
        let mut streamed = responses(true);
        assert_eq!(s.choose(&mut streamed).await.unwrap().id, "chatgpt");
        assert_eq!(streamed.session.sticky, Some(StickyResult::Hit));
        drop(streamed);
        // Compaction answers JSON on the ChatGPT backend too: it stays.
        let mut compact = responses(false);
        compact.route.upstream_path = "/responses/compact".into();
        assert_eq!(s.choose(&mut compact).await.unwrap().id, "chatgpt");
    }

    #[tokio::test]
    async fn no_account_says_a_chatgpt_account_wants_a_stream() {
        use crate::accounts::Credential;
        let chatgpt = with(
            account("chatgpt", AccountType::OpenaiResponses, 10, 1),
            |a| {
                a.credential = Credential::new("eyJhbGciOi.payload.sig".into());
            },
        );
        let dir = Arc::new(Dir(Arc::new(vec![chatgpt])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        let mut c = for_model("conv", "gpt-5");
        c.route.protocol = Protocol::OpenaiResponses;
        c.route.upstream_path = crate::route::RESPONSES_PATH.into();
        let err = s.choose(&mut c).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::NoAvailableAccount);
        assert_eq!(err.retry_after, None);
        assert!(err.message.contains("\"stream\": true"), "{}", err.message);
        // Nothing to do with streams: the plain message.
        let err = s.choose(&mut ctx(None)).await.unwrap_err();
        assert!(!err.message.contains("ChatGPT"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_conversation_whose_own_model_its_account_stopped_serving_moves() {
        let narrowed = with(account("narrowed", AccountType::Claude, 10, 1), |a| {
            a.models = vec!["claude-opus-4-1".into()];
        });
        let wide = account("wide", AccountType::Claude, 50, 1);
        let dir = Arc::new(Dir(Arc::new(vec![narrowed, wide])));
        let sessions = MemorySessionStore::new(100);
        let s = StickyUpstream::new(dir, sessions.clone(), StickyConfig::default());
        // Bound with sonnet to `narrowed` (before its models were narrowed).
        let mut b = s.binding_for(
            &for_model("conv", "claude-sonnet-4-5"),
            &account("x", AccountType::Claude, 1, 1),
        );
        b.account_id = "narrowed".into();
        b.model = Some("claude-sonnet-4-5".into());
        sessions
            .put("conv", &b, Duration::from_secs(60))
            .await
            .unwrap();
        let mut c = for_model("conv", "claude-sonnet-4-5");
        assert_eq!(s.choose(&mut c).await.unwrap().id, "wide");
        assert_eq!(c.session.sticky, Some(StickyResult::Rebind));
        assert_eq!(
            sessions
                .get("conv")
                .await
                .unwrap()
                .unwrap()
                .binding
                .account_id,
            "wide"
        );
    }

    #[tokio::test]
    async fn a_capped_account_is_counted_across_the_nodes_sharing_a_store() {
        let shared: Arc<dyn LimitStore> = Arc::new(crate::key_limits::MemoryLimits::default());
        // Two nodes: each its own copy of the accounts (own in-flight counts), one store.
        let node = || {
            let capped = with(account("capped", AccountType::Claude, 10, 1), |a| {
                a.max_concurrency = Some(1);
            });
            let spare = account("spare", AccountType::Claude, 50, 1);
            StickyUpstream::new(
                Arc::new(Dir(Arc::new(vec![capped, spare]))),
                MemorySessionStore::new(100),
                StickyConfig::default(),
            )
            .with_shared_caps(shared.clone(), Duration::from_secs(60))
        };
        let (n1, n2) = (node(), node());
        let mut on_n1 = ctx(None);
        assert_eq!(n1.choose(&mut on_n1).await.unwrap().id, "capped");
        // The other node has room by its own count, but the one slot is taken.
        let mut on_n2 = ctx(None);
        assert_eq!(n2.choose(&mut on_n2).await.unwrap().id, "spare");
        drop(on_n2);
        // The refused account was not used there: `lru` and its request count say so.
        let refused = n2.accounts.get("capped").unwrap();
        assert_eq!(refused.state.requests.load(Ordering::Relaxed), 0);
        assert_eq!(refused.state.last_used_ms.load(Ordering::Relaxed), 0);
        // The first request ends: its slot goes back (apart), and the other node gets it.
        drop(on_n1);
        let mut took = false;
        for _ in 0..100 {
            tokio::task::yield_now().await;
            let mut c = ctx(None);
            if n2.choose(&mut c).await.unwrap().id == "capped" {
                took = true;
                break;
            }
        }
        assert!(took, "the released slot never came back");
    }

    #[tokio::test]
    async fn a_continued_response_waits_for_its_account() {
        let a = account("a", AccountType::Openai, 50, 1);
        let b = account("b", AccountType::Openai, 50, 1);
        let dir = Arc::new(Dir(Arc::new(vec![a.clone(), b.clone()])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        let responses = || {
            let mut c = ctx(Some("conv"));
            c.route.protocol = Protocol::OpenaiResponses;
            c
        };
        let mut first = responses();
        let acc = s.choose(&mut first).await.unwrap();
        first.upstream.account = Some(acc.clone());
        first.usage.response_id = Some("resp_1".into());
        s.remember_response(&mut first).unwrap().await;
        let continued = || {
            let mut c = responses();
            c.request.previous_response_id = Some("resp_1".into());
            c
        };
        // Served by its account, and never failed over to another.
        let mut c = continued();
        assert_eq!(s.choose(&mut c).await.unwrap().id, acc.id);
        assert_eq!(c.session.sticky, Some(StickyResult::Pinned));
        c.upstream.tried.push(acc.id.clone());
        c.upstream.account = Some(acc.clone());
        assert!(s.failover(&mut c).await.is_none());
        // Cooling down for 90 s: a 429 saying when to come back, not another account.
        acc.state
            .cooldown_until_ms
            .store(1_000 + 90_000, Ordering::Relaxed);
        let err = s.choose(&mut continued()).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::RateLimit);
        assert_eq!(err.retry_after, Some(90));
        // Taken out of service: the response went with it, the request takes its course.
        acc.state.cooldown_until_ms.store(0, Ordering::Relaxed);
        acc.state.schedulable.store(false, Ordering::Relaxed);
        let mut c = continued();
        assert_ne!(s.choose(&mut c).await.unwrap().id, acc.id);
        assert_ne!(c.session.sticky, Some(StickyResult::Pinned));
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
        s.remember_response(&mut first).unwrap().await;
        for i in 0..20 {
            // Different (or no) session keys: the response id wins.
            let key = format!("other-{i}");
            let mut next = responses(Some(&key));
            next.request.previous_response_id = Some("resp_1".into());
            assert_eq!(s.choose(&mut next).await.unwrap().id, acc.id);
        }
        // An answer not stored upstream takes no place in the session store.
        let sessions = MemorySessionStore::new(100);
        let s = StickyUpstream::new(
            Arc::new(Dir(Arc::new(vec![acc.clone()]))),
            sessions.clone(),
            StickyConfig::default(),
        );
        let mut unstored = responses(None);
        unstored.request.store_off = true;
        unstored.upstream.account = Some(acc.clone());
        unstored.usage.response_id = Some("resp_2".into());
        assert!(s.remember_response(&mut unstored).is_none());
        assert!(sessions
            .get(&response_key("", "resp_2"))
            .await
            .unwrap()
            .is_none());
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
        s.remember_response(&mut first).unwrap().await;
        assert!(
            s.remember_response(&mut first).is_none(),
            "once per request"
        );
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
        // None serves the protocol: nothing to wait for.
        assert_eq!(err.retry_after, None);
    }

    #[tokio::test]
    async fn a_pool_cooling_for_overload_alone_is_still_tried_in_turn() {
        use crate::account_state::{apply_outcome, StateRules};
        let rules = StateRules::default();
        let overloaded = answered(529);
        let (a, b, _) = pair();
        // Overloaded at 0 and 500 ms. ctx() starts at 1 000 ms.
        apply_outcome(&a, overloaded, &rules, 0);
        apply_outcome(&b, overloaded, &rules, 500);
        let dir = Arc::new(Dir(Arc::new(vec![b.clone(), a.clone()])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(10), StickyConfig::default());
        // New conversations are spread over both, not all sent to one.
        let mut picked = Vec::new();
        for i in 0..4 {
            let mut c = ctx(Some(&format!("conv {i}")));
            picked.push(s.choose(&mut c).await.unwrap().id.clone());
        }
        assert!(picked.iter().any(|p| p == "a"), "{picked:?}");
        assert!(picked.iter().any(|p| p == "b"), "{picked:?}");
        // One of them rate limited: the pool is refused, as it says.
        apply_outcome(&b, answered(429), &rules, 600);
        let err = s.choose(&mut ctx(None)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::NoAvailableAccount);
        // A cooldown raised from the store (another node's, for a reason not known) neither.
        let c = account("c", AccountType::Claude, 50, 1);
        apply_outcome(&c, overloaded, &rules, 0);
        let dir = Arc::new(Dir(Arc::new(vec![c.clone()])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(10), StickyConfig::default());
        assert_eq!(s.choose(&mut ctx(None)).await.unwrap().id, "c");
        c.state.cooling_for_overload.store(false, Ordering::Relaxed);
        assert!(s.choose(&mut ctx(None)).await.is_err());
    }

    #[tokio::test]
    async fn a_conversations_detours_of_one_model_all_go_to_one_account() {
        // The conversation was bound by a side request on the one model `small` serves.
        let small = with(account("small", AccountType::Claude, 10, 1), |a| {
            a.models = vec!["claude-haiku-4-5".into()];
        });
        let accounts: Vec<_> = std::iter::once(small)
            .chain((0..4).map(|i| account(&format!("big{i}"), AccountType::Claude, 50, 1)))
            .collect();
        let dir = Arc::new(Dir(Arc::new(accounts)));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        let mut side = for_model("conv", "claude-haiku-4-5");
        assert_eq!(s.choose(&mut side).await.unwrap().id, "small");
        drop(side);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut main = for_model("conv", "claude-opus-4-1");
            seen.insert(s.choose(&mut main).await.unwrap().id.clone());
            assert_eq!(main.session.sticky, Some(StickyResult::Detour));
            assert_eq!(main.session.bound.as_deref(), Some("small"));
        }
        assert_eq!(seen.len(), 1, "detours went to {seen:?}");
        // Other conversations' detours spread over the accounts.
        let mut others = std::collections::HashSet::new();
        for i in 0..40 {
            let conv = format!("conv {i}");
            let mut side = for_model(&conv, "claude-haiku-4-5");
            s.choose(&mut side).await.unwrap();
            drop(side);
            let mut main = for_model(&conv, "claude-opus-4-1");
            others.insert(s.choose(&mut main).await.unwrap().id.clone());
        }
        assert!(others.len() >= 3, "{others:?}");
    }

    #[tokio::test]
    async fn a_lost_binding_and_another_nodes_first_pick_find_the_same_account() {
        let accounts: Vec<_> = (0..6)
            .map(|i| account(&format!("acc{i}"), AccountType::Claude, 50, 1))
            .collect();
        let dir = Arc::new(Dir(Arc::new(accounts)));
        let sessions = MemorySessionStore::new(100);
        let node1 = StickyUpstream::new(dir.clone(), sessions.clone(), StickyConfig::default());
        // Another node with a store of its own (as while Redis was out of reach).
        let node2 = StickyUpstream::new(dir, MemorySessionStore::new(100), StickyConfig::default());
        for i in 0..20 {
            let conv = format!("conv {i}");
            let mut c = for_model(&conv, "claude-opus-4-1");
            let first = node1.choose(&mut c).await.unwrap().id.clone();
            assert_eq!(c.session.sticky, Some(StickyResult::Miss));
            drop(c);
            let mut c = for_model(&conv, "claude-opus-4-1");
            assert_eq!(node2.choose(&mut c).await.unwrap().id, first, "{conv}");
            // The binding lost (a store restarted empty): bound where it was.
            sessions.delete(&conv).await.unwrap();
            let mut c = for_model(&conv, "claude-opus-4-1");
            assert_eq!(node1.choose(&mut c).await.unwrap().id, first, "{conv}");
            assert_eq!(c.session.sticky, Some(StickyResult::Miss));
        }
    }

    #[tokio::test]
    async fn a_binding_is_renewed_once_the_threshold_has_passed_since_its_last_write() {
        let a = account("a", AccountType::Claude, 50, 1);
        let dir = Arc::new(Dir(Arc::new(vec![a.clone()])));
        let sessions = MemorySessionStore::new(100);
        let config = StickyConfig::default();
        let (ttl, threshold) = (config.ttl, config.renew_threshold);
        let s = StickyUpstream::new(dir, sessions.clone(), config);
        let binding = s.binding_for(&ctx(Some("conv")), &a);
        let remaining = |sessions: Arc<MemorySessionStore>| async move {
            sessions.get("conv").await.unwrap().unwrap().remaining
        };
        // Written less than the threshold ago: the hit writes nothing.
        let recent = ttl - threshold / 2;
        sessions.put("conv", &binding, recent).await.unwrap();
        let mut c = ctx(Some("conv"));
        assert_eq!(s.choose(&mut c).await.unwrap().id, "a");
        assert_eq!(c.session.sticky, Some(StickyResult::Hit));
        assert!(remaining(sessions.clone()).await <= recent);
        // Written twice the threshold ago, far from expiring: the hit renews it to the TTL.
        sessions
            .put("conv", &binding, ttl - 2 * threshold)
            .await
            .unwrap();
        let mut c = ctx(Some("conv"));
        assert_eq!(s.choose(&mut c).await.unwrap().id, "a");
        assert_eq!(c.session.sticky, Some(StickyResult::Hit));
        assert!(remaining(sessions.clone()).await > ttl - threshold);

        // A threshold as long as the TTL (a 5-minute TTL with the default threshold) still
        // renews: at half the TTL.
        let short = Duration::from_secs(300);
        let s = StickyUpstream::new(
            Arc::new(Dir(Arc::new(vec![a.clone()]))),
            sessions.clone(),
            StickyConfig {
                ttl: short,
                renew_threshold: short,
                ..StickyConfig::default()
            },
        );
        sessions
            .put("conv", &binding, Duration::from_secs(120))
            .await
            .unwrap();
        let mut c = ctx(Some("conv"));
        assert_eq!(s.choose(&mut c).await.unwrap().id, "a");
        assert!(remaining(sessions.clone()).await > Duration::from_secs(240));
    }

    #[tokio::test]
    async fn a_conversation_stays_on_its_account_while_the_whole_pool_cools_for_overload() {
        use crate::account_state::{apply_outcome, StateRules};
        let rules = StateRules::default();
        let (a, b, dir) = pair();
        let s = StickyUpstream::new(dir, MemorySessionStore::new(10), StickyConfig::default());
        let mut first = ctx(Some("conv"));
        let bound = s.choose(&mut first).await.unwrap().id.clone();
        drop(first);
        apply_outcome(&a, answered(529), &rules, 0);
        apply_outcome(&b, answered(529), &rules, 0);
        for _ in 0..4 {
            let mut c = ctx(Some("conv"));
            assert_eq!(s.choose(&mut c).await.unwrap().id, bound);
            assert_eq!(c.session.sticky, Some(StickyResult::Hit));
            assert_eq!(c.session.bound.as_deref(), Some(bound.as_str()));
        }
    }

    #[tokio::test]
    async fn one_failure_that_leaves_the_account_in_service_does_not_move_the_conversation() {
        use crate::account_state::{apply_outcome, StateRules};
        let rules = StateRules::default();
        let (_, _, dir) = pair();
        let s = StickyUpstream::new(
            dir.clone(),
            MemorySessionStore::new(10),
            StickyConfig::default(),
        );
        let mut first = ctx(Some("conv"));
        let bound = s.choose(&mut first).await.unwrap();
        drop(first);
        let other = dir.get(if bound.id == "a" { "b" } else { "a" }).unwrap();
        // A server error: still in service, so this request is a detour.
        let mut c = ctx(Some("conv"));
        assert_eq!(s.choose(&mut c).await.unwrap().id, bound.id);
        c.upstream.tried.push(bound.id.clone());
        c.upstream.account = Some(bound.clone());
        apply_outcome(&bound, answered(500), &rules, 1_000);
        assert!(bound.available(1_000));
        assert_eq!(s.failover(&mut c).await.unwrap().id, other.id);
        assert_eq!(c.session.sticky, Some(StickyResult::Detour));
        assert_eq!(c.session.bound.as_deref(), Some(bound.id.as_str()));
        drop(c);
        let mut next = ctx(Some("conv"));
        assert_eq!(s.choose(&mut next).await.unwrap().id, bound.id);
        assert_eq!(next.session.sticky, Some(StickyResult::Hit));
        // A rate limit takes it out of service: the conversation moves.
        next.upstream.tried.push(bound.id.clone());
        next.upstream.account = Some(bound.clone());
        apply_outcome(&bound, answered(429), &rules, 1_000);
        assert_eq!(s.failover(&mut next).await.unwrap().id, other.id);
        assert_eq!(next.session.sticky, Some(StickyResult::Rebind));
        assert_eq!(next.session.bound.as_deref(), Some(other.id.as_str()));
    }

    #[tokio::test]
    async fn no_account_says_when_the_first_cooldown_ends() {
        // ctx() starts at 1 000 ms.
        let cooling = |id: &str, until_ms: i64| {
            let a = account(id, AccountType::Claude, 50, 1);
            a.state.cooldown_until_ms.store(until_ms, Ordering::Relaxed);
            a
        };
        let out = account("out", AccountType::Claude, 50, 1);
        out.state.schedulable.store(false, Ordering::Relaxed);
        let dir = Arc::new(Dir(Arc::new(vec![
            cooling("late", 1_000 + 300_000),
            cooling("soon", 1_000 + 37_200),
            out,
        ])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(10), StickyConfig::default());
        let err = s.choose(&mut ctx(Some("conv"))).await.unwrap_err();
        assert_eq!(
            (err.kind, err.retry_after),
            (ErrorKind::NoAvailableAccount, Some(38))
        );
        // Ending within the second: still at least 1 s.
        let dir = Arc::new(Dir(Arc::new(vec![cooling("now", 1_001)])));
        let s = StickyUpstream::new(dir, MemorySessionStore::new(10), StickyConfig::default());
        let err = s.choose(&mut ctx(None)).await.unwrap_err();
        assert_eq!(err.retry_after, Some(1));
    }
}
