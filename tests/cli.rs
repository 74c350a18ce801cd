//! The command line: migrate, admin and key creation, config checks.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Relay, RelayOptions};

fn relay_cmd(data: &Path, args: &[&str]) -> Output {
    relay_cmd_in(Path::new(env!("CARGO_MANIFEST_DIR")), data, &[], args)
}

/// Runs the command line in `dir` with `env` on top of the test's own variables.
fn relay_cmd_in(dir: &Path, data: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llm-relay"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().copied())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RELAY_DATA_DIR", data)
        .env("RELAY_ADMIN_PASSWORD", "admin-password-1")
        .output()
        .expect("run llm-relay")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn keys_created_on_the_command_line_work_on_the_proxy() {
    let data = tempfile::tempdir().unwrap();
    let out = relay_cmd(data.path(), &["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(data.path().join("relay.db").exists());

    let out = relay_cmd(
        data.path(),
        &[
            "admin",
            "create",
            "bob",
            "--password",
            "bob-password-1",
            "--user",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("created bob"));
    // The same name twice is refused.
    let out = relay_cmd(
        data.path(),
        &["admin", "create", "bob", "--password", "bob-password-1"],
    );
    assert!(!out.status.success());

    let out = relay_cmd(
        data.path(),
        &["keys", "create", "--user", "bob", "--name", "laptop"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(key.starts_with("sk-relay-") && key.len() == 9 + 43, "{key}");
    let out = relay_cmd(data.path(), &["keys", "create", "--user", "nobody"]);
    assert!(!out.status.success());

    let relay = Relay::start_with(RelayOptions {
        data_dir: Some(data.path().to_path_buf()),
        ..Default::default()
    })
    .await;
    relay.wait_key_active(&key).await;
    let r = relay
        .http
        .get(format!("{}/v1/models", relay.proxy))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = relay
        .http
        .get(format!("{}/v1/models", relay.proxy))
        .bearer_auth("sk-relay-wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[test]
fn check_config_validates_files() {
    let data = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = relay_cmd(
        data.path(),
        &[
            "check-config",
            root.join("conf/relay.example.toml").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let bad = data.path().join("bad.toml");
    std::fs::write(&bad, "proxy_addr = \"not an address\"\n").unwrap();
    let out = relay_cmd(data.path(), &["check-config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("proxy_addr"), "{}", text(&out));
    let typo = data.path().join("typo.toml");
    std::fs::write(&typo, "[upstream]\nmax_attempt = 3\n").unwrap();
    let out = relay_cmd(data.path(), &["check-config", typo.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("max_attempt"), "{}", text(&out));
}

#[test]
fn the_price_list_is_found_from_any_directory() {
    let data = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    // No conf/ here: the list built into the binary is used.
    let out = relay_cmd_in(elsewhere.path(), data.path(), &[], &["--check-config"]);
    assert!(out.status.success(), "{}", text(&out));
    // A conf/pricing.toml in the working directory is read before the built-in list.
    std::fs::create_dir(elsewhere.path().join("conf")).unwrap();
    std::fs::write(elsewhere.path().join("conf/pricing.toml"), "not toml [").unwrap();
    let out = relay_cmd_in(elsewhere.path(), data.path(), &[], &["--check-config"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("conf/pricing.toml"), "{}", text(&out));
    // A file named in the configuration must exist.
    let missing = data.path().join("prices.toml");
    let missing = missing.to_str().unwrap();
    let out = relay_cmd_in(
        data.path(),
        data.path(),
        &[("RELAY_PRICING_FILE", missing)],
        &["--check-config"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains(missing), "{}", text(&out));
}

#[test]
fn usage_retention_is_checked_before_the_relay_starts() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    for (days, ok) in [
        ("7", true),
        ("400", true),
        ("6", false),
        ("0", false),
        ("soon", false),
    ] {
        let out = relay_cmd_in(
            dir,
            dir,
            &[("RELAY_USAGE__RETENTION_DAYS", days)],
            &["--check-config"],
        );
        assert_eq!(out.status.success(), ok, "{days}: {}", text(&out));
        if !ok {
            assert!(
                text(&out).to_lowercase().contains("retention_days"),
                "{days}: {}",
                text(&out)
            );
        }
    }
}

#[test]
fn proxy_tls_files_are_checked_before_the_relay_starts() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let other_key = rcgen::KeyPair::generate().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (cert, key, other_key, junk) = (
        write("cert.pem", &cert.pem()),
        write("key.pem", &key.serialize_pem()),
        write("other.pem", &other_key.serialize_pem()),
        write("junk.pem", "not a PEM file\n"),
    );
    let check = |cert: &str, key: Option<&str>| {
        let mut env = vec![("RELAY_PROXY_TLS_CERT", cert)];
        if let Some(key) = key {
            env.push(("RELAY_PROXY_TLS_KEY", key));
        }
        relay_cmd_in(dir, dir, &env, &["--check-config"])
    };
    let out = check(&cert, Some(&key));
    assert!(out.status.success(), "{}", text(&out));
    let out = check(&cert, None);
    assert!(!out.status.success());
    assert!(text(&out).contains("set together"), "{}", text(&out));
    let out = check(&cert, Some(&other_key));
    assert!(!out.status.success());
    assert!(text(&out).contains("does not fit"), "{}", text(&out));
    let out = check(&junk, Some(&key));
    assert!(!out.status.success());
    assert!(text(&out).contains("proxy_tls_cert"), "{}", text(&out));
    let missing = dir.join("missing.pem").display().to_string();
    let out = check(&missing, Some(&key));
    assert!(!out.status.success());
    assert!(text(&out).contains("proxy_tls"), "{}", text(&out));
}

#[test]
fn what_the_relay_creates_is_readable_by_its_own_user_only() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let out = relay_cmd(&data, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = relay_cmd(&data, &["keys", "create", "--user", "admin"]);
    assert!(out.status.success(), "{}", text(&out));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data directory");
    let mut files = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            files += 1;
            assert_eq!(
                mode(&path) & 0o077,
                0,
                "{} is {:o}",
                path.display(),
                mode(&path)
            );
        }
    }
    assert!(files >= 3, "the database and the two key files");
}
