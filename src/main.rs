//! The `llm-relay` command: serve (default), migrate, admin and key management, config checks.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use llm_relay::app::{block_on, bootstrap_admin, load_secrets, open_store};
use llm_relay::config::Config;
use llm_relay::secrets::{api_key_hash, api_key_prefix, generate_api_key, hash_password};
use llm_relay::store::{NewApiKey, NewUser, Role};

// glibc's allocator pays for Pingora's 64 KiB body buffers with a heap consolidation on every
// free; mimalloc keeps per-thread free lists and measured faster under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's option setter (linked in by the `mimalloc` crate).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    fn getenv(name: *const std::ffi::c_char) -> *mut std::ffi::c_char;
}

/// Option numbers in mimalloc 3.x (the version `Cargo.lock` pins).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Arenas committed up front are purged with `MADV_FREE`, which leaves freed memory counted in the
/// process's RSS until the kernel runs short; committed on demand, purges use `MADV_DONTNEED` and
/// the RSS drops (measured: 83 instead of 153 KiB of RSS per held stream). Purging only memory
/// unused for a second keeps the page faults of reuse off the request path. The options must be
/// set before the first Rust allocation reserves an arena, so this runs as a constructor, before
/// `main` and the standard library's start-up. `MIMALLOC_*` variables in the environment win.
extern "C" fn tune_allocator() {
    // SAFETY: plain option stores in the linked allocator and an environment read that
    // allocates nothing; no other thread runs yet.
    unsafe {
        if getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
        if getenv(c"MIMALLOC_PURGE_DELAY".as_ptr()).is_null() {
            mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
        }
    }
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

#[derive(Parser)]
#[command(name = "llm-relay", version, about = "Multi-tenant LLM API relay")]
struct Cli {
    /// Config file (default: conf/relay.toml when present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long, global = true)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage admin users.
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Manage relay API keys.
    Keys {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Check the configuration (and every file given) and exit.
    CheckConfig {
        /// More files to check.
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AdminAction {
    /// Create a user (admin role by default).
    Create {
        username: String,
        /// Password; read from RELAY_NEW_PASSWORD when not given.
        #[arg(long, env = "RELAY_NEW_PASSWORD")]
        password: String,
        /// Create a plain user instead of an admin.
        #[arg(long)]
        user: bool,
    },
    /// Set a new password.
    ResetPassword {
        username: String,
        #[arg(long, env = "RELAY_NEW_PASSWORD")]
        password: String,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Create a key for a user and print it (shown once).
    Create {
        /// Owner's user name.
        #[arg(long)]
        user: String,
        /// Key name.
        #[arg(long, default_value = "default")]
        name: String,
        /// Allowed models (exact or glob), repeatable; none = all.
        #[arg(long = "model")]
        models: Vec<String>,
    },
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Lines are formatted on the calling thread and written out by a writer thread every 100 ms:
    // a request's log line never waits on stdout nor wakes another thread.
    let sink = llm_relay::log_sink::LogSink::start(
        Box::new(std::io::stdout()),
        std::time::Duration::from_millis(100),
    );
    // The access log writes its lines into the same sink, in the same format.
    llm_relay::access_log::install(sink.clone(), config.log_format == "json");
    let writer = llm_relay::log_sink::SinkMaker(sink);
    // Plain text, also on a terminal: the relay is built without colouring (see Cargo.toml).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(writer);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    // Everything the relay creates (the data directory, the SQLite database and its journal,
    // usage spool files, generated secrets) holds secrets or tenants' usage: readable by the
    // relay's own user only.
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { files }) = &cli.command {
        let mut paths: Vec<Option<PathBuf>> = vec![cli.config.clone()];
        paths.extend(files.iter().cloned().map(Some));
        for p in paths {
            let c = Config::load(p.as_deref())?;
            llm_relay::app::load_prices(&c)?;
            llm_relay::app::proxy_tls(&c)?;
            println!(
                "{}: ok",
                p.map(|p| p.display().to_string())
                    .unwrap_or_else(|| "configuration".into())
            );
        }
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    if cli.check_config {
        llm_relay::app::load_prices(&config)?;
        llm_relay::app::proxy_tls(&config)?;
        println!("configuration: ok");
        return Ok(());
    }
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            init_logging(&config);
            llm_relay::app::serve(config)
        }
        Command::Migrate => block_on(async {
            open_store(&config).await?;
            println!("migrations applied");
            anyhow::Ok(())
        })?,
        Command::Admin { action } => block_on(async {
            let store = open_store(&config).await?;
            match action {
                AdminAction::Create {
                    username,
                    password,
                    user,
                } => {
                    let hash = hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
                    let role = if user { Role::User } else { Role::Admin };
                    let u = store
                        .create_user(&NewUser {
                            username,
                            password_hash: hash,
                            role,
                            price_rate: 10_000,
                            daily_cost_limit: None,
                            monthly_cost_limit: None,
                            total_cost_limit: None,
                            allowed_platforms: Vec::new(),
                            allowed_models: Vec::new(),
                        })
                        .await?;
                    println!("created {} ({})", u.username, u.id);
                }
                AdminAction::ResetPassword { username, password } => {
                    let u = store
                        .user_by_username(&username)
                        .await?
                        .context("no such user")?;
                    let hash = hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
                    store.set_user_password(&u.id, &hash).await?;
                    println!("password of {username} changed");
                }
            }
            anyhow::Ok(())
        })?,
        Command::Keys { action } => block_on(async {
            let store = open_store(&config).await?;
            bootstrap_admin(&store, &config).await?;
            let node = load_secrets(&config)?;
            match action {
                KeyAction::Create { user, name, models } => {
                    let owner = store
                        .user_by_username(&user)
                        .await?
                        .context("no such user")?;
                    let key = generate_api_key();
                    let created = store
                        .create_api_key(
                            &NewApiKey {
                                user_id: owner.id,
                                name,
                                key_hash: api_key_hash(&node.pepper, &key),
                                key_prefix: api_key_prefix(&key),
                                allowed_models: models,
                                ..Default::default()
                            },
                            i64::from(config.max_keys_per_user),
                        )
                        .await?;
                    println!("{key}");
                    eprintln!(
                        "key {} created for {user}; it is shown only this once",
                        created.id
                    );
                }
            }
            anyhow::Ok(())
        })?,
        Command::CheckConfig { .. } => Ok(()),
    }
}
