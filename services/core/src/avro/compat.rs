//! Avro schema compatibility, as the Confluent Schema Registry and Avro's
//! `SchemaCompatibility` define it: can a reader with one schema decode data written with
//! another? Every incompatibility is collected with its location, so that callers can explain
//! *why* a change breaks.
//!
//! Pure: no IO. Logical types are compared by their underlying Avro type, as Avro does.

use std::{collections::HashSet, fmt, str::FromStr};

use apache_avro::{
    Schema,
    schema::{
        EnumSchema, FixedSchema, InnerDecimalSchema, Name, NamesRef, RecordSchema, ResolvedSchema,
        UuidSchema,
    },
};

/// The kinds of incompatibility, named as Avro and Confluent name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IncompatibilityKind {
    NameMismatch,
    FixedSizeMismatch,
    MissingEnumSymbols,
    ReaderFieldMissingDefaultValue,
    TypeMismatch,
    MissingUnionBranch,
}

impl IncompatibilityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NameMismatch => "NAME_MISMATCH",
            Self::FixedSizeMismatch => "FIXED_SIZE_MISMATCH",
            Self::MissingEnumSymbols => "MISSING_ENUM_SYMBOLS",
            Self::ReaderFieldMissingDefaultValue => "READER_FIELD_MISSING_DEFAULT_VALUE",
            Self::TypeMismatch => "TYPE_MISMATCH",
            Self::MissingUnionBranch => "MISSING_UNION_BRANCH",
        }
    }
}

/// One reason why a reader schema cannot read data of a writer schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    pub kind: IncompatibilityKind,
    /// JSON-pointer-like location in the reader schema, e.g. `/fields/2/type`.
    pub location: String,
    /// The field name, missing symbols, or types involved.
    pub info: String,
}

/// Returns every reason why `reader` cannot read data written with `writer`; empty means
/// compatible.
pub fn reader_writer_incompatibilities(reader: &Schema, writer: &Schema) -> Vec<Incompatibility> {
    let (Ok(rnames), Ok(wnames)) = (
        ResolvedSchema::try_from(reader),
        ResolvedSchema::try_from(writer),
    ) else {
        return vec![Incompatibility {
            kind: IncompatibilityKind::TypeMismatch,
            location: "/".into(),
            info: "schema has unresolved named type references".into(),
        }];
    };
    let mut checker = Checker {
        rnames: rnames.get_names(),
        wnames: wnames.get_names(),
        seen: HashSet::new(),
        location: Vec::new(),
        out: Vec::new(),
    };
    checker.check(reader, writer);
    checker.out
}

