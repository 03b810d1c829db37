//! The admin API: create, read, list and retry erasure requests, and read their certificates.
//! Bearer-token auth; JSON in and out; errors as `{"code", "message"}`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use feedloop_core::http::{bearer_token, constant_time_eq, json_error};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{config::Config, observability, store};

#[derive(Clone)]
pub struct Api {
    pub cfg: Arc<Config>,
    pub control: PgPool,
}

pub const OPENAPI: &str = include_str!("../openapi.json");

/// The API routes (auth applies to `/v1`).
pub fn routes(api: Api) -> Router {
    let v1 = Router::new()
        .route("/v1/erasure-requests", post(create).get(list))
        .route("/v1/erasure-requests/{id}", get(read))
        .route("/v1/erasure-requests/{id}/retry", post(retry))
        .route("/v1/erasure-requests/{id}/certificate", get(certificate))
        .route_layer(middleware::from_fn_with_state(api.clone(), auth))
        .with_state(api.clone());
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { ([("content-type", "application/json")], OPENAPI) }),
        )
        .merge(v1)
        .layer(axum::extract::DefaultBodyLimit::max(
            api.cfg.http.max_body_bytes,
        ))
}

async fn auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    let ok = bearer_token(req.headers()).is_some_and(|t| {
        constant_time_eq(t.as_bytes(), api.cfg.auth.admin_token.expose().as_bytes())
    });
    if ok {
        next.run(req).await
    } else {
        json_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the admin token as `Authorization: Bearer <token>`",
        )
    }
}

fn bad_request(message: impl Into<String>) -> Response {
    json_error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "Eraser API error");
    json_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see the eraser's logs",
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    user_ids: Vec<String>,
    reason: String,
    requested_by: String,
    #[serde(default)]
    idempotency_key: Option<String>,
}

async fn create(
    State(api): State<Api>,
    headers: HeaderMap,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        // Over `http.max_body_bytes`: 413, not 400.
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return json_error(e.status(), "body_too_large", e.body_text());
        }
        Err(e) => return bad_request(e.body_text()),
    };
    let max = api.cfg.erasure.max_users;
    if body.user_ids.is_empty() || body.user_ids.len() > max {
        return bad_request(format!("user_ids: give 1 to {max} user ids"));
    }
    if let Some(i) = body
        .user_ids
        .iter()
        .position(|u| u.trim().is_empty() || u.len() > 256)
    {
        return bad_request(format!("user_ids[{i}]: must be 1 to 256 characters"));
    }
    if body.reason.trim().is_empty() || body.reason.len() > 2000 {
        return bad_request("reason: required, at most 2000 characters");
    }
    if body.requested_by.trim().is_empty() || body.requested_by.len() > 256 {
        return bad_request("requested_by: required, at most 256 characters");
    }
    let key = body.idempotency_key.or_else(|| {
        headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 256) {
        return bad_request("idempotency_key: 1 to 256 characters");
    }
    let mut users = body.user_ids;
    users.sort();
    users.dedup();
    let new = store::NewRequest {
        user_ids: users,
        reason: body.reason,
        requested_by: body.requested_by,
        origin: "api".into(),
        idempotency_key: key.map(|k| format!("api:{k}")),
        deadline_ms: i64::from(api.cfg.erasure.deadline_days) * 86_400_000,
    };
    match store::create(&api.control, &new).await {
        Ok((id, true)) => {
            observability::request("api");
            (
                StatusCode::ACCEPTED,
                Json(json!({ "id": id, "status": "pending", "created": true })),
            )
                .into_response()
        }
        Ok((id, false)) => {
            (StatusCode::OK, Json(json!({ "id": id, "created": false }))).into_response()
        }
        Err(e) => internal(e),
    }
}

fn parse_id(id: &str) -> Result<Uuid, Box<Response>> {
    Uuid::parse_str(id)
        .map_err(|_| Box::new(bad_request(format!("`{id}` is not a request id (a UUID)"))))
}

fn not_found(id: Uuid) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no erasure request {id}"),
    )
}

async fn read(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match store::get(&api.control, id).await {
        Ok(Some(r)) => Json(r).into_response(),
        Ok(None) => not_found(id),
        Err(e) => internal(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    user_id: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(api): State<Api>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return bad_request(e.body_text()),
    };
    if let Some(s) = &q.status
        && !["pending", "running", "completed", "partially_failed"].contains(&s.as_str())
    {
        return bad_request("status: one of pending, running, completed, partially_failed");
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    match store::list(
        &api.control,
        q.status.as_deref(),
        q.user_id.as_deref(),
        limit,
    )
    .await
    {
        Ok(rs) => Json(json!({ "requests": rs })).into_response(),
        Err(e) => internal(e),
    }
}

async fn retry(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match store::get(&api.control, id).await {
        Ok(None) => return not_found(id),
        Err(e) => return internal(e),
        Ok(Some(_)) => {}
    }
    match store::retry(&api.control, id).await {
        Ok(n) => (
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "retried_targets": n })),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

async fn certificate(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match store::certificate(&api.control, id).await {
        Ok(Some(c)) => Json(c).into_response(),
        Ok(None) => json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no certificate for {id}: the request does not exist or has not completed"),
        ),
        Err(e) => internal(e),
    }
}
