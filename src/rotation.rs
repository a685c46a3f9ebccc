//! Master-key rotation: a new master key version becomes current at once, and a background
//! job rewraps every data key (never a value: only data keys are unwrapped) from the older
//! versions to it. The job's position is committed with each batch it rewraps, so it resumes
//! after a crash where it stopped. Reads keep working throughout: every wrapped key names the
//! version that wrapped it, and the keyring keeps older versions until the job is done.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::keyring::{
    AwsSettings, Keyring, KeyringError, MasterKeySpec, StoredKey, WrapContext, make_key_check,
    verify_key_check,
};
use crate::model::{Action, AuditDraft, EnvelopeRecord, SecretId, Time};
use crate::runner::Runner;
use crate::store::{Guard, MetaKey, Store, StoreError, Transaction, Write, load_meta, put_meta};

/// The data directory's master key versions and its rotation job, kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringState {
    /// The version that wraps new data keys.
    pub current: u32,
    /// Every version, retired ones included (their keys are no longer needed).
    pub versions: Vec<KeyVersion>,
    /// The latest rotation job, running or finished.
    pub rotation: Option<RotationJob>,
}

/// One master key version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    /// Version number, from 1.
    pub version: u32,
    /// Where the key is.
    pub spec: MasterKeySpec,
    /// The key's id, as recorded in the keys it wraps.
    pub key_id: String,
    /// A random key wrapped by this version: unwrapping it at startup proves the key is right.
    pub check: Vec<u8>,
    /// When the last data key it wrapped was rewrapped away from it.
    pub retired_at: Option<Time>,
}

/// A rotation job's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationJob {
    /// Job id.
    pub id: String,
    /// The version every data key is rewrapped to.
    pub target: u32,
    /// When it started.
    pub started_at: Time,
    /// When it finished.
    pub finished_at: Option<Time>,
    /// Envelopes when it started.
    pub total: u64,
    /// Data keys rewrapped so far.
    pub rewrapped: u64,
    /// Pass over the envelopes (a pass that rewraps nothing ends the job).
    pub pass: u32,
    /// Data keys rewrapped in this pass.
    pub pass_rewrapped: u64,
    /// Last envelope (secret id, version) handled in this pass.
    pub cursor: Option<(SecretId, u32)>,
}

crate::postcard_meta!(KeyringState, MetaKey::Keyring);
// The audit seed, wrapped by the keyring (rewrapped when a rotation finishes).
crate::postcard_meta!(StoredKey, MetaKey::AuditSeed);

impl KeyringState {
    /// The state stored in `store`, if any.
    pub async fn load(store: &dyn Store) -> Result<Option<Self>, RotationError> {
        Ok(load_meta::<Self>(store).await?.map(|meta| meta.value))
    }

    /// The state stored in `store`, with the guard that it is still the one read.
    async fn load_for_update(store: &dyn Store) -> Result<(Self, Guard), RotationError> {
        let meta = load_meta::<Self>(store)
            .await?
            .ok_or(RotationError::CorruptState)?;
        let read = meta.guard();
        Ok((meta.value, read))
    }

    /// The write that stores this state.
    pub fn write(&self) -> Result<Write, RotationError> {
        Ok(put_meta(self)?)
    }

    /// The record of `version`.
    pub fn version(&self, version: u32) -> Option<&KeyVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// True while a rotation job is unfinished.
    pub fn rotating(&self) -> bool {
        self.rotation
            .as_ref()
            .is_some_and(|job| job.finished_at.is_none())
    }
}

/// Errors of rotation.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// A job is already running.
    #[error("master key rotation {0} is still running")]
    InProgress(String),
    /// No such job.
    #[error("no rotation job {0}")]
    NoSuchJob(String),
    /// The stored keyring state does not decode.
    #[error("corrupt keyring state in the data directory")]
    CorruptState,
    /// A master key failed.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a rotation gets its new key from, and how it works.
