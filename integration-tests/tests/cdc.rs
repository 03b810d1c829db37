//! cdc against a throwaway Postgres and the real broker.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use feedloop_core::{
    crypto::Opened,
    model::{ErasureOrigin, ErasureRequest},
    registry_client::RegistryClient,
};
use feedloop_integration_tests::{
    cdc::TestCdc,
    infra,
    log::{Landed, read_all},
};
use serde_json::Value;

/// A decoded change record.
#[derive(Debug, Clone)]
struct Change {
    key: Option<Value>,
    value: Option<Value>,
    commit_lsn: u64,
    ordinal: u32,
    partition: i32,
    offset: i64,
}

async fn changes(client: &RegistryClient, topic: &str) -> Vec<Change> {
    let mut out = Vec::new();
    for r in read_all(&infra().kafka_bootstrap, topic).await {
        out.push(decode(client, &r).await);
    }
    out.sort_by_key(|c| (c.partition, c.offset));
    out
}

async fn decode(client: &RegistryClient, r: &Landed) -> Change {
    let key = if r.key.is_empty() {
        None
    } else {
        Some(client.decode::<Value>(&r.key).await.expect("key decodes"))
    };
    let value = if r.tombstone {
        None
    } else {
        Some(
            client
                .decode::<Value>(&r.value)
                .await
                .expect("value decodes"),
        )
    };
    Change {
        key,
        value,
        commit_lsn: r
            .header("feedloop.commit_lsn")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        ordinal: r
            .header("feedloop.ordinal")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        partition: r.partition,
        offset: r.offset,
    }
}

