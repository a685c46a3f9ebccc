//! Starting on a data directory, for the server and the offline commands alike: opening the
//! configured store, proving the master key versions it records (initialising a new one), the
//! audit chain's key, and the bootstrap admin when no principals are configured.

use crate::auth::{self, Principal, Principals, Role, TenantScope};
use crate::chain::ChainKey;
use crate::config::MasterKeyConfig;
use crate::keyring::{
    Keyring, KeyringError, MasterKeySpec, StoredKey, WrapContext, make_key_check, verify_key_check,
};
use crate::model::{PrincipalId, Revision};
use crate::rotation::{KeyVersion, KeyringState};
use crate::store::{
    Engine, Guard, MetaKey, MetaValue, Store, StoreError, Transaction, load_meta, put_meta,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::{Announcement, Announcer, ServeError, raise_open_files_limit};

/// Id of the admin principal created when no principals are configured.
pub const BOOTSTRAP_PRINCIPAL: &str = "bootstrap-admin";

/// Opens the store of a data directory (or the database) with the configured engine.
pub async fn open_store(engine: &Engine, data_dir: &Path) -> Result<Arc<dyn Store>, ServeError> {
    raise_open_files_limit();
    engine
        .open(data_dir)
        .await
        .map_err(|source| ServeError::OpenStore {
            path: engine
                .location(data_dir)
                .unwrap_or_else(|| data_dir.to_path_buf()),
            source,
        })
}

/// True if `current` is the configured master key, or (for a local key) a version that a
/// rotation created from it: `<path>.v<N>`, written next to the configured file.
/// A recorded local key file that is gone may have moved with its data (a restore into
/// another directory or host): the configured key file, or the file of the recorded name
/// beside it (`<path>.v<N>` of a rotation), stands in for it if its key id is the one
/// recorded. Key ids come from the key material, so no other key can pass.
pub(super) async fn moved_local_key(
    config: &MasterKeyConfig,
    recorded: &MasterKeySpec,
    key_id: &str,
) -> Option<Arc<dyn crate::keyring::MasterKey>> {
    let (MasterKeySpec::Local { path: configured }, MasterKeySpec::Local { path: recorded }) =
        (&config.spec, recorded)
    else {
        return None;
    };
    let mut candidates = vec![configured.clone()];
    if let (Some(dir), Some(name)) = (configured.parent(), recorded.file_name()) {
        candidates.push(dir.join(name));
    }
    for path in candidates {
        let spec = MasterKeySpec::Local { path: path.clone() };
        if let Ok((key, _)) = spec.open(&config.aws, false).await
            && key.key_id() == key_id
        {
            tracing::info!(
                recorded = %recorded.display(),
                found = %path.display(),
                key_id,
                "a master key file moved with its data; using it where the config points"
            );
            return Some(key);
        }
    }
    None
}

pub(super) fn rotated_from(current: &MasterKeySpec, configured: &MasterKeySpec) -> bool {
    match (current, configured) {
        (MasterKeySpec::Local { path: current }, MasterKeySpec::Local { path: configured }) => {
            let (current, configured) = (current.as_os_str(), configured.as_os_str());
            current == configured
                || current
                    .to_str()
                    .zip(configured.to_str())
                    .and_then(|(c, base)| c.strip_prefix(base)?.strip_prefix(".v"))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        }
        _ => current == configured,
    }
}

/// Whether `open_keys` may initialise a new data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initialise {
    /// Create the key-check record, the audit seed and (for a local key) the key file if
    /// this is a new data directory.
    IfNew,
    /// Only open what exists (offline tools, backups).
    Never,
}

/// The keys of a data directory, verified against it.
pub struct Keys {
    /// The master key versions.
    pub keyring: Arc<Keyring>,
    /// The audit chain's key.
    pub chain: Arc<ChainKey>,
    /// The stored keyring state (versions, rotation job).
    pub state: KeyringState,
}

