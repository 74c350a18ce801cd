//! In-process mirrors of the database the hot path reads: API keys, accounts (with decrypted
//! credentials and live state) and prices. Refreshed by a background job; never a database round
//! trip per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use relay_filters::accounts::{Account, AccountDirectory, AccountState, BaseUrl, Credential};
use relay_filters::api_key_auth::{KeyEntry, KeyStore};
use relay_filters::cost::{PriceChange, PriceSchedule, PriceSource, PriceTable};

use crate::secrets::SecretBox;
use crate::store::{Account as AccountRow, AccountStatus, ActiveApiKey, ModelPrice, ModelPriceRow};

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    match lock.read() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn write<T>(lock: &RwLock<T>, value: T) {
    match lock.write() {
        Ok(mut g) => *g = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

/// Orders the reloads of one cache. Two reloads can overlap (the periodic refresh and the one an
/// admin change starts), and the one whose query began first may finish last with older rows.
/// Each reload takes a ticket before it queries; its rows are applied only if no reload that
/// began later has been applied already. A query sees every change committed before it began, so
/// the cache never steps back past a change whose reload has started.
#[derive(Default)]
pub struct LoadOrder {
    started: AtomicU64,
    applied: Mutex<u64>,
}

/// Taken by [`LoadOrder::begin`] before a reload queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadTicket(u64);

impl LoadOrder {
    /// A ticket for a reload about to query.
    pub fn begin(&self) -> LoadTicket {
        LoadTicket(self.started.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Runs `apply` unless a reload that began after `ticket` was applied; `true` if it ran.
    fn apply(&self, ticket: LoadTicket, apply: impl FnOnce()) -> bool {
        let mut applied = match self.applied.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if ticket.0 <= *applied {
            return false;
        }
        apply();
        *applied = ticket.0;
        true
    }
}

/// Keys by peppered hash.
pub struct KeyCache {
    /// By the key's peppered hash: uniform bytes no client can choose without the pepper, so a
    /// fast hash serves (SipHash of the 64 hex digits cost 300 instructions a lookup).
    map: RwLock<Arc<HashMap<String, Arc<KeyEntry>, foldhash::fast::RandomState>>>,
    pepper: Vec<u8>,
    loads: LoadOrder,
}

impl KeyCache {
    /// An empty cache hashing with `pepper`.
    pub fn new(pepper: Vec<u8>) -> Self {
        KeyCache {
            map: RwLock::new(Arc::new(HashMap::default())),
            pepper,
            loads: LoadOrder::default(),
        }
    }

    /// A ticket to take before querying the keys for [`KeyCache::replace_loaded`].
    pub fn begin_load(&self) -> LoadTicket {
        self.loads.begin()
    }

    /// Replaces the keys with rows queried after `ticket` was taken, unless a later reload was
    /// applied already.
    pub fn replace_loaded(&self, ticket: LoadTicket, keys: Vec<ActiveApiKey>) {
        self.loads.apply(ticket, || self.replace(keys));
    }

    /// Replaces the whole set of keys.
    pub fn replace(&self, keys: Vec<ActiveApiKey>) {
        let map = keys
            .into_iter()
            .map(|k| {
                let entry = KeyEntry {
                    id: k.key.id,
                    name: k.key.name,
                    user_id: k.key.user_id,
                    username: k.key.username,
                    enabled: k.key.enabled && k.user_enabled,
                    expires_at: k.key.expires_at,
                    allowed_platforms: k.key.allowed_platforms,
                    allowed_models: k.key.allowed_models,
                    rpm_limit: k.key.rpm_limit.and_then(|v| u32::try_from(v).ok()),
                    max_concurrency: k.key.max_concurrency.and_then(|v| u32::try_from(v).ok()),
                    daily_cost_limit: k.key.daily_cost_limit,
                    monthly_cost_limit: k.key.monthly_cost_limit,
                    total_cost_limit: k.key.total_cost_limit,
                    price_rate: k.user_price_rate,
                    user_daily_cost_limit: k.user_daily_cost_limit,
                    user_monthly_cost_limit: k.user_monthly_cost_limit,
                    user_total_cost_limit: k.user_total_cost_limit,
                    user_allowed_platforms: k.user_allowed_platforms,
                    user_allowed_models: k.user_allowed_models,
                };
                (k.key.key_hash, Arc::new(entry))
            })
            .collect();
        write(&self.map, Arc::new(map));
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        read(&self.map).len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl KeyStore for KeyCache {
    fn lookup(&self, key_hash: &str) -> Option<Arc<KeyEntry>> {
        let map = match self.map.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.get(key_hash).cloned()
    }

    fn pepper(&self) -> &[u8] {
        &self.pepper
    }
}

/// Accounts with decrypted credentials; live state is kept across reloads by account id.
#[derive(Default)]
pub struct AccountCache {
    list: RwLock<Arc<Vec<Arc<Account>>>>,
    by_id: RwLock<Arc<HashMap<String, Arc<Account>, foldhash::fast::RandomState>>>,
    /// Also serializes the changes to cooldowns that must not interleave: a reload applying
    /// an operator's clear, and cooldowns read from Redis being applied.
    states: Mutex<HashMap<String, Arc<AccountState>>>,
    loads: LoadOrder,
    /// Operators' cooldown clears applied by reloads so far (see [`SharedCooldownsMark`]).
    cooldown_clears: AtomicU64,
}

/// Taken by [`AccountCache::shared_cooldowns_mark`] before cooldowns are read from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedCooldownsMark(u64);

impl AccountCache {
    /// A ticket to take before querying the accounts for [`AccountCache::replace_loaded`].
    pub fn begin_load(&self) -> LoadTicket {
        self.loads.begin()
    }

    /// Replaces the accounts with rows queried after `ticket` was taken, unless a later reload
    /// was applied already.
    pub fn replace_loaded(&self, ticket: LoadTicket, rows: Vec<AccountRow>, secrets: &SecretBox) {
        self.loads.apply(ticket, || self.replace(rows, secrets));
    }

    /// Replaces the account set from database rows. Rows whose credential cannot be decrypted
    /// or whose settings are invalid are left out (and logged), never half-used.
    pub fn replace(&self, rows: Vec<AccountRow>, secrets: &SecretBox) {
        let mut states = relay_filters::lock(&self.states);
        let now = relay_filters::now_ms();
        let mut list = Vec::with_capacity(rows.len());
        let mut cleared_any = false;
        let kept: std::collections::HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
        for row in rows {
            let account_type = row.account_type;
            let url = row
                .base_url
                .clone()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| account_type.default_base_url().to_string());
            let base_url = match BaseUrl::parse(&url) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(account = %row.name, error = %e, "bad base URL, account skipped");
                    continue;
                }
            };
            let credential = match secrets.decrypt(&row.credential_enc) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(account = %row.name, error = %e, "credential cannot be decrypted, account skipped");
                    continue;
                }
            };
            let state = states.entry(row.id.clone()).or_default().clone();
            let row_schedulable = row.enabled && row.status == AccountStatus::Valid;
            if !row_schedulable {
                // Out of scheduling in the database: an automatic disable has landed there.
                state.held_off_until_ms.store(0, Ordering::Relaxed);
            }
            let held_off = state.held_off_until_ms.load(Ordering::Relaxed) > now;
            state
                .schedulable
                .store(row_schedulable && !held_off, Ordering::Relaxed);
            let stored = row.consecutive_error_count.max(0);
            let seen = state.stored_errors_seen.swap(stored, Ordering::Relaxed);
            if stored < seen {
                // The stored count was reset (a passing check or a success on any node, an
                // operator): this node's count of errors in a row comes down with it. Errors
                // this node counted but has not stored are kept otherwise.
                let stored = u32::try_from(stored).unwrap_or(0);
                state
                    .consecutive_errors
                    .fetch_min(stored, Ordering::Relaxed);
            }
            let cleared_at = row.cooldown_cleared_at.unwrap_or(0);
            if cleared_at
                > state
                    .cooldown_cleared_seen
                    .fetch_max(cleared_at, Ordering::Relaxed)
            {
                // An operator ended the cooldown since this node's last reload. The cooldown it
                // holds may predate that (it only ever raises one), so the row's, stored after
                // the clear if any, replaces it.
                state
                    .cooldown_until_ms
                    .store(row.cooldown_until.unwrap_or(0), Ordering::Relaxed);
                state.cooling_for_overload.store(false, Ordering::Relaxed);
                cleared_any = true;
            } else if let Some(until) = row.cooldown_until {
                raise_cooldown(&state, until);
            }
            use secrecy::ExposeSecret;
            list.push(Arc::new(Account {
                id: row.id.clone(),
                name: row.name.clone(),
                account_type,
                base_url,
                credential: Credential::new(credential.expose_secret().to_string()),
                priority: row.priority,
                weight: u32::try_from(row.weight.max(0)).unwrap_or(1),
                models: row.models.clone(),
                model_map: row.model_map.clone().into_iter().collect(),
                max_concurrency: row.max_concurrency.and_then(|v| u32::try_from(v).ok()),
                chatgpt_account_id: row
                    .extra
                    .get("chatgpt_account_id")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                token_expires_ms: row.token_expires_at,
                status_set_at: row.status_set_at,
                state,
            }));
        }
        // Deleted accounts' state goes with them (requests still in flight on one hold theirs).
        // Kept for an account whose row is there but left out above, so that its live state
        // survives until its settings are mended.
        states.retain(|id, _| kept.contains(id.as_str()));
        let by_id = list.iter().map(|a| (a.id.clone(), a.clone())).collect();
        write(&self.list, Arc::new(list));
        write(&self.by_id, Arc::new(by_id));
        if cleared_any {
            self.cooldown_clears.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A mark to take before reading the cooldowns nodes share through Redis, for
    /// [`AccountCache::apply_shared_cooldowns`].
    pub fn shared_cooldowns_mark(&self) -> SharedCooldownsMark {
        let _states = relay_filters::lock(&self.states);
        SharedCooldownsMark(self.cooldown_clears.load(Ordering::Relaxed))
    }

    /// Raises each account's cooldown to the one shared for it (`shared`, by account id, read
    /// after `mark` was taken), unless a reload applied an operator's clear meanwhile: what was
    /// read may be the cooldown cleared, deleted from Redis only since. The next round reads
    /// again. Whether the cooldowns were applied.
    pub fn apply_shared_cooldowns(
        &self,
        mark: SharedCooldownsMark,
        shared: &HashMap<String, i64>,
    ) -> bool {
        let _states = relay_filters::lock(&self.states);
        if self.cooldown_clears.load(Ordering::Relaxed) != mark.0 {
            return false;
        }
        for a in self.snapshot().iter() {
            if let Some(until) = shared.get(&a.id) {
                raise_cooldown(&a.state, *until);
            }
        }
        true
    }

    /// Ends the hold of an automatic disable on account `id` (an admin changed the account:
    /// its row is the operator's word now).
    pub fn end_hold_off(&self, id: &str) {
        if let Some(a) = self.get(id) {
            a.state.held_off_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// The current accounts.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Account>>> {
        read(&self.list)
    }
}

impl AccountDirectory for AccountCache {
    fn accounts(&self) -> Arc<Vec<Arc<Account>>> {
        read(&self.list)
    }

    fn get(&self, id: &str) -> Option<Arc<Account>> {
        let map = match self.by_id.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.get(id).cloned()
    }
}

/// The price table: the shipped file with the database's overrides on top.
pub struct PriceCache {
    base: PriceTable,
    table: RwLock<Arc<PriceTable>>,
    loads: LoadOrder,
}

impl PriceCache {
    /// A cache starting from the shipped table.
    pub fn new(base: PriceTable) -> Self {
        PriceCache {
            table: RwLock::new(Arc::new(base.clone())),
            base,
            loads: LoadOrder::default(),
        }
    }

    /// A ticket to take before querying the overrides for [`PriceCache::replace_loaded`].
    pub fn begin_load(&self) -> LoadTicket {
        self.loads.begin()
    }

    /// Applies overrides queried after `ticket` was taken, unless a later reload was applied
    /// already.
    pub fn replace_loaded(&self, ticket: LoadTicket, overrides: Vec<ModelPriceRow>) {
        self.loads.apply(ticket, || self.replace(overrides));
    }

    /// Applies the database overrides: each model's standing override and those scheduled
    /// for it (`from_ms` set).
    pub fn replace(&self, overrides: Vec<ModelPriceRow>) {
        let mut table = self.base.clone();
        for (model, rows) in crate::store::overrides_by_model(&overrides) {
            if let Some(schedule) = self.schedule_with(model, &rows) {
                table.insert_schedule(model, schedule);
            }
        }
        write(&self.table, Arc::new(table));
    }

    /// The prices of `model` over time, its overrides `rows` (its standing one, and those
    /// scheduled, `from_ms` set) laid over the shipped prices: at any time the latest
    /// override that has begun (the standing one from the start), over the shipped prices
    /// then in effect (the cards and search prices it keeps follow them), else the shipped
    /// prices. A model with neither before its first scheduled override is not priced until
    /// then. `None`: no price at any time.
    pub fn schedule_with(&self, model: &str, rows: &[&ModelPriceRow]) -> Option<PriceSchedule> {
        let shipped = self.base.schedule(model);
        let over = |row: &ModelPriceRow, shipped: Option<&ModelPrice>| match shipped {
            Some(p) => with_shipped_searches(row.cards.apply(row.price(), Some(p)), p),
            None => row.price(),
        };
        let price_at = |at: i64| {
            let shipped_then = shipped.and_then(|s| s.at(at));
            match crate::store::override_at(rows, at) {
                Some(row) => Some(over(row, shipped_then)),
                None => shipped_then.copied(),
            }
        };
        if shipped.is_none() && rows.is_empty() {
            return None;
        }
        let first = price_at(i64::MIN);
        let mut times: Vec<i64> = shipped
            .into_iter()
            .flat_map(PriceSchedule::change_times)
            .chain(rows.iter().filter_map(|r| r.from_ms))
            .collect();
        times.sort_unstable();
        times.dedup();
        let changes = times.into_iter().filter_map(|from_ms| {
            Some(PriceChange {
                from_ms,
                price: price_at(from_ms)?,
            })
        });
        Some(PriceSchedule::with_changes(first, changes))
    }

    /// The shipped price of a model at `at_ms` (epoch ms): the cards an override keeps unless
    /// it sets its own or none ([`crate::store::CardChoice`]).
    pub fn shipped_at(&self, model: &str, at_ms: i64) -> Option<&ModelPrice> {
        self.base.get_at(model, at_ms)
    }
}

/// An override's `price` with the shipped search prices (per search and per request that
/// searched) where it names no `web_search`: one made before searches were priced, or that
/// sets token prices only, must not make the searches free (`0` does). An override naming
/// `web_search` prices searches by it alone.
fn with_shipped_searches(mut price: ModelPrice, shipped: &ModelPrice) -> ModelPrice {
    if price.web_search.is_none() {
        price.web_search = shipped.web_search;
        price.web_search_request = shipped.web_search_request;
    }
    price
}

impl PriceSource for PriceCache {
    fn table(&self) -> Arc<PriceTable> {
        read(&self.table)
    }
}

/// Raises an account's cooldown to one read from the store. Why that one was set is not known
/// (another node's rate limit, say), so a cooldown it lengthens no longer counts as one for
/// overload alone.
fn raise_cooldown(state: &AccountState, until: i64) {
    if state.cooldown_until_ms.fetch_max(until, Ordering::Relaxed) < until {
        state.cooling_for_overload.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CardChoice, CardChoices, LongContextPrice, TierPrice};

    /// An override of `model` at $5 / $6 naming nothing else.
    fn override_row(model: &str) -> ModelPriceRow {
        ModelPriceRow {
            model: model.into(),
            input: 5,
            output: 6,
            cache_write_5m: None,
            cache_write_1h: None,
            cache_read: None,
            web_search: None,
            cards: CardChoices::default(),
            updated_at: 0,
            from_ms: None,
        }
    }

    #[test]
    fn an_override_without_a_search_price_keeps_the_shipped_one() {
        let base = PriceTable::from_toml_str(
            "[models.m]\ninput = 1\noutput = 2\nweb_search = 10000\n[models.n]\ninput = 1\noutput = 2\n",
        )
        .expect("prices");
        let cache = PriceCache::new(base);
        let row = |model: &str, web_search| ModelPriceRow {
            web_search,
            ..override_row(model)
        };
        let search_price = |model: &str| cache.table().get(model).and_then(|p| p.web_search);
        cache.replace(vec![row("m", None), row("n", None), row("o", Some(7))]);
        assert_eq!(search_price("m"), Some(10_000));
        assert_eq!(cache.table().get("m").map(|p| p.input), Some(5));
        assert_eq!(search_price("n"), None);
        assert_eq!(search_price("o"), Some(7));
        // 0 makes the searches free.
        cache.replace(vec![row("m", Some(0))]);
        assert_eq!(search_price("m"), Some(0));
    }

    #[test]
    fn an_override_keeps_the_shipped_cards_unless_it_says_otherwise() {
        let base = PriceTable::from_toml_str(
            "[models.m]\ninput = 1\noutput = 2\n[models.m.long_context]\nabove_tokens = 10\ninput = 3\noutput = 4\n[models.m.priority]\ninput = 9\noutput = 10\n",
        )
        .expect("prices");
        let shipped = base.get("m").and_then(|p| p.long_context);
        assert!(shipped.is_some());
        let cache = PriceCache::new(base);
        let own = LongContextPrice {
            above_tokens: 20,
            input: 7,
            output: 8,
            ..LongContextPrice::default()
        };
        let row = |model: &str, long_context| {
            let mut r = override_row(model);
            r.cards.long_context = long_context;
            r
        };
        let card = |model: &str| cache.table().get(model).and_then(|p| p.long_context);
        cache.replace(vec![row("m", CardChoice::Shipped)]);
        assert_eq!(card("m"), shipped);
        // The tier cards alike: the shipped one kept, none, or the override's own.
        let priority = |model: &str| cache.table().get(model).and_then(|p| p.priority);
        assert_eq!(priority("m").map(|p| p.input), Some(9));
        let mut none = row("m", CardChoice::Shipped);
        none.cards.priority = CardChoice::None;
        cache.replace(vec![none]);
        assert_eq!(priority("m"), None);
        let mut own_tier = row("m", CardChoice::Shipped);
        own_tier.cards.priority = CardChoice::Card(TierPrice {
            input: 11,
            output: 12,
            ..TierPrice::default()
        });
        cache.replace(vec![own_tier]);
        assert_eq!(priority("m").map(|p| p.input), Some(11));
        assert_eq!(cache.table().get("m").map(|p| p.input), Some(5));
        cache.replace(vec![row("m", CardChoice::None)]);
        assert_eq!(card("m"), None);
        cache.replace(vec![
            row("m", CardChoice::Card(own)),
            row("n", CardChoice::Shipped),
        ]);
        assert_eq!(card("m"), Some(own));
        assert_eq!(card("n"), None);
    }

    #[test]
    fn an_override_follows_the_shipped_changes_of_what_it_keeps() {
        // 2027-01-01, midnight UTC.
        let change = 1_798_761_600_000;
        let base = PriceTable::from_toml_str(
            "[models.m]\ninput = 1\noutput = 2\nweb_search = 10000\n\
             [models.m.long_context]\nabove_tokens = 10\ninput = 3\noutput = 4\n\
             [models.m.from.\"2027-01-01\"]\ninput = 5\noutput = 6\nweb_search = 20000\n\
             [models.m.from.\"2027-01-01\".long_context]\nabove_tokens = 10\ninput = 7\n\
             output = 8\n",
        )
        .expect("prices");
        let cache = PriceCache::new(base);
        let at = |row: &ModelPriceRow, at_ms| {
            let schedule = cache.schedule_with("m", &[row]).expect("priced");
            let p = *schedule.at(at_ms).expect("priced");
            (p.input, p.web_search, p.long_context.map(|l| l.input))
        };
        // Keeping the shipped card and search price: both change on the date, its own
        // prices do not.
        let kept = override_row("m");
        assert_eq!(at(&kept, change - 1), (5, Some(10_000), Some(3)));
        assert_eq!(at(&kept, change), (5, Some(20_000), Some(7)));
        let applied = |row: &ModelPriceRow| cache.schedule_with("m", &[row]).expect("priced");
        assert_eq!(applied(&kept).upcoming(0).len(), 1);
        // Dropping the card: only the search price changes.
        let mut dropped = override_row("m");
        dropped.cards.long_context = CardChoice::None;
        assert_eq!(at(&dropped, change - 1), (5, Some(10_000), None));
        assert_eq!(at(&dropped, change), (5, Some(20_000), None));
        // Setting the search price too: nothing left to change.
        dropped.web_search = Some(0);
        assert!(applied(&dropped).upcoming(0).is_empty());
        assert_eq!(at(&dropped, change), (5, Some(0), None));
        // What the relay prices with is the same schedule.
        cache.replace(vec![override_row("m")]);
        assert_eq!(
            cache.table().get_at("m", change).and_then(|p| p.web_search),
            Some(20_000)
        );
    }

    #[test]
    fn scheduled_overrides_take_over_at_their_time() {
        // 2027-01-01 and 2027-02-01, midnight UTC.
        let (january, february) = (1_798_761_600_000, 1_801_440_000_000);
        let base = PriceTable::from_toml_str(
            "[models.m]\ninput = 1\noutput = 2\nweb_search = 10000\n\
             [models.m.from.\"2027-01-01\"]\ninput = 3\noutput = 4\nweb_search = 20000\n",
        )
        .expect("prices");
        let cache = PriceCache::new(base);
        let scheduled = |from_ms, input| ModelPriceRow {
            input,
            from_ms: Some(from_ms),
            ..override_row("m")
        };
        let standing = override_row("m");
        let at = |rows: &[&ModelPriceRow], at_ms| {
            let schedule = cache.schedule_with("m", rows).expect("priced");
            let p = *schedule.at(at_ms).expect("priced then");
            (p.input, p.web_search)
        };
        // Scheduled alone: the shipped prices until its time, its own after (the shipped
        // search price it keeps following the list).
        let feb = scheduled(february, 9);
        assert_eq!(at(&[&feb], 0), (1, Some(10_000)));
        assert_eq!(at(&[&feb], january), (3, Some(20_000)));
        assert_eq!(at(&[&feb], february - 1), (3, Some(20_000)));
        assert_eq!(at(&[&feb], february), (9, Some(20_000)));
        // Over a standing override: the standing one until then.
        assert_eq!(at(&[&standing, &feb], january), (5, Some(20_000)));
        assert_eq!(at(&[&feb, &standing], february), (9, Some(20_000)));
        // Two scheduled: each from its time.
        let jan = scheduled(january, 7);
        let schedule = cache.schedule_with("m", &[&feb, &jan]).expect("priced");
        assert_eq!(
            schedule
                .upcoming(0)
                .iter()
                .map(|c| (c.from_ms, c.price.input))
                .collect::<Vec<_>>(),
            [(january, 7), (february, 9)]
        );
        // A model the list does not price, scheduled only: unpriced until its time.
        let other = ModelPriceRow {
            model: "other".into(),
            ..scheduled(february, 11)
        };
        let only = cache
            .schedule_with("other", &[&other])
            .expect("priced later");
        assert_eq!(only.at(february - 1), None);
        assert_eq!(only.at(february).map(|p| p.input), Some(11));
        assert!(cache.schedule_with("nothing", &[]).is_none());
        // What the relay prices with.
        cache.replace(vec![standing.clone(), feb.clone()]);
        let table = cache.table();
        assert_eq!(table.get_at("m", february - 1).map(|p| p.input), Some(5));
        assert_eq!(table.get_at("m", february).map(|p| p.input), Some(9));
    }

    #[test]
    fn a_reload_that_began_earlier_never_undoes_a_later_one() {
        let order = LoadOrder::default();
        let seen = Mutex::new(Vec::new());
        let push = |what: &'static str| {
            let seen = &seen;
            move || seen.lock().expect("lock").push(what)
        };
        // The periodic refresh queries first, then an admin change commits and reloads.
        let periodic = order.begin();
        let admin = order.begin();
        assert!(order.apply(admin, push("admin")));
        // The periodic refresh finishes last, with rows older than the admin's: dropped.
        assert!(!order.apply(periodic, push("periodic")));
        // The admin reload again (say, a retry with the same ticket) is not applied twice.
        assert!(!order.apply(admin, push("admin again")));
        // A reload that began afterwards is applied.
        let next = order.begin();
        assert!(order.apply(next, push("next")));
        assert_eq!(*seen.lock().expect("lock"), vec!["admin", "next"]);
    }

    fn row(id: &str, secrets: &SecretBox) -> AccountRow {
        let mut new = crate::store::NewAccount::new(
            format!("account {id}"),
            relay_filters::types::AccountType::Claude,
            secrets.encrypt("sk-ant-test"),
            "k1".into(),
        );
        new.base_url = Some("http://127.0.0.1:9".into());
        new.into_account(id, 0)
    }

    #[test]
    fn live_account_state_outlives_reloads_but_not_the_account() {
        let secrets = SecretBox::new("k1".into(), [7; 32]);
        let cache = AccountCache::default();
        cache.replace(vec![row("a", &secrets), row("b", &secrets)], &secrets);
        let state_of = |id: &str| {
            cache
                .get(id)
                .map(|a| Arc::clone(&a.state))
                .expect("account in the cache")
        };
        let a = state_of("a");
        a.inflight.store(3, Ordering::Relaxed);
        // A reload keeps each remaining account's live state, the very same one.
        cache.replace(vec![row("a", &secrets), row("b", &secrets)], &secrets);
        assert!(Arc::ptr_eq(&a, &state_of("a")));
        assert_eq!(state_of("a").inflight.load(Ordering::Relaxed), 3);
        // A row left out (its credential cannot be decrypted) keeps its state for later.
        let mut broken = row("b", &secrets);
        broken.credential_enc = "not a sealed credential".into();
        let b = state_of("b");
        cache.replace(vec![row("a", &secrets), broken], &secrets);
        assert!(cache.get("b").is_none());
        cache.replace(vec![row("a", &secrets), row("b", &secrets)], &secrets);
        assert!(Arc::ptr_eq(&b, &state_of("b")));
        // A deleted account's state is let go: it comes back (same id) with a fresh one.
        cache.replace(vec![row("b", &secrets)], &secrets);
        assert!(cache.get("a").is_none());
        assert_eq!(cache.states.lock().expect("lock").len(), 1);
        cache.replace(vec![row("a", &secrets), row("b", &secrets)], &secrets);
        assert!(!Arc::ptr_eq(&a, &state_of("a")));
        assert_eq!(state_of("a").inflight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_automatic_disable_holds_against_rows_read_before_it_landed() {
        let secrets = SecretBox::new("k1".into(), [7; 32]);
        let cache = AccountCache::default();
        cache.replace(vec![row("a", &secrets)], &secrets);
        let a = cache.get("a").expect("account");
        let schedulable = || {
            cache
                .get("a")
                .expect("account")
                .state
                .schedulable
                .load(Ordering::Relaxed)
        };
        assert!(schedulable());
        // Auth errors take it out; the database write is still on its way.
        let auth = relay_filters::account_state::Outcome::Status {
            status: 401,
            reset_at_ms: None,
            fault: relay_filters::account_state::Fault::Disabled,
        };
        let rules = relay_filters::account_state::StateRules::default();
        let now = relay_filters::now_ms();
        relay_filters::account_state::apply_outcome(&a, auth, &rules, now);
        assert!(!schedulable());
        // A reload whose rows were read before the write landed: still valid there.
        cache.replace(vec![row("a", &secrets)], &secrets);
        assert!(!schedulable(), "a stale row put the account back");
        // The write lands and a reload sees it: the hold has done its work.
        let mut blocked = row("a", &secrets);
        blocked.status = AccountStatus::Blocked;
        cache.replace(vec![blocked], &secrets);
        assert!(!schedulable());
        assert_eq!(a.state.held_off_until_ms.load(Ordering::Relaxed), 0);
        // An operator sets it valid again: the row is followed.
        cache.replace(vec![row("a", &secrets)], &secrets);
        assert!(schedulable());

        // An admin change before the write landed ends the hold on this node at once.
        relay_filters::account_state::apply_outcome(&a, auth, &rules, now);
        cache.end_hold_off("a");
        cache.replace(vec![row("a", &secrets)], &secrets);
        assert!(schedulable());

        // And a hold past its time (the write never landed) no longer holds.
        relay_filters::account_state::apply_outcome(
            &a,
            auth,
            &rules,
            now - relay_filters::account_state::DISABLE_HOLD_OFF.as_millis() as i64 - 1,
        );
        cache.replace(vec![row("a", &secrets)], &secrets);
        assert!(schedulable());
    }

    #[test]
    fn an_operators_clear_ends_the_cooldown_and_nothing_read_before_it_brings_it_back() {
        use relay_filters::account_state::{apply_outcome, Outcome, StateRules};
        let secrets = SecretBox::new("k1".into(), [7; 32]);
        let cache = AccountCache::default();
        let now = relay_filters::now_ms();
        let far = now + 3_600_000;
        let stored = |cooldown_until: Option<i64>, cooldown_cleared_at: Option<i64>| {
            let mut r = row("a", &secrets);
            r.cooldown_until = cooldown_until;
            r.cooldown_cleared_at = cooldown_cleared_at;
            vec![r]
        };
        let cooldown = || {
            cache
                .get("a")
                .expect("account")
                .state
                .cooldown_until_ms
                .load(Ordering::Relaxed)
        };
        cache.replace(stored(None, None), &secrets);
        let a = cache.get("a").expect("account");
        let limited = Outcome::Status {
            status: 429,
            reset_at_ms: Some(far),
            fault: relay_filters::account_state::Fault::ByStatus,
        };
        apply_outcome(&a, limited, &StateRules::default(), now);
        // The cooldown stored and shared: reloads and Redis keep it.
        cache.replace(stored(Some(far), None), &secrets);
        let mark = cache.shared_cooldowns_mark();
        assert!(cache.apply_shared_cooldowns(mark, &HashMap::from([("a".into(), far)])));
        assert_eq!(cooldown(), far);

        // Rows read before the clear (periodic refresh), then the clear and its reload: only
        // the later reload counts, and it ends the cooldown.
        let stale = cache.begin_load();
        let mark = cache.shared_cooldowns_mark();
        let fresh = cache.begin_load();
        cache.replace_loaded(fresh, stored(None, Some(now)), &secrets);
        assert_eq!(cooldown(), 0);
        assert!(a.usable(now));
        cache.replace_loaded(stale, stored(Some(far), None), &secrets);
        assert_eq!(cooldown(), 0, "rows read before the clear brought it back");
        // Redis read before the clear (still holding the cooldown): not applied.
        assert!(!cache.apply_shared_cooldowns(mark, &HashMap::from([("a".into(), far)])));
        assert_eq!(cooldown(), 0, "Redis read before the clear brought it back");
        // The same clear seen again is no new clear; cooldowns after it hold as usual.
        let later = now + 60_000;
        assert!(cache.apply_shared_cooldowns(
            cache.shared_cooldowns_mark(),
            &HashMap::from([("a".into(), later)])
        ));
        cache.replace(stored(None, Some(now)), &secrets);
        assert_eq!(cooldown(), later);
        cache.replace(stored(Some(far), Some(now)), &secrets);
        assert_eq!(cooldown(), far);
        // A second clear with a cooldown stored after it: the row's cooldown is the one.
        cache.replace(stored(Some(later), Some(now + 1)), &secrets);
        assert_eq!(cooldown(), later);
    }

    #[test]
    fn reloads_in_order_are_all_applied() {
        let order = LoadOrder::default();
        let mut applied = 0;
        for _ in 0..3 {
            let t = order.begin();
            assert!(order.apply(t, || applied += 1));
        }
        assert_eq!(applied, 3);
    }
}
