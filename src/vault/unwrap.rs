//! Unwrapping a data key, whatever master-key version wrapped it: one this process has not
//! opened yet (another process sharing the store added it), or one retired since the envelope
//! was read (a rewrap moved the stored envelope to a newer version meanwhile, and the
//! rotation's end made this process forget the old one).

use std::future::Future;

use super::error::{DecryptFailure, VaultError};
use crate::crypto::SymmetricKey;
use crate::keyring::{Keyring, KeyringError, WrapContext};
use crate::model::EnvelopeRecord;
use crate::store::Store;

/// Unwraps `envelope`'s data key. When the keyring does not hold the version that wrapped
/// it, `follow` first opens the versions the store records; if the version is still not
/// held (it was retired), the envelope as the store holds it now is unwrapped instead: a
/// rewrap changes the wrapping, never the data key, and the wrapping is bound to the
/// secret's tenant, id and version (`context`).
pub(super) async fn unwrap_data_key<F: Future<Output = ()>>(
    keyring: &Keyring,
    store: &dyn Store,
    follow: impl FnOnce() -> F,
    envelope: &EnvelopeRecord,
    context: &WrapContext,
) -> Result<SymmetricKey, VaultError> {
    let foreign =
        |r: &Result<SymmetricKey, KeyringError>| matches!(r, Err(KeyringError::ForeignKey { .. }));
    let mut unwrapped = keyring.unwrap(&envelope.wrapped_key, context).await;
    if foreign(&unwrapped) {
        follow().await;
        unwrapped = keyring.unwrap(&envelope.wrapped_key, context).await;
    }
    if foreign(&unwrapped)
        && let Some(stored) = store.envelope(envelope.secret_id, envelope.version).await?
        && stored.wrapped_key != envelope.wrapped_key
    {
        unwrapped = keyring.unwrap(&stored.wrapped_key, context).await;
    }
    unwrapped.map_err(|e| match e {
        KeyringError::Unwrap | KeyringError::ForeignKey { .. } => {
            VaultError::Decrypt(DecryptFailure::Unwrap(e))
        }
        other => VaultError::Keyring(other),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::crypto;
    use crate::keyring::{LocalMasterKey, MasterKey};
    use crate::model::{SecretId, TenantId, Time};
    use crate::store::{Engine, Transaction, Write};

    /// A copy of an envelope read before a rewrap moved it to version 2 and the rotation's
    /// end retired version 1: its data key unwraps from the envelope as stored now. Without
    /// a newer stored envelope it fails as any failed unwrap does; the stored versions are
    /// opened first, once.
    #[tokio::test]
    async fn a_copy_wrapped_by_a_retired_version_unwraps_from_the_stored_envelope() {
        let master = || -> Arc<dyn MasterKey> {
            let key = SymmetricKey::generate().unwrap();
            Arc::new(LocalMasterKey::from_key(&key).unwrap())
        };
        let keyring = Keyring::new(BTreeMap::from([(1, master())]), 1);
        keyring.add(2, master(), true);
        let tenant = TenantId::parse("t").unwrap();
        let secret_id = SecretId::generate();
        let context = WrapContext::SecretVersion {
            tenant: tenant.clone(),
            secret_id,
            version: 1,
        };
        let data_key = SymmetricKey::generate().unwrap();
        let sealed = crypto::seal(&data_key, b"sk-value", b"aad").unwrap();
        let envelope = |wrapped_key| EnvelopeRecord {
            secret_id,
            tenant: tenant.clone(),
            version: 1,
            wrapped_key,
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext.clone(),
            created_at: Time::from_micros(1),
            rev: Default::default(),
        };
        let copy = envelope(keyring.wrap_with(1, &data_key, &context).await.unwrap());
        let rewrapped = envelope(keyring.wrap_with(2, &data_key, &context).await.unwrap());
        keyring.remove(1);
        let dir = tempfile::tempdir().unwrap();
        let store = Engine::default().open(dir.path()).await.unwrap();
        let follows = AtomicUsize::new(0);
        let follow = || async {
            follows.fetch_add(1, Ordering::SeqCst);
        };
        // Nothing newer stored: the failure of any unwrap.
        let refused = unwrap_data_key(&keyring, &*store, follow, &copy, &context).await;
        assert!(matches!(
            refused.map(drop),
            Err(VaultError::Decrypt(DecryptFailure::Unwrap(_)))
        ));
        store
            .commit(Transaction {
                writes: vec![Write::PutEnvelope(rewrapped)],
                ..Default::default()
            })
            .await
            .unwrap();
        let key = unwrap_data_key(&keyring, &*store, follow, &copy, &context)
            .await
            .unwrap();
        let opened = crypto::open(&key, &sealed, b"aad").unwrap();
        assert_eq!(opened.expose_secret(), b"sk-value");
        assert_eq!(follows.load(Ordering::SeqCst), 2);
        store.close().await.unwrap();
    }
}
