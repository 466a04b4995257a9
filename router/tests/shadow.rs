//! The `kt-router shadow` binary on loopback, under hostile peers: it must stay up and keep
//! serving the session's real client.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kt_common::pki::SessionPki;
use kt_common::tunnel::{self, ClientSession, ServerPin};
use kt_common::wire::Open;

const SESSION: &str = "fdtest";

/// The shadow process, killed when dropped.
struct Shadow(Child);

impl Drop for Shadow {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Starts the shadow with an open-files limit of `nofile` (soft and hard: it cannot raise it).
fn start(pki: &SessionPki, nofile: u64) -> (Shadow, SocketAddr) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kt-router"));
    cmd.args([
        "shadow",
        &format!("--listen={addr}"),
        "--health-port=0",
        &format!("--session={SESSION}"),
        "--routes=127.0.0.0/8",
    ])
    .env("KT_CLIENT_CA", &pki.client_ca_pem)
    .env("KT_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit in the child between fork and exec, on a local struct.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("kt-router starts");
    let shadow = Shadow(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the shadow never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (shadow, addr)
}

async fn session(addr: SocketAddr, pki: &SessionPki) -> Result<ClientSession, tunnel::TunnelError> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tunnel::client_tls(&pki.client, &ServerPin::trust_first())?;
    let (s, _) = ClientSession::connect(tcp, &tls, SESSION, "test", Duration::from_secs(5)).await?;
    Ok(s)
}

#[tokio::test]
/// Regression: any accept error (EMFILE under a descriptor flood) ended the shadow, and idle
/// connections could hold handshakes without bound.
async fn the_shadow_survives_a_descriptor_flood_and_still_welcomes_its_client() {
    let pki = SessionPki::generate(SESSION, 1).expect("pki");
    let (mut shadow, addr) = start(&pki, 64);
    // 200 plain TCP connections that say nothing and stay open.
    let mut idle = vec![];
    for _ in 0..200 {
        if let Ok(c) = tokio::net::TcpStream::connect(addr).await {
            idle.push(c);
        }
    }
    assert!(idle.len() > 64, "only {} idle connections", idle.len());
    // The real client gets its Welcome, within the handshake timeout of the idle ones plus
    // some retries (as ktctl retries).
    let started = Instant::now();
    let welcomed = loop {
        match tokio::time::timeout(Duration::from_secs(15), session(addr, &pki)).await {
            Ok(Ok(s)) => break s,
            Ok(Err(_)) | Err(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(45),
                    "no Welcome for the real client under the flood"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(welcomed.welcome.version, kt_common::wire::PROTOCOL_VERSION);
    welcomed
        .mux
        .request(Open::Echo)
        .await
        .expect("the session works");
    assert!(
        shadow.0.try_wait().expect("wait").is_none(),
        "the shadow exited under the flood"
    );
    drop(idle);
}
