//! Requests that arrive on `feedloop.erasure.requests` (cdc raises them when a user row is
//! deleted or soft-deleted): each becomes a request here, once, keyed by its request id.
//! Consumed with `feedloop_core::intake`: records that do not decode, or name no user, go to
//! the dead-letter topic; the offset is committed only after the request is stored.

use feedloop_core::{
    intake::{Failure, Handled},
    model::{ErasureOrigin, ErasureRequest},
};
use sqlx::PgPool;

use crate::{observability, store};

fn origin_name(o: ErasureOrigin) -> &'static str {
    match o {
        ErasureOrigin::Api => "api",
        ErasureOrigin::CdcDelete => "cdc_delete",
        ErasureOrigin::CdcSoftDelete => "cdc_soft_delete",
        ErasureOrigin::Other => "other",
    }
}

/// Stores one request from the log (idempotent: a request read again is found by its key).
pub async fn take(
    control: &PgPool,
    request: ErasureRequest,
    default_deadline_ms: i64,
) -> Result<Handled, Failure> {
    if request.user_ids.is_empty() {
        return Ok(Handled::Poison("no user ids".into()));
    }
    let origin = origin_name(request.origin);
    let new = store::NewRequest {
        user_ids: request.user_ids,
        reason: request.reason,
        requested_by: request.requested_by,
        origin: origin.to_owned(),
        idempotency_key: Some(format!("{origin}:{}", request.request_id)),
        deadline_ms: if request.deadline_at > request.requested_at {
            request.deadline_at - request.requested_at
        } else {
            default_deadline_ms
        },
    };
    let (id, created) = store::create(control, &new)
        .await
        .map_err(|store::StoreError::Postgres(e)| Failure::from(e))?;
    if created {
        observability::request(origin);
        tracing::info!(request = %id, origin, "Erasure request received from the log");
    }
    Ok(Handled::Done)
}
