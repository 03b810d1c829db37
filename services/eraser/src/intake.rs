//! Requests that arrive on `feedloop.erasure.requests` (cdc raises them when a user row is
//! deleted or soft-deleted): each becomes a request here, once, keyed by its request id.
//! Records that do not decode go to the dead-letter topic; the offset is committed only after
//! the request is stored.

use std::{sync::Arc, time::Duration};

use feedloop_core::{
    avro::CompiledSchema,
    catalogue::{DEADLETTER_TOPIC, ERASURE_REQUESTS_TOPIC},
    model::{DeadLetter, DeadLetterReason, ErasureOrigin, ErasureRequest},
    registry_client::RegistryClient,
};
use futures_util::StreamExt;
use rdkafka::{
    Message,
    consumer::{CommitMode, Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{config::Config, observability, store};

pub struct Intake {
    consumer: StreamConsumer,
    control: PgPool,
    registry: Arc<RegistryClient>,
    producer: FutureProducer,
    deadletter: Option<Arc<CompiledSchema>>,
    deadline_ms: i64,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake").finish_non_exhaustive()
    }
}

fn origin_name(o: ErasureOrigin) -> &'static str {
    match o {
        ErasureOrigin::Api => "api",
        ErasureOrigin::CdcDelete => "cdc_delete",
        ErasureOrigin::CdcSoftDelete => "cdc_soft_delete",
        ErasureOrigin::Other => "other",
    }
}

impl Intake {
    pub fn new(
        cfg: &Config,
        control: PgPool,
        registry: Arc<RegistryClient>,
        producer: FutureProducer,
        deadletter: Option<Arc<CompiledSchema>>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let consumer: StreamConsumer = cfg
            .kafka
            .client_config("feedloop-eraser-intake")
            .set("group.id", "feedloop-eraser")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[ERASURE_REQUESTS_TOPIC])?;
        Ok(Self {
            consumer,
            control,
            registry,
            producer,
            deadletter,
            deadline_ms: i64::from(cfg.erasure.deadline_days) * 86_400_000,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut stream = self.consumer.stream();
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => return,
                m = stream.next() => m,
            };
            let Some(msg) = msg else { return };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "Erasure request intake: Kafka error");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let payload = msg.payload().unwrap_or_default().to_vec();
            loop {
                match self.take(&payload, msg.partition(), msg.offset()).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot store an erasure request yet; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
            if let Err(e) = self.consumer.commit_message(&msg, CommitMode::Async) {
                tracing::warn!(error = %e, "Cannot commit the intake offset; the request may be read again (idempotent)");
            }
        }
    }

    /// Stores one record's request; poison goes to the dead-letter topic.
    async fn take(&self, payload: &[u8], partition: i32, offset: i64) -> Result<(), String> {
        let request: ErasureRequest = match self.registry.decode(payload).await {
            Ok(r) => r,
            Err(feedloop_core::registry_client::RegistryClientError::Codec(e)) => {
                return self
                    .dead_letter(&e.to_string(), payload, partition, offset)
                    .await;
            }
            Err(e) => return Err(e.to_string()),
        };
        if request.user_ids.is_empty() {
            return self
                .dead_letter("no user ids", payload, partition, offset)
                .await;
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
                self.deadline_ms
            },
        };
        let (id, created) = store::create(&self.control, &new)
            .await
            .map_err(|e| e.to_string())?;
        if created {
            observability::request(origin);
            tracing::info!(request = %id, origin, "Erasure request received from the log");
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        detail: &str,
        original: &[u8],
        partition: i32,
        offset: i64,
    ) -> Result<(), String> {
        tracing::warn!(
            partition,
            offset,
            detail,
            "Undecodable erasure request sent to the dead-letter topic"
        );
        let Some(schema) = &self.deadletter else {
            return Ok(());
        };
        let dl = DeadLetter {
            dead_letter_id: Uuid::now_v7(),
            service: "eraser".into(),
            reason: DeadLetterReason::DecodeFailure,
            detail: detail.to_owned(),
            path: None,
            event_type: None,
            event_id: None,
            app_id: None,
            source_topic: Some(ERASURE_REQUESTS_TOPIC.into()),
            source_partition: Some(partition),
            source_offset: Some(offset),
            original: original.to_vec(),
            received_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        };
        let mut value = Vec::new();
        schema.encode(&dl, &mut value).map_err(|e| e.to_string())?;
        let key = format!("{ERASURE_REQUESTS_TOPIC}/{partition}");
        self.producer
            .send(
                FutureRecord::to(DEADLETTER_TOPIC).key(&key).payload(&value),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e.to_string())?;
        Ok(())
    }
}
