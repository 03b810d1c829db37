//! TLS fixtures: a throwaway CA with a server certificate for `localhost` and `127.0.0.1`, and
//! a TLS-terminating proxy that puts a plaintext server (tansu, which does not serve TLS
//! itself) behind TLS.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};

/// A CA and one server certificate it signed, as PEM files in a temp dir.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    /// A fresh CA, a server certificate for `localhost` and `127.0.0.1`, and a certificate of
    /// another CA (for clients that must be refused).
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("pki dir");
        let write = |name: &str, pem: String| {
            std::fs::write(dir.path().join(name), pem).expect("write pem");
        };
        let (ca_key, ca_params) = ca("feedloop test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        write("ca.pem", ca_cert.pem());
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        write("server.pem", cert.pem());
        write("server.key", key.serialize_pem());
        let (other_key, other_params) = ca("some other CA");
        let other = other_params.self_signed(&other_key).expect("other CA");
        write("other-ca.pem", other.pem());
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signed the server certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that did not.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// `[http.tls]` of a service serving this certificate.
    pub fn server_tls(&self) -> feedloop_core::tls::ServerTls {
        feedloop_core::tls::ServerTls {
            cert: self.server_cert().display().to_string(),
            key: self.server_key().display().to_string(),
        }
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

fn ca(name: &str) -> (KeyPair, CertificateParams) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    (key, params)
}

/// Accepts TLS on `port` (0: any) and forwards the plaintext to `upstream`, until dropped.
#[derive(Debug)]
pub struct TlsProxy {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(pki: &TestPki, port: u16, upstream: SocketAddr) -> Self {
        let acceptor = pki.server_tls().acceptor().expect("proxy TLS");
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let acceptor = Arc::new(acceptor);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