/// Opens the master key versions recorded in the data directory and proves each is the one
/// recorded (by unwrapping its key-check record): a wrong, missing or unreachable key stops
/// startup here rather than failing requests later. A new data directory is initialised with
/// the configured key (creating a local key file if absent). Then unwraps (or creates) the
/// audit seed and derives the audit chain's key from it.
pub async fn open_keys(
    config: &MasterKeyConfig,
    store: &dyn Store,
    initialise: Initialise,
    data_dir: &Path,
) -> Result<Keys, ServeError> {
    let state = match KeyringState::load(store).await.map_err(rotation_error)? {
        Some(state) => state,
        None if initialise == Initialise::Never => {
            return Err(ServeError::NotInitialised(data_dir.to_path_buf()));
        }
        None => {
            let (key, created) = config.spec.open(&config.aws, true).await?;
            if created {
                tracing::info!(key = %config.spec, key_id = key.key_id(), "created local master key");
            }
            let check = make_key_check(&*key)
                .await
                .map_err(|e| key_error(&config.spec, key.key_id(), e))?;
            let state = KeyringState {
                current: 1,
                versions: vec![KeyVersion {
                    version: 1,
                    spec: config.spec.clone(),
                    key_id: key.key_id().to_string(),
                    check,
                    retired_at: None,
                }],
                rotation: None,
            };
            // Another process (or task) initialising the same store at once may win: then
            // its keyring is the one.
            match create_meta(store, &state).await? {
                Some(theirs) => theirs,
                None => state,
            }
        }
    };
    let mut keys = BTreeMap::new();
    for v in state.versions.iter().filter(|v| v.retired_at.is_none()) {
        let key = match v.spec.open(&config.aws, false).await {
            Ok((key, _)) => key,
            Err(KeyringError::Io { path, source })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                match moved_local_key(config, &v.spec, &v.key_id).await {
                    Some(key) => key,
                    None => {
                        return Err(ServeError::MasterKeyMissing {
                            path,
                            expected: v.key_id.clone(),
                        });
                    }
                }
            }
            Err(e) => return Err(e.into()),
        };
        if key.key_id() != v.key_id {
            return Err(ServeError::WrongMasterKey {
                expected: v.key_id.clone(),
                found: key.key_id().to_string(),
            });
        }
        verify_key_check(&*key, &v.check)
            .await
            .map_err(|e| key_error(&v.spec, &v.key_id, e))?;
        keys.insert(v.version, key);
    }
    let keyring = Arc::new(Keyring::new(keys, state.current));
    if state
        .version(state.current)
        .is_some_and(|v| !rotated_from(&v.spec, &config.spec))
    {
        tracing::warn!(
            configured = %config.spec,
            "the configured master key is not the current one; call RotateMasterKey to move to it"
        );
    }
    let stored = match load_meta::<StoredKey>(store).await? {
        Some(stored) => stored.value,
        None if initialise == Initialise::Never => {
            return Err(ServeError::NotInitialised(data_dir.to_path_buf()));
        }
        None => {
            let (stored, _) = StoredKey::generate(&keyring, &WrapContext::AuditSeed).await?;
            // The seed of another process initialising the store at once, if it won.
            create_meta(store, &stored).await?.unwrap_or(stored)
        }
    };
    let seed = stored
        .unwrap(&keyring, &WrapContext::AuditSeed)
        .await
        .map_err(|e| key_error(&config.spec, &keyring.current().1, e))?;
    Ok(Keys {
        keyring,
        chain: Arc::new(ChainKey::derive(&seed)),
        state,
    })
}

/// A key that failed its startup check, explained.
pub(super) fn key_error(spec: &MasterKeySpec, key_id: &str, e: KeyringError) -> ServeError {
    match e {
        KeyringError::Unwrap | KeyringError::ForeignKey { .. } => ServeError::KeyCheckFailed {
            key_id: key_id.to_string(),
        },
        KeyringError::Unavailable(detail) => ServeError::KeyUnreachable {
            key: spec.to_string(),
            detail,
        },
        KeyringError::KeyUnusable(detail) => ServeError::KeyUnusable {
            key: spec.to_string(),
            detail,
        },
        other => other.into(),
    }
}

