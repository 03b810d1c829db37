//! Captured tables: their Avro schemas (derived from the stream's Relation messages and the
//! catalogue's change-envelope template), and the encoding of their changes as
//! Debezium-compatible envelopes and keys.

use std::sync::Arc;

use feedloop_core::avro::{CodecError, CompiledSchema};
use serde::{Serialize, Serializer, ser::SerializeMap};
use serde_json::{Value as Json, json};

use crate::{
    pgoutput::{Relation, Tuple, Value},
    types::{self, Datum, Kind},
};

/// Makes a name fit Avro's `[A-Za-z_][A-Za-z0-9_]*`.
pub fn avro_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A converted row: its values, and the names of the unchanged TOAST columns in it.
pub type Row = (Vec<Datum>, Vec<String>);

/// A table's shape, as derived from its Relation message.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub relation: Relation,
    pub kinds: Vec<Kind>,
    /// Avro field names of the columns.
    pub fields: Vec<String>,
    /// Indexes of the key columns.
    pub key: Vec<usize>,
}

impl Shape {
    pub fn new(relation: Relation) -> Self {
        let kinds = relation
            .columns
            .iter()
            .map(|c| types::kind(c.type_oid))
            .collect();
        let fields = relation
            .columns
            .iter()
            .map(|c| avro_name(&c.name))
            .collect();
        let key = relation
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect();
        Self {
            relation,
            kinds,
            fields,
            key,
        }
    }

    /// Namespace of the table's records: `<prefix>.<schema>.<table>`.
    pub fn namespace(&self, prefix: &str) -> String {
        format!(
            "{}.{}.{}",
            avro_name(prefix),
            avro_name(&self.relation.namespace),
            avro_name(&self.relation.name)
        )
    }

    /// Whether two shapes encode the same way (column names and types in order).
    pub fn same_encoding(&self, other: &Shape) -> bool {
        self.fields == other.fields && self.kinds == other.kinds && self.key == other.key
    }

    /// The value schema: the change-envelope template with `Row` replaced by this table's
    /// columns, every one optional (null when absent from a key-only old row).
    pub fn value_schema(&self, template: &Json, prefix: &str) -> String {
        let ns = self.namespace(prefix);
        let fields: Vec<Json> = self
            .fields
            .iter()
            .zip(&self.kinds)
            .zip(&self.relation.columns)
            .map(|((name, kind), col)| {
                json!({"name": name, "type": ["null", kind.avro()], "default": null,
                       "doc": format!("Column {} (type oid {}).", col.name, col.type_oid)})
            })
            .collect();
        let row = json!({"type": "record", "name": "Value", "namespace": ns,
                         "doc": format!("A row of {}.{}.", self.relation.namespace, self.relation.name),
                         "fields": fields});
        let mut envelope = template.clone();
        replace_row(&mut envelope, &row, &format!("{ns}.Value"));
        if let Some(o) = envelope.as_object_mut() {
            o.insert("name".into(), json!("Envelope"));
            o.insert("namespace".into(), json!(ns));
            o.insert(
                "doc".into(),
                json!(format!(
                    "Change events of {}.{} (Debezium envelope).",
                    self.relation.namespace, self.relation.name
                )),
            );
            o.remove("feedloop.template");
        }
        envelope.to_string()
    }

    /// The key schema: the key columns, or `None` when the table has no key.
    pub fn key_schema(&self, prefix: &str) -> Option<String> {
        if self.key.is_empty() {
            return None;
        }
        let fields: Vec<Json> = self
            .key
            .iter()
            .map(|&i| json!({"name": self.fields[i], "type": self.kinds[i].avro()}))
            .collect();
        Some(json!({"type": "record", "name": "Key", "namespace": self.namespace(prefix), "fields": fields}).to_string())
    }

    /// Converts a tuple (see [`Shape::row`]) when there is one.
    pub fn maybe_row(
        &self,
        tuple: Option<&Tuple>,
        placeholder: &str,
    ) -> Result<Option<Row>, String> {
        tuple.map(|t| self.row(t, placeholder)).transpose()
    }

    /// Converts a tuple; unchanged TOAST values become `placeholder` where the type can hold
    /// it (their names are returned), and null elsewhere.
    pub fn row(
        &self,
        tuple: &Tuple,
        placeholder: &str,
    ) -> Result<(Vec<Datum>, Vec<String>), String> {
        if tuple.len() != self.kinds.len() {
            return Err(format!(
                "tuple has {} columns, relation {}.{} has {}",
                tuple.len(),
                self.relation.namespace,
                self.relation.name,
                self.kinds.len()
            ));
        }
        let mut unchanged = Vec::new();
        let values = tuple
            .iter()
            .zip(&self.kinds)
            .enumerate()
            .map(|(i, (v, kind))| match v {
                Value::Null => Ok(Datum::Null),
                Value::UnchangedToast => {
                    unchanged.push(self.relation.columns[i].name.clone());
                    Ok(match kind {
                        Kind::Bytes => Datum::Bytes(placeholder.as_bytes().to_vec()),
                        _ if kind.holds_placeholder() => Datum::String(placeholder.to_owned()),
                        _ => Datum::Null,
                    })
                }
                Value::Text(t) | Value::Binary(t) => types::parse(*kind, t)
                    .map_err(|e| format!("column {}: {e}", self.relation.columns[i].name)),
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((values, unchanged))
    }
}

fn replace_row(v: &mut Json, row: &Json, full_name: &str) {
    match v {
        Json::Object(o) => {
            if o.get("name").and_then(Json::as_str) == Some("Row") {
                *v = row.clone();
                return;
            }
            for (_, child) in o.iter_mut() {
                replace_row(child, row, full_name);
            }
        }
        Json::Array(items) => items
            .iter_mut()
            .for_each(|i| replace_row(i, row, full_name)),
        Json::String(s) if s == "io.feedloop.cdc.Row" || s == "Row" => *s = full_name.to_owned(),
        _ => {}
    }
}

/// A row as an Avro record (field name → value).
pub struct RowOut<'a> {
    pub fields: &'a [String],
    pub values: &'a [Datum],
}

impl Serialize for RowOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.fields.len()))?;
        for (k, v) in self.fields.iter().zip(self.values) {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// `io.feedloop.cdc.Source`, named as Debezium names it.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub version: &'static str,
    pub connector: &'static str,
    pub name: String,
    pub ts_ms: i64,
    pub snapshot: Option<&'static str>,
    pub db: String,
    pub sequence: Option<String>,
    pub schema: String,
    pub table: String,
    #[serde(rename = "txId")]
    pub tx_id: Option<i64>,
    pub lsn: Option<i64>,
    pub xmin: Option<i64>,
}

