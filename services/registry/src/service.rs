//! Registry behaviour: what registering, looking up, deleting and checking mean, on top of the
//! store. HTTP lives in `api`; the compatibility rules in `feedloop_core::avro::compat`.

use apache_avro::Schema;
use feedloop_core::avro::{
    canonical,
    compat::{self, CompatibilityLevel, Violation},
    parse_schema,
};
use sha2::{Digest, Sha256};

use crate::{
    error::RegistryError,
    observability,
    store::{Store, VersionRow},
};

/// A submitted schema, validated and normalized.
#[derive(Debug)]
pub struct Prepared {
    pub text: String,
    pub fingerprint: Vec<u8>,
    pub parsed: Schema,
}

/// Validates a submission: only Avro, no references, valid JSON and valid Avro.
pub fn prepare(
    schema: &str,
    schema_type: Option<&str>,
    has_references: bool,
) -> Result<Prepared, RegistryError> {
    if let Some(t) = schema_type
        && !t.eq_ignore_ascii_case("AVRO")
    {
        return Err(RegistryError::InvalidSchema(format!(
            "unsupported schema type {t}: this registry stores AVRO only"
        )));
    }
    if has_references {
        return Err(RegistryError::InvalidSchema(
            "schema references are not supported; submit a self-contained schema".into(),
        ));
    }
    let text = canonical::normalize(schema)
        .map_err(|e| RegistryError::InvalidSchema(format!("not valid JSON: {e}")))?;
    let parsed = parse_schema(&text).map_err(RegistryError::InvalidSchema)?;
    let mut hasher = Sha256::new();
    hasher.update(b"AVRO\0");
    hasher.update(text.as_bytes());
    Ok(Prepared {
        text,
        fingerprint: hasher.finalize().to_vec(),
        parsed,
    })
}

/// Which version a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSpec {
    Latest,
    Number(i32),
}

impl VersionSpec {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        if s == "latest" || s == "-1" {
            return Ok(Self::Latest);
        }
        match s.parse::<i32>() {
            Ok(n) if n >= 1 => Ok(Self::Number(n)),
            _ => Err(RegistryError::InvalidVersion(s.to_owned())),
        }
    }

    fn find(self, versions: &[VersionRow]) -> Option<&VersionRow> {
        match self {
            Self::Latest => versions.last(),
            Self::Number(n) => versions.iter().find(|v| v.version == n),
        }
    }

    fn label(self) -> i32 {
        match self {
            Self::Latest => -1,
            Self::Number(n) => n,
        }
    }
}

/// Outcome of a compatibility check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub compatible: bool,
    pub messages: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Registry {
    store: Store,
}

fn parse_stored(v: &VersionRow) -> Result<Schema, RegistryError> {
    // Stored schemas were validated when registered.
    parse_schema(&v.schema).map_err(|e| {
        RegistryError::InvalidSchema(format!(
            "stored version {} no longer parses: {e}",
            v.version
        ))
    })
}

/// Confluent's verbose explanation: every violation, then the old versions involved, then the
/// level.
fn explain(
    violations: &[Violation],
    previous: &[VersionRow],
    level: CompatibilityLevel,
) -> Vec<String> {
    let mut out: Vec<String> = violations.iter().map(Violation::describe).collect();
    let mut versions: Vec<i32> = violations.iter().map(|v| v.old_version).collect();
    versions.dedup();
    for version in versions {
        out.push(format!("{{oldSchemaVersion: {version}}}"));
        if let Some(old) = previous.iter().find(|p| p.version == version) {
            out.push(format!("{{oldSchema: '{}'}}", old.schema));
        }
    }
    out.push(format!(
        "{{validateFields: 'false', compatibility: '{level}'}}"
    ));
    out
}

fn check_against(
    level: CompatibilityLevel,
    new: &Schema,
    previous: &[VersionRow],
) -> Result<Vec<Violation>, RegistryError> {
    let parsed = previous
        .iter()
        .map(|v| Ok((v.version, parse_stored(v)?)))
        .collect::<Result<Vec<_>, RegistryError>>()?;
    let refs: Vec<(i32, &Schema)> = parsed.iter().map(|(v, s)| (*v, s)).collect();
    Ok(compat::check_level(level, new, &refs))
}

