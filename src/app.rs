//! Assembles a relay node from its configuration: secrets, database, caches, the filter chain,
//! the Pingora server with the proxy service and the control-plane background service.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use relay_filters::account_state::StateRules;
use relay_filters::chain::{Chain, ChainDeps};
use relay_filters::cost::PriceTable;
use relay_filters::key_limits::{utc_day, LimitStore, MemoryLimits};
use relay_filters::now_ms;
use relay_filters::session_store::{MemorySessionStore, SessionStore};
use relay_filters::sticky_upstream::StickyConfig;

use crate::background::account_events::AccountEvents;
use crate::background::usage_writer::{usage_channel, WriterSettings};
use crate::background::{cache_refresh, ControlPlane};
use crate::cache::{AccountCache, KeyCache, PriceCache};
use crate::config::{parse_hex_key, Config};
use crate::proxy::{ProxySettings, RelayProxy, Resolver};
use crate::secrets::{hash_password, load_or_create_key_file, SecretBox};
use crate::store::redis_counters::RedisUsageCounters;
use crate::store::redis_limits::RedisLimits;
use crate::store::redis_sessions::{
    FallbackSessionStore, RedisCooldowns, RedisLink, RedisLinkConfig, RedisSessionStore,
};
use crate::store::{NewUser, Role, SqlStore};

/// Secrets of this node: the credential encryption key and the API key pepper.
pub struct NodeSecrets {
    pub secrets: SecretBox,
    pub pepper: Vec<u8>,
}

/// Loads the secrets from the config, or from generated files in the data directory.
pub fn load_secrets(config: &Config) -> anyhow::Result<NodeSecrets> {
    let key = match &config.encryption_key {
        Some(k) => parse_hex_key(k.expose()).context("encryption_key must be 64 hex characters")?,
        None => load_or_create_key_file(&config.data_dir.join("encryption.key"))
            .context("cannot read or create the encryption key file")?,
    };
    let pepper = match &config.key_pepper {
        Some(k) => parse_hex_key(k.expose()).context("key_pepper must be 64 hex characters")?,
        None => load_or_create_key_file(&config.data_dir.join("key-pepper.key"))
            .context("cannot read or create the key pepper file")?,
    };
    // The key id names the key without revealing it: a digest prefix.
    let key_id = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(key)[..4])
    };
    Ok(NodeSecrets {
        secrets: SecretBox::new(key_id, key),
        pepper: pepper.to_vec(),
    })
}

/// Runs a future on a short-lived runtime (start-up and CLI work, before Pingora starts its own).
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    Ok(rt.block_on(f))
}

/// Opens the database and applies the migrations.
pub async fn open_store(config: &Config) -> anyhow::Result<SqlStore> {
    std::fs::create_dir_all(&config.data_dir).context("cannot create the data directory")?;
    let store = SqlStore::connect(&config.database_url(), 4)
        .await
        .context("cannot open the database")?;
    store.migrate().await.context("cannot apply migrations")?;
    Ok(store)
}

/// Creates the first admin when there is no user yet; prints the password once and writes it
/// to `data/initial-admin.txt` (mode 0600).
pub async fn bootstrap_admin(store: &SqlStore, config: &Config) -> anyhow::Result<()> {
    if store.count_users().await? > 0 {
        return Ok(());
    }
    let (password, generated) = match &config.admin_password {
        Some(p) => (p.expose().to_string(), false),
        None => (crate::secrets::random_token(), true),
    };
    let hash = hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
    store
        .create_user(&NewUser {
            username: "admin".into(),
            password_hash: hash,
            role: Role::Admin,
            price_rate: 10_000,
            daily_cost_limit: None,
            monthly_cost_limit: None,
            total_cost_limit: None,
            allowed_platforms: Vec::new(),
            allowed_models: Vec::new(),
        })
        .await?;
    if generated {
        let path = config.data_dir.join("initial-admin.txt");
        write_private(&path, &format!("username: admin\npassword: {password}\n"))?;
        println!("Created the first admin.\n  username: admin\n  password: {password}\n(also written to {})", path.display());
    } else {
        println!("Created the first admin (username: admin) with the password from RELAY_ADMIN_PASSWORD.");
    }
    Ok(())
}

