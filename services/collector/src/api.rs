//! The HTTP API: `POST /v1/events` (native), `POST /v1/batch` (Segment), the Segment
//! single-call endpoints, `/openapi.json`, and the operational routes.

use std::{
    io::Read,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Request, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use feedloop_core::{
    http::{json_error, ops_routes, track},
    model::DeadLetterReason,
};
use serde_json::value::RawValue;

use crate::{
    auth::{Keys, RateLimiter},
    config::{Config, TimeConfig},
    durable::{DurableError, now_ms},
    ingest::{Context, Parsed, Reject, native, segment},
    observability,
    pipeline::{IngestError, Pipeline},
};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

#[derive(Debug)]
pub struct AppState {
    pub pipeline: Arc<Pipeline>,
    pub keys: Keys,
    pub limiter: RateLimiter,
    pub time: TimeConfig,
    pub max_decompressed_bytes: usize,
    pub max_event_bytes: usize,
    pub max_batch_len: usize,
}

type Shared = Arc<AppState>;

pub fn router(state: Shared, config: &Config) -> Router {
    let api = Router::new()
        .route("/v1/events", post(native_events))
        .route("/v1/batch", post(segment_batch))
        .route("/v1/b", post(segment_batch))
        .route("/v1/import", post(segment_batch))
        .route("/v1/track", post(segment_single))
        .route("/v1/identify", post(segment_single))
        .route("/v1/page", post(segment_single))
        .route("/v1/screen", post(segment_single))
        .layer(DefaultBodyLimit::max(config.http.max_request_bytes))
        .layer(middleware::from_fn_with_state(
            Arc::new(Shed {
                in_flight: AtomicUsize::new(0),
                max: config.http.max_in_flight,
            }),
            shed,
        ));
    Router::new()
        .merge(api)
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/readyz", get(ready))
        .merge(ops_routes())
        .layer(feedloop_core::http::timeout(config_timeout(config)))
        .layer(middleware::from_fn_with_state(observability::HTTP, track))
        .with_state(state)
}

fn config_timeout(config: &Config) -> std::time::Duration {
    std::time::Duration::from_millis(config.http.request_timeout_ms)
}

/// Requests in flight, and how many are allowed.
#[derive(Debug)]
struct Shed {
    in_flight: AtomicUsize,
    max: usize,
}

async fn shed(State(shed): State<Arc<Shed>>, req: Request, next: Next) -> Response {
    if shed.in_flight.fetch_add(1, Ordering::AcqRel) >= shed.max {
        shed.in_flight.fetch_sub(1, Ordering::AcqRel);
        observability::shed();
        return retry_after(
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in flight; retry",
            ),
            1,
        );
    }
    let resp = next.run(req).await;
    shed.in_flight.fetch_sub(1, Ordering::AcqRel);
    resp
}

async fn ready(State(s): State<Shared>) -> Response {
    let durable = &s.pipeline.durable;
    let spool = durable.spool();
    let spool_full = spool.used_bytes() >= spool.max_bytes() / 100 * 95;
    if durable.is_spooling() && spool_full {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "broker unreachable and spool full",
        );
    }
    // Spooling while the broker answers, and nothing drained for a minute: something keeps
    // the spool from draining; traffic should go to a replica that publishes.
    if durable.drain_stalled() && durable.broker_reachable().await {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the spool is not draining although the broker answers",
        );
    }
    (StatusCode::OK, "ready").into_response()
}

/// A refusal of the whole request.
fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    json_error(status, code, message)
}

fn retry_after(mut resp: Response, seconds: u64) -> Response {
    if let Ok(v) = HeaderValue::from_str(&seconds.max(1).to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// Checks content type and encoding, and returns the JSON body.
fn body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    max_decompressed: usize,
) -> Result<Vec<u8>, Response> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body exceeds the size limit",
            )
        } else {
            refuse(StatusCode::BAD_REQUEST, "unreadable_body", e.body_text())
        }
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    // text/plain is what browsers' sendBeacon (analytics.js) sends.
    if !(content_type.starts_with("application/json") || content_type.starts_with("text/plain")) {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        ));
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .to_ascii_lowercase();
    match encoding.as_str() {
        "identity" | "" => Ok(body.to_vec()),
        "gzip" => {
            let mut out = Vec::new();
            let limit = u64::try_from(max_decompressed).unwrap_or(u64::MAX);
            flate2::read::GzDecoder::new(&body[..])
                .take(limit + 1)
                .read_to_end(&mut out)
                .map_err(|_| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "bad_gzip",
                        "body is not valid gzip",
                    )
                })?;
            if out.len() > max_decompressed {
                return Err(refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("decompressed body exceeds {max_decompressed} bytes"),
                ));
            }
            Ok(out)
        }
        other => Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_encoding",
            format!("Content-Encoding {other} is not supported; use gzip or none"),
        )),
    }
}

fn unauthorized() -> Response {
    let mut resp = refuse(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a valid write key is required",
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"feedloop\""),
    );
    resp
}

fn rate_limit(s: &AppState, app: &str, cost: usize) -> Result<(), Response> {
    s.limiter.take(app, cost).map_err(|wait| {
        observability::rate_limited();
        retry_after(
            refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "event rate limit exceeded for this write key",
            ),
            wait.as_secs_f64().ceil() as u64,
        )
    })
}

