//! Postgres adapter basics: pools and the control-plane migrations in `sql/migrations`.

use std::time::Duration;

use sqlx::{
    PgPool,
    migrate::{MigrateError, Migrator},
    postgres::PgPoolOptions,
};

use crate::retry::{Attempt, RetryPolicy, retry};

/// The control-plane migrations, embedded at build time. Forward-only once landed.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../sql/migrations");

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