#[derive(Debug, Clone)]
pub struct RotationSettings {
    /// The configured master key: the target of the next rotation. A local key gets a new
    /// file next to the configured one (`<path>.v<N>`); a KMS key is used as it is (the same
    /// key id again rewraps onto its newest backing key after a KMS-side rotation).
    pub target: MasterKeySpec,
    /// How to reach KMS.
    pub aws: AwsSettings,
    /// Envelopes rewrapped per commit.
    pub batch: usize,
    /// A pause after each batch: paces the rewrap (KMS request quotas, a busy disk).
    pub pause: std::time::Duration,
    /// Whether a rotation may create the new version's local key file. Not when processes
    /// share the store: each must find the same file, put there by the operator.
    pub create_local: bool,
}

/// Starts, runs and reports rotation jobs.
pub struct Rotator {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    settings: RotationSettings,
    /// Whose turn it is to run the rewrap job; its commits carry the turn's fence.
    runner: Arc<Runner>,
    /// Serializes job starts (and a job's bookkeeping against a new start).
    control: tokio::sync::Mutex<()>,
    /// Whether this process runs the job now.
    running: std::sync::atomic::AtomicBool,
}

impl Rotator {
    /// A rotator over `store` and `keyring`, running the job when `runner` holds the turn.
    pub fn new(
        store: Arc<dyn Store>,
        keyring: Arc<Keyring>,
        settings: RotationSettings,
        runner: Arc<Runner>,
    ) -> Self {
        Self {
            store,
            keyring,
            settings,
            runner,
            control: tokio::sync::Mutex::new(()),
            running: Default::default(),
        }
    }

    /// Brings this process's keyring to `state`, which another process sharing the store may
    /// have changed (a rotation started or finished there): opens the versions it lacks, each
    /// proven by its key-check record, makes `state.current` current and forgets retired ones.
    pub async fn follow(&self, state: &KeyringState) -> Result<(), RotationError> {
        let held = self.keyring.versions();
        for v in &state.versions {
            if v.retired_at.is_some() {
                if held.contains(&v.version) && v.version != state.current {
                    self.keyring.remove(v.version);
                }
                continue;
            }
            if held.contains(&v.version) {
                continue;
            }
            let (key, _) = v.spec.open(&self.settings.aws, false).await?;
            if key.key_id() != v.key_id {
                return Err(RotationError::Keyring(KeyringError::ForeignKey {
                    found: key.key_id().to_string(),
                    version: v.version,
                }));
            }
            verify_key_check(&*key, &v.check).await?;
            tracing::info!(version = v.version, key = %v.spec, "master key version opened");
            self.keyring.add(v.version, key, false);
        }
        self.keyring.make_current(state.current);
        Ok(())
    }

    /// [`follow`](Self::follow)s the stored state.
    pub async fn follow_stored(&self) -> Result<(), RotationError> {
        let state = KeyringState::load(&*self.store)
            .await?
            .ok_or(RotationError::CorruptState)?;
        self.follow(&state).await
    }

    /// Creates the next master key version from the configured master key, makes it current,
    /// and starts the rewrap job. `audit` is committed with the new state.
    pub async fn start(
        self: &Arc<Self>,
        mut audit: AuditDraft,
    ) -> Result<RotationJob, RotationError> {
        let _guard = self.control.lock().await;
        let (mut state, read) = KeyringState::load_for_update(&*self.store).await?;
        if let Some(job) = state.rotation.as_ref().filter(|_| state.rotating()) {
            return Err(RotationError::InProgress(job.id.clone()));
        }
        let version = state.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let spec = match &self.settings.target {
            MasterKeySpec::Local { path } => {
                let mut file = path.clone().into_os_string();
                file.push(format!(".v{version}"));
                MasterKeySpec::Local { path: file.into() }
            }
            aws @ MasterKeySpec::AwsKms { .. } => aws.clone(),
        };
        let (key, _) = spec
            .open(&self.settings.aws, self.settings.create_local)
            .await?;
        let check = make_key_check(&*key).await?;
        let job = RotationJob {
            id: uuid::Uuid::new_v4().to_string(),
            target: version,
            started_at: Time::now(),
            finished_at: None,
            total: self.store.envelope_count().await?,
            rewrapped: 0,
            pass: 1,
            pass_rewrapped: 0,
            cursor: None,
        };
        state.versions.push(KeyVersion {
            version,
            spec: spec.clone(),
            key_id: key.key_id().to_string(),
            check,
            retired_at: None,
        });
        state.current = version;
        state.rotation = Some(job.clone());
        audit.version = Some(version);
        audit.reason = format!(
            "new master key version {version}: {spec}; rewrap job {}",
            job.id
        );
        // Unwrappable from now on; current only once the state that names it is durable.
        self.keyring.add(version, key.clone(), false);
        self.store
            .commit(Transaction {
                charges: Vec::new(),
                guards: vec![read],
                writes: vec![state.write()?],
                audit: Some(audit),
            })
            .await?;
        self.keyring.add(version, key, true);
        tracing::info!(version, job = %job.id, "master key rotation started");
        self.spawn();
        Ok(job)
    }

