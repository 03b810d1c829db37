//! Writes the fuzz targets' seed corpus from real captures (integration-tests/fuzz/seed runs
//! it): request bodies of the demo's simulated phones (native and Segment), the Avro frames the
//! collector publishes for them, pgoutput messages a real Postgres sends for the product
//! tables, the label spec, and every service's configuration file.
//!
//! `cargo run -p feedloop-integration-tests --example fuzz_seeds -- integration-tests/fuzz/corpus`

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use feedloop::{
    demo::sim::{self, Api, SimOptions, Step},
    dev::PgCluster,
};
use feedloop_collector::{
    config::Config,
    ingest::{Context, Parsed, native, segment},
    pipeline::Codecs,
};
use feedloop_core::model::DeadLetter;
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, Row};

/// Stands in for the moment of capture: the simulation's times end here.
const T0: i64 = 1_767_225_600_000;

/// Writes `bytes` as `dir/<sha256 prefix>`.
fn put(dir: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = hex::encode(&Sha256::digest(bytes)[..10]);
    std::fs::write(dir.join(name), bytes)?;
    Ok(())
}

fn collector_and_avro(corpus: &Path) -> anyhow::Result<usize> {
    let world = sim::generate(SimOptions {
        users: 12,
        events: 400,
        seed: 7,
        t0: T0,
    });
    let config = Config::from_defaults()?;
    let ctx = Context {
        app_id: "dev",
        received_at: T0,
        max_event_bytes: config.http.max_event_bytes,
        time: &config.time,
    };
    let codecs = Codecs::local()?;
    let mut n = 0;
    let batches = world.steps.iter().filter_map(|s| match s {
        Step::Send(b) => Some(b),
        Step::Write(_) => None,
    });
    for batch in batches.take(40) {
        let body = match batch.api {
            Api::Native => json!({"sent_at": T0 + batch.skew_ms, "batch": batch.events}),
            Api::Segment => json!({"sentAt": T0 + batch.skew_ms, "batch": batch.events}),
        };
        let body = serde_json::to_vec(&body)?;
        let parsed: Vec<Parsed> = match batch.api {
            Api::Native => {
                put(&corpus.join("collector_native"), &body)?;
                let (events, sent_at) = native::split(&body, config.http.max_batch_len)?;
                events
                    .iter()
                    .map(|e| native::parse_event(e, sent_at, &ctx))
                    .collect()
            }
            Api::Segment => {
                put(&corpus.join("collector_segment"), &body)?;
                let b: segment::SegmentBatch<'_> = serde_json::from_slice(&body)?;
                b.batch
                    .iter()
                    .map(|m| segment::parse_message(m, &b, &ctx))
                    .collect()
            }
        };
        for p in parsed {
            let mut frame = Vec::new();
            match p {
                Parsed::Event(e) => codecs.encode_event(&e, &mut frame)?,
                Parsed::Reject(r) => codecs.encode_dead_letter(
                    &DeadLetter {
                        dead_letter_id: uuid::Uuid::from_u128(n as u128),
                        path: r.path,
                        event_type: r.event_type,
                        event_id: r.event_id,
                        app_id: Some("dev".into()),
                        ..DeadLetter::new("collector", r.reason, r.detail, &r.original, T0)
                    },
                    &mut frame,
                )?,
            }
            put(&corpus.join("avro_frame"), &frame)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The product schema's writes, as the backend makes them, and a table of every column type cdc
/// maps; each statement its own transaction.
const DML: &str = "INSERT INTO app.users (id, email, phone, display_name, country, bio)
           VALUES ('u-1', 'a@example.org', '+15550000001', 'A', 'DE', 'hello'),
                  ('u-2', 'b@example.org', NULL, 'B', NULL, repeat('x', 3000));
         INSERT INTO app.matches (id, user_a, user_b, score)
           VALUES ('0193f5a0-0000-7000-8000-000000000001', 'u-1', 'u-2', 0.75);
         UPDATE app.matches SET status = 'accepted';
         INSERT INTO app.reports (reporter_id, reported_id, reason, comment)
           VALUES ('u-1', 'u-2', 'spam', 'sent links');
         INSERT INTO app.blocks (blocker_id, blocked_id) VALUES ('u-2', 'u-1');
         UPDATE app.users SET deleted_at = now() WHERE id = 'u-2';
         DELETE FROM app.users WHERE id = 'u-2';
         INSERT INTO app.outbox (aggregate_type, aggregate_id, type, payload)
           VALUES ('user', 'u-1', 'erasure_requested', '{\"reason\": \"gdpr\"}');
         INSERT INTO app.kinds VALUES (1, true, -2, 40000, 1.5, -2.25e300, 12345.678,
           '2026-01-31', '23:59:59.999999', '2026-01-01 00:00:00', '1999-12-31 23:59:59+02',
           '0193f5a0-0000-7000-8000-000000000002', '{\"a\": [1, null]}', '\\xdeadbeef',
           '{x,\"y z\"}', '1 day 02:03:04');
         INSERT INTO app.kinds (id) VALUES (2);
         UPDATE app.kinds SET f8 = 'NaN', f4 = '-Infinity', d = 'infinity' WHERE id = 2;
         ALTER TABLE app.kinds ADD COLUMN extra text;
         UPDATE app.kinds SET extra = 'after ddl' WHERE id = 1;
         TRUNCATE app.blocks;
         SELECT pg_logical_emit_message(true, 'feedloop', 'hello');";

/// Runs the product schema's DML through a throwaway Postgres and captures each pgoutput
/// message of a logical slot (`pg_logical_slot_get_binary_changes`).
async fn pgoutput(corpus: &Path) -> anyhow::Result<usize> {
    let mut pg = PgCluster::start().await?;
    let mut db = PgConnection::connect(&pg.url()).await?;
    let schema = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/product/schema.sql"),
    )
    .context("reading the product schema")?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(schema))
        .execute(&mut db)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE app.kinds (id bigint PRIMARY KEY, b boolean, i2 smallint, i4 integer, \
           f4 real, f8 double precision, n numeric, d date, t time, ts timestamp, \
           tstz timestamptz, u uuid, j jsonb, by bytea, arr text[], iv interval);
         CREATE PUBLICATION fuzz FOR ALL TABLES;",
    )
    .execute(&mut db)
    .await?;
    sqlx::raw_sql("SELECT pg_create_logical_replication_slot('fuzz', 'pgoutput')")
        .execute(&mut db)
        .await?;
    // Separate statements, each its own transaction (Begin and Commit messages of each).
    for statement in DML.split(";\n") {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut db)
            .await
            .with_context(|| format!("running {statement}"))?;
    }
    let rows = sqlx::query(
        "SELECT data FROM pg_logical_slot_get_binary_changes('fuzz', NULL, NULL, \
           'proto_version', '1', 'publication_names', 'fuzz', 'messages', 'true')",
    )
    .fetch_all(&mut db)
    .await?;
    for row in &rows {
        let data: Vec<u8> = row.try_get("data")?;
        put(&corpus.join("pgoutput"), &data)?;
    }
    drop(db);
    pg.stop();
    Ok(rows.len())
}

/// The label spec and every service's configuration, as shipped.
fn texts(corpus: &Path) -> anyhow::Result<usize> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    put(
        &corpus.join("label_spec"),
        feedloop_labeler::spec::EXAMPLE_SPEC.as_bytes(),
    )?;
    let mut n = 1;
    let mut configs: Vec<PathBuf> = [
        "collector",
        "cdc",
        "labeler",
        "eraser",
        "trigger",
        "registry",
    ]
    .iter()
    .map(|s| root.join(format!("services/{s}/default.toml")))
    .collect();
    configs.push(root.join("deploy/registry.toml"));
    for path in configs {
        put(&corpus.join("config"), &std::fs::read(&path)?)?;
        n += 1;
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let corpus = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: fuzz_seeds CORPUS_DIR")?,
    );
    let events = collector_and_avro(&corpus)?;
    let messages = pgoutput(&corpus).await?;
    let texts = texts(&corpus)?;
    println!("{events} Avro frames, {messages} pgoutput messages, {texts} spec and config files");
    Ok(())
}