/// The underlying Avro type of a schema, with logical types and references stripped.
#[derive(Clone, Copy)]
enum Ty<'a> {
    Null,
    Boolean,
    Int,
    Long,
    Float,
    Double,
    Bytes,
    String,
    Array(&'a Schema),
    Map(&'a Schema),
    Union(&'a [Schema]),
    Record(&'a RecordSchema),
    Enum(&'a EnumSchema),
    Fixed(&'a FixedSchema),
}

impl Ty<'_> {
    fn name(&self) -> &'static str {
        match self {
            Ty::Null => "NULL",
            Ty::Boolean => "BOOLEAN",
            Ty::Int => "INT",
            Ty::Long => "LONG",
            Ty::Float => "FLOAT",
            Ty::Double => "DOUBLE",
            Ty::Bytes => "BYTES",
            Ty::String => "STRING",
            Ty::Array(_) => "ARRAY",
            Ty::Map(_) => "MAP",
            Ty::Union(_) => "UNION",
            Ty::Record(_) => "RECORD",
            Ty::Enum(_) => "ENUM",
            Ty::Fixed(_) => "FIXED",
        }
    }
}

struct Checker<'a, 'n> {
    rnames: &'n NamesRef<'a>,
    wnames: &'n NamesRef<'a>,
    /// (reader, writer) named-type pairs already checked or being checked: recursion guard.
    seen: HashSet<(String, String)>,
    location: Vec<String>,
    out: Vec<Incompatibility>,
}

fn ty<'a>(schema: &'a Schema, names: &NamesRef<'a>) -> Ty<'a> {
    match schema {
        Schema::Null => Ty::Null,
        Schema::Boolean => Ty::Boolean,
        Schema::Int | Schema::Date | Schema::TimeMillis => Ty::Int,
        Schema::Long
        | Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => Ty::Long,
        Schema::Float => Ty::Float,
        Schema::Double => Ty::Double,
        Schema::Bytes | Schema::BigDecimal => Ty::Bytes,
        Schema::String => Ty::String,
        Schema::Array(a) => Ty::Array(&a.items),
        Schema::Map(m) => Ty::Map(&m.types),
        Schema::Union(u) => Ty::Union(u.variants()),
        Schema::Record(r) => Ty::Record(r),
        Schema::Enum(e) => Ty::Enum(e),
        Schema::Fixed(f) | Schema::Duration(f) => Ty::Fixed(f),
        Schema::Decimal(d) => match &d.inner {
            InnerDecimalSchema::Bytes => Ty::Bytes,
            InnerDecimalSchema::Fixed(f) => Ty::Fixed(f),
        },
        Schema::Uuid(u) => match u {
            UuidSchema::String => Ty::String,
            UuidSchema::Bytes => Ty::Bytes,
            UuidSchema::Fixed(f) => Ty::Fixed(f),
        },
        Schema::Ref { name } => match names.get(name) {
            Some(s) => ty(s, names),
            // Unreachable for a resolved schema; treat as null so the mismatch is reported.
            None => Ty::Null,
        },
    }
}

fn names_match(reader: &Name, reader_aliases: Option<&[String]>, writer: &Name) -> bool {
    reader.name() == writer.name()
        || reader_aliases
            .unwrap_or_default()
            .iter()
            .any(|a| a == writer.name() || *a == writer.fullname(None))
}

impl<'a> Checker<'a, '_> {
    fn push(&mut self, kind: IncompatibilityKind, suffix: Option<&str>, info: String) {
        let mut location = String::new();
        for part in self.location.iter().map(String::as_str).chain(suffix) {
            location.push('/');
            location.push_str(part);
        }
        if location.is_empty() {
            location.push('/');
        }
        self.out.push(Incompatibility {
            kind,
            location,
            info,
        });
    }

    fn at<R>(&mut self, parts: &[&str], f: impl FnOnce(&mut Self) -> R) -> R {
        let depth = self.location.len();
        self.location.extend(parts.iter().map(|p| (*p).to_owned()));
        let r = f(self);
        self.location.truncate(depth);
        r
    }

    /// Whether reader can read writer, without recording anything.
    fn compatible(&self, reader: &'a Schema, writer: &'a Schema) -> bool {
        let mut probe = Checker {
            rnames: self.rnames,
            wnames: self.wnames,
            seen: self.seen.clone(),
            location: Vec::new(),
            out: Vec::new(),
        };
        probe.check(reader, writer);
        probe.out.is_empty()
    }

    fn check(&mut self, reader: &'a Schema, writer: &'a Schema) {
        let r = ty(reader, self.rnames);
        let w = ty(writer, self.wnames);
        match (r, w) {
            (Ty::Union(rb), Ty::Union(wb)) => {
                for (i, branch) in wb.iter().enumerate() {
                    if !rb.iter().any(|rbranch| self.compatible(rbranch, branch)) {
                        let name = ty(branch, self.wnames).name();
                        self.at(&[&i.to_string()], |c| {
                            c.push(
                                IncompatibilityKind::MissingUnionBranch,
                                None,
                                format!("reader union lacking writer type: {name}"),
                            )
                        });
                    }
                }
            }
            // A reader that can read every branch of the writer's union can read the union.
            (_, Ty::Union(wb)) => {
                for branch in wb {
                    self.check(reader, branch);
                }
            }
            (Ty::Union(rb), _) => {
                if !rb.iter().any(|rbranch| self.compatible(rbranch, writer)) {
                    self.push(
                        IncompatibilityKind::MissingUnionBranch,
                        None,
                        format!("reader union lacking writer type: {}", w.name()),
                    );
                }
            }
            (Ty::Null, Ty::Null)
            | (Ty::Boolean, Ty::Boolean)
            | (Ty::Int, Ty::Int)
            | (Ty::Long, Ty::Long | Ty::Int)
            | (Ty::Float, Ty::Float | Ty::Long | Ty::Int)
            | (Ty::Double, Ty::Double | Ty::Float | Ty::Long | Ty::Int)
            | (Ty::Bytes, Ty::Bytes | Ty::String)
            | (Ty::String, Ty::String | Ty::Bytes) => {}
            (Ty::Array(ri), Ty::Array(wi)) => self.at(&["items"], |c| c.check(ri, wi)),
            (Ty::Map(rv), Ty::Map(wv)) => self.at(&["values"], |c| c.check(rv, wv)),
            (Ty::Record(rr), Ty::Record(wr)) => self.check_record(rr, wr),
            (Ty::Enum(re), Ty::Enum(we)) => self.check_enum(re, we),
            (Ty::Fixed(rf), Ty::Fixed(wf)) => {
                if !names_match(&rf.name, None, &wf.name) {
                    self.push(
                        IncompatibilityKind::NameMismatch,
                        Some("name"),
                        format!("expected: {}", wf.name.fullname(None)),
                    );
                }
                if rf.size != wf.size {
                    self.push(
                        IncompatibilityKind::FixedSizeMismatch,
                        Some("size"),
                        format!("expected: {}, found: {}", wf.size, rf.size),
                    );
                }
            }
            (r, w) => self.push(
                IncompatibilityKind::TypeMismatch,
                None,
                format!(
                    "reader type: {} not compatible with writer type: {}",
                    r.name(),
                    w.name()
                ),
            ),
        }
    }

    fn check_record(&mut self, reader: &'a RecordSchema, writer: &'a RecordSchema) {
        let key = (reader.name.fullname(None), writer.name.fullname(None));
        if !self.seen.insert(key) {
            return;
        }
        let aliases: Option<Vec<String>> = reader
            .aliases
            .as_ref()
            .map(|a| a.iter().map(|a| a.fullname(None)).collect());
        if !names_match(&reader.name, aliases.as_deref(), &writer.name) {
            self.push(
                IncompatibilityKind::NameMismatch,
                Some("name"),
                format!("expected: {}", writer.name.fullname(None)),
            );
        }
        for (i, rfield) in reader.fields.iter().enumerate() {
            let wfield = writer
                .fields
                .iter()
                .find(|w| w.name == rfield.name || rfield.aliases.contains(&w.name));
            match wfield {
                Some(wfield) => self.at(&["fields", &i.to_string(), "type"], |c| {
                    c.check(&rfield.schema, &wfield.schema)
                }),
                None if rfield.default.is_none() => self.at(&["fields", &i.to_string()], |c| {
                    c.push(
                        IncompatibilityKind::ReaderFieldMissingDefaultValue,
                        None,
                        rfield.name.clone(),
                    )
                }),
                None => {}
            }
        }
    }

    fn check_enum(&mut self, reader: &EnumSchema, writer: &EnumSchema) {
        let aliases: Option<Vec<String>> = reader
            .aliases
            .as_ref()
            .map(|a| a.iter().map(|a| a.fullname(None)).collect());
        if !names_match(&reader.name, aliases.as_deref(), &writer.name) {
            self.push(
                IncompatibilityKind::NameMismatch,
                Some("name"),
                format!("expected: {}", writer.name.fullname(None)),
            );
        }
        let missing: Vec<&str> = writer
            .symbols
            .iter()
            .filter(|s| !reader.symbols.contains(s))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() && reader.default.is_none() {
            self.push(
                IncompatibilityKind::MissingEnumSymbols,
                Some("symbols"),
                format!("[{}]", missing.join(", ")),
            );
        }
    }
}

/// Compatibility levels of the Confluent Schema Registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompatibilityLevel {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl CompatibilityLevel {
    pub const ALL: [Self; 7] = [
        Self::None,
        Self::Backward,
        Self::BackwardTransitive,
        Self::Forward,
        Self::ForwardTransitive,
        Self::Full,
        Self::FullTransitive,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    pub fn is_transitive(self) -> bool {
        matches!(
            self,
            Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive
        )
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Self::Backward | Self::BackwardTransitive | Self::Full | Self::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Self::Forward | Self::ForwardTransitive | Self::Full | Self::FullTransitive
        )
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compatibility level name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid compatibility level {0:?}: expected one of NONE, BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE"
)]
pub struct InvalidLevel(pub String);

impl FromStr for CompatibilityLevel {
    type Err = InvalidLevel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| InvalidLevel(s.to_owned()))
    }
}

