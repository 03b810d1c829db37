//! Erasure state in Postgres (`eraser.*`): requests, per-target state, and every transition.

use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

/// The targets every request goes through, in order.
pub const TARGETS: &[&str] = &[
    "inventory",
    "suppression",
    "crypto_keys",
    "join_state",
    "datasets",
    "labels_topic",
    "tombstones",
    "verify",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("control database: {0}")]
    Postgres(#[from] sqlx::Error),
}

/// A new request.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub user_ids: Vec<String>,
    pub reason: String,
    pub requested_by: String,
    pub origin: String,
    pub idempotency_key: Option<String>,
    pub deadline_ms: i64,
}

/// One target's state.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetState {
    pub target: String,
    pub status: String,
    pub attempts: i32,
    pub affected: i64,
    pub details: serde_json::Value,
    pub error: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// A request and its targets, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RequestState {
    pub id: Uuid,
    pub status: String,
    pub user_count: usize,
    pub reason: String,
    pub requested_by: String,
    pub origin: String,
    pub idempotency_key: Option<String>,
    pub requested_at: String,
    pub deadline_at: String,
    pub completed_at: Option<String>,
    pub targets: Vec<TargetState>,
}

/// Inserts a request with its targets; with an idempotency key already used, returns the
/// existing request's id and `false`.
pub async fn create(pool: &PgPool, r: &NewRequest) -> Result<(Uuid, bool), StoreError> {
    let mut tx = pool.begin().await?;
    let id = Uuid::now_v7();
    let inserted: Option<String> = sqlx::query_scalar(
        "INSERT INTO eraser.requests (id, idempotency_key, user_ids, reason, requested_by, origin, status, deadline_at)
         VALUES ($1::uuid, $2, $3, $4, $5, $6, 'pending', now() + make_interval(secs => $7::float8 / 1000))
         ON CONFLICT (idempotency_key) DO NOTHING RETURNING id::text",
    )
    .bind(id.to_string())
    .bind(&r.idempotency_key)
    .bind(&r.user_ids)
    .bind(&r.reason)
    .bind(&r.requested_by)
    .bind(&r.origin)
    .bind(r.deadline_ms as f64)
    .fetch_optional(&mut *tx)
    .await?;
    if inserted.is_none() {
        let existing: String =
            sqlx::query_scalar("SELECT id::text FROM eraser.requests WHERE idempotency_key = $1")
                .bind(&r.idempotency_key)
                .fetch_one(&mut *tx)
                .await?;
        tx.rollback().await?;
        return Ok((Uuid::parse_str(&existing).unwrap_or(id), false));
    }
    for t in TARGETS {
        sqlx::query("INSERT INTO eraser.targets (request_id, target, status) VALUES ($1::uuid, $2, 'pending')")
            .bind(id.to_string())
            .bind(*t)
            .execute(&mut *tx)
            .await?;
    }
    transition(&mut tx, id, None, None, "pending", "requested").await?;
    tx.commit().await?;
    Ok((id, true))
}

pub async fn transition(
    conn: &mut sqlx::PgConnection,
    id: Uuid,
    target: Option<&str>,
    from: Option<&str>,
    to: &str,
    detail: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO eraser.transitions (request_id, target, from_status, to_status, detail)
         VALUES ($1::uuid, $2, $3, $4, $5)",
    )
    .bind(id.to_string())
    .bind(target)
    .bind(from)
    .bind(to)
    .bind(detail)
    .execute(conn)
    .await?;
    Ok(())
}

fn request_state(
    r: &sqlx::postgres::PgRow,
    targets: Vec<TargetState>,
) -> Result<RequestState, StoreError> {
    let users: Vec<String> = r.try_get("user_ids")?;
    Ok(RequestState {
        id: Uuid::parse_str(&r.try_get::<String, _>("id")?).unwrap_or_default(),
        status: r.try_get("status")?,
        user_count: users.len(),
        reason: r.try_get("reason")?,
        requested_by: r.try_get("requested_by")?,
        origin: r.try_get("origin")?,
        idempotency_key: r.try_get("idempotency_key")?,
        requested_at: r.try_get("requested_at")?,
        deadline_at: r.try_get("deadline_at")?,
        completed_at: r.try_get("completed_at")?,
        targets,
    })
}

const REQUEST_COLUMNS: &str = "id::text AS id, status, user_ids, reason, requested_by, origin, idempotency_key,
    requested_at::text AS requested_at, deadline_at::text AS deadline_at, completed_at::text AS completed_at";

pub async fn targets(pool: &PgPool, id: Uuid) -> Result<Vec<TargetState>, StoreError> {
    let rows = sqlx::query(
        "SELECT target, status, attempts, affected, details, error, started_at::text AS started_at,
                finished_at::text AS finished_at
         FROM eraser.targets WHERE request_id = $1::uuid",
    )
    .bind(id.to_string())
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(TargetState {
            target: r.try_get("target")?,
            status: r.try_get("status")?,
            attempts: r.try_get("attempts")?,
            affected: r.try_get("affected")?,
            details: serde_json::from_str(&r.try_get::<String, _>("details")?).unwrap_or_default(),
            error: r.try_get("error")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
        });
    }
    out.sort_by_key(|t| TARGETS.iter().position(|x| *x == t.target));
    Ok(out)
}

pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<RequestState>, StoreError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {REQUEST_COLUMNS} FROM eraser.requests WHERE id = $1::uuid"
    )))
    .bind(id.to_string())
    .fetch_optional(pool)
    .await?;
    match row {
        Some(r) => Ok(Some(request_state(&r, targets(pool, id).await?)?)),
        None => Ok(None),
    }
}