/// Polls `topic` until `done` holds for its changes.
async fn wait_changes(
    client: &RegistryClient,
    topic: &str,
    within: Duration,
    done: impl Fn(&[Change]) -> bool,
) -> Vec<Change> {
    let deadline = Instant::now() + within;
    loop {
        let c = changes(client, topic).await;
        if done(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{topic}: condition not met within {within:?}; have {} records",
            c.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn op(c: &Change) -> &str {
    c.value
        .as_ref()
        .and_then(|v| v["op"].as_str())
        .unwrap_or("tombstone")
}

#[tokio::test]
async fn changes_arrive_in_commit_order_per_key_with_envelopes_and_tombstones() {
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    let db = &cdc.source;
    // One transaction across two tables, then one transaction per change.
    let mut tx = db.begin().await.expect("begin");
    sqlx::query("INSERT INTO app.users (id, email, display_name, bio) VALUES ('u1', 'a@example.com', 'A', repeat('x', 5000)), ('u2', 'b@example.com', 'B', 'short')")
        .execute(&mut *tx).await.expect("users");
    sqlx::query("INSERT INTO app.matches (id, user_a, user_b, score) VALUES ('0192f2b4-7c1e-7000-8000-0000000000aa', 'u1', 'u2', 0.5)")
        .execute(&mut *tx).await.expect("match");
    tx.commit().await.expect("commit");
    sqlx::query("UPDATE app.users SET display_name = 'A2' WHERE id = 'u1'")
        .execute(db)
        .await
        .expect("update");
    sqlx::query("UPDATE app.matches SET status = 'accepted' WHERE user_a = 'u1'")
        .execute(db)
        .await
        .expect("update match");
    sqlx::query("DELETE FROM app.matches")
        .execute(db)
        .await
        .expect("delete match");
    sqlx::query("UPDATE app.users SET display_name = 'A3' WHERE id = 'u1'")
        .execute(db)
        .await
        .expect("update 2");

    let client = cdc.registry.client();
    let users = wait_changes(
        &client,
        &cdc.topic("app.users"),
        Duration::from_secs(60),
        |c| c.len() >= 4,
    )
    .await;
    let u1: Vec<&Change> = users
        .iter()
        .filter(|c| c.key.as_ref().is_some_and(|k| k["id"] == "u1"))
        .collect();
    assert_eq!(
        u1.iter().map(|c| op(c)).collect::<Vec<_>>(),
        ["c", "u", "u"]
    );
    let first = u1[0].value.as_ref().expect("value");
    // Personal columns are sealed with the user's data key; the key store opens them.
    assert_eq!(
        cdc.open("u1", &first["after"]["email"]).await,
        Opened::Clear("a@example.com".into())
    );
    assert_eq!(first["after"]["country"], serde_json::Value::Null);
    assert!(first["before"].is_null());
    assert_eq!(first["source"]["table"], "users");
    assert_eq!(first["source"]["schema"], "app");
    assert_eq!(first["source"]["snapshot"], "false");
    assert!(first["source"]["lsn"].as_i64().is_some_and(|l| l > 0));
    // REPLICA IDENTITY FULL: updates carry the old row.
    let second = u1[1].value.as_ref().expect("value");
    assert_eq!(
        cdc.open("u1", &second["before"]["display_name"]).await,
        Opened::Clear("A".into())
    );
    assert_eq!(
        cdc.open("u1", &second["after"]["display_name"]).await,
        Opened::Clear("A2".into())
    );
    // The unchanged TOASTed bio is marked, never null.
    assert_eq!(
        cdc.open("u1", &second["after"]["bio"]).await,
        Opened::Clear("x".repeat(5000)),
        "FULL identity carries the old value"
    );
    let third = u1[2].value.as_ref().expect("value");
    assert_eq!(
        cdc.open("u1", &third["before"]["display_name"]).await,
        Opened::Clear("A2".into())
    );
    // Commit order per key: positions strictly increase.
    assert!(
        u1.windows(2)
            .all(|w| (w[0].commit_lsn, w[0].ordinal) < (w[1].commit_lsn, w[1].ordinal))
    );

    let matches = wait_changes(
        &client,
        &cdc.topic("app.matches"),
        Duration::from_secs(60),
        |c| c.len() >= 4,
    )
    .await;
    assert_eq!(
        matches.iter().map(op).collect::<Vec<_>>(),
        ["c", "u", "d", "tombstone"]
    );
    // DEFAULT identity: an update has no before; a delete has the key in before.
    assert!(matches[1].value.as_ref().expect("u")["before"].is_null());
    assert_eq!(
        matches[1].value.as_ref().expect("u")["after"]["status"],
        "accepted"
    );
    let delete = matches[2].value.as_ref().expect("d");
    assert_eq!(
        delete["before"]["id"],
        "0192f2b4-7c1e-7000-8000-0000000000aa"
    );
    assert!(delete["after"].is_null());
    assert_eq!(
        matches[3].key, matches[2].key,
        "the tombstone carries the deleted key"
    );
    // The first transaction's two tables share its commit position.
    assert_eq!(matches[0].commit_lsn, u1[0].commit_lsn);
    cdc.cleanup().await;
}

#[tokio::test]
async fn unchanged_toast_values_are_marked_not_nulled() {
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    let db = &cdc.source;
    sqlx::query("INSERT INTO app.reports (reporter_id, reported_id, reason, comment) VALUES ('u1', 'u2', 'spam', (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 1000) g))")
        .execute(db).await.expect("insert");
    sqlx::query("UPDATE app.reports SET reason = 'harassment'")
        .execute(db)
        .await
        .expect("update");
    let client = cdc.registry.client();
    let reports = wait_changes(
        &client,
        &cdc.topic("app.reports"),
        Duration::from_secs(60),
        |c| c.len() >= 2,
    )
    .await;
    let update = reports[1].value.as_ref().expect("update");
    assert_eq!(update["after"]["reason"], "harassment");
    assert_eq!(update["after"]["comment"], "__debezium_unavailable_value");
    cdc.cleanup().await;
}

#[tokio::test]
async fn snapshot_then_stream_has_no_gap_and_no_duplicate() {
    // Writes keep coming while the slot is created and the snapshot runs.
    let writer: std::sync::Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>> =
        Default::default();
    let slot = writer.clone();
    let cdc = TestCdc::start_with(
        |db| async move {
            sqlx::query("INSERT INTO app.blocks (blocker_id, blocked_id) SELECT 'a' || g, 'b' || g FROM generate_series(1, 1000) g")
                .execute(&db).await.expect("seed");
            let handle = tokio::spawn(async move {
                for i in 0..400 {
                    sqlx::query("INSERT INTO app.blocks (blocker_id, blocked_id) VALUES ($1, 'later')")
                        .bind(format!("w{i}"))
                        .execute(&db).await.expect("insert");
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            });
            *slot.lock().expect("slot") = Some(handle);
        },
        |_| {},
    )
    .await;
    let handle = writer.lock().expect("slot").take().expect("writer");
    handle.await.expect("writer");
    let client = cdc.registry.client();
    let blocks = wait_changes(
        &client,
        &cdc.topic("app.blocks"),
        Duration::from_secs(90),
        |c| c.len() >= 1400,
    )
    .await;
    let mut seen: HashMap<i64, Vec<&str>> = HashMap::new();
    for c in &blocks {
        let v = c.value.as_ref().expect("value");
        let id = v["after"]["id"].as_i64().expect("id");
        seen.entry(id)
            .or_default()
            .push(v["op"].as_str().unwrap_or(""));
    }
    assert_eq!(seen.len(), 1400, "every row exactly once");
    assert!(seen.values().all(|ops| ops.len() == 1), "no row twice");
    let snapshotted = seen.values().filter(|o| o[0] == "r").count();
    let streamed = seen.values().filter(|o| o[0] == "c").count();
    assert!(
        snapshotted >= 1000,
        "the seeded rows come from the snapshot ({snapshotted})"
    );
    assert!(
        streamed > 0,
        "rows written after the slot's consistent point are streamed"
    );
    assert_eq!(snapshotted + streamed, 1400);
    let last = blocks
        .iter()
        .filter(|c| {
            c.value
                .as_ref()
                .is_some_and(|v| v["source"]["snapshot"] == "last")
        })
        .count();
    assert_eq!(last, 1, "one event marks the end of the snapshot");
    cdc.cleanup().await;
}

#[tokio::test]
async fn outbox_rows_are_routed_keyed_and_headed() {
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    let row: (String,) = sqlx::query_as(
        r#"INSERT INTO app.outbox (aggregate_type, aggregate_id, type, payload)
           VALUES ('match', 'm-77', 'MatchAccepted', '{"by": "u1"}') RETURNING id::text"#,
    )
    .fetch_one(&cdc.source)
    .await
    .expect("outbox insert");
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        let records = read_all(&infra().kafka_bootstrap, "outbox.match").await;
        if let Some(r) = records
            .into_iter()
            .find(|r| r.header("id") == Some(row.0.as_str()))
        {
            break r;
        }
        assert!(Instant::now() < deadline, "outbox event not routed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(record.key, b"m-77");
    assert_eq!(record.header("type"), Some("MatchAccepted"));
    let value: Value = cdc
        .registry
        .client()
        .decode(&record.value)
        .await
        .expect("decodes");
    assert_eq!(value["aggregate_id"], "m-77");
    let payload: Value =
        serde_json::from_str(value["payload"].as_str().expect("payload")).expect("json payload");
    assert_eq!(payload["by"], "u1");
    // Routed, not captured as changes.
    let raw = read_all(&infra().kafka_bootstrap, &cdc.topic("app.outbox")).await;
    assert!(raw.is_empty());
    cdc.cleanup().await;
}

#[tokio::test]
async fn deleted_and_soft_deleted_users_raise_erasure_requests() {
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    let db = &cdc.source;
    let (hard, soft) = (
        format!("hard-{}", uuid::Uuid::new_v4()),
        format!("soft-{}", uuid::Uuid::new_v4()),
    );
    for u in [&hard, &soft] {
        sqlx::query(
            "INSERT INTO app.users (id, email, display_name) VALUES ($1, 'x@example.com', 'X')",
        )
        .bind(u)
        .execute(db)
        .await
        .expect("insert");
    }
    sqlx::query("DELETE FROM app.users WHERE id = $1")
        .bind(&hard)
        .execute(db)
        .await
        .expect("delete");
    sqlx::query("UPDATE app.users SET deleted_at = now() WHERE id = $1")
        .bind(&soft)
        .execute(db)
        .await
        .expect("soft delete");
    sqlx::query("UPDATE app.users SET display_name = 'still gone' WHERE id = $1")
        .bind(&soft)
        .execute(db)
        .await
        .expect("later update");
    let client = cdc.registry.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut found: Vec<ErasureRequest> = Vec::new();
        for r in read_all(
            &infra().kafka_bootstrap,
            &cdc.config.users.erasure_requests_topic,
        )
        .await
        {
            if let Ok(req) = client.decode::<ErasureRequest>(&r.value).await
                && (req.user_ids.contains(&hard) || req.user_ids.contains(&soft))
            {
                found.push(req);
            }
        }
        if found.len() >= 2 {
            assert_eq!(
                found.len(),
                2,
                "one request per user; a later update of a soft-deleted user raises none: {found:?}"
            );
            assert!(
                found
                    .iter()
                    .any(|r| r.user_ids == [hard.clone()] && r.origin == ErasureOrigin::CdcDelete)
            );
            assert!(
                found
                    .iter()
                    .any(|r| r.user_ids == [soft.clone()]
                        && r.origin == ErasureOrigin::CdcSoftDelete)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "erasure requests not raised: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cdc.cleanup().await;
}

#[tokio::test]
async fn add_column_under_load_registers_a_new_version_without_failing() {
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    let db = cdc.source.clone();
    let writer = tokio::spawn(async move {
        for i in 0..300 {
            if i == 150 {
                sqlx::query("ALTER TABLE app.reports ADD COLUMN severity integer")
                    .execute(&db)
                    .await
                    .expect("alter");
            }
            let sql = if i >= 150 {
                "INSERT INTO app.reports (reporter_id, reported_id, reason, severity) VALUES ($1, 'x', 'spam', 3)"
            } else {
                "INSERT INTO app.reports (reporter_id, reported_id, reason) VALUES ($1, 'x', 'spam')"
            };
            sqlx::query(sql)
                .bind(format!("r{i}"))
                .execute(&db)
                .await
                .expect("insert");
        }
    });
    writer.await.expect("writer");
    let client = cdc.registry.client();
    let reports = wait_changes(
        &client,
        &cdc.topic("app.reports"),
        Duration::from_secs(90),
        |c| c.len() >= 300,
    )
    .await;
    let with: Vec<&Change> = reports
        .iter()
        .filter(|c| {
            c.value
                .as_ref()
                .is_some_and(|v| v["after"]["severity"] == 3)
        })
        .collect();
    assert_eq!(
        with.len(),
        150,
        "every event after the migration carries the column"
    );
    let versions: Vec<i64> = cdc
        .registry
        .request(
            reqwest::Method::GET,
            &format!("/subjects/{}-value/versions", cdc.topic("app.reports")),
        )
        .send()
        .await
        .expect("registry")
        .json()
        .await
        .expect("json");
    assert_eq!(versions.len(), 2, "{versions:?}");
    cdc.cleanup().await;
}

#[tokio::test]
async fn an_incompatible_change_dead_letters_that_table_and_the_rest_goes_on() {
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    let db = &cdc.source;
    sqlx::query("INSERT INTO app.matches (id, user_a, user_b, score) VALUES (gen_random_uuid(), 'a', 'b', 0.1)").execute(db).await.expect("insert");
    let client = cdc.registry.client();
    wait_changes(
        &client,
        &cdc.topic("app.matches"),
        Duration::from_secs(60),
        |c| !c.is_empty(),
    )
    .await;
    // double precision -> text: readers of the old schema cannot follow.
    sqlx::query("ALTER TABLE app.matches ALTER COLUMN score TYPE text")
        .execute(db)
        .await
        .expect("alter");
    sqlx::query("INSERT INTO app.matches (id, user_a, user_b, score) VALUES (gen_random_uuid(), 'c', 'd', 'high')").execute(db).await.expect("insert");
    sqlx::query("INSERT INTO app.blocks (blocker_id, blocked_id) VALUES ('still', 'flowing')")
        .execute(db)
        .await
        .expect("other table");
    wait_changes(
        &client,
        &cdc.topic("app.blocks"),
        Duration::from_secs(60),
        |c| !c.is_empty(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dls = read_all(
            &infra().kafka_bootstrap,
            feedloop_core::catalogue::DEADLETTER_TOPIC,
        )
        .await;
        let mut found = false;
        for r in dls {
            if let Ok(dl) = client
                .decode::<feedloop_core::model::DeadLetter>(&r.value)
                .await
                && dl.service == "cdc"
                && dl.detail.contains("schema not registered")
                && dl.sealed_by.is_some()
                && !String::from_utf8_lossy(&r.value).contains("high")
                && String::from_utf8_lossy(
                    &feedloop_integration_tests::unsealed(cdc.config.control.url.expose(), &dl)
                        .await,
                )
                .contains("high")
            {
                found = true;
            }
        }
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the incompatible change was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        changes(&client, &cdc.topic("app.matches")).await.len(),
        1,
        "nothing incompatible was published"
    );
    cdc.cleanup().await;
}

/// A row larger than the producer's message.max.bytes allows (a 1.3 MB bio) is dead-lettered
/// about itself (its first 64 KiB, size and digest) instead of being retried from the slot
/// forever while WAL piles up; the changes after it flow.
#[tokio::test]
async fn an_oversized_row_is_dead_lettered_and_the_changes_after_it_flow() {
    let cdc = TestCdc::start_with(|_| async {}, |_| {}).await;
    let db = &cdc.source;
    sqlx::query(
        "INSERT INTO app.users (id, email, display_name, bio)
         SELECT 'huge', 'h@example.com', 'H', string_agg(md5(random()::text), '')
         FROM generate_series(1, 40000)",
    )
    .execute(db)
    .await
    .expect("huge row");
    sqlx::query(
        "INSERT INTO app.users (id, email, display_name) VALUES ('next', 'n@example.com', 'N')",
    )
    .execute(db)
    .await
    .expect("next row");
    let client = cdc.registry.client();
    let changes = wait_changes(
        &client,
        &cdc.topic("app.users"),
        Duration::from_secs(60),
        |c| {
            c.iter().any(|c| {
                c.key
                    .as_ref()
                    .is_some_and(|k| k.to_string().contains("next"))
            })
        },
    )
    .await;
    assert!(
        !changes.iter().any(|c| c
            .key
            .as_ref()
            .is_some_and(|k| k.to_string().contains("huge"))),
        "the oversized change itself must not be published"
    );
    let mut letters = Vec::new();
    for r in read_all(
        &infra().kafka_bootstrap,
        feedloop_core::catalogue::DEADLETTER_TOPIC,
    )
    .await
    {
        if let Ok(dl) = client
            .decode::<feedloop_core::model::DeadLetter>(&r.value)
            .await
            && dl.service == "cdc"
            && dl.detail.contains(&cdc.topic("app.users"))
        {
            letters.push(dl);
        }
    }
    assert_eq!(letters.len(), 1, "one dead letter about the oversized row");
    let dl = &letters[0];
    assert_eq!(
        dl.reason,
        feedloop_core::model::DeadLetterReason::SizeViolation
    );
    assert!(
        dl.original_size.is_some_and(|n| n > 1_000_000),
        "{:?}",
        dl.original_size
    );
    let opened = feedloop_integration_tests::unsealed(cdc.config.control.url.expose(), dl).await;
    assert_eq!(opened.len(), 64 * 1024);
    cdc.cleanup().await;
}

#[tokio::test]
async fn the_decoder_reads_real_captured_messages_and_rejects_mangled_ones() {
    use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
    let (url, db) = feedloop_integration_tests::cdc::product_database().await;
    let slot = format!("cap_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE PUBLICATION {slot} FOR TABLE app.users, app.reports"
    )))
    .execute(&db)
    .await
    .expect("publication");
    sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(&slot)
        .execute(&db)
        .await
        .expect("slot");
    sqlx::query("INSERT INTO app.users (id, email, display_name, bio) VALUES ('c1', 'c@example.com', 'C', repeat('z', 4000))").execute(&db).await.expect("insert");
    sqlx::query("UPDATE app.users SET email = 'd@example.com'")
        .execute(&db)
        .await
        .expect("update");
    sqlx::query(
        "INSERT INTO app.reports (reporter_id, reported_id, reason) VALUES ('c1', 'c2', 'spam')",
    )
    .execute(&db)
    .await
    .expect("insert");
    sqlx::query("UPDATE app.reports SET reason = 'other'")
        .execute(&db)
        .await
        .expect("update");
    sqlx::query("DELETE FROM app.users")
        .execute(&db)
        .await
        .expect("delete");
    sqlx::query("TRUNCATE app.reports")
        .execute(&db)
        .await
        .expect("truncate");
    let parsed = url::Url::parse(&url).expect("url");
    let cfg = ReplicationConfig::new(
        parsed.host_str().unwrap_or("127.0.0.1"),
        parsed.username(),
        "",
        parsed.path().trim_start_matches('/'),
        &slot,
        slot.as_str(),
    )
    .with_port(parsed.port().unwrap_or(5432))
    .with_tls(TlsConfig::disabled());
    let mut client = ReplicationClient::connect(cfg).await.expect("replication");
    let mut captured = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !captured.iter().any(|m: &Vec<u8>| m.first() == Some(&b'T')) && Instant::now() < deadline
    {
        if let Ok(Ok(Some(ReplicationEvent::XLogData { data, .. }))) =
            tokio::time::timeout(Duration::from_secs(5), client.recv()).await
        {
            captured.push(data.to_vec());
        }
    }
    let _ = client.shutdown().await;
    let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&db)
        .await;
    let tags: HashSet<u8> = captured.iter().filter_map(|m| m.first().copied()).collect();
    for tag in [b'R', b'I', b'U', b'D', b'T'] {
        assert!(
            tags.contains(&tag),
            "captured no {:?} message",
            char::from(tag)
        );
    }
    for m in &captured {
        feedloop_cdc::pgoutput::decode(m).unwrap_or_else(|e| panic!("real message rejected: {e}"));
        for cut in 0..m.len() {
            assert!(
                feedloop_cdc::pgoutput::decode(&m[..cut]).is_err(),
                "truncated message accepted"
            );
        }
        for i in 0..m.len() {
            let mut mangled = m.clone();
            mangled[i] ^= 0xff;
            let _ = feedloop_cdc::pgoutput::decode(&mangled);
        }
    }
}
