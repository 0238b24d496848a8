//! The server's own TLS (`--tls-cert`, `--tls-key`): HTTPS and WSS on its one port, with a
//! CA and certificates made here (rcgen), checked by independent clients (rustls through
//! tokio-rustls and tokio-tungstenite) on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use signaling_server::Server;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use common::WAIT;

/// A test certificate authority.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (host names or IP addresses): (cert PEM, key PEM).
    fn issue(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "duet test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap();
        roots.add(der).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A TLS server with a certificate from `ca` for localhost and 127.0.0.1.
async fn tls_server(ca: &Ca, dir: &Path) -> Server {
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    let cert = write(dir, "cert.pem", &cert);
    let key = write(dir, "key.pem", &key);
    common::start_server(|c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
    })
    .await
}

/// One HTTP/1.1 request over TLS to `localhost`; returns (status, body).
async fn https(
    server: &Server,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
) -> Result<(u16, String), std::io::Error> {
    let port = server.local_addr().port();
    let tcp = TcpStream::connect(server.local_addr()).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\
         Content-Length: 0\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    // The server closes with close_notify after `Connection: close`.
    tokio::time::timeout(WAIT, tls.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::other("timed out reading the answer"))??;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn wss(server: &Server, config: Arc<rustls::ClientConfig>) -> Result<Ws, String> {
    let url = format!("wss://localhost:{}/ws", server.local_addr().port());
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        false,
        Some(Connector::Rustls(config)),
    );
    match tokio::time::timeout(WAIT, connecting).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(format!("{e}")),
        Err(_) => Err("timed out".into()),
    }
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("connection closed")
            .unwrap();
        if let Message::Text(t) = next {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

async fn expect(ws: &mut Ws, kind: &str) -> Value {
    let m = recv(ws).await;
    assert_eq!(m["type"], kind, "expected {kind}, got {m}");
    m
}

#[tokio::test]
async fn https_serves_health_and_api_with_https_join_urls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Duet test CA");
    let server = tls_server(&ca, dir.path()).await;
    assert!(server.http_url().starts_with("https://127.0.0.1:"));
    assert!(server.ws_url().starts_with("wss://127.0.0.1:"));

    let (status, body) = https(&server, ca.client_config(), "GET", "/healthz")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));

    let (status, body) = https(&server, ca.client_config(), "POST", "/api/rooms")
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    let port = server.local_addr().port();
    let join_url = created["join_url"].as_str().unwrap();
    assert!(
        join_url.starts_with(&format!("https://localhost:{port}/r/")),
        "{join_url}"
    );

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    // A client that trusts another CA refuses the server.
    let other = Ca::new("Another CA");
    let err = https(&server, other.client_config(), "GET", "/healthz")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // ... and the server still serves others.
    let (status, _) = https(&server, ca.client_config(), "GET", "/healthz")
        .await
        .unwrap();
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn wss_clients_join_relay_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Duet test CA");
    let server = tls_server(&ca, dir.path()).await;
    let mut alice = wss(&server, ca.client_config()).await.unwrap();
    let mut bob = wss(&server, ca.client_config()).await.unwrap();
    expect(&mut alice, "welcome").await;
    expect(&mut bob, "welcome").await;
    alice
        .send(Message::text(
            json!({"type":"join","room":"tls"}).to_string(),
        ))
        .await
        .unwrap();
    expect(&mut alice, "joined").await;
    bob.send(Message::text(
        json!({"type":"join","room":"tls"}).to_string(),
    ))
    .await
    .unwrap();
    expect(&mut bob, "joined").await;
    expect(&mut alice, "peer_joined").await;
    // A message larger than one TLS record, both ways.
    let sdp = "a".repeat(40_000);
    alice
        .send(Message::text(json!({"type":"offer","sdp":sdp}).to_string()))
        .await
        .unwrap();
    assert_eq!(expect(&mut bob, "offer").await["sdp"], sdp.as_str());
    bob.send(Message::text(
        json!({"type":"answer","sdp":"ok"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(expect(&mut alice, "answer").await["sdp"], "ok");
    // Pings are answered over TLS too.
    alice
        .send(Message::Ping(b"p".to_vec().into()))
        .await
        .unwrap();
    loop {
        let next = tokio::time::timeout(WAIT, alice.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Pong(p) = next {
            assert_eq!(&p[..], b"p");
            break;
        }
    }
    // A close without `leave`: alice's seat is kept for a resume, so bob hears that she
    // is reconnecting; alice gets the close echoed.
    alice.close(None).await.unwrap();
    expect(&mut bob, "peer_reconnecting").await;
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(m) = alice.next().await {
            if m.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "alice's connection did not end");
    assert_eq!(server.counts().0, 1);
    server.stop().await;
}

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::new("First CA");
    let server = tls_server(&first, dir.path()).await;
    let mut open = wss(&server, first.client_config()).await.unwrap();
    expect(&mut open, "welcome").await;

    // New files from another CA, as certbot renewing through a new intermediate would.
    let second = Ca::new("Second CA");
    let (cert, key) = second.issue(&["localhost"]);
    write(dir.path(), "cert.pem", &cert);
    write(dir.path(), "key.pem", &key);
    server.reload_tls().unwrap();
    assert!(wss(&server, first.client_config()).await.is_err());
    let mut fresh = wss(&server, second.client_config()).await.unwrap();
    expect(&mut fresh, "welcome").await;

    // A broken file is refused and the current certificate stays.
    write(dir.path(), "key.pem", "not a key\n");
    let err = server.reload_tls().unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
    let mut still = wss(&server, second.client_config()).await.unwrap();
    expect(&mut still, "welcome").await;

    // The connection opened before the reload still works.
    open.send(Message::text(json!({"type":"join","room":"r"}).to_string()))
        .await
        .unwrap();
    expect(&mut open, "joined").await;
    server.stop().await;
}

#[tokio::test]
async fn bad_tls_files_stop_the_start_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let (cert, _) = ca.issue(&["localhost"]);
    let (_, other_key) = ca.issue(&["localhost"]);
    let cert = write(dir.path(), "cert.pem", &cert);
    let wrong_key = write(dir.path(), "other-key.pem", &other_key);
    let start = |cert: Option<PathBuf>, key: Option<PathBuf>| {
        let mut config = signaling_server::Config::ephemeral();
        config.tls_cert = cert;
        config.tls_key = key;
        Server::start(config)
    };
    let err = start(Some(cert.clone()), None).await.unwrap_err();
    assert!(err.to_string().contains("go together"), "{err}");
    let err = start(
        Some(dir.path().join("missing.pem")),
        Some(wrong_key.clone()),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let err = start(Some(cert), Some(wrong_key)).await.unwrap_err();
    assert!(err.to_string().contains("cannot be used together"), "{err}");
}

#[test]
fn flags_parse() {
    use clap::Parser as _;
    let config = signaling_server::Config::try_parse_from([
        "signaling-server",
        "--tls-cert",
        "/etc/duet/fullchain.pem",
        "--tls-key",
        "/etc/duet/privkey.pem",
    ])
    .unwrap();
    assert_eq!(
        config.tls_cert.as_deref(),
        Some(Path::new("/etc/duet/fullchain.pem"))
    );
    assert!(
        signaling_server::Config::try_parse_from(["signaling-server", "--tls-cert", "c.pem"])
            .is_err(),
        "--tls-cert without --tls-key"
    );
}

#[tokio::test]
async fn shutdown_is_bounded_with_a_stalled_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let server = tls_server(&ca, dir.path()).await;
    // Connects and never says hello.
    let _stalled = TcpStream::connect(server.local_addr()).await.unwrap();
    let mut ws = wss(&server, ca.client_config()).await.unwrap();
    expect(&mut ws, "welcome").await;
    let started = std::time::Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The real binary: `--tls-cert`/`--tls-key` on the command line, and SIGHUP reloads them.
#[test]
fn the_binary_serves_https_and_reloads_on_sighup() {
    use std::io::BufRead as _;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::new("First CA");
    let (cert, key) = first.issue(&["localhost"]);
    let cert = write(dir.path(), "cert.pem", &cert);
    let key = write(dir.path(), "key.pem", &key);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_signaling-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            ":memory:",
            "--log",
            "info",
        ])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    // Keeps reading stderr to the end, so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |needle: &str| -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid])
                        .status();
                    panic!("the server never logged {needle:?}");
                }
            }
        }
    };
    let line = wait_for("listening on https://");
    let addr: std::net::SocketAddr = line
        .split("listening on https://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(line.contains(&format!("wss://{addr}/ws")), "{line}");

    let handshake = |ca: &Ca| {
        let config = ca.client_config();
        runtime.block_on(async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            tokio::time::timeout(
                WAIT,
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| std::io::Error::other("timed out"))?
            .map(drop)
        })
    };
    handshake(&first).unwrap();

    let second = Ca::new("Second CA");
    let (cert, key) = second.issue(&["localhost"]);
    write(dir.path(), "cert.pem", &cert);
    write(dir.path(), "key.pem", &key);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("TLS certificate reloaded");
    handshake(&second).unwrap();
    assert!(handshake(&first).is_err());

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}
