//! TLS for the app's connections to a signaling server (`wss://` and `https://`): rustls
//! with the ring provider, trusting the system's root certificates plus, optionally, the
//! certificate authorities of a PEM file (`--ca-file`: private CAs, tests).
//!
//! Root certificates come from `rustls-native-certs`, not `webpki-roots`: it reads the
//! operating system's store (on Debian `/etc/ssl/certs`, the `ca-certificates` package;
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` override it), so it works offline, follows the
//! system's updates and honours CAs an administrator added. `webpki-roots` would be a
//! snapshot compiled into the binary that ignores both.
//!
//! A failed handshake is turned into a sentence a person can act on ([`explain`]):
//! "the server's certificate is not trusted: ...", "... has expired", "... is for
//! another host name ...". There is never a fallback to an unencrypted connection.
//!
//! Which CAs to trust is process-wide configuration, like the system store itself: the
//! binary sets it once from `--ca-file` ([`set_default_trust`]); connections made without
//! an explicit [`Trust`] (calls, presence, meetings) use it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use rustls::{CertificateError, ClientConfig, RootCertStore};

/// Why TLS could not be set up (before any connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA file {path}: {detail}")]
    CaFile { path: PathBuf, detail: String },
    #[error("the CA file {0} holds no PEM certificate")]
    NoCertificates(PathBuf),
    #[error("the CA file {path} holds a certificate that cannot be used: {detail}")]
    BadCertificate { path: PathBuf, detail: String },
    #[error(
        "no trusted certificate authorities: the system has none installed \
         (Debian: the ca-certificates package) and no --ca-file was given"
    )]
    NoRoots,
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

/// The certificate authorities a client trusts: the system's plus those of a CA file.
/// Cheap to clone; the rustls configuration is built once, on first use.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    inner: Arc<TrustInner>,
}

#[derive(Debug, Default)]
struct TrustInner {
    ca_file: Option<PathBuf>,
    extra: Vec<CertificateDer<'static>>,
    config: OnceLock<Result<Arc<ClientConfig>, TlsError>>,
}

impl Trust {
    /// The system's root certificates only.
    pub fn system() -> Trust {
        Trust::default()
    }

    /// The system's roots plus every certificate in the PEM file `path` (read now, so a
    /// wrong path is reported at start-up, not at the first connection).
    pub fn with_ca_file(path: &Path) -> Result<Trust, TlsError> {
        let extra = read_ca_file(path)?;
        Ok(Trust {
            inner: Arc::new(TrustInner {
                ca_file: Some(path.to_owned()),
                extra,
                config: OnceLock::new(),
            }),
        })
    }

    /// The CA file given, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.inner.ca_file.as_deref()
    }

    /// The rustls client configuration (built on first use, then shared).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.inner
            .config
            .get_or_init(|| build_client_config(&self.inner.extra))
            .clone()
    }
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError::CaFile {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::CaFile {
            path: path.to_owned(),
            detail: format!("not a PEM file ({e})"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates(path.to_owned()));
    }
    // Checked here so that a broken file is reported as such, not as an untrusted server.
    let mut store = RootCertStore::empty();
    for cert in &certs {
        store
            .add(cert.clone())
            .map_err(|e| TlsError::BadCertificate {
                path: path.to_owned(),
                detail: e.to_string(),
            })?;
    }
    Ok(certs)
}

/// The system's root certificates, loaded once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for e in &loaded.errors {
            tracing::warn!(error = %e, "cannot load some system root certificates");
        }
        tracing::debug!(count = loaded.certs.len(), "system root certificates");
        loaded.certs
    })
}

fn build_client_config(extra: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    let (_, unusable) = roots.add_parsable_certificates(system_roots().iter().cloned());
    if unusable > 0 {
        tracing::debug!(unusable, "system root certificates rustls cannot use");
    }
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|e| TlsError::Setup(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn default_slot() -> &'static RwLock<Trust> {
    static DEFAULT: OnceLock<RwLock<Trust>> = OnceLock::new();
    DEFAULT.get_or_init(|| RwLock::new(Trust::system()))
}

/// Sets the trust used by connections that are not given one (`--ca-file`).
pub fn set_default_trust(trust: Trust) {
    match default_slot().write() {
        Ok(mut slot) => *slot = trust,
        Err(poisoned) => *poisoned.into_inner() = trust,
    }
}

/// The trust set by [`set_default_trust`] (the system's roots unless changed).
pub fn default_trust() -> Trust {
    match default_slot().read() {
        Ok(slot) => slot.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// A readable reason for a failed TLS connection to `host`, if `error` (or anything in
/// its chain) is a TLS error; `None` when it is something else (refused, timed out).
pub fn explain(error: &(dyn std::error::Error + 'static), host: &str) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(tls, host));
        }
        // io::Error's `source()` skips the error it wraps: look at it directly.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(describe(tls, host));
            }
            current = inner.source();
            continue;
        }
        current = e.source();
    }
    None
}

const UNTRUSTED: &str = "the server's certificate is not trusted";

fn describe(error: &rustls::Error, host: &str) -> String {
    match error {
        rustls::Error::InvalidCertificate(cert) => describe_certificate(cert, host),
        rustls::Error::InvalidMessage(_) => format!(
            "the server did not answer in TLS ({error}); if it serves plain ws://, \
             use ws:// or HOST:PORT"
        ),
        rustls::Error::NoCertificatesPresented => {
            format!("{UNTRUSTED}: the server presented no certificate")
        }
        other => format!("the TLS handshake with {host} failed: {other}"),
    }
}

fn describe_certificate(error: &CertificateError, host: &str) -> String {
    match error {
        CertificateError::UnknownIssuer => format!(
            "{UNTRUSTED}: it is not signed by a certificate authority this computer trusts \
             (for a private CA, pass its certificate with --ca-file)"
        ),
        CertificateError::BadSignature => {
            format!("{UNTRUSTED}: its signature does not verify")
        }
        CertificateError::Expired => "the server's certificate has expired".to_owned(),
        CertificateError::ExpiredContext { time, not_after } => format!(
            "the server's certificate has expired (valid until {}, now {})",
            date(not_after.as_secs()),
            date(time.as_secs())
        ),
        CertificateError::NotValidYet => {
            "the server's certificate is not valid yet (check this computer's clock)".to_owned()
        }
        CertificateError::NotValidYetContext { not_before, .. } => format!(
            "the server's certificate is not valid yet: it starts on {} (check this \
             computer's clock)",
            date(not_before.as_secs())
        ),
        CertificateError::NotValidForName => {
            format!("the server's certificate is for another host name, not {host}")
        }
        CertificateError::NotValidForNameContext { presented, .. } => {
            let names: Vec<String> = presented.iter().map(|n| presented_name(n)).collect();
            format!(
                "the server's certificate is for another host name: it is for {}, not {host}",
                if names.is_empty() {
                    "no host name at all".to_owned()
                } else {
                    names.join(", ")
                }
            )
        }
        CertificateError::Revoked => "the server's certificate has been revoked".to_owned(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!("{UNTRUSTED}: it is not meant for TLS servers")
        }
        other => format!("{UNTRUSTED}: {other}"),
    }
}

/// `DnsName("localhost")` -> `localhost`, `IpAddress(127.0.0.1)` -> `127.0.0.1`.
fn presented_name(name: &str) -> String {
    if let Some(dns) = name
        .strip_prefix("DnsName(")
        .and_then(|n| n.strip_suffix(')'))
    {
        return dns.trim_matches('"').to_owned();
    }
    if let Some(ip) = name
        .strip_prefix("IpAddress(")
        .and_then(|n| n.strip_suffix(')'))
    {
        return ip.to_owned();
    }
    name.to_owned()
}

fn date(unix_seconds: u64) -> String {
    i64::try_from(unix_seconds)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| format!("{unix_seconds} s after 1970"), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn certificate_errors_read_well() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let text = explain(&io, "localhost").unwrap();
        assert!(
            text.starts_with("the server's certificate is not trusted: "),
            "{text}"
        );
        let expired = rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
            time: rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                1_800_000_000,
            )),
            not_after: rustls::pki_types::UnixTime::since_unix_epoch(
                std::time::Duration::from_secs(1_700_000_000),
            ),
        });
        let text = explain(&expired, "h").unwrap();
        assert!(
            text.contains("has expired (valid until 2023-11-14T22:13:20Z"),
            "{text}"
        );
        assert_eq!(presented_name("DnsName(\"a.example\")"), "a.example");
        assert_eq!(presented_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(explain(&refused, "h"), None);
    }

    #[test]
    fn ca_files_are_checked_when_given() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            Trust::with_ca_file(&missing),
            Err(TlsError::CaFile { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        assert!(matches!(
            Trust::with_ca_file(&empty),
            Err(TlsError::NoCertificates(_))
        ));
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        let trust = Trust::with_ca_file(&good).unwrap();
        assert_eq!(trust.ca_file(), Some(good.as_path()));
        assert!(trust.client_config().is_ok());
    }
}
