//! The event catalogue: the Avro schemas under `schemas/` (embedded at build time), the topics
//! that carry them, and the registry subjects they are registered under.
//!
//! Schema files may refer to named types defined in other files (every event embeds
//! `io.feedloop.events.Envelope`). [`Catalogue::composed`] inlines those definitions, so that
//! what gets registered is self-contained and any Confluent client can use it unchanged.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Map, Value};

use crate::avro::{canonical, parse_schema};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/catalogue_files.rs"));
}

/// Interaction events from mobile clients, keyed by match_id (else user_id).
pub const EVENTS_TOPIC: &str = "feedloop.events";
/// Typed rejects from every service.
pub const DEADLETTER_TOPIC: &str = "feedloop.deadletter";
/// Erasure requests, from the eraser API and from cdc.
pub const ERASURE_REQUESTS_TOPIC: &str = "feedloop.erasure.requests";
/// Erasure audit certificates.
pub const ERASURE_AUDIT_TOPIC: &str = "feedloop.erasure.audit";
/// Committed dataset partition manifests.
pub const PARTITIONS_TOPIC: &str = "feedloop.datasets.partitions";
/// Retraining triggers (CloudEvents).
pub const RETRAIN_TOPIC: &str = "feedloop.retrain";

/// A topic feedloop owns, and the catalogue records it carries.
#[derive(Debug, Clone, Copy)]
pub struct TopicSpec {
    pub name: &'static str,
    pub partitions: i32,
    /// Log compaction (keyed state) instead of time retention.
    pub compacted: bool,
    /// Full names of the records the topic carries.
    pub records: &'static [&'static str],
}

impl TopicSpec {
    /// The registry subject of `record` on this topic: TopicRecordName when the topic carries
    /// several record types, TopicName (`<topic>-value`) otherwise.
    pub fn subject(&self, record: &str) -> String {
        self.subject_as(self.name, record)
    }

    /// [`subject`](Self::subject) for this topic deployed under another name (a configured
    /// topic that carries what this one does).
    pub fn subject_as(&self, name: &str, record: &str) -> String {
        if self.records.len() > 1 {
            format!("{name}-{record}")
        } else {
            format!("{name}-value")
        }
    }
}

/// Every static topic. Dynamic ones (labels per dataset, cdc tables, outbox) are created by the
/// services that own them.
pub const TOPICS: &[TopicSpec] = &[
    TopicSpec {
        name: EVENTS_TOPIC,
        partitions: 6,
        compacted: false,
        records: &[
            "io.feedloop.events.MatchImpression",
            "io.feedloop.events.MatchDecision",
            "io.feedloop.events.ChatEnded",
            "io.feedloop.events.ReportSubmitted",
            "io.feedloop.events.UserBlocked",
            "io.feedloop.events.ScreenViewed",
            "io.feedloop.events.UserIdentified",
        ],
    },
    TopicSpec {
        name: DEADLETTER_TOPIC,
        partitions: 3,
        compacted: false,
        records: &["io.feedloop.deadletter.DeadLetter"],
    },
    TopicSpec {
        name: ERASURE_REQUESTS_TOPIC,
        partitions: 3,
        compacted: false,
        records: &["io.feedloop.erasure.ErasureRequest"],
    },
    TopicSpec {
        name: ERASURE_AUDIT_TOPIC,
        partitions: 1,
        compacted: false,
        records: &["io.feedloop.erasure.ErasureAudit"],
    },
    TopicSpec {
        name: PARTITIONS_TOPIC,
        partitions: 3,
        compacted: false,
        records: &["io.feedloop.datasets.DatasetPartition"],
    },
    TopicSpec {
        name: RETRAIN_TOPIC,
        partitions: 1,
        compacted: false,
        records: &["io.feedloop.trigger.RetrainTrigger"],
    },
];

/// Records carried by topics whose names are only known at run time: (record, topic pattern).
pub const DYNAMIC_TOPIC_RECORDS: &[(&str, &str)] = &[
    (
        "io.feedloop.labels.LabeledExample",
        "feedloop.labels.<dataset>",
    ),
    ("io.feedloop.cdc.OutboxEvent", "outbox.<aggregate_type>"),
];

/// Header of a cdc change record naming the user its row belongs to (tables with `[pii]`): the
/// eraser tombstones the keys of an erased user's rows by it.
pub const OWNER_HEADER: &str = "feedloop.owner";

/// The topic of a dataset's labeled examples.
pub fn labels_topic(dataset: &str) -> String {
    format!("feedloop.labels.{dataset}")
}

