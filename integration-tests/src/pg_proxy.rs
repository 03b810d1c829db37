//! A TCP proxy in front of Postgres that, once armed, lets the next `COMMIT` through to the
//! server and drops the server's reply, closing that client connection: the commit happened,
//! and the client cannot know it (an ambiguous commit).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A simple-protocol Query message holding `COMMIT` (sqlx commits that way).
const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

#[derive(Debug, Clone)]
pub struct CommitReplyDropper {
    pub addr: SocketAddr,
    armed: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
}

impl CommitReplyDropper {
    /// Listens on a free local port, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let proxy = Self {
            addr,
            armed: Arc::default(),
            dropped: Arc::default(),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let p = p.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        p.pump(client, server).await;
                    }
                });
            }
        });
        proxy
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).expect("postgres url");
        u.set_host(Some("127.0.0.1")).expect("host");
        u.set_port(Some(self.addr.port())).expect("port");
        u.to_string()
    }

    /// The next COMMIT's reply is dropped.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::Release);
    }

    /// How many COMMIT replies were dropped.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Acquire)
    }

    async fn pump(&self, client: TcpStream, server: TcpStream) {
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        let drop_reply = Arc::new(AtomicBool::new(false));
        let to_server = {
            let armed = self.armed.clone();
            let drop_reply = drop_reply.clone();
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_rx.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &buf[..n];
                    if chunk.windows(COMMIT.len()).any(|w| w == COMMIT)
                        && armed.swap(false, Ordering::AcqRel)
                    {
                        drop_reply.store(true, Ordering::Release);
                    }
                    if server_tx.write_all(chunk).await.is_err() {
                        break;
                    }
                }
                let _ = server_tx.shutdown().await;
            }
        };
        let to_client = {
            let dropped = self.dropped.clone();
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_rx.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if drop_reply.load(Ordering::Acquire) {
                        // The server answered the COMMIT: it is done. The client never hears.
                        dropped.fetch_add(1, Ordering::AcqRel);
                        break;
                    }
                    if client_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = client_tx.shutdown().await;
            }
        };
        // Either side ending ends the connection.
        tokio::select! {
            () = to_server => {}
            () = to_client => {}
        }
    }
}