/// Requests by status and/or user, newest first.
pub async fn list(
    pool: &PgPool,
    status: Option<&str>,
    user_id: Option<&str>,
    limit: i64,
) -> Result<Vec<RequestState>, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {REQUEST_COLUMNS} FROM eraser.requests
         WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR user_ids @> ARRAY[$2])
         ORDER BY requested_at DESC LIMIT $3"
    )))
    .bind(status)
    .bind(user_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for r in &rows {
        out.push(request_state(r, Vec::new())?);
    }
    Ok(out)
}

/// The users of a request.
pub async fn users(pool: &PgPool, id: Uuid) -> Result<Vec<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT user_ids FROM eraser.requests WHERE id = $1::uuid")
            .bind(id.to_string())
            .fetch_one(pool)
            .await?,
    )
}

/// Puts failed targets of a request back to pending; returns how many.
pub async fn retry(pool: &PgPool, id: Uuid) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "UPDATE eraser.targets SET status = 'pending', attempts = 0, error = NULL
         WHERE request_id = $1::uuid AND status = 'failed'",
    )
    .bind(id.to_string())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n > 0 {
        sqlx::query(
            "UPDATE eraser.requests SET status = 'pending', updated_at = now() WHERE id = $1::uuid",
        )
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        transition(
            &mut tx,
            id,
            None,
            Some("partially_failed"),
            "pending",
            "retry requested",
        )
        .await?;
    }
    tx.commit().await?;
    Ok(n)
}

/// Open request ids, oldest first.
pub async fn open(pool: &PgPool) -> Result<Vec<Uuid>, StoreError> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id::text FROM eraser.requests WHERE status IN ('pending', 'running') ORDER BY requested_at LIMIT 100",
    )
    .fetch_all(pool)
    .await?;
    Ok(ids.iter().filter_map(|i| Uuid::parse_str(i).ok()).collect())
}

pub async fn set_request_status(
    pool: &PgPool,
    id: Uuid,
    to: &str,
    detail: &str,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let from: Option<String> =
        sqlx::query_scalar("SELECT status FROM eraser.requests WHERE id = $1::uuid FOR UPDATE")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
    if from.as_deref() != Some(to) {
        sqlx::query(
            "UPDATE eraser.requests SET status = $2, updated_at = now(),
               completed_at = CASE WHEN $2 = 'completed' THEN now() ELSE completed_at END
             WHERE id = $1::uuid",
        )
        .bind(id.to_string())
        .bind(to)
        .execute(&mut *tx)
        .await?;
        transition(&mut tx, id, None, from.as_deref(), to, detail).await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn set_target(
    pool: &PgPool,
    id: Uuid,
    target: &str,
    to: &str,
    affected: i64,
    details: &serde_json::Value,
    error: Option<&str>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let from: Option<String> = sqlx::query_scalar(
        "SELECT status FROM eraser.targets WHERE request_id = $1::uuid AND target = $2 FOR UPDATE",
    )
    .bind(id.to_string())
    .bind(target)
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE eraser.targets SET status = $3, affected = $4, details = $5, error = $6,
           attempts = attempts + CASE WHEN $3 = 'running' THEN 1 ELSE 0 END,
           started_at = CASE WHEN $3 = 'running' THEN now() ELSE started_at END,
           finished_at = CASE WHEN $3 IN ('completed', 'failed') THEN now() ELSE finished_at END
         WHERE request_id = $1::uuid AND target = $2",
    )
    .bind(id.to_string())
    .bind(target)
    .bind(to)
    .bind(affected)
    .bind(details.to_string())
    .bind(error)
    .execute(&mut *tx)
    .await?;
    transition(
        &mut tx,
        id,
        Some(target),
        from.as_deref(),
        to,
        error.unwrap_or(""),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn set_certificate(
    pool: &PgPool,
    id: Uuid,
    certificate: &serde_json::Value,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE eraser.requests SET certificate = $2 WHERE id = $1::uuid")
        .bind(id.to_string())
        .bind(certificate.to_string())
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn certificate(pool: &PgPool, id: Uuid) -> Result<Option<serde_json::Value>, StoreError> {
    let text: Option<Option<String>> =
        sqlx::query_scalar("SELECT certificate FROM eraser.requests WHERE id = $1::uuid")
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?;
    Ok(text.flatten().and_then(|t| serde_json::from_str(&t).ok()))
}

/// Records the personal values found for a request, sealed (see the migration
/// `erasure_scan`); a snapshot already recorded is kept.
pub async fn set_scan_values(
    pool: &PgPool,
    id: Uuid,
    sealed: &[u8],
    sealed_by: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE eraser.requests SET scan_values = $2, scan_sealed_by = $3
         WHERE id = $1::uuid AND scan_values IS NULL",
    )
    .bind(id.to_string())
    .bind(sealed)
    .bind(sealed_by)
    .execute(pool)
    .await?;
    Ok(())
}

/// The sealed personal values of a request and the key they are sealed with, if recorded.
pub async fn scan_values(pool: &PgPool, id: Uuid) -> Result<Option<(Vec<u8>, String)>, StoreError> {
    let row: Option<(Option<Vec<u8>>, Option<String>)> = sqlx::query_as(
        "SELECT scan_values, scan_sealed_by FROM eraser.requests WHERE id = $1::uuid",
    )
    .bind(id.to_string())
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((Some(v), Some(by))) => Some((v, by)),
        _ => None,
    })
}
