//! Pieces every HTTP service shares: serving with graceful shutdown, the operational routes,
//! and credential parsing with constant-time comparison.

use std::{
    future::IntoFuture,
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{MatchedPath, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use base64::Engine;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    telemetry,
    tls::{ServerTls, TlsError, TlsListener},
};

/// Where a server listens: plain HTTP, or HTTPS with `[http.tls]`.
#[derive(Debug)]
pub enum Listener {
    Plain(TcpListener),
    Tls(TlsListener),
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then drains in-flight requests.
pub async fn serve(
    listener: Listener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let stop = async move { shutdown.cancelled().await };
    match listener {
        Listener::Plain(l) => {
            axum::serve(l, app)
                .with_graceful_shutdown(stop)
                .into_future()
                .await
        }
        Listener::Tls(l) => {
            axum::serve(l, app)
                .with_graceful_shutdown(stop)
                .into_future()
                .await
        }
    }
}

/// A listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot serve HTTPS on {addr}: {source}")]
    Tls { addr: String, source: TlsError },
}

/// Binds `addr` (`host:port`, port 0 for any), with TLS when `tls` has a certificate, and
/// says where it ended up.
pub async fn bind(addr: &str, tls: &ServerTls) -> Result<(Listener, SocketAddr), BindError> {
    let io = |source| BindError::Io {
        addr: addr.to_owned(),
        source,
    };
    // Certificates first: a bad file is a configuration error, whatever the port.
    let acceptor = if tls.enabled() {
        Some(tls.acceptor().map_err(|source| BindError::Tls {
            addr: addr.to_owned(),
            source,
        })?)
    } else {
        None
    };
    let listener = TcpListener::bind(addr).await.map_err(io)?;
    let local = listener.local_addr().map_err(io)?;
    let listener = match acceptor {
        Some(acceptor) => Listener::Tls(TlsListener::new(listener, acceptor).map_err(io)?),
        None => Listener::Plain(listener),
    };
    Ok((listener, local))
}

/// Names of a service's request metrics.
#[derive(Debug, Clone, Copy)]
pub struct HttpMetrics {
    /// Counter, labelled by route and status.
    pub requests: &'static str,
    /// Histogram in seconds, labelled by route.
    pub duration: &'static str,
}

/// Middleware (`middleware::from_fn_with_state(metrics, track)`) counting and timing requests
/// by matched route, so that ids in paths do not explode the label space.
pub async fn track(State(metrics): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!(metrics.requests, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(metrics.duration, "route" => route).record(start.elapsed().as_secs_f64());
    resp
}

/// `GET /healthz` (the process is up) and `GET /metrics` (Prometheus text format).
pub fn ops_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
}

/// `GET /readyz` of a service that serves from Postgres: 200 while `pool` answers `SELECT 1`
/// within two seconds, 503 otherwise (the database is down or restarting).
pub fn postgres_readyz<S: Clone + Send + Sync + 'static>(pool: sqlx::PgPool) -> Router<S> {
    Router::new().route(
        "/readyz",
        get(move || {
            let pool = pool.clone();
            async move {
                let ping = sqlx::query("SELECT 1").execute(&pool);
                match tokio::time::timeout(Duration::from_secs(2), ping).await {
                    Ok(Ok(_)) => (StatusCode::OK, "ready"),
                    _ => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the control database does not answer",
                    ),
                }
            }
        }),
    )
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::render_metrics(),
    )
}

/// Compares secrets without leaking, through timing, how much of them matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Lengths are not secret enough to matter; contents are compared in constant time.
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Credentials of an `Authorization: Basic` header.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicCredentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Parses `Authorization: Basic …`, or `None` if absent or malformed.
pub fn basic_credentials(headers: &HeaderMap) -> Option<BasicCredentials> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some(BasicCredentials {
        user: user.to_owned(),
        password: password.to_owned(),
    })
}

/// The token of `Authorization: Bearer …`, if present.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Default per-request timeout of feedloop's HTTP servers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The one request timeout every feedloop server has (`.layer(http::timeout(d))`): a request
/// still running after `d` is answered 503, which clients retry.
pub fn timeout(d: Duration) -> tower_http::timeout::TimeoutLayer {
    tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, d)
}

/// A status and message answered as `{"code": …, "message": …}`.
pub fn json_error(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
) -> axum::response::Response {
    (
        status,
        axum::Json(serde_json::json!({ "code": code, "message": message.into() })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(auth).expect("ascii"),
        );
        h
    }

    #[test]
    fn parses_basic_and_bearer() {
        // "user:pa:ss"
        let creds = basic_credentials(&headers("Basic dXNlcjpwYTpzcw==")).expect("basic");
        assert_eq!(creds.user, "user");
        assert_eq!(creds.password, "pa:ss");
        assert_eq!(bearer_token(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&headers("Basic abc")), None);
        assert!(basic_credentials(&headers("Basic !!!")).is_none());
        assert!(basic_credentials(&HeaderMap::new()).is_none());
    }

    #[test]
    fn constant_time_eq_compares_contents() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    #[test]
    fn credentials_debug_hides_password() {
        let c = BasicCredentials {
            user: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