/// Why the catalogue is unusable.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: top level must be a named record, enum or fixed")]
    NotNamed { path: String },
    #[error("{path}: named type {name} is also defined in {other}")]
    Duplicate {
        path: String,
        name: String,
        other: String,
    },
    #[error("unknown record {0} (not defined by any schema file)")]
    UnknownRecord(String),
    #[error("{record}: refers to undefined type {reference}")]
    UnknownType { record: String, reference: String },
    #[error("{record}: invalid Avro after composition: {message}")]
    Invalid { record: String, message: String },
}

/// One `.avsc` file of the catalogue.
#[derive(Debug, Clone)]
pub struct SchemaFile {
    /// Path relative to `schemas/`.
    pub path: String,
    /// Full name of the top-level type.
    pub full_name: String,
    /// A template that services instantiate (the cdc envelope); never registered as is.
    pub template: bool,
    json: Value,
}

/// The catalogue of schema files, indexed by full name.
#[derive(Debug, Clone)]
pub struct Catalogue {
    files: BTreeMap<String, SchemaFile>,
}

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

fn full_name(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_owned(),
    }
}

/// Namespace of a full name: everything before the last dot.
fn namespace_of(full: &str) -> Option<&str> {
    full.rsplit_once('.').map(|(ns, _)| ns)
}

impl Catalogue {
    /// The catalogue compiled into this binary.
    pub fn embedded() -> Result<Self, CatalogueError> {
        Self::from_files(
            embedded::FILES
                .iter()
                .map(|(p, c)| ((*p).to_owned(), (*c).to_owned())),
        )
    }

    /// Builds a catalogue from (path, contents) pairs, e.g. a working tree or a git revision.
    pub fn from_files(
        files: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, CatalogueError> {
        let mut by_name: BTreeMap<String, SchemaFile> = BTreeMap::new();
        for (path, contents) in files {
            let json: Value =
                serde_json::from_str(&contents).map_err(|source| CatalogueError::Json {
                    path: path.clone(),
                    source,
                })?;
            let name = json
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| CatalogueError::NotNamed { path: path.clone() })?;
            let full = full_name(name, json.get("namespace").and_then(Value::as_str));
            let template = json.get("feedloop.template") == Some(&Value::Bool(true));
            if let Some(other) = by_name.get(&full) {
                return Err(CatalogueError::Duplicate {
                    path,
                    name: full,
                    other: other.path.clone(),
                });
            }
            by_name.insert(
                full.clone(),
                SchemaFile {
                    path,
                    full_name: full,
                    template,
                    json,
                },
            );
        }
        Ok(Self { files: by_name })
    }

    /// Every schema file, by full name.
    pub fn files(&self) -> impl Iterator<Item = &SchemaFile> {
        self.files.values()
    }

    pub fn get(&self, full_name: &str) -> Option<&SchemaFile> {
        self.files.get(full_name)
    }

    /// The self-contained, normalized schema of `record`, with every named type it uses from
    /// other files inlined at first use. Validated by the Avro parser.
    pub fn composed(&self, record: &str) -> Result<String, CatalogueError> {
        let file = self
            .files
            .get(record)
            .ok_or_else(|| CatalogueError::UnknownRecord(record.to_owned()))?;
        let mut defined = HashSet::new();
        let value = self.inline(record, &file.json, None, &mut defined)?;
        let text = value.to_string();
        parse_schema(&text).map_err(|message| CatalogueError::Invalid {
            record: record.to_owned(),
            message,
        })?;
        canonical::normalize(&text).map_err(|e| CatalogueError::Invalid {
            record: record.to_owned(),
            message: e.to_string(),
        })
    }

    /// (subject, composed schema) for every record on a static topic, in topic order.
    pub fn subjects(&self) -> Result<Vec<(String, String)>, CatalogueError> {
        let mut out = Vec::new();
        for topic in TOPICS {
            for record in topic.records {
                out.push((topic.subject(record), self.composed(record)?));
            }
        }
        Ok(out)
    }

    fn inline(
        &self,
        record: &str,
        value: &Value,
        namespace: Option<&str>,
        defined: &mut HashSet<String>,
    ) -> Result<Value, CatalogueError> {
        match value {
            Value::String(s) if PRIMITIVES.contains(&s.as_str()) => Ok(value.clone()),
            Value::String(s) => {
                let full = full_name(s, namespace);
                if defined.contains(&full) {
                    return Ok(Value::String(full));
                }
                let file = self
                    .files
                    .get(&full)
                    .ok_or_else(|| CatalogueError::UnknownType {
                        record: record.to_owned(),
                        reference: full.clone(),
                    })?;
                self.inline(record, &file.json, namespace_of(&full), defined)
            }
            Value::Array(branches) => branches
                .iter()
                .map(|b| self.inline(record, b, namespace, defined))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            Value::Object(map) => self.inline_object(record, map, namespace, defined),
            other => Ok(other.clone()),
        }
    }

