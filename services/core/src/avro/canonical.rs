//! A normalized text form of an Avro schema, used by the registry to decide whether two
//! submissions are the same schema.
//!
//! Unlike the Avro "Parsing Canonical Form", it keeps everything that matters for evolution
//! (doc, default, aliases, logical types, custom attributes); it only removes differences that
//! mean nothing: whitespace, the order of JSON attributes, and `{"type":"string"}` spelled out
//! for a bare primitive.

use serde_json::{Map, Value};

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Attribute order of a schema object; others follow alphabetically.
const SCHEMA_KEYS: &[&str] = &[
    "type",
    "name",
    "namespace",
    "doc",
    "fields",
    "symbols",
    "items",
    "values",
    "size",
    "logicalType",
    "precision",
    "scale",
    "default",
    "aliases",
];
/// Attribute order of a record field; others follow alphabetically.
const FIELD_KEYS: &[&str] = &["name", "type", "doc", "default", "order", "aliases"];

/// Returns the normalized form of `schema`, or the JSON parse error.
pub fn normalize(schema: &str) -> Result<String, serde_json::Error> {
    let value: Value = serde_json::from_str(schema)?;
    let mut out = String::with_capacity(schema.len());
    write_schema(&value, &mut out);
    Ok(out)
}

fn write_schema(value: &Value, out: &mut String) {
    match value {
        Value::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_schema(b, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            if map.len() == 1
                && let Some(Value::String(t)) = map.get("type")
                && PRIMITIVES.contains(&t.as_str())
            {
                write_json(&Value::String(t.clone()), out);
                return;
            }
            write_object(map, SCHEMA_KEYS, out, |key, v, out| match key {
                "type" | "items" | "values" => write_schema(v, out),
                "fields" => match v {
                    Value::Array(fields) => {
                        out.push('[');
                        for (i, f) in fields.iter().enumerate() {
                            if i > 0 {
                                out.push(',');
                            }
                            match f {
                                Value::Object(fm) => {
                                    write_object(fm, FIELD_KEYS, out, |k, v, out| {
                                        if k == "type" {
                                            write_schema(v, out)
                                        } else {
                                            write_json(v, out)
                                        }
                                    })
                                }
                                other => write_json(other, out),
                            }
                        }
                        out.push(']');
                    }
                    other => write_json(other, out),
                },
                _ => write_json(v, out),
            });
        }
        other => write_json(other, out),
    }
}

fn write_object(
    map: &Map<String, Value>,
    order: &[&str],
    out: &mut String,
    mut write_value: impl FnMut(&str, &Value, &mut String),
) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| {
        (
            order.iter().position(|o| o == k).unwrap_or(order.len()),
            k.as_str(),
        )
    });
    out.push('{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_json(&Value::String(k.clone()), out);
        out.push(':');
        if let Some(v) = map.get(k) {
            write_value(k, v, out);
        }
    }
    out.push('}');
}

/// Writes arbitrary JSON (defaults, docs, custom attributes) with sorted object keys.
fn write_json(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => write_object(map, &[], out, |_, v, out| write_json(v, out)),
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn whitespace_and_attribute_order_do_not_matter() {
        let a = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int","doc":"x"}]}"#;
        let b = r#"{ "fields" : [ { "doc":"x", "type" : {"type":"int"}, "name":"a" } ],
                    "name" : "R", "type" : "record" }"#;
        assert_eq!(
            normalize(a).expect("a"),
            normalize(b).expect("b"),
            "same schema, different spelling"
        );
    }

    #[test]
    fn defaults_docs_and_field_order_still_matter() {
        let base = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"b","type":"int"}]}"#;
        let with_default = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int","default":1},{"name":"b","type":"int"}]}"#;
        let swapped = r#"{"type":"record","name":"R","fields":[{"name":"b","type":"int"},{"name":"a","type":"int"}]}"#;
        let n = |s| normalize(s).expect("valid");
        assert_ne!(n(base), n(with_default));
        assert_ne!(n(base), n(swapped));
    }

    #[test]
    fn logical_types_are_kept() {
        let s = r#"{"type":"long","logicalType":"timestamp-millis"}"#;
        assert_eq!(
            normalize(s).expect("valid"),
            r#"{"type":"long","logicalType":"timestamp-millis"}"#
        );
    }

    #[test]
    fn rejects_non_json() {
        assert!(normalize("{nope").is_err());
    }
}
