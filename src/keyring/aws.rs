//! The AWS KMS master key (`aws-sdk-kms`).
//!
//! Data keys are wrapped with KMS `Encrypt` under the configured key id, ARN or alias, always
//! with an encryption context naming tenant, secret id and version; unwrap uses `Decrypt` with
//! the same context and key id, so KMS itself refuses a data key moved to another record.
//! Credentials come from the standard AWS chain (environment, profile, IMDS/ECS). Throttling
//! and network failures are retried with backoff by the SDK, within `operation_timeout`.

use std::collections::HashMap;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::KeyState;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use zeroize::Zeroizing;

use super::{KeyringError, MasterKey, WrapContext};
use crate::crypto::SymmetricKey;

/// How byokd talks to KMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwsSettings {
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Limit on one KMS operation, retries included.
    pub operation_timeout: Duration,
    /// Attempts per operation (1: no retries).
    pub max_attempts: u32,
}

impl Default for AwsSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(10),
            max_attempts: 3,
        }
    }
}

/// A master key in AWS KMS.
pub struct AwsKmsMasterKey {
    client: aws_sdk_kms::Client,
    /// The key as configured (id, ARN or alias), as sent to KMS.
    kms_key: String,
    /// `aws-kms:` and the configured key: byokd's id of this master key.
    key_id: String,
}

impl AwsKmsMasterKey {
    /// A client for `key_id` (id, ARN or alias). Nothing is sent until the first wrap or
    /// unwrap; the startup key check is the first.
    pub async fn connect(
        key_id: &str,
        region: Option<&str>,
        endpoint_url: Option<&str>,
        settings: &AwsSettings,
    ) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.connect_timeout)
                    .operation_timeout(settings.operation_timeout)
                    .build(),
            );
        if let Some(region) = region {
            loader = loader.region(Region::new(region.to_string()));
        }
        if let Some(url) = endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        Self::from_client(aws_sdk_kms::Client::new(&config), key_id)
    }

    /// A master key for `key_id` using an already configured client (e.g. with its own
    /// credentials provider).
    pub fn from_client(client: aws_sdk_kms::Client, key_id: &str) -> Self {
        Self {
            client,
            kms_key: key_id.to_string(),
            key_id: format!("aws-kms:{key_id}"),
        }
    }
}

