//! The gRPC client side of the command line: `byokd backup` reaches the running server,
//! streams its backup into a file and checks it before keeping it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::api::v1::{self as pb, vault_client::VaultClient};
use crate::backup::{BackupHeader, BackupReader};
use crate::config::Config;
use crate::offline::sync_parent;
use crate::server::ServeError;

/// How a client command reaches the running server.
pub struct Target {
    /// Server URL; `None`: from the config's listen address and TLS settings.
    pub url: Option<String>,
    /// Bearer token of an admin principal.
    pub token: crate::crypto::SecretToken,
    /// CA certificate to trust; `None`: the config's server certificate.
    pub ca: Option<PathBuf>,
    /// Name expected in the server's certificate.
    pub server_name: String,
    /// Client certificate and key, for mutual TLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

/// What `backup` wrote.
#[derive(Debug, Clone)]
pub struct BackupSummary {
    /// Records in the file.
    pub records: u64,
    /// Its size.
    pub bytes: u64,
    /// Its header.
    pub header: BackupHeader,
}

fn backup_error(e: impl std::fmt::Display) -> ServeError {
    ServeError::Backup(e.to_string())
}

async fn connect(
    config: &Config,
    target: &Target,
) -> Result<tonic::transport::Channel, ServeError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let url = match &target.url {
        Some(url) => url.clone(),
        None => {
            let mut addr = config.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{addr}")
        }
    };
    let mut endpoint = Endpoint::from_shared(url.clone()).map_err(backup_error)?;
    if url.starts_with("https://") {
        let ca = match (&target.ca, &config.tls) {
            (Some(ca), _) => ca.clone(),
            (None, Some(tls)) => tls.cert.clone(),
            (None, None) => return Err(ServeError::Backup("https needs --ca".into())),
        };
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| ServeError::Backup(format!("{}: {e}", p.display())))
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&ca)?))
            .domain_name(target.server_name.clone());
        if let Some((cert, key)) = &target.client_identity {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).map_err(backup_error)?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| ServeError::Backup(format!("cannot connect to {url}: {e}")))
}

/// Takes an online backup from the running server into `out` (which must not exist): the
/// stream goes to `out.partial`, is read back and checked end to end (format, record count,
/// SHA-256), made durable, and only then renamed to `out`.
pub async fn backup(
    config: &Config,
    target: &Target,
    out: &Path,
) -> Result<BackupSummary, ServeError> {
    if out.exists() {
        return Err(ServeError::Backup(format!(
            "{} exists; refusing to overwrite it",
            out.display()
        )));
    }
    let channel = connect(config, target).await?;
    let mut request = tonic::Request::new(pb::BackupRequest {});
    let auth = zeroize::Zeroizing::new(format!("Bearer {}", target.token.expose_secret()))
        .parse()
        .map_err(|_| ServeError::Backup("the token is not valid metadata".into()))?;
    request.metadata_mut().insert("authorization", auth);
    let mut stream = VaultClient::new(channel)
        .max_decoding_message_size(4 * 1024 * 1024)
        .backup(request)
        .await
        .map_err(|s| ServeError::Backup(format!("{:?}: {}", s.code(), s.message())))?
        .into_inner();
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let result = async {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&partial)
            .map_err(|e| ServeError::Backup(format!("{}: {e}", partial.display())))?;
        let mut bytes = 0u64;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| ServeError::Backup(format!("{:?}: {}", s.code(), s.message())))?
        {
            file.write_all(&chunk.data).map_err(backup_error)?;
            bytes += chunk.data.len() as u64;
        }
        file.sync_all().map_err(backup_error)?;
        let reader = BackupReader::new(std::io::BufReader::new(
            std::fs::File::open(&partial).map_err(backup_error)?,
        ))
        .map_err(backup_error)?;
        let header = reader.header().clone();
        let records = reader.verify().map_err(backup_error)?;
        std::fs::rename(&partial, out).map_err(backup_error)?;
        sync_parent(out).map_err(backup_error)?;
        Ok(BackupSummary {
            records,
            bytes,
            header,
        })
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}
