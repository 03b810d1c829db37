//! TLS for feedloop's HTTP servers and clients: a server given a certificate serves HTTPS, and
//! a client given a CA file trusts it beside the system's roots. rustls with the aws-lc-rs
//! provider, the one reqwest and sqlx use too. (Kafka's TLS is librdkafka's own, configured in
//! `[kafka.tls]`; Postgres's is set in its URL, as with libpq.)

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::config::ConfigError;

/// `[http.tls]`: serve HTTPS with this certificate chain and private key (PEM files). Both
/// empty (the default): plain HTTP, for a service behind a TLS-terminating ingress.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// Certificate chain, leaf first.
    #[serde(default, deserialize_with = "crate::config::path")]
    pub cert: String,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, deserialize_with = "crate::config::path")]
    pub key: String,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no {what} in it (PEM expected): {message}")]
    Pem {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

impl ServerTls {
    pub fn enabled(&self) -> bool {
        !self.cert.is_empty() || !self.key.is_empty()
    }

    /// Both files or neither; `section` names the keys in errors (`http.tls`).
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        match (self.cert.is_empty(), self.key.is_empty()) {
            (false, true) => Err(ConfigError::invalid(
                &format!("{section}.key"),
                "required when a certificate is set",
            )),
            (true, false) => Err(ConfigError::invalid(
                &format!("{section}.cert"),
                "required when a key is set",
            )),
            _ => Ok(()),
        }
    }

    /// The acceptor for this certificate and key (HTTP/1.1 only, as the servers speak).
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let certs = certificates(Path::new(&self.cert))?;
        let key = private_key(Path::new(&self.key))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// The crypto provider of every TLS endpoint feedloop sets up itself.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn pem_error(what: &'static str, path: &Path, message: impl ToString) -> TlsError {
    TlsError::Pem {
        what,
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Every certificate of a PEM file (a chain, or a CA bundle).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    const WHAT: &str = "certificate";
    let pem = read(WHAT, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(WHAT, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(WHAT, path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key";
    let pem = read(WHAT, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| pem_error(WHAT, path, e))
}

/// An HTTP client builder that trusts the CAs of `ca_files` (PEM; empty names are skipped)
/// beside the system's roots, for servers with a private CA.
pub fn client_builder<'a>(
    ca_files: impl IntoIterator<Item = &'a str>,
) -> Result<reqwest::ClientBuilder, TlsError> {
    let mut roots = Vec::new();
    for file in ca_files.into_iter().filter(|f| !f.is_empty()) {
        let path = Path::new(file);
        for der in certificates(path)? {
            roots.push(
                reqwest::Certificate::from_der(&der)
                    .map_err(|e| pem_error("certificate", path, e))?,
            );
        }
    }
    Ok(reqwest::Client::builder().tls_certs_merge(roots))
}

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener that hands out connections once their TLS handshake is done. Handshakes run in
/// tasks of their own, so a slow or silent client holds up nobody else.
#[derive(Debug)]
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = tx.closed() => return,
                    a = listener.accept() => a,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off as axum does.
                        tracing::warn!(error = %e, "Accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task only ends once this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