/// Writes a file readable by its owner only: a file already there is made so too, and a
/// symbolic link in its place is refused rather than followed.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The price list shipped with the relay, built into the binary so that a relay started from
/// any directory has prices.
pub const SHIPPED_PRICES: &str = include_str!("../conf/pricing.toml");

/// Where the default price list is looked for before the built-in one.
const DEFAULT_PRICING_FILE: &str = "conf/pricing.toml";

/// Loads the price list: the configured file (which must exist), else `conf/pricing.toml` in
/// the working directory when there is one, else the built-in list.
pub fn load_prices(config: &Config) -> anyhow::Result<PriceTable> {
    let file = match &config.pricing_file {
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from(DEFAULT_PRICING_FILE)).filter(|p| p.is_file()),
    };
    let (text, source) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the price list {}", path.display()))?;
            (text, path.display().to_string())
        }
        None => (SHIPPED_PRICES.to_owned(), "the built-in list".to_owned()),
    };
    PriceTable::from_toml_str(&text).map_err(|e| anyhow::anyhow!("price list ({source}): {e}"))
}

/// TLS for the proxy listener when a certificate is configured (TLS 1.2 and 1.3), its files
/// read and checked here with a clear error. HTTP/1.1 is the only protocol offered (ALPN), as
/// the relay speaks no other.
pub fn proxy_tls(config: &Config) -> anyhow::Result<Option<Arc<pingora::tls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&config.proxy_tls_cert, &config.proxy_tls_key) else {
        return Ok(None);
    };
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let loaded = pingora::tls::load_certs_and_key_files(&cert, &key)
        .map_err(|e| anyhow::anyhow!("proxy_tls_cert / proxy_tls_key: {e}"))?;
    let Some((certs, private_key)) = loaded else {
        anyhow::bail!(
            "proxy_tls_cert {cert} holds no certificate, or proxy_tls_key {key} no private key"
        );
    };
    pingora::tls::install_default_crypto_provider();
    // The listener is built from this configuration, not from the paths: Pingora's own
    // builder reads the files again and panics on one that changed in between.
    let versions = [&pingora::tls::version::TLS12, &pingora::tls::version::TLS13];
    let mut tls = pingora::tls::ServerConfig::builder_with_protocol_versions(&versions)
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(|e| {
            anyhow::anyhow!("proxy_tls_key {key} does not fit proxy_tls_cert {cert}: {e}")
        })?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(tls)))
}

