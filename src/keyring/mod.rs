//! Master keys: they wrap and unwrap per-version data keys.
//!
//! A [`MasterKey`] is one key (a local key file, or an AWS KMS key). The [`Keyring`] holds the
//! data directory's master key *versions*: the current one wraps new data keys; older ones
//! stay available to unwrap until a master-key rotation has rewrapped every data key. Every
//! wrap binds its [`WrapContext`] (tenant, secret id, version), and unwrap needs the same
//! context. This module is the only one that reads key files or talks to AWS.

mod aws;
mod cache;
mod local;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

pub use self::aws::{AwsKmsMasterKey, AwsSettings};
pub use self::cache::{CacheSettings, DataKeyCache};
pub use self::local::LocalMasterKey;
use crate::crypto::{self, CryptoError, SymmetricKey};
use crate::model::{SecretId, TenantId, WrappedKey};

/// Associated-data label of a wrapped data key.
const WRAP_AAD_LABEL: &str = "byokd/v1/wrapped-data-key";

/// Errors of master-key operations.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The key file could not be read or created.
    #[error("master key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The group or others may read the key file.
    #[error("master key file {path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold exactly 32 bytes.
    #[error("master key file {path} must hold exactly 32 bytes, found {len}")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A data key names a master key version this keyring does not have, or another key id.
    #[error(
        "data key was wrapped by master key {found} (version {version}), which this keyring does not hold"
    )]
    ForeignKey {
        /// The key id recorded with the wrapped key.
        found: String,
        /// The version recorded with the wrapped key.
        version: u32,
    },
    /// A wrapped key did not unwrap: wrong key, wrong context or altered bytes.
    #[error("data key unwrap failed")]
    Unwrap,
    /// The key service cannot be reached or is throttling (retried within the deadline).
    #[error("key service unavailable: {0}")]
    Unavailable(String),
    /// The key exists but cannot be used: disabled, pending deletion, not found, or the
    /// credentials lack permission.
    #[error("master key unusable: {0}")]
    KeyUnusable(String),
    /// HKDF refused to derive a key (only possible for output lengths byokd never asks for).
    #[error("key derivation failed")]
    Derive,
    /// The crypto core failed (e.g. the random number generator).
    #[error(transparent)]
    Crypto(CryptoError),
}

/// What a wrapped data key is bound to. Unwrapping needs the same context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WrapContext {
    /// The data key of one secret version.
    SecretVersion {
        /// The secret's tenant.
        tenant: TenantId,
        /// The secret's id.
        secret_id: SecretId,
        /// The version.
        version: u32,
    },
    /// A master key version's key-check record, which proves at startup that the configured
    /// key is the one the data directory was created with.
    KeyCheck,
    /// The seed of the audit chain's key.
    AuditSeed,
}

impl WrapContext {
    /// The context as ordered key/value pairs: the associated data of a local wrap, and the
    /// encryption context of a KMS wrap.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        match self {
            WrapContext::SecretVersion {
                tenant,
                secret_id,
                version,
            } => vec![
                ("byokd:tenant", tenant.to_string()),
                ("byokd:secret_id", secret_id.to_string()),
                ("byokd:version", version.to_string()),
            ],
            WrapContext::KeyCheck => vec![("byokd:purpose", "key-check".to_string())],
            WrapContext::AuditSeed => vec![("byokd:purpose", "audit-seed".to_string())],
        }
    }

    fn associated_data(&self) -> Vec<u8> {
        let pairs = self.pairs();
        let fields: Vec<&[u8]> = pairs
            .iter()
            .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()])
            .collect();
        crypto::associated_data(WRAP_AAD_LABEL, &fields)
    }
}

/// One master key.
#[async_trait::async_trait]
pub trait MasterKey: Send + Sync {
    /// A public, stable identifier of the key (never key material).
    fn key_id(&self) -> &str;

    /// Wraps `key`, bound to `context`.
    async fn wrap(
        &self,
        key: &SymmetricKey,
        context: &WrapContext,
    ) -> Result<Vec<u8>, KeyringError>;

    /// Unwraps `blob`, which must have been wrapped with the same `context`.
    async fn unwrap(
        &self,
        blob: &[u8],
        context: &WrapContext,
    ) -> Result<SymmetricKey, KeyringError>;

    /// Whether the key service holds the key usable ([`KeyringError::KeyUnusable`] naming
    /// its state if not: a KMS key disabled or pending deletion). `Ok` where there is no
    /// service to ask (a local key) or it may not be asked.
    async fn usable(&self) -> Result<(), KeyringError> {
        Ok(())
    }
}

