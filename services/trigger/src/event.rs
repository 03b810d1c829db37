//! A retraining trigger: a CloudEvents 1.0 event. As Avro on `feedloop.retrain`
//! (`io.feedloop.trigger.RetrainTrigger`, the context attributes as fields), and as JSON for
//! HTTP sinks (the CloudEvents JSON format, `time` in RFC 3339).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::store::PartitionRef;

pub const EVENT_TYPE: &str = "io.feedloop.retrain.requested";

/// `io.feedloop.trigger.RetrainTrigger`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub id: String,
    pub source: String,
    pub specversion: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Epoch ms.
    pub time: i64,
    pub subject: Option<String>,
    pub datacontenttype: String,
    pub data: TriggerData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerData {
    pub dataset: String,
    pub rule: String,
    pub reason: String,
    pub metrics: BTreeMap<String, f64>,
    pub partitions: Vec<PartitionRefData>,
    pub row_count: i64,
    pub label_rates: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionRefData {
    pub partition: String,
    pub version: i32,
    pub manifest_uri: String,
    pub row_count: i64,
}

impl From<&PartitionRef> for PartitionRefData {
    fn from(p: &PartitionRef) -> Self {
        Self {
            partition: p.partition.clone(),
            version: p.version,
            manifest_uri: p.manifest_uri.clone(),
            row_count: p.row_count,
        }
    }
}

/// Shares of rows per label.
pub fn label_rates(counts: &BTreeMap<String, i64>) -> BTreeMap<String, f64> {
    let total: i64 = counts.values().filter(|n| **n > 0).sum();
    counts
        .iter()
        .filter(|(_, n)| **n > 0 && total > 0)
        .map(|(k, n)| (k.clone(), *n as f64 / total as f64))
        .collect()
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl Trigger {
    /// The CloudEvents JSON format (structured mode).
    pub fn to_cloudevent(&self) -> Value {
        json!({
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.kind,
            "time": rfc3339(self.time),
            "subject": self.subject,
            "datacontenttype": self.datacontenttype,
            "data": self.data,
        })
    }

    /// The context attributes as HTTP headers (binary mode).
    pub fn ce_headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("ce-specversion", self.specversion.clone()),
            ("ce-id", self.id.clone()),
            ("ce-source", self.source.clone()),
            ("ce-type", self.kind.clone()),
            ("ce-time", rfc3339(self.time)),
        ];
        if let Some(s) = &self.subject {
            h.push(("ce-subject", s.clone()));
        }
        h
    }

    /// What schedulers get as `extra` / metadata: the decision and the manifests.
    pub fn extra(&self) -> Value {
        json!({
            "feedloop_decision_id": self.id,
            "dataset": self.data.dataset,
            "rule": self.data.rule,
            "reason": self.data.reason,
            "row_count": self.data.row_count,
            "manifest_uris": self.data.partitions.iter().map(|p| p.manifest_uri.as_str()).collect::<Vec<_>>(),
            "partitions": self.data.partitions,
            "label_rates": self.data.label_rates,
            "metrics": self.data.metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_cloudevents_json_format() {
        let t = Trigger {
            id: "d-1".into(),
            source: "/feedloop/trigger".into(),
            specversion: "1.0".into(),
            kind: EVENT_TYPE.into(),
            time: 1_795_000_000_250,
            subject: Some("ds".into()),
            datacontenttype: "application/json".into(),
            data: TriggerData {
                dataset: "ds".into(),
                rule: "min_new_rows".into(),
                reason: "r".into(),
                metrics: BTreeMap::new(),
                partitions: vec![],
                row_count: 0,
                label_rates: label_rates(&BTreeMap::from([
                    ("positive".into(), 1),
                    ("negative".into(), 3),
                ])),
            },
        };
        let ce = t.to_cloudevent();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["type"], "io.feedloop.retrain.requested");
        assert_eq!(ce["time"], "2026-11-18T11:06:40.250Z");
        assert_eq!(ce["data"]["label_rates"]["positive"], 0.25);
        assert!(t.ce_headers().contains(&("ce-id", "d-1".into())));
    }
}
