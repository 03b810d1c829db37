//! The webhook that stands in for Airflow: answers 200 after a delay the test sets (a slow
//! sink), and records every request it received and every one it answered.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::HeaderMap, routing::post};

#[derive(Debug, Default)]
pub struct Hook {
    delay_ms: AtomicU64,
    /// Idempotency keys of the requests received, answered or not.
    pub received: Mutex<Vec<String>>,
    /// Idempotency keys of the requests answered 200 (the trigger may have stopped waiting).
    pub answered: Mutex<Vec<String>>,
}

impl Hook {
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

async fn receive(State(hook): State<Arc<Hook>>, headers: HeaderMap) -> &'static str {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    hook.received.lock().expect("hook").push(key.clone());
    let delay = hook.delay_ms.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    hook.answered.lock().expect("hook").push(key);
    "ok"
}

/// Serves the hook at `http://<addr>/hook` until the test's runtime ends.
pub async fn start() -> (Arc<Hook>, SocketAddr) {
    let hook = Arc::new(Hook::default());
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(hook.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("hook listener");
    let addr = listener.local_addr().expect("hook addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hook, addr)
}
