//! The captured database over SQL: prerequisites, publication, slot state, table metadata, the
//! snapshot read, heartbeats and lag.

use sqlx::{Connection, PgConnection, PgPool, Row};

use crate::{
    config::split_table,
    pgoutput::{Column, Relation, ReplicaIdentity},
};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Sql(#[from] sqlx::Error),
    #[error(
        "wal_level is {0:?} on the source database: logical replication needs wal_level=logical (set it in postgresql.conf and restart Postgres)"
    )]
    WalLevel(String),
    #[error("captured table {0} does not exist")]
    MissingTable(String),
}

/// Checks `wal_level` and makes the publication cover the configured tables.
pub async fn prepare(
    pool: &PgPool,
    publication: &str,
    tables: &[String],
) -> Result<(), SourceError> {
    let level: String = sqlx::query_scalar("SHOW wal_level").fetch_one(pool).await?;
    if level != "logical" {
        return Err(SourceError::WalLevel(level));
    }
    for t in tables {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(t)
            .fetch_one(pool)
            .await?;
        if !exists {
            return Err(SourceError::MissingTable(t.clone()));
        }
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(publication)
            .fetch_one(pool)
            .await?;
    let quoted: Vec<String> = tables
        .iter()
        .filter_map(|t| split_table(t).map(|(s, n)| format!("\"{s}\".\"{n}\"")))
        .collect();
    if !exists {
        // Identifiers were validated as [A-Za-z0-9_]+ by the configuration.
        let sql = format!(
            "CREATE PUBLICATION \"{publication}\" FOR TABLE {}",
            quoted.join(", ")
        );
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
        tracing::info!(publication, "Publication created");
        return Ok(());
    }
    let present: Vec<String> = sqlx::query_scalar(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
    )
    .bind(publication)
    .fetch_all(pool)
    .await?;
    for (t, q) in tables.iter().zip(&quoted) {
        if !present.contains(t) {
            let sql = format!("ALTER PUBLICATION \"{publication}\" ADD TABLE {q}");
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
            tracing::info!(publication, table = %t, "Table added to the publication");
        }
    }
    Ok(())
}

/// Whether the replication slot exists.
pub async fn slot_exists(pool: &PgPool, slot: &str) -> Result<bool, SourceError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(slot)
    .fetch_one(pool)
    .await?)
}

/// Drops the slot (a snapshot that never completed must start over with a fresh one).
pub async fn drop_slot(pool: &PgPool, slot: &str) -> Result<(), SourceError> {
    sqlx::query("SELECT pg_drop_replication_slot($1) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active")
        .bind(slot)
        .execute(pool)
        .await?;
    Ok(())
}

/// Primary-key column names of a table, in key order; falls back to the replica identity index.
pub async fn key_columns(pool: &PgPool, oid: u32) -> Result<Vec<String>, SourceError> {
    let rows = sqlx::query(
        "SELECT a.attname::text
           FROM pg_index i
           JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
          WHERE i.indrelid = $1::oid AND (i.indisprimary OR i.indisreplident)
          ORDER BY i.indisprimary DESC, k.ord",
    )
    .bind(i64::from(oid))
    .fetch_all(pool)
    .await?;
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        let n: String = r.try_get(0)?;
        if !names.contains(&n) {
            names.push(n);
        }
    }
    Ok(names)
}