fn live(versions: Vec<VersionRow>) -> Vec<VersionRow> {
    versions.into_iter().filter(|v| !v.deleted).collect()
}

impl Registry {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Registers `schema` under `subject`. Re-registering a schema the subject already has
    /// returns the existing id; an incompatible one is refused with the reasons.
    pub async fn register(
        &self,
        subject: &str,
        schema: Prepared,
    ) -> Result<(i32, i32), RegistryError> {
        let mut tx = self.store.lock_subject(subject).await?;
        let current = live(self.store.versions(&mut tx, subject).await?);
        if let Some(existing) = current.iter().find(|v| v.schema == schema.text) {
            tx.commit().await?;
            return Ok((existing.schema_id, existing.version));
        }
        let level = self.store.effective_level(subject).await?;
        let violations = check_against(level, &schema.parsed, &current)?;
        if !violations.is_empty() {
            observability::incompatible();
            return Err(RegistryError::Incompatible {
                subject: subject.to_owned(),
                details: explain(&violations, &current, level),
            });
        }
        let id = self
            .store
            .schema_id(&mut tx, &schema.text, &schema.fingerprint)
            .await?;
        let version = self.store.add_version(&mut tx, subject, id).await?;
        tx.commit().await?;
        observability::registered();
        tracing::info!(subject, id, version, "Schema registered");
        Ok((id, version))
    }

    /// The version of `subject` holding exactly `schema`.
    pub async fn lookup(
        &self,
        subject: &str,
        schema: &Prepared,
        include_deleted: bool,
    ) -> Result<VersionRow, RegistryError> {
        let versions = self.visible(subject, include_deleted).await?;
        versions
            .into_iter()
            .rev()
            .find(|v| v.schema == schema.text)
            .ok_or_else(|| {
                RegistryError::SchemaNotFound("not registered under this subject".into())
            })
    }