/// Where a master key version lives: recorded in the data directory so that every version
/// still needed can be opened at startup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MasterKeySpec {
    /// A local key file.
    Local {
        /// Its absolute path.
        path: PathBuf,
    },
    /// An AWS KMS key.
    AwsKms {
        /// Key id, ARN or alias.
        key_id: String,
        /// Region (default: the standard AWS chain).
        region: Option<String>,
        /// A KMS-compatible endpoint instead of AWS's.
        endpoint_url: Option<String>,
    },
}

impl fmt::Display for MasterKeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterKeySpec::Local { path } => write!(f, "local key file {}", path.display()),
            MasterKeySpec::AwsKms { key_id, .. } => write!(f, "AWS KMS key {key_id}"),
        }
    }
}

impl MasterKeySpec {
    /// Opens the key. A local key file is created if `create` is set and it does not exist.
    /// Returns the key and whether it was created.
    pub async fn open(
        &self,
        aws: &AwsSettings,
        create: bool,
    ) -> Result<(Arc<dyn MasterKey>, bool), KeyringError> {
        match self {
            MasterKeySpec::Local { path } => {
                let (key, created) = LocalMasterKey::load_or_create(path, create)?;
                Ok((Arc::new(key), created))
            }
            MasterKeySpec::AwsKms {
                key_id,
                region,
                endpoint_url,
            } => {
                let key = AwsKmsMasterKey::connect(
                    key_id,
                    region.as_deref(),
                    endpoint_url.as_deref(),
                    aws,
                )
                .await;
                Ok((Arc::new(key), false))
            }
        }
    }
}

/// The master key versions of a data directory.
pub struct Keyring {
    inner: RwLock<Versions>,
}

struct Versions {
    current: u32,
    keys: BTreeMap<u32, Arc<dyn MasterKey>>,
}

impl Keyring {
    /// A keyring with `keys` (by version), wrapping with version `current`.
    pub fn new(keys: BTreeMap<u32, Arc<dyn MasterKey>>, current: u32) -> Self {
        Self {
            inner: RwLock::new(Versions { current, keys }),
        }
    }

    /// The version that wraps new data keys, and its key id.
    pub fn current(&self) -> (u32, String) {
        let v = self.read();
        let id = v
            .keys
            .get(&v.current)
            .map(|k| k.key_id().to_string())
            .unwrap_or_default();
        (v.current, id)
    }

    /// The key of the current version.
    pub fn current_key(&self) -> Option<Arc<dyn MasterKey>> {
        let v = self.read();
        v.keys.get(&v.current).cloned()
    }

    /// Adds `key` as `version`; with `make_current`, new data keys are wrapped by it from now on.
    pub fn add(&self, version: u32, key: Arc<dyn MasterKey>, make_current: bool) {
        let mut v = self.write();
        v.keys.insert(version, key);
        if make_current {
            v.current = version;
        }
    }

    /// Wraps new data keys with `version` from now on, if this keyring has it.
    pub fn make_current(&self, version: u32) {
        let mut v = self.write();
        if v.keys.contains_key(&version) {
            v.current = version;
        }
    }

    /// The versions this keyring holds.
    pub fn versions(&self) -> Vec<u32> {
        self.read().keys.keys().copied().collect()
    }

    /// Forgets `version` (after every data key was rewrapped away from it).
    pub fn remove(&self, version: u32) {
        self.write().keys.remove(&version);
    }

    /// Wraps `key` with the current version.
    pub async fn wrap(
        &self,
        key: &SymmetricKey,
        context: &WrapContext,
    ) -> Result<WrappedKey, KeyringError> {
        let version = self.read().current;
        self.wrap_with(version, key, context).await
    }

    /// Wraps `key` with `version`.
    pub async fn wrap_with(
        &self,
        version: u32,
        key: &SymmetricKey,
        context: &WrapContext,
    ) -> Result<WrappedKey, KeyringError> {
        let master = self.key(version).ok_or(KeyringError::ForeignKey {
            found: String::new(),
            version,
        })?;
        Ok(WrappedKey {
            key_id: master.key_id().to_string(),
            key_version: version,
            blob: master.wrap(key, context).await?,
        })
    }