async fn finish(
    s: &AppState,
    app: &str,
    parsed: Vec<Parsed>,
    received_at: i64,
    segment: bool,
) -> Response {
    match s.pipeline.ingest(app, parsed, received_at).await {
        Ok(resp) => {
            if segment {
                let mut v = serde_json::to_value(&resp).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("success".into(), serde_json::Value::Bool(true));
                }
                (StatusCode::OK, Json(v)).into_response()
            } else {
                (StatusCode::OK, Json(resp)).into_response()
            }
        }
        Err(IngestError::Durable(DurableError::SpoolFull)) => retry_after(
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "spool_full",
                "the broker is unreachable and the local spool is full; retry later",
            ),
            5,
        ),
        Err(e) => {
            tracing::error!(error = %e, "Could not make a batch durable");
            retry_after(
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "events could not be stored; retry",
                ),
                1,
            )
        }
    }
}

/// A body that is not a batch: refused with 400, and kept as one dead letter.
async fn malformed(
    s: &AppState,
    app: &str,
    bytes: &[u8],
    detail: String,
    received_at: i64,
) -> Response {
    let reject = Reject::new(DeadLetterReason::ProtocolViolation, detail.clone(), bytes);
    let kept = match s.pipeline.dead_letter(app, &reject, received_at).await {
        Ok(record) => s
            .pipeline
            .durable
            .write(vec![record])
            .await
            .map(|_| ())
            .map_err(IngestError::from),
        Err(e) => Err(e),
    };
    match kept {
        Ok(()) => refuse(StatusCode::BAD_REQUEST, "malformed_batch", detail),
        // Not kept: the client must send it again rather than lose it.
        Err(e) => {
            tracing::warn!(error = %e, "Could not keep a malformed body");
            retry_after(
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the malformed body could not be kept for repair; retry",
                ),
                1,
            )
        }
    }
}

async fn native_events(
    State(s): State<Shared>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let received_at = now_ms();
    let Some(app) = s.keys.app(&headers, None).map(str::to_owned) else {
        return unauthorized();
    };
    let bytes = match body(&headers, raw, s.max_decompressed_bytes) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let (events, sent_at) = match native::split(&bytes, s.max_batch_len) {
        Ok(split) => split,
        Err(native::BodyError::TooLong { len, max }) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_long",
                format!("{len} events; the limit is {max}"),
            );
        }
        Err(e) => return malformed(&s, &app, &bytes, e.to_string(), received_at).await,
    };
    if let Err(resp) = rate_limit(&s, &app, events.len()) {
        return resp;
    }
    let ctx = Context {
        app_id: &app,
        received_at,
        max_event_bytes: s.max_event_bytes,
        time: &s.time,
    };
    let parsed: Vec<Parsed> = events
        .iter()
        .map(|e| native::parse_event(e, sent_at, &ctx))
        .collect();
    finish(&s, &app, parsed, received_at, false).await
}

async fn segment_batch(
    State(s): State<Shared>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    // A wrong key in the headers is refused before the body is decompressed and parsed.
    if s.keys.refuses_headers(&headers) {
        return unauthorized();
    }
    let bytes = match body(&headers, raw, s.max_decompressed_bytes) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    segment_common(&s, &headers, &bytes, false).await
}

async fn segment_single(
    State(s): State<Shared>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    // A wrong key in the headers is refused before the body is decompressed and parsed.
    if s.keys.refuses_headers(&headers) {
        return unauthorized();
    }
    let bytes = match body(&headers, raw, s.max_decompressed_bytes) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    segment_common(&s, &headers, &bytes, true).await
}

async fn segment_common(s: &AppState, headers: &HeaderMap, bytes: &[u8], single: bool) -> Response {
    let received_at = now_ms();
    let wrapped;
    let batch_bytes: &[u8] = if single {
        // A single call is a batch of one; its writeKey, sentAt and context stay on the message.
        let message: Result<&RawValue, _> = serde_json::from_slice(bytes);
        match message {
            Ok(m) => {
                wrapped = format!("{{\"batch\":[{}]}}", m.get());
                wrapped.as_bytes()
            }
            Err(_) => bytes,
        }
    } else {
        bytes
    };
    let parsed_batch: Result<segment::SegmentBatch<'_>, _> = serde_json::from_slice(batch_bytes);
    let body_key = match &parsed_batch {
        Ok(b) => b.write_key.clone(),
        Err(_) => serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| {
                v.get("writeKey")
                    .and_then(|k| k.as_str())
                    .map(str::to_owned)
            }),
    };
    let Some(app) = s.keys.app(headers, body_key.as_deref()).map(str::to_owned) else {
        return unauthorized();
    };
    let batch = match parsed_batch {
        Ok(b) => b,
        Err(e) => {
            let detail = format!("body is not a Segment batch: {e}");
            return malformed(s, &app, bytes, detail, received_at).await;
        }
    };
    if batch.batch.len() > s.max_batch_len {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_long",
            format!(
                "{} events; the limit is {}",
                batch.batch.len(),
                s.max_batch_len
            ),
        );
    }
    if let Err(resp) = rate_limit(s, &app, batch.batch.len()) {
        return resp;
    }
    let ctx = Context {
        app_id: &app,
        received_at,
        max_event_bytes: s.max_event_bytes,
        time: &s.time,
    };
    let parsed: Vec<Parsed> = batch
        .batch
        .iter()
        .map(|m| segment::parse_message(m, &batch, &ctx))
        .collect();
    finish(s, &app, parsed, received_at, true).await
}