fn encryption_context(context: &WrapContext) -> HashMap<String, String> {
    context
        .pairs()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[async_trait::async_trait]
impl MasterKey for AwsKmsMasterKey {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    async fn wrap(
        &self,
        key: &SymmetricKey,
        context: &WrapContext,
    ) -> Result<Vec<u8>, KeyringError> {
        let started = std::time::Instant::now();
        let result = self
            .client
            .encrypt()
            .key_id(&self.kms_key)
            .plaintext(Blob::new(key.expose_secret().to_vec()))
            .set_encryption_context(Some(encryption_context(context)))
            .send()
            .await
            .map_err(classify);
        observe("Encrypt", &result, started);
        let output = result?;
        output
            .ciphertext_blob
            .map(Blob::into_inner)
            .ok_or_else(|| KeyringError::Unavailable("KMS Encrypt returned no ciphertext".into()))
    }

    /// Asks KMS for the key's state (DescribeKey): a disabled key, or one pending deletion,
    /// fails every Decrypt, and the deletion date is the operator's deadline. Without
    /// permission to ask (`kms:DescribeKey`), the key check's Decrypt alone decides.
    async fn usable(&self) -> Result<(), KeyringError> {
        let started = std::time::Instant::now();
        let result = self
            .client
            .describe_key()
            .key_id(&self.kms_key)
            .send()
            .await;
        if let Err(SdkError::ServiceError(e)) = &result
            && e.err().code() == Some("AccessDeniedException")
        {
            tracing::debug!("no permission to describe the KMS key; its state is not checked");
            return Ok(());
        }
        let result = result.map_err(classify);
        observe("DescribeKey", &result, started);
        let described = result?;
        let Some(metadata) = described.key_metadata() else {
            return Ok(());
        };
        match metadata.key_state() {
            None | Some(KeyState::Enabled) => Ok(()),
            Some(KeyState::PendingDeletion) => {
                let when = metadata
                    .deletion_date()
                    .map(|d| format!(" on {d}"))
                    .unwrap_or_default();
                Err(KeyringError::KeyUnusable(format!(
                    "the KMS key is pending deletion{when}: cancel the deletion \
                     (CancelKeyDeletion, then EnableKey) or every value it wraps is lost"
                )))
            }
            Some(state) => Err(KeyringError::KeyUnusable(format!(
                "the KMS key is {}",
                state.as_str()
            ))),
        }
    }

    async fn unwrap(
        &self,
        blob: &[u8],
        context: &WrapContext,
    ) -> Result<SymmetricKey, KeyringError> {
        let started = std::time::Instant::now();
        let result = self
            .client
            .decrypt()
            .key_id(&self.kms_key)
            .ciphertext_blob(Blob::new(blob.to_vec()))
            .set_encryption_context(Some(encryption_context(context)))
            .send()
            .await
            .map_err(classify);
        observe("Decrypt", &result, started);
        let output = result?;
        let plaintext = Zeroizing::new(output.plaintext.map(Blob::into_inner).unwrap_or_default());
        SymmetricKey::from_slice(&plaintext).map_err(|_| KeyringError::Unwrap)
    }
}

/// Counts and times a KMS call by its result class.
fn observe<T>(
    operation: &'static str,
    result: &Result<T, KeyringError>,
    started: std::time::Instant,
) {
    let class = match result {
        Ok(_) => "ok",
        Err(KeyringError::Unwrap) => "unwrap_failed",
        Err(KeyringError::Unavailable(_)) => "unavailable",
        Err(_) => "unusable",
    };
    crate::metrics::global().kms(operation, class, started.elapsed());
}

/// Maps a KMS failure onto what the caller should make of it.
fn classify<E, R>(err: SdkError<E, R>) -> KeyringError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let detail = DisplayErrorContext(&err).to_string();
    match &err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("");
            match code {
                // The ciphertext or its context does not match: for byokd, a failed unwrap.
                "InvalidCiphertextException" | "IncorrectKeyException" => KeyringError::Unwrap,
                "DisabledException"
                | "KMSInvalidStateException"
                | "NotFoundException"
                | "AccessDeniedException"
                | "InvalidKeyUsageException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "IncompleteSignature" => KeyringError::KeyUnusable(detail),
                _ => KeyringError::Unavailable(detail),
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            KeyringError::Unavailable(detail)
        }
        _ => KeyringError::KeyUnusable(detail),
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_kms::config::http::HttpResponse;
    use aws_sdk_kms::error::ErrorMetadata;
    use aws_sdk_kms::operation::encrypt::EncryptError;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    use super::*;

    fn service_error(code: &str) -> SdkError<EncryptError, HttpResponse> {
        let err = EncryptError::generic(
            ErrorMetadata::builder()
                .code(code)
                .message("from KMS")
                .build(),
        );
        let status = StatusCode::try_from(400).unwrap();
        SdkError::service_error(err, HttpResponse::new(status, SdkBody::empty()))
    }

    #[test]
    fn kms_errors_map_to_what_the_caller_can_do() {
        for code in [
            "DisabledException",
            "KMSInvalidStateException",
            "NotFoundException",
            "AccessDeniedException",
        ] {
            assert!(
                matches!(classify(service_error(code)), KeyringError::KeyUnusable(_)),
                "{code}"
            );
        }
        for code in [
            "ThrottlingException",
            "KMSInternalException",
            "DependencyTimeoutException",
            "SomethingNew",
        ] {
            assert!(
                matches!(classify(service_error(code)), KeyringError::Unavailable(_)),
                "{code}"
            );
        }
        for code in ["InvalidCiphertextException", "IncorrectKeyException"] {
            assert!(
                matches!(classify(service_error(code)), KeyringError::Unwrap),
                "{code}"
            );
        }
        let timeout: SdkError<EncryptError, HttpResponse> = SdkError::timeout_error("deadline");
        assert!(matches!(classify(timeout), KeyringError::Unavailable(_)));
    }
}
