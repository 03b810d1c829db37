//! Publishing to Kafka with at-least-once bookkeeping: the records of each transaction are
//! acknowledged in order, and only then is the transaction's end LSN reported as confirmed.

use std::time::{Duration, SystemTime};

use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
};
use tokio::sync::{mpsc, watch};

use crate::observability;

/// Headers identifying a change for consumer-side deduplication: the commit's LSN and the
/// change's position in its transaction.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    pub commit_lsn: u64,
    pub ordinal: u32,
    pub xid: u32,
    /// Commit time in Postgres, epoch ms (0 when unknown).
    pub commit_ms: i64,
}

pub const COMMIT_LSN_HEADER: &str = "feedloop.commit_lsn";
pub const ORDINAL_HEADER: &str = "feedloop.ordinal";
pub const XID_HEADER: &str = "feedloop.txid";
/// Commit time in Postgres (epoch ms): lets consumers measure end-to-end lag.
pub const COMMIT_TIME_HEADER: &str = "feedloop.commit_ts_ms";

fn headers(pos: &Position, extra: &[(&str, &str)]) -> OwnedHeaders {
    let lsn = pos.commit_lsn.to_string();
    let ord = pos.ordinal.to_string();
    let xid = pos.xid.to_string();
    let at = pos.commit_ms.to_string();
    let mut h = OwnedHeaders::new()
        .insert(Header {
            key: COMMIT_TIME_HEADER,
            value: Some(at.as_str()),
        })
        .insert(Header {
            key: COMMIT_LSN_HEADER,
            value: Some(lsn.as_str()),
        })
        .insert(Header {
            key: ORDINAL_HEADER,
            value: Some(ord.as_str()),
        })
        .insert(Header {
            key: XID_HEADER,
            value: Some(xid.as_str()),
        });
    for (k, v) in extra {
        h = h.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    h
}

/// Enqueues a record, waiting while the producer's queue is full.
pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    pos: &Position,
    extra: &[(&str, &str)],
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).headers(headers(pos, extra));
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// The records of one transaction (or none, for a position to confirm) and its end LSN.
pub struct Batch {
    pub futures: Vec<DeliveryFuture>,
    pub end_lsn: u64,
    /// Commit time in Postgres, for the commit-to-ack latency.
    pub committed: Option<SystemTime>,
}

/// Awaits batches in order; publishes each end LSN once everything before it is acked, or the
/// first failure.
pub fn acker(
    mut batches: mpsc::Receiver<Batch>,
    confirmed: watch::Sender<u64>,
    failed: watch::Sender<Option<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(batch) = batches.recv().await {
            for f in batch.futures {
                match f.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => {
                        let _ = failed.send(Some(e.to_string()));
                        return;
                    }
                    Err(_) => {
                        let _ = failed.send(Some("delivery cancelled".into()));
                        return;
                    }
                }
            }
            if let Some(t) = batch.committed
                && let Ok(d) = t.elapsed()
            {
                observability::commit_to_ack(d);
            }
            observability::batch_acked();
            confirmed.send_if_modified(|c| {
                if batch.end_lsn > *c {
                    *c = batch.end_lsn;
                    true
                } else {
                    false
                }
            });
        }
    })
}
