//! The decision loop: for every dataset with partitions committed since its last trigger,
//! the policy decides; a decision is stored with its deliveries in one transaction, under a
//! per-dataset advisory lock, with an id derived from the partitions it covers. A restart
//! therefore never fires twice for the same partitions, and what was due is decided again.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    deliver::sinks_for,
    event::{EVENT_TYPE, PartitionRefData, Trigger, TriggerData, label_rates},
    observability, policy,
    store::{self, NewDecision},
};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("event: {0}")]
    Json(#[from] serde_json::Error),
}

/// Evaluates every dataset every `trigger.evaluate_interval_ms` until `shutdown`.
pub async fn run(cfg: Arc<Config>, control: PgPool, shutdown: CancellationToken) {
    let every = Duration::from_millis(cfg.trigger.evaluate_interval_ms);
    loop {
        if let Err(e) = evaluate_all(&cfg, &control).await {
            tracing::warn!(error = %e, "Trigger evaluation failed; trying again");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// One evaluation of every dataset with pending partitions; returns the decisions taken.
pub async fn evaluate_all(cfg: &Config, control: &PgPool) -> Result<usize, DecideError> {
    let mut fired = 0;
    for dataset in store::datasets_with_pending(control).await? {
        if evaluate(cfg, control, &dataset, now_ms()).await? {
            fired += 1;
        }
    }
    Ok(fired)
}

/// Evaluates one dataset at `now`; true when a trigger fired.
pub async fn evaluate(
    cfg: &Config,
    control: &PgPool,
    dataset: &str,
    now: i64,
) -> Result<bool, DecideError> {
    let Some(policy) = cfg.policy(dataset) else {
        return Ok(false);
    };
    let mut tx = control.begin().await?;
    // One decider per dataset at a time, across instances.
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('feedloop.trigger.' || $1))")
            .bind(dataset)
            .fetch_one(&mut *tx)
            .await?;
    if !locked {
        return Ok(false);
    }
    let previous = store::previous(control, dataset).await?;
    let after = previous.as_ref().map_or(0, |(seq, _)| *seq);
    let Some(set) = store::pending(control, dataset, after).await? else {
        return Ok(false);
    };
    observability::pending_rows(dataset, set.pending.new_rows);
    let Some(fired) = policy::decide(policy, &set.pending, previous.as_ref().map(|(_, p)| p), now)
    else {
        return Ok(false);
    };
    let id = store::decision_id(dataset, set.from_seq, set.through_seq);
    let trigger = Trigger {
        id: id.to_string(),
        source: cfg.trigger.source.clone(),
        specversion: "1.0".into(),
        kind: EVENT_TYPE.into(),
        time: now,
        subject: Some(dataset.to_owned()),
        datacontenttype: "application/json".into(),
        data: TriggerData {
            dataset: dataset.to_owned(),
            rule: fired.rule.to_owned(),
            reason: fired.reason.clone(),
            metrics: fired.metrics.clone(),
            partitions: set.partitions.iter().map(PartitionRefData::from).collect(),
            row_count: set.partitions.iter().map(|p| p.row_count).sum(),
            label_rates: label_rates(&set.pending.label_counts),
        },
    };
    let event = serde_json::to_string(&trigger)?;
    let sinks = sinks_for(cfg, dataset);
    let inserted = store::insert_decision(
        &mut tx,
        &NewDecision {
            id,
            dataset,
            rule: fired.rule,
            reason: &fired.reason,
            from_seq: set.from_seq,
            through_seq: set.through_seq,
            label_counts: &set.pending.label_counts,
            event: &event,
            sinks: &sinks,
        },
    )
    .await?;
    tx.commit().await?;
    if inserted {
        observability::decision(dataset, fired.rule);
        observability::pending_rows(dataset, 0);
        tracing::info!(dataset, decision = %id, rule = fired.rule, reason = %fired.reason, "Retraining triggered");
    }
    Ok(inserted)
}
