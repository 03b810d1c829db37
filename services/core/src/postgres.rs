//! Postgres adapter basics: pools and the control-plane migrations in `sql/migrations`.

use std::time::Duration;

use std::{borrow::Cow, sync::LazyLock};

use sqlx::{
    PgPool, SqlSafeStr,
    migrate::{MigrateError, Migration, MigrationType, Migrator},
    postgres::PgPoolOptions,
};

use crate::retry::{Attempt, RetryPolicy, retry};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/migrations.rs"));
}

/// The control-plane migrations, embedded at build time (`build.rs`). Forward-only once landed.
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    Migrator::with_migrations(
        embedded::MIGRATIONS
            .iter()
            .map(|(name, sql)| migration(name, sql))
            .collect(),
    )
});

/// The migration of the file `name` (`<version>_<description>.sql`), as `sqlx::migrate!` reads
/// it: the description with spaces for underscores, the checksum of the whole text, no
/// transaction when it starts with `-- no-transaction`. Databases migrated by earlier builds
/// (which used the macro) then see the same versions and checksums.
fn migration(name: &str, sql: &'static str) -> Migration {
    let stem = name.strip_suffix(".sql").unwrap_or(name);
    let (version, description) = stem.split_once('_').unwrap_or((stem, ""));
    Migration::new(
        // build.rs refuses to build with a file not named by a version.
        version.parse().unwrap_or(i64::MIN),
        Cow::Owned(description.replace('_', " ")),
        MigrationType::Simple,
        sql.into_sql_str(),
        sql.starts_with("-- no-transaction"),
    )
}

/// Connects a pool, retrying while the server starts up.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    retry(RetryPolicy::startup(), || async {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| match e {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => Attempt::Retry(e),
                sqlx::Error::Database(ref db) if db.code().as_deref() == Some("57P03") => {
                    // the database system is starting up
                    Attempt::Retry(e)
                }
                other => Attempt::Fail(other),
            })
    })
    .await
}

/// Applies pending control-plane migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    MIGRATOR.run(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded migrations are every file of sql/migrations, in version order, each with
    /// the version, description and checksum `sqlx::migrate!` gave it (SHA-384 of the text).
    #[test]
    fn migrations_are_every_file_as_sqlx_reads_it() {
        use sha2::Digest;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sql/migrations");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("sql/migrations")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        names.sort();
        let migrations: Vec<&Migration> = MIGRATOR.iter().collect();
        assert_eq!(migrations.len(), names.len());
        assert!(!names.is_empty());
        let mut last = i64::MIN;
        for (m, name) in migrations.iter().zip(&names) {
            let text = std::fs::read_to_string(dir.join(name)).expect("read");
            let (version, description) = name
                .trim_end_matches(".sql")
                .split_once('_')
                .expect("<version>_<description>.sql");
            assert_eq!(
                m.version,
                version.parse::<i64>().expect("a version"),
                "{name}"
            );
            assert!(m.version > last, "{name}: versions ascend");
            last = m.version;
            assert_eq!(m.description, description.replace('_', " "));
            assert_eq!(m.migration_type, MigrationType::Simple);
            assert_eq!(
                &m.checksum[..],
                &sha2::Sha384::digest(text.as_bytes())[..],
                "{name}"
            );
            assert_eq!(m.sql.as_str(), text);
            assert!(!m.no_tx);
        }
        assert_eq!(migrations[0].description, "registry schemas");
    }
}