    fn inline_object(
        &self,
        record: &str,
        map: &Map<String, Value>,
        namespace: Option<&str>,
        defined: &mut HashSet<String>,
    ) -> Result<Value, CatalogueError> {
        let mut out = map.clone();
        let kind = map.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "record" | "enum" | "fixed" => {
                let name = map.get("name").and_then(Value::as_str).unwrap_or_default();
                let explicit_ns = map.get("namespace").and_then(Value::as_str);
                let full = full_name(name, explicit_ns.or(namespace));
                // Make the namespace explicit so the definition reads the same wherever it
                // ends up being inlined.
                if !name.contains('.')
                    && let Some(ns) = namespace_of(&full)
                {
                    out.insert("namespace".into(), Value::String(ns.to_owned()));
                }
                defined.insert(full.clone());
                let inner_ns = namespace_of(&full).map(str::to_owned);
                if kind == "record"
                    && let Some(Value::Array(fields)) = map.get("fields")
                {
                    let mut new_fields = Vec::with_capacity(fields.len());
                    for field in fields {
                        let mut field = field.clone();
                        if let Some(t) = field.get("type").cloned() {
                            let t = self.inline(record, &t, inner_ns.as_deref(), defined)?;
                            if let Some(obj) = field.as_object_mut() {
                                obj.insert("type".into(), t);
                            }
                        }
                        new_fields.push(field);
                    }
                    out.insert("fields".into(), Value::Array(new_fields));
                }
            }
            "array" => {
                if let Some(items) = map.get("items") {
                    out.insert(
                        "items".into(),
                        self.inline(record, items, namespace, defined)?,
                    );
                }
            }
            "map" => {
                if let Some(values) = map.get("values") {
                    out.insert(
                        "values".into(),
                        self.inline(record, values, namespace, defined)?,
                    );
                }
            }
            _ => {
                if let Some(t) = map.get("type")
                    && !t.as_str().is_some_and(|s| PRIMITIVES.contains(&s))
                {
                    out.insert("type".into(), self.inline(record, t, namespace, defined)?);
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> Catalogue {
        Catalogue::embedded().expect("embedded catalogue parses")
    }

    #[test]
    fn every_topic_record_is_defined_and_composes() {
        let cat = catalogue();
        let subjects = cat.subjects().expect("all subjects compose");
        assert_eq!(
            subjects.len(),
            TOPICS.iter().map(|t| t.records.len()).sum::<usize>()
        );
        assert!(
            subjects
                .iter()
                .any(|(s, _)| s == "feedloop.events-io.feedloop.events.MatchImpression")
        );
        assert!(
            subjects
                .iter()
                .any(|(s, _)| s == "feedloop.deadletter-value")
        );
    }

    #[test]
    fn every_file_is_used_somewhere() {
        let cat = catalogue();
        let on_topics: HashSet<&str> = TOPICS
            .iter()
            .flat_map(|t| t.records.iter().copied())
            .chain(DYNAMIC_TOPIC_RECORDS.iter().map(|(r, _)| *r))
            .collect();
        let templates = cat
            .files()
            .filter(|f| f.template)
            .map(|f| f.full_name.as_str());
        let composed: Vec<String> = on_topics
            .iter()
            .copied()
            .chain(templates)
            .map(|r| cat.composed(r).expect("composes"))
            .collect();
        for file in cat.files() {
            let used = on_topics.contains(file.full_name.as_str())
                || file.template
                || composed.iter().any(|c| {
                    c.contains(&format!(
                        "\"{}\"",
                        file.full_name.rsplit('.').next().unwrap_or_default()
                    ))
                });
            assert!(
                used,
                "{} is neither on a topic, a template, nor used by one",
                file.path
            );
        }
    }

    #[test]
    fn envelope_is_inlined_once_and_self_contained() {
        let cat = catalogue();
        let text = cat
            .composed("io.feedloop.events.MatchImpression")
            .expect("composes");
        assert_eq!(text.matches("\"name\":\"Envelope\"").count(), 1);
        // A lone parse (no other schemas supplied) must succeed.
        assert!(parse_schema(&text).is_ok());
    }

    #[test]
    fn templates_compose_too() {
        let cat = catalogue();
        let template = cat
            .files()
            .find(|f| f.template)
            .expect("the cdc envelope template");
        cat.composed(&template.full_name)
            .expect("template composes");
    }

    #[test]
    fn unknown_reference_is_reported() {
        let cat = Catalogue::from_files([(
            "x.avsc".to_owned(),
            r#"{"type":"record","name":"X","fields":[{"name":"a","type":"Missing"}]}"#.to_owned(),
        )])
        .expect("parses");
        let err = cat.composed("X").expect_err("unknown type");
        assert!(matches!(err, CatalogueError::UnknownType { .. }), "{err}");
    }
}
