//! Administration: backups and master key rotation.

use crate::auth::Operation;
use crate::backup::{BackupError, BackupHeader, BackupWriter};
use crate::crypto::{self, Sealed};
use crate::keyring::{Keyring, WrapContext};
use crate::model::{Action, Time, ValidationError};
use crate::rotation::{KeyringState, RotationError, RotationJob};
use crate::store::Store;
use std::sync::Arc;

use super::{BACKUP_TEMP_PREFIX, BackupFile, Caller, DecryptFailure, Vault, VaultError, value_aad};

impl Vault {
    /// Takes a backup: every record but leases, from one consistent state, into a
    /// temporary file in the data directory (deleted when the returned file is dropped).
    /// Writes wait while the records are copied. Admin only.
    pub async fn backup(&self, caller: &Caller) -> Result<BackupFile, VaultError> {
        operation!(self, caller, Action::Backup, |audit| {
            caller.authorize_global(Operation::Backup)?;
            // Recorded first, so that the backup holds the entry of its own taking.
            audit.reason = "backup started".into();
            self.record(audit.settle()).await?;
            let state = KeyringState::load(&*self.store)
                .await
                .map_err(VaultError::Rotation)?
                .ok_or(VaultError::Rotation(RotationError::CorruptState))?;
            let file = tempfile::Builder::new()
                .prefix(BACKUP_TEMP_PREFIX)
                .tempfile_in(&self.scratch_dir)
                .map_err(|e| VaultError::Backup(BackupError::Io(e)))?;
            let out = file
                .as_file()
                .try_clone()
                .map_err(|e| VaultError::Backup(BackupError::Io(e)))?;
            let head = self.store.audit_head().await?;
            let header = BackupHeader {
                created_at: Time::now().to_rfc3339(),
                byokd_version: env!("CARGO_PKG_VERSION").to_string(),
                audit_head_seq: head.as_ref().map_or(0, |h| h.seq),
                audit_head_hash: head
                    .as_ref()
                    .map(|h| hex::encode(h.hash))
                    .unwrap_or_default(),
                master_key_ids: state
                    .versions
                    .iter()
                    .filter(|v| v.retired_at.is_none())
                    .map(|v| v.key_id.clone())
                    .collect(),
            };
            let writer = BackupWriter::new(std::io::BufWriter::new(out), &header)
                .map_err(VaultError::Backup)?;
            let writer = Arc::new(std::sync::Mutex::new(Some(writer)));
            let sink_writer = writer.clone();
            // A backup nobody waits for any more stops copying.
            let stop = audit.stop_flag();
            self.store
                .export(Box::new(move |record| {
                    if stop.load(std::sync::atomic::Ordering::Acquire) {
                        return Err("the backup was abandoned".into());
                    }
                    let mut guard = sink_writer.lock().map_err(|_| "poisoned".to_string())?;
                    let w = guard.as_mut().ok_or("finished")?;
                    w.record(&record).map_err(|e| e.to_string())
                }))
                .await?;
            let writer =
                writer
                    .lock()
                    .ok()
                    .and_then(|mut w| w.take())
                    .ok_or(VaultError::Backup(BackupError::Format(
                        "writer lost".into(),
                    )))?;
            let (out, records) = writer.finish().map_err(VaultError::Backup)?;
            let out = out
                .into_inner()
                .map_err(|e| VaultError::Backup(BackupError::Io(e.into_error())))?;
            out.sync_all()
                .map_err(|e| VaultError::Backup(BackupError::Io(e)))?;
            Ok(BackupFile {
                file,
                records,
                header,
            })
        })
    }

    /// Starts a master-key rotation to the configured master key (admin).
    pub async fn rotate_master_key(&self, caller: &Caller) -> Result<RotationJob, VaultError> {
        operation!(self, caller, Action::RotateMasterKey, |audit| {
            caller.authorize_global(Operation::RotateMasterKey)?;
            self.rotator
                .start(audit.clone())
                .await
                .map_err(VaultError::Rotation)
        })
    }

    /// The progress of a master-key rotation (the latest, if `job_id` is empty).
    pub async fn rotation_status(
        &self,
        caller: &Caller,
        job_id: String,
    ) -> Result<RotationJob, VaultError> {
        operation!(self, caller, Action::GetRotationStatus, |audit| {
            // Master-key rotation concerns the whole vault, as RotateMasterKey does.
            caller.authorize_global(Operation::RotateMasterKey)?;
            let job_id = match job_id.as_str() {
                "" => None,
                id => Some(
                    uuid::Uuid::parse_str(id)
                        .map_err(|_| {
                            ValidationError::new("job_id", "not a rotation job id (a UUID)")
                        })?
                        .to_string(),
                ),
            };
            let job = self
                .rotator
                .status(job_id.as_deref())
                .await
                .map_err(VaultError::Rotation)?;
            audit.version = Some(job.target);
            self.record(audit.settle()).await?;
            Ok(job)
        })
    }
}

/// Unwraps every stored data key and opens every stored value (a restored data directory's
/// decrypt check). Returns how many versions opened; the first failure stops the check.
pub async fn check_envelopes(store: &dyn Store, keyring: &Keyring) -> Result<u64, VaultError> {
    let mut after = None;
    let mut checked = 0;
    loop {
        let page = store.envelopes_after(after, 256).await?;
        let Some(last) = page.last() else {
            return Ok(checked);
        };
        after = Some((last.secret_id, last.version));
        for envelope in &page {
            let context = WrapContext::SecretVersion {
                tenant: envelope.tenant.clone(),
                secret_id: envelope.secret_id,
                version: envelope.version,
            };
            let key = keyring
                .unwrap(&envelope.wrapped_key, &context)
                .await
                .map_err(|e| VaultError::Decrypt(DecryptFailure::Unwrap(e)))?;
            let sealed = Sealed {
                nonce: envelope.nonce,
                ciphertext: envelope.ciphertext.clone(),
            };
            crypto::open(
                &key,
                &sealed,
                &value_aad(&envelope.tenant, envelope.secret_id, envelope.version),
            )
            .map_err(|e| VaultError::Decrypt(DecryptFailure::Open(e)))?;
            checked += 1;
        }
    }
}
