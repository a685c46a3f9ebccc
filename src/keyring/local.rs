//! The local master key: a file of 32 random bytes.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hkdf::Hkdf;
use sha2::Sha256;

use super::{KeyringError, MasterKey, WrapContext};
use crate::crypto::{self, KEY_LEN, NONCE_LEN, Sealed, SymmetricKey};

/// HKDF label of the local master key's key-wrapping key.
const WRAP_KEY_LABEL: &[u8] = b"byokd/v1/local-master-key/wrap";
/// HKDF label of the local master key's public key id.
const KEY_ID_LABEL: &[u8] = b"byokd/v1/local-master-key/id";

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
    /// Loads the key at `path`, creating it (mode 0600, in a new file that must not exist
    /// yet) with fresh random bytes if `create` is set and no file exists. Returns the key and
    /// whether it was created.
    pub fn load_or_create(path: &Path, create: bool) -> Result<(Self, bool), KeyringError> {
        let io = |source| KeyringError::Io {
            path: path.to_path_buf(),
            source,
        };
        match OpenOptions::new().read(true).open(path) {
            Ok(mut file) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = file.metadata().map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(KeyringError::InsecureKeyFile {
                        path: path.to_path_buf(),
                        mode: mode & 0o777,
                    });
                }
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
                // Written whole under another name, then linked into place (which fails if
                // the name exists): a process creating the key at the same moment either
                // wins, or finds this one complete and loads it.
                let key = SymmetricKey::generate().map_err(KeyringError::Crypto)?;
                let mut partial = path.as_os_str().to_owned();
                partial.push(format!(".{}.partial", uuid::Uuid::new_v4().simple()));
                let partial = std::path::PathBuf::from(partial);
                let written = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&partial)
                    .and_then(|mut file| {
                        file.write_all(key.expose_secret())?;
                        file.sync_all()
                    })
                    .and_then(|()| std::fs::hard_link(&partial, path));
                let _ = std::fs::remove_file(&partial);
                match written {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                        return Self::load_or_create(path, false);
                    }
                    Err(e) => return Err(io(e)),
                }
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
    ) -> Result<Vec<u8>, KeyringError> {
        let sealed = crypto::seal(
            &self.wrapping_key,
            key.expose_secret(),
            &context.associated_data(),
        )
        .map_err(KeyringError::Crypto)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.ciphertext.len());
        blob.extend_from_slice(&sealed.nonce);
        blob.extend_from_slice(&sealed.ciphertext);
        Ok(blob)
    }

    async fn unwrap(
        &self,
        blob: &[u8],
        context: &WrapContext,
    ) -> Result<SymmetricKey, KeyringError> {
        if blob.len() < NONCE_LEN {
            return Err(KeyringError::Unwrap);
        }
        let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
        let sealed = Sealed {
            nonce: nonce.try_into().map_err(|_| KeyringError::Unwrap)?,
            ciphertext: ciphertext.to_vec(),
        };
        let plain = crypto::open(&self.wrapping_key, &sealed, &context.associated_data())
            .map_err(|_| KeyringError::Unwrap)?;
        SymmetricKey::from_slice(plain.expose_secret()).map_err(|_| KeyringError::Unwrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SecretId, TenantId};

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
        assert!(matches!(
            m.unwrap(&w, &WrapContext::KeyCheck).await,
            Err(KeyringError::Unwrap)
        ));
        assert!(matches!(
            master(2).unwrap(&w, &c).await,
            Err(KeyringError::Unwrap)
        ));
        assert!(matches!(
            m.unwrap(&w[..5], &c).await,
            Err(KeyringError::Unwrap)
        ));
    }

    #[test]
    fn key_ids_identify_keys_without_revealing_them() {
        assert_eq!(master(1).key_id(), master(1).key_id());
        assert_ne!(master(1).key_id(), master(2).key_id());
        assert!(master(1).key_id().starts_with("local:"));
        assert!(!master(1).key_id().contains("0101"));
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
        let dk = SymmetricKey::generate().unwrap();
        let w = a.wrap(&dk, &WrapContext::KeyCheck).await.unwrap();
        b.unwrap(&w, &WrapContext::KeyCheck).await.unwrap();

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            LocalMasterKey::load_or_create(&path, true),
            Err(KeyringError::InsecureKeyFile { mode: 0o640, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, [0u8; 31]).unwrap();
        assert!(matches!(
            LocalMasterKey::load_or_create(&path, true),
            Err(KeyringError::BadKeyFile { len: 31, .. })
        ));
    }
}
