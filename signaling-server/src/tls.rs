//! Optional TLS on the server's one port (`--tls-cert FILE --tls-key FILE`): HTTPS and
//! WSS from the same listener, with rustls (ring provider) through tokio-rustls.
//!
//! The certificate and key are PEM files as certbot writes them (`fullchain.pem`,
//! `privkey.pem`; PKCS#8, PKCS#1 or SEC1 keys). The embedded TURN server's TLS front
//! (`--turn-listen-tls`) uses the same certificate ([`ServerTls::turn_acceptor`]). [`ServerTls::reload`] reads them again
//! and swaps them in for new connections (the binary does it on SIGHUP); a file that
//! does not load leaves the old certificate in place. Connections already open keep the
//! session they have.
//!
//! [`Stream`] is what a connection runs on after the accept: plain TCP or TLS over TCP.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use bytes::BytesMut;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

/// The certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-cert and --tls-key go together: give both or neither")]
    Incomplete,
    #[error("cannot read the TLS certificate file {path}: {detail}")]
    CertFile { path: PathBuf, detail: String },
    #[error("the TLS certificate file {0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("cannot read the TLS key file {path}: {detail}")]
    KeyFile { path: PathBuf, detail: String },
    #[error("the certificate {cert} and the key {key} cannot be used together: {detail}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
}

/// The server's TLS settings, swappable at run time.
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    acceptors: RwLock<Acceptors>,
}

/// One certificate, two protocol lists: HTTP/1.1 for the web port, none for TURN.
#[derive(Clone)]
struct Acceptors {
    http: TlsAcceptor,
    turn: TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads `cert` and `key` (both or neither): `Ok(None)` without TLS.
    pub fn from_files(
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<ServerTls>, TlsError> {
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(ServerTls {
                acceptors: RwLock::new(load(cert, key)?),
                cert: cert.to_owned(),
                key: key.to_owned(),
            })),
            _ => Err(TlsError::Incomplete),
        }
    }

    fn current(&self) -> Acceptors {
        match self.acceptors.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The acceptor for the next HTTPS/WSS connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current().http
    }

    /// The acceptor for the next TURN-over-TLS connection (`--turn-listen-tls`): the same
    /// certificate, no ALPN (a client offering `stun.turn` or nothing is served alike).
    pub fn turn_acceptor(&self) -> TlsAcceptor {
        self.current().turn
    }

    /// Reads the certificate and key files again and uses them for new connections; on
    /// an error the old ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load(&self.cert, &self.key)?;
        match self.acceptors.write() {
            Ok(mut a) => *a = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }
}

fn load(cert: &Path, key: &Path) -> Result<Acceptors, TlsError> {
    let cert_err = |detail: String| TlsError::CertFile {
        path: cert.to_owned(),
        detail,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::KeyFile {
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    let mismatch = |detail: String| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        detail,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| mismatch(e.to_string()))?;
    let turn = TlsAcceptor::from(Arc::new(config.clone()));
    // HTTP/1.1 only: the WebSocket upgrade needs it, and the API is served by hyper's
    // HTTP/1 connection.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Acceptors {
        http: TlsAcceptor::from(Arc::new(config)),
        turn,
    })
}

/// How much to ask for per read on a TLS connection.
const TLS_READ_CHUNK: usize = 4096;

/// A connection's byte stream: plain TCP or TLS over TCP.
#[derive(Debug)]
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    pub(crate) fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Stream::Plain(tcp) => tcp.peer_addr(),
            Stream::Tls(tls) => tls.get_ref().0.peer_addr(),
        }
    }

    /// Waits until there is something to read. Plain TCP: only readiness (`Ok(None)`),
    /// so that an idle connection holds no buffer; read with [`Stream::try_read_buf`].
    /// TLS: socket readiness says nothing about decrypted bytes rustls may hold, so this
    /// reads into `inbox` (`Ok(Some(n))`, 0 at the end). Cancel-safe either way.
    pub(crate) async fn wait_readable(
        &mut self,
        inbox: &mut BytesMut,
    ) -> io::Result<Option<usize>> {
        match self {
            Stream::Plain(tcp) => tcp.readable().await.map(|()| None),
            Stream::Tls(tls) => {
                inbox.reserve(TLS_READ_CHUNK);
                tls.read_buf(inbox).await.map(Some)
            }
        }
    }

    /// A non-blocking read (plain TCP; TLS reads in [`Stream::wait_readable`]).
    pub(crate) fn try_read_buf(&mut self, inbox: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.try_read_buf(inbox),
            Stream::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    /// A non-blocking write (plain TCP; TLS always says `WouldBlock`, so the caller
    /// writes it with `write_all` and `flush`).
    pub(crate) fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.try_write(data),
            Stream::Tls(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, data),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}
