//! Master keys: they wrap and unwrap per-version data keys.
//!
//! The [`MasterKey`] trait is the only way the rest of byokd reaches a master key; this module
//! is the only one that reads key files (and, later, talks to AWS KMS). Every wrap binds its
//! [`WrapContext`] (tenant, secret id, version), and unwrap needs the same context.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::crypto::{self, CryptoError, KEY_LEN, NONCE_LEN, Sealed, SymmetricKey};
use crate::model::{SecretId, TenantId, WrappedKey};

/// HKDF label of the local master key's key-wrapping key.
const WRAP_KEY_LABEL: &[u8] = b"byokd/v1/local-master-key/wrap";
/// HKDF label of the local master key's public key id.
const KEY_ID_LABEL: &[u8] = b"byokd/v1/local-master-key/id";
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
    /// The key file does not hold exactly 32 bytes.
    #[error("master key file {path} must hold exactly 32 bytes, found {len}")]
    BadKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// A data key was wrapped by another master key than this one.
    #[error("data key was wrapped by master key {found}, not by this one ({expected})")]
    ForeignKey {
        /// This master key's id.
        expected: String,
        /// The id recorded with the wrapped key.
        found: String,
    },
    /// A wrapped key did not unwrap: wrong key, wrong context or altered bytes.
    #[error("data key unwrap failed")]
    Unwrap,
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
    /// The key-check record that proves at startup that the configured master key is the one
    /// the data directory was created with.
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

/// A master key: the root of the key hierarchy.
#[async_trait::async_trait]
pub trait MasterKey: Send + Sync {
    /// A public, stable identifier of the key (never key material).
    fn key_id(&self) -> &str;

    /// Wraps `key`, bound to `context`.
    async fn wrap(
        &self,
        key: &SymmetricKey,
        context: &WrapContext,
    ) -> Result<WrappedKey, KeyringError>;

    /// Unwraps `wrapped`, which must have been wrapped with the same `context`.
    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext,
    ) -> Result<SymmetricKey, KeyringError>;
}

/// A master key held in a local file of 32 random bytes.
///
/// Data keys are wrapped with AES-256-GCM under a key-wrapping key derived from the file's
/// bytes with HKDF-SHA256; the key id is derived the same way under another label, so it
/// identifies the key without revealing anything about it.
pub struct LocalMasterKey {
    wrapping_key: SymmetricKey,
    key_id: String,
}

impl LocalMasterKey {
    /// Loads the key at `path`, creating it (mode 0600) with fresh random bytes if `create` is
    /// set and no file exists. Returns the key and whether it was created.
    pub fn load_or_create(path: &Path, create: bool) -> Result<(Self, bool), KeyringError> {
        let io = |source| KeyringError::Io {
            path: path.to_path_buf(),
            source,
        };
        match OpenOptions::new().read(true).open(path) {
            Ok(mut file) => {
                let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(KEY_LEN));
                file.read_to_end(&mut bytes).map_err(io)?;
                let key =
                    SymmetricKey::from_slice(&bytes).map_err(|_| KeyringError::BadKeyFile {
                        path: path.to_path_buf(),
                        len: bytes.len(),
                    })?;
                Ok((Self::from_key(&key)?, false))
            }
            Err(e) if e.kind() == ErrorKind::NotFound && create => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let key = SymmetricKey::generate().map_err(KeyringError::Crypto)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                file.write_all(key.expose_secret()).map_err(io)?;
                file.sync_all().map_err(io)?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io)?;
                }
                Ok((Self::from_key(&key)?, true))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A master key from its 32 bytes.
    pub fn from_key(key: &SymmetricKey) -> Result<Self, KeyringError> {
        let hkdf = Hkdf::<Sha256>::new(None, key.expose_secret());
        let mut wrap = zeroize::Zeroizing::new([0u8; KEY_LEN]);
        let mut id = [0u8; 8];
        hkdf.expand(WRAP_KEY_LABEL, wrap.as_mut())
            .and_then(|()| hkdf.expand(KEY_ID_LABEL, &mut id))
            .map_err(|_| KeyringError::Derive)?;
        Ok(Self {
            wrapping_key: SymmetricKey::from_array(wrap),
            key_id: format!("local:{}", hex::encode(id)),
        })
    }
}

