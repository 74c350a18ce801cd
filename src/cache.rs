//! In-process mirrors of the database the hot path reads: API keys, accounts (with decrypted
//! credentials and live state) and prices. Refreshed by a background job; never a database round
//! trip per request.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use relay_filters::accounts::{Account, AccountDirectory, AccountState, BaseUrl, Credential};
use relay_filters::api_key_auth::{KeyEntry, KeyStore};
use relay_filters::cost::{PriceSource, PriceTable};

use crate::secrets::SecretBox;
use crate::store::{Account as AccountRow, AccountStatus, ActiveApiKey, ModelPriceRow};

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

/// Keys by peppered hash.
pub struct KeyCache {
    map: RwLock<Arc<HashMap<String, Arc<KeyEntry>>>>,
    pepper: Vec<u8>,
}

impl KeyCache {
    /// An empty cache hashing with `pepper`.
    pub fn new(pepper: Vec<u8>) -> Self {
        KeyCache {
            map: RwLock::new(Arc::new(HashMap::new())),
            pepper,
        }
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
                    total_cost_limit: k.key.total_cost_limit,
                    price_rate: k.user_price_rate,
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
    by_id: RwLock<Arc<HashMap<String, Arc<Account>>>>,
    states: Mutex<HashMap<String, Arc<AccountState>>>,
}

impl AccountCache {
    /// Replaces the account set from database rows. Rows whose credential cannot be decrypted
    /// or whose settings are invalid are left out (and logged), never half-used.
    pub fn replace(&self, rows: Vec<AccountRow>, secrets: &SecretBox) {
        let mut states = match self.states.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut list = Vec::with_capacity(rows.len());
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
            state.schedulable.store(
                row.enabled && row.status == AccountStatus::Valid,
                Ordering::Relaxed,
            );
            if let Some(until) = row.cooldown_until {
                state.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
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
                state,
            }));
        }
        let by_id = list.iter().map(|a| (a.id.clone(), a.clone())).collect();
        write(&self.list, Arc::new(list));
        write(&self.by_id, Arc::new(by_id));
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
}

impl PriceCache {
    /// A cache starting from the shipped table.
    pub fn new(base: PriceTable) -> Self {
        PriceCache {
            table: RwLock::new(Arc::new(base.clone())),
            base,
        }
    }

    /// Applies the database overrides.
    pub fn replace(&self, overrides: Vec<ModelPriceRow>) {
        let mut table = self.base.clone();
        for row in overrides {
            table.insert(&row.model, row.price());
        }
        write(&self.table, Arc::new(table));
    }
}

impl PriceSource for PriceCache {
    fn table(&self) -> Arc<PriceTable> {
        read(&self.table)
    }
}