/// Which way data flows in a failed check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The new schema cannot read data written with the old one.
    Backward,
    /// The old schema cannot read data written with the new one.
    Forward,
}

/// An incompatibility between the new schema and one earlier version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub old_version: i32,
    pub direction: Direction,
    pub incompatibility: Incompatibility,
}

impl Violation {
    /// Confluent's verbose message: `{errorType:'…', description:'…', additionalInfo:'…'}`.
    pub fn describe(&self) -> String {
        let (reader, writer) = match self.direction {
            Direction::Backward => ("new", "old"),
            Direction::Forward => ("old", "new"),
        };
        let i = &self.incompatibility;
        let loc = &i.location;
        let description = match i.kind {
            IncompatibilityKind::ReaderFieldMissingDefaultValue => format!(
                "The field '{}' at path '{loc}' in the {reader} schema has no default value and is missing in the {writer} schema",
                i.info
            ),
            IncompatibilityKind::TypeMismatch => format!(
                "The type (path '{loc}') of a field in the {reader} schema does not match with the {writer} schema"
            ),
            IncompatibilityKind::NameMismatch => {
                format!("The name of the schema has changed (path '{loc}')")
            }
            IncompatibilityKind::MissingEnumSymbols => format!(
                "The {reader} schema is missing enum symbols '{}' at path '{loc}' in the {writer} schema",
                i.info
            ),
            IncompatibilityKind::MissingUnionBranch => format!(
                "The {reader} schema is missing a type inside a union field at path '{loc}' in the {writer} schema"
            ),
            IncompatibilityKind::FixedSizeMismatch => format!(
                "The size of FIXED type field at path '{loc}' in the {reader} schema does not match with the {writer} schema"
            ),
        };
        format!(
            "{{errorType:'{}', description:'{description}', additionalInfo:'{}'}}",
            i.kind.as_str(),
            i.info
        )
    }
}