#[async_trait::async_trait]
impl MasterKey for LocalMasterKey {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    async fn wrap(
        &self,
        key: &SymmetricKey,
        context: &WrapContext,
    ) -> Result<WrappedKey, KeyringError> {
        let sealed = crypto::seal(
            &self.wrapping_key,
            key.expose_secret(),
            &context.associated_data(),
        )
        .map_err(KeyringError::Crypto)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.ciphertext.len());
        blob.extend_from_slice(&sealed.nonce);
        blob.extend_from_slice(&sealed.ciphertext);
        Ok(WrappedKey {
            key_id: self.key_id.clone(),
            blob,
        })
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        context: &WrapContext,
    ) -> Result<SymmetricKey, KeyringError> {
        if wrapped.key_id != self.key_id {
            return Err(KeyringError::ForeignKey {
                expected: self.key_id.clone(),
                found: wrapped.key_id.clone(),
            });
        }
        if wrapped.blob.len() < NONCE_LEN {
            return Err(KeyringError::Unwrap);
        }
        let (nonce, ciphertext) = wrapped.blob.split_at(NONCE_LEN);
        let sealed = Sealed {
            nonce: nonce.try_into().map_err(|_| KeyringError::Unwrap)?,
            ciphertext: ciphertext.to_vec(),
        };
        let plain = crypto::open(&self.wrapping_key, &sealed, &context.associated_data())
            .map_err(|_| KeyringError::Unwrap)?;
        SymmetricKey::from_slice(plain.expose_secret()).map_err(|_| KeyringError::Unwrap)
    }
}

/// A random key kept in the store, wrapped by the master key under a fixed context: the
/// key-check record (proof at startup that the configured master key is the data directory's)
/// and the audit seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// The wrapped key; its `key_id` names the master key that wrapped it.
    pub wrapped: WrappedKey,
}

impl StoredKey {
    /// A fresh random key, and its record wrapped by `master` under `context`.
    pub async fn generate(
        master: &dyn MasterKey,
        context: &WrapContext,
    ) -> Result<(Self, SymmetricKey), KeyringError> {
        let key = SymmetricKey::generate().map_err(KeyringError::Crypto)?;
        let wrapped = master.wrap(&key, context).await?;
        Ok((Self { wrapped }, key))
    }

    /// The key, unwrapped by `master` under `context`.
    pub async fn unwrap(
        &self,
        master: &dyn MasterKey,
        context: &WrapContext,
    ) -> Result<SymmetricKey, KeyringError> {
        master.unwrap(&self.wrapped, context).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(version: u32) -> WrapContext {
        WrapContext::SecretVersion {
            tenant: TenantId::parse("t").unwrap(),
            secret_id: SecretId::generate(),
            version,
        }
    }

    fn master(byte: u8) -> LocalMasterKey {
        LocalMasterKey::from_key(&SymmetricKey::from_slice(&[byte; 32]).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn wrap_unwrap_round_trip_and_context_binding() {
        let m = master(1);
        let dk = SymmetricKey::generate().unwrap();
        let c = ctx(1);
        let w = m.wrap(&dk, &c).await.unwrap();
        assert_eq!(
            m.unwrap(&w, &c).await.unwrap().expose_secret(),
            dk.expose_secret()
        );
        let WrapContext::SecretVersion {
            tenant, secret_id, ..
        } = c.clone()
        else {
            unreachable!()
        };
        let other_version = WrapContext::SecretVersion {
            tenant,
            secret_id,
            version: 2,
        };
        assert!(matches!(
            m.unwrap(&w, &other_version).await,
            Err(KeyringError::Unwrap)
        ));
        assert!(matches!(
            m.unwrap(&w, &ctx(1)).await,
            Err(KeyringError::Unwrap)
        ));
    }

    #[tokio::test]
    async fn other_master_key_is_refused() {
        let dk = SymmetricKey::generate().unwrap();
        let c = ctx(1);
        let w = master(1).wrap(&dk, &c).await.unwrap();
        assert!(matches!(
            master(2).unwrap(&w, &c).await,
            Err(KeyringError::ForeignKey { .. })
        ));
        // Same id claimed, different key: still fails, without saying why.
        let mut forged = w.clone();
        forged.key_id = master(2).key_id().to_string();
        assert!(matches!(
            master(2).unwrap(&forged, &c).await,
            Err(KeyringError::Unwrap)
        ));
    }

    #[tokio::test]
    async fn key_file_is_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/master.key");
        assert!(LocalMasterKey::load_or_create(&path, false).is_err());
        let (a, created) = LocalMasterKey::load_or_create(&path, true).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap().len(), 32);
        let (b, created) = LocalMasterKey::load_or_create(&path, true).unwrap();
        assert!(!created);
        assert_eq!(a.key_id(), b.key_id());
        let (check, key) = StoredKey::generate(&a, &WrapContext::KeyCheck)
            .await
            .unwrap();
        let again = check.unwrap(&b, &WrapContext::KeyCheck).await.unwrap();
        assert_eq!(again.expose_secret(), key.expose_secret());
        assert!(
            check
                .unwrap(&master(9), &WrapContext::KeyCheck)
                .await
                .is_err()
        );
        assert!(check.unwrap(&b, &WrapContext::AuditSeed).await.is_err());

        std::fs::write(&path, [0u8; 31]).unwrap();
        assert!(matches!(
            LocalMasterKey::load_or_create(&path, true),
            Err(KeyringError::BadKeyFile { len: 31, .. })
        ));
    }
}