/// A table's current shape from the catalog, as a Relation message would describe it (with
/// the primary key marked).
pub async fn relation(pool: &PgPool, table: &str) -> Result<Relation, SourceError> {
    let (schema, name) =
        split_table(table).ok_or_else(|| SourceError::MissingTable(table.to_owned()))?;
    let row = sqlx::query(
        "SELECT c.oid::bigint, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(schema)
    .bind(name)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| SourceError::MissingTable(table.to_owned()))?;
    let oid = u32::try_from(row.try_get::<i64, _>(0)?).unwrap_or_default();
    let identity: String = row.try_get(1)?;
    let cols = sqlx::query(
        "SELECT attname::text, atttypid::bigint, atttypmod FROM pg_attribute
          WHERE attrelid = $1::oid AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
    )
    .bind(i64::from(oid))
    .fetch_all(pool)
    .await?;
    let keys = key_columns(pool, oid).await?;
    let columns = cols
        .into_iter()
        .map(|r| {
            let name: String = r.try_get(0)?;
            Ok(Column {
                key: keys.contains(&name),
                type_oid: u32::try_from(r.try_get::<i64, _>(1)?).unwrap_or_default(),
                type_modifier: r.try_get(2)?,
                name,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Relation {
        oid,
        namespace: schema.to_owned(),
        name: name.to_owned(),
        replica_identity: match identity.as_str() {
            "f" => ReplicaIdentity::Full,
            "n" => ReplicaIdentity::Nothing,
            "i" => ReplicaIdentity::Index,
            _ => ReplicaIdentity::Default,
        },
        columns,
    })
}

/// A transaction reading the database as of an exported snapshot.
pub struct SnapshotReader {
    conn: PgConnection,
}

impl SnapshotReader {
    /// Opens a repeatable-read transaction on `snapshot` (from `CREATE_REPLICATION_SLOT`).
    pub async fn open(url: &str, snapshot: &str) -> Result<Self, SourceError> {
        let mut conn = PgConnection::connect(url).await?;
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut conn)
            .await?;
        // The snapshot name is what the server returned; quote it as a literal.
        let set = format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        );
        sqlx::query(sqlx::AssertSqlSafe(set))
            .execute(&mut conn)
            .await?;
        sqlx::query("SET LOCAL TimeZone = 'UTC'")
            .execute(&mut conn)
            .await?;
        sqlx::query("SET LOCAL DateStyle = 'ISO, YMD'")
            .execute(&mut conn)
            .await?;
        sqlx::query("SET LOCAL extra_float_digits = 3")
            .execute(&mut conn)
            .await?;
        Ok(Self { conn })
    }

    /// Opens a cursor over `table`, every column as text (as pgoutput sends it).
    pub async fn declare(&mut self, relation: &Relation) -> Result<(), SourceError> {
        let cols: Vec<String> = relation
            .columns
            .iter()
            .map(|c| format!("\"{}\"::text", c.name.replace('"', "\"\"")))
            .collect();
        let sql = format!(
            "DECLARE feedloop_snapshot NO SCROLL CURSOR FOR SELECT {} FROM \"{}\".\"{}\"",
            cols.join(", "),
            relation.namespace.replace('"', "\"\""),
            relation.name.replace('"', "\"\"")
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    /// The next rows of the open cursor (empty at the end), as text values.
    pub async fn fetch(&mut self, rows: u32) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        let sql = format!("FETCH {rows} FROM feedloop_snapshot");
        // Not cached as a prepared statement: the same text returns different columns per table.
        let fetched = sqlx::query(sqlx::AssertSqlSafe(sql))
            .persistent(false)
            .fetch_all(&mut self.conn)
            .await?;
        fetched
            .into_iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| r.try_get::<Option<String>, _>(i))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(SourceError::from)
    }

    pub async fn close_cursor(&mut self) -> Result<(), SourceError> {
        sqlx::query("CLOSE feedloop_snapshot")
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    pub async fn finish(mut self) -> Result<(), SourceError> {
        sqlx::query("COMMIT").execute(&mut self.conn).await?;
        self.conn.close().await?;
        Ok(())
    }
}

/// Writes a non-transactional heartbeat message into the WAL.
pub async fn heartbeat(pool: &PgPool) -> Result<(), SourceError> {
    sqlx::query("SELECT pg_logical_emit_message(false, 'feedloop.heartbeat', '')")
        .execute(pool)
        .await?;
    Ok(())
}

/// Bytes of WAL the slot has not confirmed yet.
pub async fn slot_lag_bytes(pool: &PgPool, slot: &str) -> Result<Option<i64>, SourceError> {
    Ok(sqlx::query_scalar(
        "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?
    .flatten())
}