    /// Unwraps `wrapped` with the version that wrapped it.
    pub async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext,
    ) -> Result<SymmetricKey, KeyringError> {
        let master = self
            .key(wrapped.key_version)
            .filter(|k| k.key_id() == wrapped.key_id)
            .ok_or_else(|| KeyringError::ForeignKey {
                found: wrapped.key_id.clone(),
                version: wrapped.key_version,
            })?;
        master.unwrap(&wrapped.blob, context).await
    }

    fn key(&self, version: u32) -> Option<Arc<dyn MasterKey>> {
        self.read().keys.get(&version).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Versions> {
        // A panic while holding the lock cannot leave `Versions` half-updated (each update
        // is a single insert or remove), so a poisoned lock is still consistent.
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Versions> {
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A random key kept in the store, wrapped by the keyring under a fixed context (the audit
/// seed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// The wrapped key.
    pub wrapped: WrappedKey,
}

impl StoredKey {
    /// A fresh random key, and its record wrapped by the current version under `context`.
    pub async fn generate(
        keyring: &Keyring,
        context: &WrapContext,
    ) -> Result<(Self, SymmetricKey), KeyringError> {
        let key = SymmetricKey::generate().map_err(KeyringError::Crypto)?;
        let wrapped = keyring.wrap(&key, context).await?;
        Ok((Self { wrapped }, key))
    }

    /// The key, unwrapped under `context`.
    pub async fn unwrap(
        &self,
        keyring: &Keyring,
        context: &WrapContext,
    ) -> Result<SymmetricKey, KeyringError> {
        keyring.unwrap(&self.wrapped, context).await
    }
}

/// A key-check blob for `master`: a random key wrapped under [`WrapContext::KeyCheck`].
pub async fn make_key_check(master: &dyn MasterKey) -> Result<Vec<u8>, KeyringError> {
    let check = SymmetricKey::generate().map_err(KeyringError::Crypto)?;
    master.wrap(&check, &WrapContext::KeyCheck).await
}

/// Ok if `master` is usable and unwraps its key-check blob.
pub async fn verify_key_check(master: &dyn MasterKey, check: &[u8]) -> Result<(), KeyringError> {
    master.usable().await?;
    master.unwrap(check, &WrapContext::KeyCheck).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(byte: u8) -> Arc<dyn MasterKey> {
        Arc::new(LocalMasterKey::from_key(&SymmetricKey::from_slice(&[byte; 32]).unwrap()).unwrap())
    }

    fn ctx() -> WrapContext {
        WrapContext::SecretVersion {
            tenant: TenantId::parse("t").unwrap(),
            secret_id: SecretId::generate(),
            version: 1,
        }
    }

    #[tokio::test]
    async fn the_keyring_wraps_with_its_current_version_and_unwraps_with_any() {
        let keyring = Keyring::new(BTreeMap::from([(1, local(1))]), 1);
        let dk = SymmetricKey::generate().unwrap();
        let c = ctx();
        let old = keyring.wrap(&dk, &c).await.unwrap();
        assert_eq!(old.key_version, 1);
        keyring.add(2, local(2), true);
        let new = keyring.wrap(&dk, &c).await.unwrap();
        assert_eq!(
            (new.key_version, new.key_id.as_str()),
            (2, local(2).key_id())
        );
        for w in [&old, &new] {
            assert_eq!(
                keyring.unwrap(w, &c).await.unwrap().expose_secret(),
                dk.expose_secret()
            );
        }
        keyring.remove(1);
        assert!(matches!(
            keyring.unwrap(&old, &c).await,
            Err(KeyringError::ForeignKey { version: 1, .. })
        ));
        // A record claiming another key id for a known version is refused too.
        let mut forged = new.clone();
        forged.key_id = "local:0000".into();
        assert!(matches!(
            keyring.unwrap(&forged, &c).await,
            Err(KeyringError::ForeignKey { .. })
        ));
    }

    #[tokio::test]
    async fn key_checks_tell_keys_apart() {
        let check = make_key_check(&*local(1)).await.unwrap();
        verify_key_check(&*local(1), &check).await.unwrap();
        assert!(verify_key_check(&*local(2), &check).await.is_err());
        let keyring = Keyring::new(BTreeMap::from([(1, local(1))]), 1);
        let (seed, key) = StoredKey::generate(&keyring, &WrapContext::AuditSeed)
            .await
            .unwrap();
        let again = seed
            .unwrap(&keyring, &WrapContext::AuditSeed)
            .await
            .unwrap();
        assert_eq!(again.expose_secret(), key.expose_secret());
        assert!(seed.unwrap(&keyring, &WrapContext::KeyCheck).await.is_err());
    }
}
