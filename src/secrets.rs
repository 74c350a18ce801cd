//! Secrets at rest and on the wire: account credential encryption (AES-256-GCM), the key file,
//! password hashing (argon2id), relay API keys and random tokens.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rand::distr::{Alphanumeric, SampleString};
use rand::RngCore;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

/// Version tag of the ciphertext format written by [`SecretBox::encrypt`].
const FORMAT_VERSION: &str = "v1";
/// AES-GCM nonce length in bytes (96 bits, the size GCM is specified for).
const NONCE_LEN: usize = 12;
/// AES-GCM authentication tag length in bytes.
const TAG_LEN: usize = 16;
/// Prefix of every relay API key.
pub const API_KEY_PREFIX: &str = "sk-relay-";
/// Number of base62 characters after the prefix: 62^43 > 2^256.
const API_KEY_RANDOM_CHARS: usize = 43;
/// Characters of a key kept in its display prefix.
const DISPLAY_PREFIX_CHARS: usize = 12;

/// Why a secret could not be decrypted or a password hashed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The ciphertext was written with another encryption key.
    #[error("secret was encrypted with key id {found:?}, this relay holds key id {expected:?}")]
    WrongKeyId {
        /// Key id written in the ciphertext.
        found: String,
        /// Key id of this box.
        expected: String,
    },
    /// The stored text is not in the `v1:{key_id}:{base64}` format.
    #[error("malformed encrypted secret: {0}")]
    Malformed(&'static str),
    /// Authentication failed: tampered ciphertext or wrong key.
    #[error("secret could not be decrypted (tampered or wrong key)")]
    Decrypt,
    /// Password hashing failed.
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// AES-256-GCM box that encrypts account credentials at rest under one named key.
#[derive(Clone)]
pub struct SecretBox {
    key_id: String,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SecretBox {
    /// Builds a box from a key id (written into every ciphertext) and a 256-bit key.
    pub fn new(key_id: String, key: [u8; 32]) -> SecretBox {
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key));
        SecretBox { key_id, cipher }
    }

    /// The key id written into every ciphertext of this box.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Encrypts `plaintext` as `v1:{key_id}:{base64(nonce || ciphertext)}` with a fresh nonce.
    pub fn encrypt(&self, plaintext: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aad = self.aad();
        let payload = Payload {
            msg: plaintext.as_bytes(),
            aad: aad.as_bytes(),
        };
        // Encryption only fails when the message exceeds GCM's 64 GiB limit; credentials are
        // far below it, so an empty ciphertext (which would fail to decrypt) is never written.
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        format!("{aad}:{}", STANDARD.encode(blob))
    }

    /// Decrypts a string written by [`SecretBox::encrypt`]; wrong key id or tampering is an error.
    pub fn decrypt(&self, s: &str) -> Result<SecretString, SecretError> {
        let rest = s
            .strip_prefix(FORMAT_VERSION)
            .and_then(|r| r.strip_prefix(':'))
            .ok_or(SecretError::Malformed("unknown version"))?;
        // The base64 alphabet has no ':', so the last ':' ends the key id.
        let (key_id, encoded) = rest
            .rsplit_once(':')
            .ok_or(SecretError::Malformed("missing key id"))?;
        if key_id != self.key_id {
            return Err(SecretError::WrongKeyId {
                found: key_id.to_owned(),
                expected: self.key_id.clone(),
            });
        }
        let blob = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::Malformed("invalid base64"))?;
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(SecretError::Malformed("too short"));
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let aad = self.aad();
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Decrypt)?;
        let text = String::from_utf8(plain).map_err(|_| SecretError::Malformed("not UTF-8"))?;
        Ok(SecretString::from(text))
    }

    /// Associated data binding each ciphertext to its format version and key id.
    fn aad(&self) -> String {
        format!("{FORMAT_VERSION}:{}", self.key_id)
    }
}

/// Reads the 32-byte key stored hex-encoded at `path`, or creates it (mode 0600, parents too).
pub fn load_or_create_key_file(path: &Path) -> io::Result<[u8; 32]> {
    match fs::read_to_string(path) {
        Ok(text) => return parse_hex_key(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(format!("{}\n", hex::encode(key)).as_bytes())?;
            file.sync_all()?;
            Ok(key)
        }
        // Another process created it between our read and our create: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            parse_hex_key(&fs::read_to_string(path)?)
        }
        Err(e) => Err(e),
    }
}

/// A short public name for a key: the first 8 hex chars of its SHA-256 (a default key id).
pub fn key_fingerprint(key: &[u8; 32]) -> String {
    let digest = Sha256::digest(key);
    hex::encode(&digest[..4])
}

/// Parses a hex-encoded 32-byte key (as in the key file or an environment variable),
/// ignoring surrounding whitespace.
pub fn parse_hex_key(text: &str) -> io::Result<[u8; 32]> {
    let bytes = hex::decode(text.trim())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "key file is not hex-encoded"))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "key file does not hold exactly 32 bytes",
        )
    })
}

/// Hashes a password with argon2id (default parameters, random salt) into a PHC string.
pub fn hash_password(pw: &str) -> Result<String, SecretError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| SecretError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| SecretError::Hash(e.to_string()))
}