pub(super) fn rotation_error(e: crate::rotation::RotationError) -> ServeError {
    match e {
        crate::rotation::RotationError::Store(e) => ServeError::Store(e),
        crate::rotation::RotationError::Keyring(e) => ServeError::Keyring(e),
        _ => ServeError::CorruptMeta { what: "keyring" },
    }
}

/// Stores `value` if the store holds none yet. If another process (or task) stored one
/// first, nothing is written and theirs is returned.
pub(super) async fn create_meta<T: MetaValue>(
    store: &dyn Store,
    value: &T,
) -> Result<Option<T>, ServeError> {
    replace_meta(store, value, None).await
}

/// Stores `value` if the stored one is still at revision `read` (`None`: there is none yet).
/// If another process (or task) changed it first, nothing is written and theirs is returned.
async fn replace_meta<T: MetaValue>(
    store: &dyn Store,
    value: &T,
    read: Option<Revision>,
) -> Result<Option<T>, ServeError> {
    let written = store
        .commit(Transaction {
            charges: Vec::new(),
            guards: vec![Guard::meta(T::KEY, read)],
            writes: vec![put_meta(value)?],
            audit: None,
        })
        .await;
    match written {
        Ok(_) => Ok(None),
        Err(StoreError::Conflict) => {
            let theirs = load_meta::<T>(store).await?.ok_or(StoreError::Conflict)?;
            Ok(Some(theirs.value))
        }
        Err(e) => Err(e.into()),
    }
}

/// The SHA-256 of the bootstrap admin's token (stored as its 32 bytes).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub(super) struct BootstrapAdmin(auth::TokenDigest);

crate::postcard_meta!(BootstrapAdmin, MetaKey::BootstrapAdmin);

/// With no principals configured: an admin principal whose token was printed once, at the
/// first start (or now, if asked to reset it).
pub(super) async fn bootstrap_principals(
    store: &dyn Store,
    reset: bool,
    announce: &Announcer,
) -> Result<Principals, ServeError> {
    let corrupt = || ServeError::CorruptMeta {
        what: "bootstrap-admin",
    };
    let stored = load_meta::<BootstrapAdmin>(store).await?;
    let digest: auth::TokenDigest = match stored {
        Some(stored) if !reset => stored.value.0,
        stored => {
            let token = crate::crypto::random_token(auth::PRINCIPAL_TOKEN_PREFIX)
                .map_err(ServeError::Rng)?;
            let digest = auth::token_digest(token.expose_secret());
            let read = stored.map(|s| s.revision);
            match replace_meta(store, &BootstrapAdmin(digest), read).await? {
                None => {
                    announce(Announcement::BootstrapToken {
                        principal: BOOTSTRAP_PRINCIPAL,
                        token: token.expose_secret(),
                    });
                    digest
                }
                // Another process initialising the store at once created it: its token is
                // the one (it printed it).
                Some(theirs) if !reset => theirs.0,
                // Another reset at once: this one's token was never stored.
                Some(_) => return Err(StoreError::Conflict.into()),
            }
        }
    };
    tracing::warn!(
        principal = BOOTSTRAP_PRINCIPAL,
        "no principals configured: serving the bootstrap admin only; configure [[principal]] tables for production"
    );
    let id = PrincipalId::parse(BOOTSTRAP_PRINCIPAL).map_err(|_| corrupt())?;
    Ok(Principals::new(vec![Principal {
        id,
        token_sha256: Some(digest),
        cert_ids: Default::default(),
        roles: [Role::Admin].into_iter().collect(),
        tenants: TenantScope::All,
        rate_limit: None,
    }]))
}
