//! The pull API for sensors (an Airflow HttpSensor, a Dagster sensor): datasets, their
//! committed partition versions paged by cursor, and the triggers with their deliveries.
//! Bearer-token auth; JSON; errors as `{"code", "message"}`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use feedloop_core::http::{bearer_token, constant_time_eq, json_error};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};

use crate::config::Config;

#[derive(Clone)]
pub struct Api {
    pub cfg: Arc<Config>,
    pub control: PgPool,
}

pub const OPENAPI: &str = include_str!("../openapi.json");

pub fn routes(api: Api) -> Router {
    let v1 = Router::new()
        .route("/v1/datasets", get(datasets))
        .route("/v1/datasets/{name}/partitions", get(partitions))
        .route("/v1/triggers", get(triggers))
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
    let ok = bearer_token(req.headers())
        .is_some_and(|t| constant_time_eq(t.as_bytes(), api.cfg.auth.token.expose().as_bytes()));
    if ok {
        next.run(req).await
    } else {
        json_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the API token as `Authorization: Bearer <token>`",
        )
    }
}

fn bad_request(message: impl Into<String>) -> Response {
    json_error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "Trigger API error");
    json_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see the trigger's logs",
    )
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

async fn datasets(State(api): State<Api>) -> Response {
    let rows = sqlx::query(
        "WITH latest AS (
           SELECT DISTINCT ON (dataset, partition) dataset, partition, row_count
           FROM trigger.partitions ORDER BY dataset, partition, version DESC),
         last AS (
           SELECT DISTINCT ON (dataset) dataset, id::text AS id, rule, through_seq,
                  (EXTRACT(EPOCH FROM decided_at) * 1000)::bigint AS decided_ms
           FROM trigger.decisions ORDER BY dataset, through_seq DESC)
         SELECT p.dataset,
                (SELECT count(*) FROM latest l WHERE l.dataset = p.dataset) AS partitions,
                (SELECT COALESCE(sum(row_count), 0)::bigint FROM latest l WHERE l.dataset = p.dataset) AS rows,
                max(p.seq) AS latest_cursor,
                (EXTRACT(EPOCH FROM max(p.committed_at)) * 1000)::bigint AS last_committed_ms,
                COALESCE(sum(p.added_rows) FILTER (WHERE p.seq > COALESCE(d.through_seq, 0)), 0)::bigint AS pending_rows,
                d.id, d.rule, d.decided_ms
         FROM trigger.partitions p LEFT JOIN last d ON d.dataset = p.dataset
         GROUP BY p.dataset, d.id, d.rule, d.decided_ms, d.through_seq
         ORDER BY p.dataset",
    )
    .fetch_all(&api.control)
    .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            let id: Option<String> = r.try_get("id").unwrap_or_default();
            json!({
                "name": r.try_get::<String, _>("dataset").unwrap_or_default(),
                "partitions": r.try_get::<i64, _>("partitions").unwrap_or_default(),
                "rows": r.try_get::<i64, _>("rows").unwrap_or_default(),
                "latest_cursor": r.try_get::<i64, _>("latest_cursor").unwrap_or_default().to_string(),
                "last_committed_at_ms": r.try_get::<i64, _>("last_committed_ms").unwrap_or_default(),
                "rows_since_last_trigger": r.try_get::<i64, _>("pending_rows").unwrap_or_default(),
                "last_trigger": id.map(|id| json!({
                    "id": id,
                    "rule": r.try_get::<String, _>("rule").unwrap_or_default(),
                    "decided_at_ms": r.try_get::<i64, _>("decided_ms").unwrap_or_default(),
                })),
            })
        })
        .collect();
    Json(json!({ "datasets": list })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    after: Option<String>,
    limit: Option<i64>,
}