    /// Versions of `subject` a reader may see; 40401 if there are none.
    pub async fn visible(
        &self,
        subject: &str,
        include_deleted: bool,
    ) -> Result<Vec<VersionRow>, RegistryError> {
        let versions: Vec<VersionRow> = self
            .store
            .subject_versions(subject)
            .await?
            .into_iter()
            .filter(|v| include_deleted || !v.deleted)
            .collect();
        if versions.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_owned()));
        }
        Ok(versions)
    }

    pub async fn version(
        &self,
        subject: &str,
        spec: VersionSpec,
        include_deleted: bool,
    ) -> Result<VersionRow, RegistryError> {
        let versions = self.visible(subject, include_deleted).await?;
        spec.find(&versions)
            .cloned()
            .ok_or(RegistryError::VersionNotFound(spec.label()))
    }

    /// Deletes a subject: soft by default (versions hidden, ids kept), permanent only after a
    /// soft delete. Returns the versions deleted.
    pub async fn delete_subject(
        &self,
        subject: &str,
        permanent: bool,
    ) -> Result<Vec<i32>, RegistryError> {
        let mut tx = self.store.lock_subject(subject).await?;
        let all = self.store.versions(&mut tx, subject).await?;
        if all.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_owned()));
        }
        let live: Vec<i32> = all
            .iter()
            .filter(|v| !v.deleted)
            .map(|v| v.version)
            .collect();
        let deleted = if permanent {
            if !live.is_empty() {
                return Err(RegistryError::SubjectNotSoftDeleted(subject.to_owned()));
            }
            let every: Vec<i32> = all.iter().map(|v| v.version).collect();
            self.store.hard_delete(&mut tx, subject, &every).await?;
            every
        } else {
            if live.is_empty() {
                return Err(RegistryError::SubjectSoftDeleted(subject.to_owned()));
            }
            self.store.soft_delete(&mut tx, subject, &live).await?;
            live
        };
        tx.commit().await?;
        if permanent {
            self.store.delete_level(subject).await?;
        }
        tracing::info!(
            subject,
            permanent,
            versions = deleted.len(),
            "Subject deleted"
        );
        Ok(deleted)
    }

    /// Deletes one version, soft or (after a soft delete) permanent.
    pub async fn delete_version(
        &self,
        subject: &str,
        spec: VersionSpec,
        permanent: bool,
    ) -> Result<i32, RegistryError> {
        let mut tx = self.store.lock_subject(subject).await?;
        let all = self.store.versions(&mut tx, subject).await?;
        if all.is_empty() {
            return Err(RegistryError::SubjectNotFound(subject.to_owned()));
        }
        let target = match spec {
            VersionSpec::Latest => all.iter().rev().find(|v| !v.deleted),
            VersionSpec::Number(n) => all.iter().find(|v| v.version == n),
        }
        .ok_or(RegistryError::VersionNotFound(spec.label()))?;
        let version = target.version;
        match (permanent, target.deleted) {
            (false, true) => {
                return Err(RegistryError::VersionSoftDeleted {
                    subject: subject.to_owned(),
                    version,
                });
            }
            (true, false) => {
                return Err(RegistryError::VersionNotSoftDeleted {
                    subject: subject.to_owned(),
                    version,
                });
            }
            (false, false) => self.store.soft_delete(&mut tx, subject, &[version]).await?,
            (true, true) => self.store.hard_delete(&mut tx, subject, &[version]).await?,
        }
        tx.commit().await?;
        tracing::info!(subject, version, permanent, "Version deleted");
        Ok(version)
    }

    /// Checks `schema` against one version (`Some`) or, per the subject's level, against the
    /// versions the level covers (`None`).
    pub async fn check(
        &self,
        subject: &str,
        spec: Option<VersionSpec>,
        schema: &Prepared,
    ) -> Result<CheckResult, RegistryError> {
        let current = live(self.store.subject_versions(subject).await?);
        let level = self.store.effective_level(subject).await?;
        let against: Vec<VersionRow> = match spec {
            Some(spec) => {
                if current.is_empty() {
                    return Err(RegistryError::SubjectNotFound(subject.to_owned()));
                }
                vec![
                    spec.find(&current)
                        .cloned()
                        .ok_or(RegistryError::VersionNotFound(spec.label()))?,
                ]
            }
            None => current,
        };
        let violations = check_against(level, &schema.parsed, &against)?;
        Ok(CheckResult {
            compatible: violations.is_empty(),
            messages: if violations.is_empty() {
                Vec::new()
            } else {
                explain(&violations, &against, level)
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_like_confluent() {
        assert_eq!(VersionSpec::parse("latest").ok(), Some(VersionSpec::Latest));
        assert_eq!(VersionSpec::parse("-1").ok(), Some(VersionSpec::Latest));
        assert_eq!(VersionSpec::parse("3").ok(), Some(VersionSpec::Number(3)));
        for bad in ["0", "-2", "x", ""] {
            assert!(matches!(
                VersionSpec::parse(bad),
                Err(RegistryError::InvalidVersion(_))
            ));
        }
    }

    #[test]
    fn prepare_rejects_what_it_cannot_store() {
        assert!(matches!(
            prepare("{nope", None, false),
            Err(RegistryError::InvalidSchema(_))
        ));
        assert!(matches!(
            prepare(r#"{"type":"record","name":"R"}"#, None, false),
            Err(RegistryError::InvalidSchema(_))
        ));
        assert!(matches!(
            prepare(r#""string""#, Some("PROTOBUF"), false),
            Err(RegistryError::InvalidSchema(_))
        ));
        assert!(matches!(
            prepare(r#""string""#, None, true),
            Err(RegistryError::InvalidSchema(_))
        ));
        let a = prepare(r#"{"type": "string"}"#, Some("AVRO"), false).expect("valid");
        let b = prepare(r#""string""#, None, false).expect("valid");
        assert_eq!(a.fingerprint, b.fingerprint);
    }
}
