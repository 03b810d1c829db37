//! Registry storage in Postgres (tables in `sql/migrations`).

use feedloop_core::avro::compat::CompatibilityLevel;
use sqlx::{PgPool, Postgres, Row, Transaction};

/// One version of a subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub version: i32,
    pub schema_id: i32,
    pub schema: String,
    pub deleted: bool,
}

/// Postgres-backed registry store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

/// Scope of the global compatibility level in `registry.config`.
const GLOBAL: &str = "";

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Starts a transaction holding the subject's lock, so that concurrent registrations of one
    /// subject are serialized.
    pub async fn lock_subject(
        &self,
        subject: &str,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('registry.subject:' || $1, 0))")
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// All versions of `subject`, oldest first, including soft-deleted ones.
    pub async fn versions(
        &self,
        conn: &mut sqlx::PgConnection,
        subject: &str,
    ) -> Result<Vec<VersionRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT sv.version, sv.schema_id, s.schema_text, sv.deleted
               FROM registry.subject_versions sv
               JOIN registry.schemas s ON s.id = sv.schema_id
              WHERE sv.subject = $1
              ORDER BY sv.version",
        )
        .bind(subject)
        .fetch_all(conn)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(VersionRow {
                    version: r.try_get(0)?,
                    schema_id: r.try_get(1)?,
                    schema: r.try_get(2)?,
                    deleted: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// Versions of `subject` without a transaction.
    pub async fn subject_versions(&self, subject: &str) -> Result<Vec<VersionRow>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.versions(&mut conn, subject).await
    }

    /// The id of `schema_text` (identified by `fingerprint`), inserting it if new.
    pub async fn schema_id(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        schema_text: &str,
        fingerprint: &[u8],
    ) -> Result<i32, sqlx::Error> {
        let inserted: Option<i32> = sqlx::query_scalar(
            "INSERT INTO registry.schemas (schema_type, schema_text, fingerprint)
             VALUES ('AVRO', $1, $2)
             ON CONFLICT (fingerprint) DO NOTHING
             RETURNING id",
        )
        .bind(schema_text)
        .bind(fingerprint)
        .fetch_optional(&mut **tx)
        .await?;
        match inserted {
            Some(id) => Ok(id),
            None => {
                sqlx::query_scalar("SELECT id FROM registry.schemas WHERE fingerprint = $1")
                    .bind(fingerprint)
                    .fetch_one(&mut **tx)
                    .await
            }
        }
    }

    /// Appends a version to `subject`; returns the version number.
    pub async fn add_version(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        subject: &str,
        schema_id: i32,
    ) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO registry.subject_versions (subject, version, schema_id)
             SELECT $1, COALESCE(MAX(version), 0) + 1, $2
               FROM registry.subject_versions WHERE subject = $1
             RETURNING version",
        )
        .bind(subject)
        .bind(schema_id)
        .fetch_one(&mut **tx)
        .await
    }

    pub async fn schema_by_id(&self, id: i32) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT schema_text FROM registry.schemas WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// (subject, version) pairs using schema `id`, live versions only.
    pub async fn usages(&self, id: i32) -> Result<Vec<(String, i32)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT subject, version FROM registry.subject_versions
              WHERE schema_id = $1 AND NOT deleted ORDER BY subject, version",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    pub async fn subjects(
        &self,
        include_deleted: bool,
        prefix: &str,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT DISTINCT subject FROM registry.subject_versions
              WHERE ($1 OR NOT deleted) AND starts_with(subject, $2)
              ORDER BY subject",
        )
        .bind(include_deleted)
        .bind(prefix)
        .fetch_all(&self.pool)
        .await
    }

    /// Marks the given versions deleted (soft delete).
    pub async fn soft_delete(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        subject: &str,
        versions: &[i32],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE registry.subject_versions SET deleted = true
              WHERE subject = $1 AND version = ANY($2)",
        )
        .bind(subject)
        .bind(versions)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Removes the given versions for good (permanent delete).
    pub async fn hard_delete(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        subject: &str,
        versions: &[i32],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "DELETE FROM registry.subject_versions WHERE subject = $1 AND version = ANY($2)",
        )
        .bind(subject)
        .bind(versions)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The level configured for `subject` (or globally when `None`).
    pub async fn level(
        &self,
        subject: Option<&str>,
    ) -> Result<Option<CompatibilityLevel>, sqlx::Error> {
        let text: Option<String> =
            sqlx::query_scalar("SELECT compatibility FROM registry.config WHERE scope = $1")
                .bind(subject.unwrap_or(GLOBAL))
                .fetch_optional(&self.pool)
                .await?;
        Ok(text.and_then(|t| t.parse().ok()))
    }

    /// The level that applies to `subject`: its own, else the global one.
    pub async fn effective_level(&self, subject: &str) -> Result<CompatibilityLevel, sqlx::Error> {
        if let Some(level) = self.level(Some(subject)).await? {
            return Ok(level);
        }
        Ok(self
            .level(None)
            .await?
            .unwrap_or(CompatibilityLevel::Backward))
    }

    pub async fn set_level(
        &self,
        subject: Option<&str>,
        level: CompatibilityLevel,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO registry.config (scope, compatibility) VALUES ($1, $2)
             ON CONFLICT (scope) DO UPDATE SET compatibility = EXCLUDED.compatibility",
        )
        .bind(subject.unwrap_or(GLOBAL))
        .bind(level.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes the subject's level; returns what it was.
    pub async fn delete_level(
        &self,
        subject: &str,
    ) -> Result<Option<CompatibilityLevel>, sqlx::Error> {
        let text: Option<String> = sqlx::query_scalar(
            "DELETE FROM registry.config WHERE scope = $1 RETURNING compatibility",
        )
        .bind(subject)
        .fetch_optional(&self.pool)
        .await?;
        Ok(text.and_then(|t| t.parse().ok()))
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
    }
}