async fn partitions(
    State(api): State<Api>,
    Path(name): Path<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return bad_request("query: `after` (a cursor) and `limit` (1 to max) only");
    };
    if !valid_name(&name) {
        return bad_request("dataset name: letters, digits, _ - . only");
    }
    let after = match q.after.as_deref() {
        None | Some("") => 0,
        Some(c) => match c.parse::<i64>() {
            Ok(v) if v >= 0 => v,
            _ => return bad_request("after: a cursor from a previous page (next_cursor)"),
        },
    };
    let max = api.cfg.trigger.max_page;
    let limit = q.limit.unwrap_or(100);
    if !(1..=max).contains(&limit) {
        return bad_request(format!("limit: 1 to {max}"));
    }
    let known: Result<bool, _> =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM trigger.partitions WHERE dataset = $1)")
            .bind(&name)
            .fetch_one(&api.control)
            .await;
    match known {
        Ok(true) => {}
        Ok(false) => {
            return json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no partition of dataset {name} was committed"),
            );
        }
        Err(e) => return internal(e),
    }
    let rows = sqlx::query(
        "SELECT seq, partition, version, manifest_uri, row_count, added_rows, manifest,
                (EXTRACT(EPOCH FROM committed_at) * 1000)::bigint AS committed_ms
         FROM trigger.partitions WHERE dataset = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(&name)
    .bind(after)
    .bind(limit)
    .fetch_all(&api.control)
    .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let mut next = after;
    let items: Vec<Value> = rows
        .iter()
        .map(|r| {
            let seq: i64 = r.try_get("seq").unwrap_or_default();
            next = next.max(seq);
            let manifest: Value = r
                .try_get::<String, _>("manifest")
                .ok()
                .and_then(|m| serde_json::from_str(&m).ok())
                .unwrap_or(Value::Null);
            json!({
                "cursor": seq.to_string(),
                "partition": r.try_get::<String, _>("partition").unwrap_or_default(),
                "version": r.try_get::<i32, _>("version").unwrap_or_default(),
                "supersedes_version": manifest["supersedes_version"],
                "erasure_epoch": manifest["erasure_epoch"],
                "manifest_uri": r.try_get::<String, _>("manifest_uri").unwrap_or_default(),
                "row_count": r.try_get::<i64, _>("row_count").unwrap_or_default(),
                "added_rows": r.try_get::<i64, _>("added_rows").unwrap_or_default(),
                "label_counts": manifest["label_counts"],
                "committed_at_ms": r.try_get::<i64, _>("committed_ms").unwrap_or_default(),
            })
        })
        .collect();
    Json(json!({
        "dataset": name,
        "partitions": items,
        "next_cursor": next.to_string(),
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggersQuery {
    dataset: Option<String>,
    limit: Option<i64>,
}

async fn triggers(
    State(api): State<Api>,
    query: Result<Query<TriggersQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return bad_request("query: `dataset` and `limit` only");
    };
    if q.dataset.as_deref().is_some_and(|d| !valid_name(d)) {
        return bad_request("dataset: letters, digits, _ - . only");
    }
    let max = api.cfg.trigger.max_page;
    let limit = q.limit.unwrap_or(100);
    if !(1..=max).contains(&limit) {
        return bad_request(format!("limit: 1 to {max}"));
    }
    let rows = sqlx::query(
        "SELECT d.id::text AS id, d.dataset, d.rule, d.reason, d.event,
                (EXTRACT(EPOCH FROM d.decided_at) * 1000)::bigint AS decided_ms,
                COALESCE((SELECT json_agg(json_build_object(
                    'sink', x.sink, 'status', x.status, 'attempts', x.attempts,
                    'last_error', x.last_error,
                    'delivered_at_ms', (EXTRACT(EPOCH FROM x.delivered_at) * 1000)::bigint)
                  ORDER BY x.sink)::text
                  FROM trigger.deliveries x WHERE x.decision_id = d.id), '[]') AS deliveries
         FROM trigger.decisions d
         WHERE $1::text IS NULL OR d.dataset = $1
         ORDER BY d.decided_at DESC, d.id LIMIT $2",
    )
    .bind(&q.dataset)
    .bind(limit)
    .fetch_all(&api.control)
    .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let parse = |text: String| serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
    let list: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            json!({
                "id": r.try_get::<String, _>("id").unwrap_or_default(),
                "dataset": r.try_get::<String, _>("dataset").unwrap_or_default(),
                "rule": r.try_get::<String, _>("rule").unwrap_or_default(),
                "reason": r.try_get::<String, _>("reason").unwrap_or_default(),
                "decided_at_ms": r.try_get::<i64, _>("decided_ms").unwrap_or_default(),
                "event": parse(r.try_get("event").unwrap_or_default()),
                "deliveries": parse(r.try_get("deliveries").unwrap_or_default()),
            })
        })
        .collect();
    Json(json!({ "triggers": list })).into_response()
}