/// Checks `new` against earlier versions under `level`. `previous` holds (version, schema)
/// oldest first; non-transitive levels look only at the latest one.
pub fn check_level(
    level: CompatibilityLevel,
    new: &Schema,
    previous: &[(i32, &Schema)],
) -> Vec<Violation> {
    let against: &[(i32, &Schema)] = if level.is_transitive() {
        previous
    } else {
        previous.last().map(std::slice::from_ref).unwrap_or(&[])
    };
    let mut out = Vec::new();
    for (version, old) in against.iter().rev() {
        if level.backward() {
            out.extend(
                reader_writer_incompatibilities(new, old)
                    .into_iter()
                    .map(|i| Violation {
                        old_version: *version,
                        direction: Direction::Backward,
                        incompatibility: i,
                    }),
            );
        }
        if level.forward() {
            out.extend(
                reader_writer_incompatibilities(old, new)
                    .into_iter()
                    .map(|i| Violation {
                        old_version: *version,
                        direction: Direction::Forward,
                        incompatibility: i,
                    }),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(json: &str) -> Schema {
        Schema::parse_str(json).expect("valid schema")
    }

    fn record(fields: &str) -> Schema {
        s(&format!(
            r#"{{"type":"record","name":"R","namespace":"t","fields":[{fields}]}}"#
        ))
    }

    fn kinds(reader: &Schema, writer: &Schema) -> Vec<IncompatibilityKind> {
        reader_writer_incompatibilities(reader, writer)
            .into_iter()
            .map(|i| i.kind)
            .collect()
    }

    #[test]
    fn added_field_without_default_cannot_read_old_data() {
        let old = record(r#"{"name":"a","type":"int"}"#);
        let new = record(r#"{"name":"a","type":"int"},{"name":"b","type":"string"}"#);
        let found = reader_writer_incompatibilities(&new, &old);
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].kind,
            IncompatibilityKind::ReaderFieldMissingDefaultValue
        );
        assert_eq!(found[0].location, "/fields/1");
        assert_eq!(found[0].info, "b");
        // The old reader ignores the new field.
        assert!(kinds(&old, &new).is_empty());
    }

    #[test]
    fn added_field_with_default_is_fully_compatible() {
        let old = record(r#"{"name":"a","type":"int"}"#);
        let new = record(r#"{"name":"a","type":"int"},{"name":"b","type":"string","default":""}"#);
        assert!(kinds(&new, &old).is_empty());
        assert!(kinds(&old, &new).is_empty());
    }

    #[test]
    fn promotions_go_one_way() {
        let int = record(r#"{"name":"a","type":"int"}"#);
        let long = record(r#"{"name":"a","type":"long"}"#);
        assert!(kinds(&long, &int).is_empty(), "long reader reads int");
        let found = reader_writer_incompatibilities(&int, &long);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, IncompatibilityKind::TypeMismatch);
        assert_eq!(found[0].location, "/fields/0/type");
    }

    #[test]
    fn enum_symbols() {
        let ab = s(r#"{"type":"enum","name":"E","symbols":["A","B"]}"#);
        let abc = s(r#"{"type":"enum","name":"E","symbols":["A","B","C"]}"#);
        let abc_default = s(r#"{"type":"enum","name":"E","symbols":["A","B","C"],"default":"A"}"#);
        let ab_default = s(r#"{"type":"enum","name":"E","symbols":["A","B"],"default":"A"}"#);
        assert!(kinds(&abc, &ab).is_empty(), "new reader knows old symbols");
        assert_eq!(
            kinds(&ab, &abc),
            vec![IncompatibilityKind::MissingEnumSymbols]
        );
        assert!(
            kinds(&ab_default, &abc_default).is_empty(),
            "default absorbs"
        );
    }

    #[test]
    fn union_widening() {
        let narrow = record(r#"{"name":"a","type":["null","int"]}"#);
        let wide = record(r#"{"name":"a","type":["null","int","string"]}"#);
        assert!(kinds(&wide, &narrow).is_empty());
        let found = reader_writer_incompatibilities(&narrow, &wide);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, IncompatibilityKind::MissingUnionBranch);
        assert_eq!(found[0].location, "/fields/0/type/2");
    }

    #[test]
    fn plain_type_into_union_and_back() {
        let plain = record(r#"{"name":"a","type":"int"}"#);
        let union = record(r#"{"name":"a","type":["null","int"]}"#);
        assert!(kinds(&union, &plain).is_empty());
        assert_eq!(
            kinds(&plain, &union),
            vec![IncompatibilityKind::TypeMismatch]
        );
    }

    #[test]
    fn record_rename_needs_alias() {
        let a = s(r#"{"type":"record","name":"A","fields":[]}"#);
        let b = s(r#"{"type":"record","name":"B","fields":[]}"#);
        let b_alias = s(r#"{"type":"record","name":"B","aliases":["A"],"fields":[]}"#);
        assert_eq!(kinds(&b, &a), vec![IncompatibilityKind::NameMismatch]);
        assert!(kinds(&b_alias, &a).is_empty());
    }

    #[test]
    fn recursive_types_terminate() {
        let list = s(
            r#"{"type":"record","name":"Node","fields":[{"name":"v","type":"int"},{"name":"next","type":["null","Node"]}]}"#,
        );
        assert!(kinds(&list, &list).is_empty());
    }

    #[test]
    fn logical_types_compare_by_underlying_type() {
        let ts = record(r#"{"name":"t","type":{"type":"long","logicalType":"timestamp-millis"}}"#);
        let long = record(r#"{"name":"t","type":"long"}"#);
        assert!(kinds(&ts, &long).is_empty());
        assert!(kinds(&long, &ts).is_empty());
    }

    #[test]
    fn levels_pick_directions_and_history() {
        let v1 = record(r#"{"name":"a","type":"int"}"#);
        let v2 = record(r#"{"name":"a","type":"int"},{"name":"b","type":"int","default":0}"#);
        // v3 removes `a`, which has no default: readers holding `a` cannot read v3 data.
        let v3 = record(r#"{"name":"b","type":"int","default":0}"#);
        let prev = [(1, &v1), (2, &v2)];
        assert!(check_level(CompatibilityLevel::Backward, &v3, &prev).is_empty());
        let fwd = check_level(CompatibilityLevel::Forward, &v3, &prev);
        assert_eq!(fwd.len(), 1);
        assert_eq!(fwd[0].old_version, 2);
        assert_eq!(fwd[0].direction, Direction::Forward);
        assert_eq!(
            check_level(CompatibilityLevel::ForwardTransitive, &v3, &prev).len(),
            2
        );
        assert!(check_level(CompatibilityLevel::None, &v3, &prev).is_empty());
        assert!(
            fwd[0]
                .describe()
                .contains("READER_FIELD_MISSING_DEFAULT_VALUE")
        );
        assert!(fwd[0].describe().contains("in the old schema"));
    }

    #[test]
    fn level_names_parse() {
        for level in CompatibilityLevel::ALL {
            assert_eq!(level.as_str().parse::<CompatibilityLevel>(), Ok(level));
        }
        assert!("SIDEWAYS".parse::<CompatibilityLevel>().is_err());
    }
}
