//! TLS end to end: a signaling server with its own certificate (from a CA made here with
//! rcgen), two `duet call --headless --ca-file` processes calling through `wss://`, the
//! meetings client over `https://`, and the three certificate failures a person meets
//! (unknown CA, expired, another host's certificate), each with a reason in words.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use duet::meetings::{self, CreateRoomRequest, MeetingError};
use duet::signaling::{Client, SignalingError};
use duet::tls::Trust;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use signaling_server::Server;

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

    /// A server certificate for `names`; `expired` makes one that ended in 2020.
    fn issue(&self, names: &[&str], expired: bool) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "duet test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write(dir, name, &self.pem)
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A signaling server serving `names`' certificate (from `ca`) over TLS.
async fn tls_server(ca: &Ca, dir: &Path, names: &[&str], expired: bool) -> Server {
    let (cert, key) = ca.issue(names, expired);
    let tag = names.join("-") + if expired { "-expired" } else { "" };
    let mut config = signaling_server::Config::ephemeral();
    config.tls_cert = Some(write(dir, &format!("{tag}.cert.pem"), &cert));
    config.tls_key = Some(write(dir, &format!("{tag}.key.pem"), &key));
    Server::start(config).await.unwrap()
}

fn localhost(server: &Server, scheme: &str) -> String {
    format!("{scheme}://localhost:{}", server.local_addr().port())
}

/// The error of a `wss://` connection to `server` trusting `trust`.
async fn connect_error(server: &Server, trust: &Trust) -> String {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    match Client::connect_with(&localhost(server, "wss"), trust, tx).await {
        Ok(_) => panic!("connected to {}", server.ws_url()),
        Err(e @ SignalingError::Tls { .. }) => e.to_string(),
        Err(e) => panic!("not a TLS error: {e}"),
    }
}

#[test]
fn two_headless_processes_call_over_wss_with_a_ca_file() {
    // The server runs on the runtime's threads while this one waits for the processes.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Duet test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let server = runtime.block_on(tls_server(
        &ca,
        dir.path(),
        &["localhost", "127.0.0.1"],
        false,
    ));
    let url = format!("{}/ws", localhost(&server, "wss"));
    let run = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_duet"))
            .args(["call", "--headless", "--server", &url, "--room", "tls"])
            .args(["--name", name, "--duration", "3s", "--wait", "30s"])
            .args(["--chat", &format!("hi from {name}")])
            .arg("--ca-file")
            .arg(&ca_file)
            .arg("--report")
            .arg(dir.path().join(format!("{name}.json")))
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run("ann").unwrap());
        let b = s.spawn(|| run("bob").unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    for out in [&a, &b] {
        assert!(
            out.status.success(),
            "{:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (me, other) in [("ann", "bob"), ("bob", "ann")] {
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("{me}.json"))).unwrap(),
        )
        .unwrap();
        assert!(report["frames_decoded"].as_u64().unwrap() > 10, "{report}");
        assert_eq!(report["chat_received"][0], format!("hi from {other}"));
    }
    runtime.block_on(server.stop());
}

#[test]
fn a_wrong_ca_fails_the_call_with_a_clear_reason() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Duet test CA");
    let other = Ca::new("Someone else's CA");
    let other_file = other.write(dir.path(), "other.pem");
    let server = runtime.block_on(tls_server(&ca, dir.path(), &["localhost"], false));
    let report = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["call", "--headless", "--room", "r", "--wait", "20s"])
        .args(["--server", &localhost(&server, "wss")])
        .arg("--ca-file")
        .arg(&other_file)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the server's certificate is not trusted"),
        "{err}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let reason = report["end_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the server's certificate is not trusted"),
        "{report}"
    );
    // No silent fallback: the server never saw a WebSocket.
    assert_eq!(server.counts().0, 0);
    runtime.block_on(server.stop());
}

#[test]
fn a_missing_ca_file_is_reported_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .args(["call", "--headless", "--room", "r"])
        .args(["--ca-file", "/nonexistent/ca.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the CA file /nonexistent/ca.pem"),
        "{err}"
    );
}

#[tokio::test]
async fn an_expired_certificate_fails_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Duet test CA");
    let trust = Trust::with_ca_file(&ca.write(dir.path(), "ca.pem")).unwrap();
    let server = tls_server(&ca, dir.path(), &["localhost"], true).await;
    let err = connect_error(&server, &trust).await;
    assert!(
        err.contains("the server's certificate has expired (valid until 2020-01-01"),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test]
async fn another_hosts_certificate_fails_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Duet test CA");
    let trust = Trust::with_ca_file(&ca.write(dir.path(), "ca.pem")).unwrap();
    let server = tls_server(&ca, dir.path(), &["duet.example.org"], false).await;
    let err = connect_error(&server, &trust).await;
    assert!(
        err.contains(
            "the server's certificate is for another host name: it is for duet.example.org, \
             not localhost"
        ),
        "{err}"
    );
    // The meetings client says the same.
    let request = CreateRoomRequest::default();
    match meetings::create_with(&localhost(&server, "https"), &trust, &request, None).await {
        Err(MeetingError::Tls(reason)) => {
            assert!(reason.contains("is for another host name"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn wss_and_meetings_over_https_with_the_right_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Duet test CA");
    let trust = Trust::with_ca_file(&ca.write(dir.path(), "ca.pem")).unwrap();
    let server = tls_server(&ca, dir.path(), &["localhost", "127.0.0.1"], false).await;

    // A meeting created over https has an https join link.
    let request = CreateRoomRequest::default();
    let created = meetings::create_with(&localhost(&server, "https"), &trust, &request, None)
        .await
        .unwrap();
    let port = server.local_addr().port();
    assert!(
        created
            .join_url
            .starts_with(&format!("https://localhost:{port}/r/")),
        "{}",
        created.join_url
    );

    // The signaling client talks wss:// (by IP address too: the certificate names it).
    for server_url in [localhost(&server, "wss"), server.ws_url()] {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _client = Client::connect_with(&server_url, &trust, tx).await.unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                first,
                duet::signaling::Incoming::Message(
                    duet::signaling::protocol::ServerMessage::Welcome { .. }
                )
            ),
            "{first:?}"
        );
    }

    // Plain ws:// to the TLS port fails, with a hint.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = Client::connect_with(&localhost(&server, "ws"), &trust, tx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("use wss://"), "{err}");

    // The system roots alone do not know this CA: refused, with the hint to --ca-file.
    let err = connect_error(&server, &Trust::system()).await;
    assert!(
        err.contains("the server's certificate is not trusted") && err.contains("--ca-file"),
        "{err}"
    );
    let err = meetings::create_with(
        &localhost(&server, "https"),
        &Trust::system(),
        &request,
        None,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("the server's certificate is not trusted"),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_wss_url_to_a_plain_server_never_falls_back() {
    let server = Server::start(signaling_server::Config::ephemeral())
        .await
        .unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let url = format!("wss://{}", server.local_addr());
    let err = Client::connect_with(&url, &Trust::system(), tx)
        .await
        .unwrap_err();
    assert!(matches!(err, SignalingError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("did not answer in TLS"), "{err}");
    assert_eq!(server.counts().0, 0);
    // ws:// to the same server works as before.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    Client::connect_with(&server.ws_url(), &Trust::system(), tx)
        .await
        .unwrap();
    server.stop().await;
}