/// Builds and runs the node until a signal stops it; returns once every usage record it held
/// is stored or spooled, or with an error on fatal start-up errors and when records could not
/// be kept.
pub fn serve(config: Config) -> anyhow::Result<()> {
    // Both addresses are claimed before anything else starts: a node that cannot listen stops
    // here with the reason, instead of running on without serving.
    let admin_listener = claim_address(&config.admin_addr, "admin_addr")?;
    let proxy_listener = claim_address(&config.proxy_addr, "proxy_addr")?;
    let node = load_secrets(&config)?;
    let keys = Arc::new(KeyCache::new(node.pepper.clone()));
    let accounts = Arc::new(AccountCache::default());
    let prices = Arc::new(PriceCache::new(load_prices(&config)?));
    let memory_limits = Arc::new(MemoryLimits::default());
    block_on(async {
        let store = open_store(&config).await?;
        bootstrap_admin(&store, &config).await?;
        cache_refresh::load_all(&store, &keys, &accounts, &prices, &node.secrets).await?;
        let today = utc_day(now_ms());
        for s in store.limit_spend(&today, false).await? {
            memory_limits.seed_cost(&s.subject, &today, s.spent);
        }
        store.close().await;
        anyhow::Ok(())
    })??;
    cache_refresh::publish_account_states(&accounts);

    // With Redis, bindings, limit counters and cooldowns are shared by every node; memory
    // serves while Redis is unreachable. Opening the link does no I/O: it connects in the
    // background once the services run.
    let redis_link = match &config.redis_url {
        Some(url) => Some(
            RedisLink::open_with(
                url,
                RedisLinkConfig {
                    op_timeout: config.redis_op_timeout,
                    ..RedisLinkConfig::default()
                },
            )
            .context("redis_url is not valid")?,
        ),
        None => None,
    };
    let memory_sessions = MemorySessionStore::new(config.session.memory_capacity);
    let (sessions, bindings_admin): (Arc<dyn SessionStore>, _) = match &redis_link {
        Some(link) => (
            Arc::new(FallbackSessionStore::new(
                RedisSessionStore::new(link.clone(), ""),
                memory_sessions.clone(),
            )),
            crate::admin::BindingsAdmin {
                store: Arc::new(RedisSessionStore::new(link.clone(), "")),
                mirror: Some(memory_sessions),
            },
        ),
        None => (
            memory_sessions.clone(),
            crate::admin::BindingsAdmin {
                store: memory_sessions,
                mirror: None,
            },
        ),
    };
    let limits: Arc<dyn LimitStore> = match &redis_link {
        Some(link) => Arc::new(RedisLimits::new(link.clone(), "", memory_limits.clone())),
        None => memory_limits.clone(),
    };
    let cooldowns = redis_link
        .as_ref()
        .map(|link| Arc::new(RedisCooldowns::new(link.clone(), "")));
    let deps = ChainDeps {
        keys: keys.clone(),
        accounts: accounts.clone(),
        sessions,
        prices: prices.clone(),
        limits,
        lease_ttl: config.concurrency_lease_ttl,
        shared_account_caps: redis_link.is_some(),
        sticky: StickyConfig {
            ttl: config.session.ttl,
            responses_ttl: config.session.responses_ttl,
            renew_threshold: config.session.renew_threshold,
            strategy: config.scheduler.strategy,
        },
        session_strategy: config.session.strategy,
        session_message_count: config.session.message_count,
    };
    let chain = Chain::build(&config.filter_chain(), &deps)
        .map_err(|e| anyhow::anyhow!("filter chain: {e}"))?;
    let (usage, writer, usage_drain) =
        usage_channel(config.usage.queue_capacity, config.data_dir.join("spool"));
    let usage_backlog = usage.backlog();
    let (account_events, account_rx) = AccountEvents::channel();

    let state_rules = StateRules {
        cooldown_429: config.scheduler.cooldown_429,
        cooldown_429_max: config.scheduler.cooldown_429_max,
        cooldown_529: config.scheduler.cooldown_529,
        cooldown_5xx: config.scheduler.cooldown_5xx,
        server_error_threshold: config.scheduler.server_error_threshold,
        account_error_threshold: config.scheduler.account_error_threshold,
    };

    let mut server_conf = ServerConf {
        threads: config.threads,
        work_stealing: config.work_stealing,
        grace_period_seconds: Some(config.shutdown.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(config.shutdown.graceful_shutdown_timeout_seconds),
        ..ServerConf::default()
    };
    server_conf.upstream_keepalive_pool_size = 1024;
    // The relay's upstream connector, and its pool of idle connections (1024 per thread).
    let connector_options = pingora::connectors::ConnectorOptions::from_server_conf(&server_conf);
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();

    let proxy = RelayProxy {
        chain,
        settings: ProxySettings {
            max_body_bytes: config.max_body_bytes,
            client_idle_timeout: config.client_idle_timeout,
            connect_timeout: config.upstream.connect_timeout,
            header_timeout: config.upstream.header_timeout,
            idle_timeout: config.upstream.idle_timeout,
            pool_idle_timeout: config.upstream.pool_idle_timeout,
            max_attempts: config.upstream.max_attempts,
            failover_statuses: config.upstream.failover_statuses.clone(),
            drain_on_disconnect: config.upstream.on_client_disconnect == "drain",
            drain_timeout: config.upstream.drain_timeout,
            state_rules: state_rules.clone(),
        },
        pool: crate::proxy::UpstreamPool::new(connector_options.keepalive_pool_size),
        connector: pingora::connectors::TransportConnector::new(Some(connector_options)),
        resolver: Resolver::default(),
        usage,
        account_events,
        accounts: accounts.clone(),
        prices: prices.clone(),
        counters: redis_link
            .as_ref()
            .map(|link| Arc::new(RedisUsageCounters::new(link.clone(), ""))),
    };
    // The proxy serves on the socket bound above, which it never lets go of. Client
    // connections have no buffers of Pingora's: the relay's client side reads heads into a
    // buffer of its own, freed between requests, and queues an answer's pieces for one vectored
    // write.
    let proxy_service =
        crate::proxy::ProxyService::new("relay proxy", proxy_listener, proxy_tls(&config)?, proxy)
            .context("proxy listener")?;

    admin_listener
        .set_nonblocking(true)
        .context("admin listener")?;
    let control = ControlPlane {
        database_url: config.database_url(),
        admin_listener: Mutex::new(Some(admin_listener)),
        admin_token: config.admin_token.as_ref().map(|t| t.expose().to_string()),
        metrics_token: config
            .metrics_token
            .as_ref()
            .map(|t| t.expose().trim().to_string()),
        max_keys_per_user: config.max_keys_per_user,
        admin_secure_cookie: config.admin_secure_cookie,
        refresh_interval: config.cache_refresh_interval,
        writer_settings: WriterSettings {
            batch_size: config.usage.batch_size,
            flush_interval: config.usage.flush_interval,
        },
        sqlite_idle_priority: config.usage.idle_priority,
        usage_backlog,
        secrets: Arc::new(node.secrets),
        pepper: Arc::new(node.pepper),
        keys,
        accounts,
        prices,
        redis: redis_link.clone(),
        writer: Mutex::new(Some(writer)),
        account_events: Mutex::new(Some(account_rx)),
        cooldowns,
        memory_limits,
        spend_refresh: config.spend_refresh_interval,
        state_rules,
        sessions: Arc::new(bindings_admin),
        oauth: crate::background::oauth_refresh::RefreshSettings::from_config(&config.oauth)
            .map_err(|e| anyhow::anyhow!("oauth token URL: {e}"))?,
        retention_days: config.usage.retention_days,
        retention_interval: config.usage.retention_interval,
    };
    server.add_service(proxy_service);
    server.add_service(pingora::services::background::background_service(
        "control plane",
        control,
    ));
    tracing::info!(proxy = %config.proxy_addr, admin = %config.admin_addr, "llm-relay starting");
    // Not `run_forever`, which exits as soon as the runtimes are told to stop: their threads
    // may still be dropping the usage writer and requests cut short, which spool what they hold
    // as they go (with SIGINT Pingora does not wait for its runtimes at all).
    server.run(pingora::server::RunArgs::default());
    let kept = usage_drain.finish(config.usage.exit_timeout);
    if let Err(e) = &kept {
        tracing::error!(error = %e, "stopping with usage records unsaved");
    }
    crate::log_sink::flush_global();
    Ok(kept?)
}

/// Binds `addr` (a socket address from the configuration), naming the setting in the error.
fn claim_address(addr: &str, setting: &str) -> anyhow::Result<std::net::TcpListener> {
    let parsed: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("{setting} is not an address: {addr}"))?;
    std::net::TcpListener::bind(parsed)
        .with_context(|| format!("cannot listen on {parsed} ({setting})"))
}