/// A change event.
#[derive(Serialize)]
pub struct EnvelopeOut<'a> {
    pub before: Option<RowOut<'a>>,
    pub after: Option<RowOut<'a>>,
    pub source: &'a Source,
    pub op: &'static str,
    pub ts_ms: Option<i64>,
    pub transaction: Option<()>,
}

/// A table ready to encode: its shape and registered schemas.
#[derive(Debug, Clone)]
pub struct Table {
    pub shape: Shape,
    pub topic: String,
    pub value: Arc<CompiledSchema>,
    pub key: Option<Arc<CompiledSchema>>,
    /// Personal columns to seal, if the table has any.
    pub pii: Option<crate::pii::Pii>,
}

impl Table {
    /// The Kafka key of a row: the Avro key record, or `None` for keyless tables.
    pub fn encode_key(&self, values: &[Datum], out: &mut Vec<u8>) -> Result<bool, CodecError> {
        let Some(schema) = &self.key else {
            return Ok(false);
        };
        let fields: Vec<String> = self
            .shape
            .key
            .iter()
            .map(|&i| self.shape.fields[i].clone())
            .collect();
        let key_values: Vec<Datum> = self
            .shape
            .key
            .iter()
            .map(|&i| values.get(i).cloned().unwrap_or(Datum::Null))
            .collect();
        schema.encode(
            &RowOut {
                fields: &fields,
                values: &key_values,
            },
            out,
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, ReplicaIdentity};
    use feedloop_core::catalogue::Catalogue;

    fn relation() -> Relation {
        Relation {
            oid: 1,
            namespace: "app".into(),
            name: "users".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                Column {
                    key: true,
                    name: "id".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
                Column {
                    key: false,
                    name: "deleted-at".into(),
                    type_oid: 1184,
                    type_modifier: -1,
                },
                Column {
                    key: false,
                    name: "bio".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        }
    }

    #[test]
    fn schemas_compile_and_encode_a_change() {
        let template: Json = serde_json::from_str(
            &Catalogue::embedded()
                .expect("catalogue")
                .composed("io.feedloop.cdc.Envelope")
                .expect("template"),
        )
        .expect("json");
        let shape = Shape::new(relation());
        let value_json = shape.value_schema(&template, "product");
        assert!(value_json.contains("\"product.app.users\""), "{value_json}");
        assert!(value_json.contains("deleted_at"), "names are sanitized");
        let value = CompiledSchema::new(1, &value_json).expect("value schema compiles");
        feedloop_core::avro::parse_schema(&value_json).expect("valid Avro");
        let key = CompiledSchema::new(2, &shape.key_schema("product").expect("keyed"))
            .expect("key schema");
        let tuple = vec![
            Value::Text(b"u-1".to_vec()),
            Value::Text(b"2026-11-28 17:00:00+00".to_vec()),
            Value::UnchangedToast,
        ];
        let (row, unchanged) = shape
            .row(&tuple, "__debezium_unavailable_value")
            .expect("row");
        assert_eq!(unchanged, vec!["bio"]);
        assert_eq!(row[2], Datum::String("__debezium_unavailable_value".into()));
        let source = Source {
            version: "0",
            connector: "postgresql",
            name: "product".into(),
            ts_ms: 1,
            snapshot: None,
            db: "product".into(),
            sequence: None,
            schema: "app".into(),
            table: "users".into(),
            tx_id: Some(7),
            lsn: Some(100),
            xmin: None,
        };
        let mut buf = Vec::new();
        value
            .encode(
                &EnvelopeOut {
                    before: None,
                    after: Some(RowOut {
                        fields: &shape.fields,
                        values: &row,
                    }),
                    source: &source,
                    op: "c",
                    ts_ms: Some(2),
                    transaction: None,
                },
                &mut buf,
            )
            .expect("encodes");
        let back: serde_json::Value = value.decode_body(&buf[5..]).expect("decodes");
        assert_eq!(back["after"]["id"], "u-1");
        assert_eq!(back["op"], "c");
        assert_eq!(back["source"]["txId"], 7);
        let table = Table {
            shape,
            topic: "t".into(),
            value: Arc::new(value),
            key: Some(Arc::new(key)),
            pii: None,
        };
        let mut k = Vec::new();
        assert!(table.encode_key(&row, &mut k).expect("key"));
    }
}