/// Whether `pw` matches the PHC string `phc`; a malformed hash never matches.
pub fn verify_password(pw: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|hash| {
            Argon2::default()
                .verify_password(pw.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A new relay API key: `sk-relay-` and 43 base62 characters from a CSPRNG (256 bits).
pub fn generate_api_key() -> String {
    let mut key = String::with_capacity(API_KEY_PREFIX.len() + API_KEY_RANDOM_CHARS);
    key.push_str(API_KEY_PREFIX);
    // `rand::rng()` is a CSPRNG seeded from the OS; `Alphanumeric` is uniform over [A-Za-z0-9].
    Alphanumeric.append_string(&mut rand::rng(), &mut key, API_KEY_RANDOM_CHARS);
    key
}

/// The stored form of a key: hex SHA-256 of `pepper || key`.
pub fn api_key_hash(pepper: &[u8], key: &str) -> String {
    // One definition: the proxy's key lookup hashes with the same function.
    relay_filters::api_key_auth::hash_api_key(pepper, key)
}

/// The display form of a key: its first 12 characters and an ellipsis.
pub fn api_key_prefix(key: &str) -> String {
    let mut prefix: String = key.chars().take(DISPLAY_PREFIX_CHARS).collect();
    prefix.push('…');
    prefix
}

/// 32 random bytes, base64url without padding (admin session tokens, CSRF tokens).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing unwrap is a failing test
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn test_box(id: &str, byte: u8) -> SecretBox {
        SecretBox::new(id.to_owned(), [byte; 32])
    }

    #[test]
    fn encrypt_round_trips_with_fresh_nonces() {
        let b = test_box("k1", 7);
        let a = b.encrypt("sk-ant-secret");
        let c = b.encrypt("sk-ant-secret");
        assert_ne!(a, c, "each encryption uses a new nonce");
        assert!(a.starts_with("v1:k1:"));
        assert!(!a.contains("sk-ant-secret"));
        assert_eq!(b.decrypt(&a).unwrap().expose_secret(), "sk-ant-secret");
        assert_eq!(b.decrypt(&c).unwrap().expose_secret(), "sk-ant-secret");
        assert_eq!(b.decrypt(&b.encrypt("")).unwrap().expose_secret(), "");
        assert_eq!(b.key_id(), "k1");
    }

    #[test]
    fn wrong_key_id_is_rejected() {
        let s = test_box("k1", 7).encrypt("x");
        assert!(matches!(
            test_box("k2", 7).decrypt(&s),
            Err(SecretError::WrongKeyId { .. })
        ));
    }

    #[test]
    fn wrong_key_with_same_id_is_rejected() {
        let s = test_box("k1", 7).encrypt("x");
        assert!(matches!(
            test_box("k1", 8).decrypt(&s),
            Err(SecretError::Decrypt)
        ));
    }

    #[test]
    fn tampering_is_rejected() {
        let b = test_box("k1", 7);
        let s = b.encrypt("credential");
        let (head, encoded) = s.rsplit_once(':').unwrap();
        let mut blob = STANDARD.decode(encoded).unwrap();
        for i in [0, NONCE_LEN, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            let forged = format!("{head}:{}", STANDARD.encode(&bad));
            assert!(matches!(b.decrypt(&forged), Err(SecretError::Decrypt)));
        }
        blob.truncate(NONCE_LEN + TAG_LEN - 1);
        let short = format!("{head}:{}", STANDARD.encode(&blob));
        assert!(matches!(b.decrypt(&short), Err(SecretError::Malformed(_))));
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let b = test_box("k1", 7);
        for s in [
            "",
            "v1",
            "v1:",
            "v1:k1",
            "v2:k1:AAAA",
            "v1:k1:!!!",
            "v1:k1:",
            "plain",
        ] {
            assert!(b.decrypt(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/secret.key");
        let first = load_or_create_key_file(&path).unwrap();
        let second = load_or_create_key_file(&path).unwrap();
        assert_eq!(first, second);
        assert_ne!(first, [0u8; 32]);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim(), hex::encode(first));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn corrupt_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        fs::write(&path, "abcd").unwrap();
        let err = load_or_create_key_file(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        fs::write(&path, "zz").unwrap();
        assert!(load_or_create_key_file(&path).is_err());
    }

    #[test]
    fn hex_keys_parse_and_fingerprint() {
        let key = parse_hex_key(&format!("  {}\n", "ab".repeat(32))).unwrap();
        assert_eq!(key, [0xab; 32]);
        assert!(parse_hex_key(&"ab".repeat(31)).is_err());
        let fp = key_fingerprint(&key);
        assert_eq!(fp.len(), 8);
        assert_eq!(fp, hex::encode(&Sha256::digest([0xab; 32])[..4]));
        assert_ne!(fp, key_fingerprint(&[0; 32]));
    }

    #[test]
    fn passwords_hash_and_verify() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &phc));
        assert!(!verify_password("wrong horse", &phc));
        assert!(!verify_password("correct horse", "not a phc string"));
        assert_ne!(phc, hash_password("correct horse").unwrap(), "random salt");
    }

    #[test]
    fn api_keys_have_the_documented_shape() {
        let k = generate_api_key();
        assert_eq!(k.len(), 9 + 43);
        assert!(k.starts_with("sk-relay-"));
        assert!(k[9..].chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(k, generate_api_key());
        assert_eq!(api_key_prefix(&k).chars().count(), 13);
        assert_eq!(api_key_prefix("sk-relay-Ab12345"), "sk-relay-Ab1…");
        assert_eq!(api_key_prefix("short"), "short…");
    }

    #[test]
    fn api_key_hash_is_peppered_sha256() {
        // sha256("") = e3b0c442...; with an empty pepper and key the hash is that value.
        assert_eq!(
            api_key_hash(b"", ""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // sha256("abc") split across pepper and key.
        assert_eq!(
            api_key_hash(b"ab", "c"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(api_key_hash(b"p1", "k"), api_key_hash(b"p2", "k"));
    }

    #[test]
    fn random_tokens_are_43_url_safe_chars() {
        let t = random_token();
        assert_eq!(t.len(), 43);
        assert!(t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_ne!(t, random_token());
    }
}