    /// The job `id`, or the latest one.
    pub async fn status(&self, id: Option<&str>) -> Result<RotationJob, RotationError> {
        let state = KeyringState::load(&*self.store)
            .await?
            .ok_or(RotationError::CorruptState)?;
        match (state.rotation, id) {
            (Some(job), None) => Ok(job),
            (Some(job), Some(id)) if job.id == id => Ok(job),
            (_, id) => Err(RotationError::NoSuchJob(
                id.map_or_else(|| "has run yet".to_string(), str::to_string),
            )),
        }
    }

    /// Runs the unfinished job, if there is one, while this process holds the turn (called
    /// after a start, and on every turn of the background runner: a job whose runner died
    /// resumes in whichever process holds the turn next).
    pub async fn resume(self: &Arc<Self>) -> Result<(), RotationError> {
        if self.runner.fence().is_none() || self.running.load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(());
        }
        let state = KeyringState::load(&*self.store).await?;
        if let Some(job) = state.filter(|s| s.rotating()).and_then(|s| s.rotation) {
            tracing::info!(job = %job.id, "resuming the unfinished master key rotation");
            self.spawn();
        }
        Ok(())
    }

    fn spawn(self: &Arc<Self>) {
        if self.runner.fence().is_some()
            && !self.running.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tokio::spawn(self.clone().run());
        }
    }

    async fn run(self: Arc<Self>) {
        loop {
            match self.step().await {
                Ok(true) => {
                    if !self.settings.pause.is_zero() {
                        tokio::time::sleep(self.settings.pause).await;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    // Transient (KMS unavailable, store busy): try again shortly.
                    tracing::warn!(error = %e, "master key rewrap step failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
        self.running
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Rewraps one batch, or finishes the pass or the job. False when there is nothing left
    /// or this process does not hold the turn.
    async fn step(&self) -> Result<bool, RotationError> {
        let _guard = self.control.lock().await;
        if self.runner.fence().is_none() {
            return Ok(false);
        }
        let (mut state, read) = KeyringState::load_for_update(&*self.store).await?;
        let Some(mut job) = state.rotation.clone().filter(|_| state.rotating()) else {
            return Ok(false);
        };
        // The job may have been started by another process: its target version too.
        self.follow(&state).await?;
        let batch = self
            .store
            .envelopes_after(job.cursor, self.settings.batch.max(1))
            .await?;
        let Some(last) = batch.last().map(|e| (e.secret_id, e.version)) else {
            if job.pass_rewrapped > 0 {
                // Something was still wrapped by an older version: go over everything again,
                // until a pass finds nothing left to do.
                job.pass += 1;
                job.pass_rewrapped = 0;
                job.cursor = None;
                state.rotation = Some(job);
                self.commit(vec![state.write()?], vec![read], None).await?;
                return Ok(true);
            }
            self.finish(state, read, job).await?;
            return Ok(false);
        };
        let mut guards = vec![read];
        let mut writes = Vec::new();
        for envelope in batch {
            if envelope.wrapped_key.key_version == job.target {
                continue;
            }
            let rewrapped = self.rewrap(&envelope, job.target).await?;
            guards.push(Guard::envelope(
                envelope.secret_id,
                envelope.version,
                Some(&envelope),
            ));
            writes.push(Write::PutEnvelope(rewrapped));
        }
        let count = writes.len() as u64;
        job.cursor = Some(last);
        job.rewrapped += count;
        job.pass_rewrapped += count;
        state.rotation = Some(job);
        writes.push(state.write()?);
        match self.commit(writes, guards, None).await {
            // An envelope changed under us (rotated or revoked): read the batch again.
            Err(RotationError::Store(StoreError::Conflict)) => Ok(true),
            other => other.map(|()| true),
        }
    }

    async fn rewrap(
        &self,
        envelope: &EnvelopeRecord,
        target: u32,
    ) -> Result<EnvelopeRecord, RotationError> {
        let context = WrapContext::SecretVersion {
            tenant: envelope.tenant.clone(),
            secret_id: envelope.secret_id,
            version: envelope.version,
        };
        let data_key = self.keyring.unwrap(&envelope.wrapped_key, &context).await?;
        let mut out = envelope.clone();
        out.wrapped_key = self.keyring.wrap_with(target, &data_key, &context).await?;
        Ok(out)
    }

    /// Rewraps the audit seed, retires every older version and records the end of the job.
    async fn finish(
        &self,
        mut state: KeyringState,
        read: Guard,
        mut job: RotationJob,
    ) -> Result<(), RotationError> {
        let mut writes = Vec::new();
        let mut guards = vec![read];
        if let Some(meta) = load_meta::<StoredKey>(&*self.store).await? {
            let seed = &meta.value;
            if seed.wrapped.key_version != job.target {
                let key = seed.unwrap(&self.keyring, &WrapContext::AuditSeed).await?;
                let wrapped = self
                    .keyring
                    .wrap_with(job.target, &key, &WrapContext::AuditSeed)
                    .await?;
                writes.push(put_meta(&StoredKey { wrapped })?);
                guards.push(meta.guard());
            }
        }
        let now = Time::now();
        let mut retired = Vec::new();
        for v in &mut state.versions {
            if v.version != job.target && v.retired_at.is_none() {
                v.retired_at = Some(now);
                retired.push(v.version);
            }
        }
        job.finished_at = Some(now);
        state.rotation = Some(job.clone());
        writes.push(state.write()?);
        let mut audit = AuditDraft::new(Action::Rewrap, None, None);
        audit.version = Some(job.target);
        audit.reason = format!(
            "rotation {} done: {} data keys rewrapped to master key version {}; retired versions {retired:?}",
            job.id, job.rewrapped, job.target
        );
        self.commit(writes, guards, Some(audit)).await?;
        for version in &retired {
            self.keyring.remove(*version);
        }
        let target_spec = state.version(job.target).map(|v| v.spec.clone());
        let files: BTreeMap<u32, String> = state
            .versions
            .iter()
            .filter(|v| retired.contains(&v.version) && Some(&v.spec) != target_spec.as_ref())
            .map(|v| (v.version, v.spec.to_string()))
            .collect();
        tracing::info!(
            job = %job.id,
            rewrapped = job.rewrapped,
            no_longer_needed = ?files,
            "master key rotation finished; the retired keys are no longer needed"
        );
        Ok(())
    }

    /// Commits a step of the job, fenced by the turn (a lost turn reads as a conflict).
    async fn commit(
        &self,
        writes: Vec<Write>,
        mut guards: Vec<Guard>,
        audit: Option<AuditDraft>,
    ) -> Result<(), RotationError> {
        guards.push(self.runner.fence().ok_or(StoreError::Conflict)?);
        self.store
            .commit(Transaction {
                charges: Vec::new(),
                guards,
                writes,
                audit,
            })
            .await
            .map(drop)
            .map_err(RotationError::from)
    }
}
