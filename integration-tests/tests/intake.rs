//! The intake every catalogue consumer uses (eraser, trigger): a record that keeps failing is
//! retried a bounded number of times, by its failure's class, then dead-lettered with its
//! topic, partition, offset and the error; the records after it are taken in.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use feedloop_core::{
    catalogue::{Catalogue, DEADLETTER_TOPIC},
    error::ErrorClass,
    intake::{Failure, Handled, Intake, Retries},
    kafka::{HealingProducer, create_missing},
    model::{DeadLetter, ErasureOrigin, ErasureRequest},
};
use feedloop_integration_tests::{TestRegistry, infra, kafka, log::read_all};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const RECORD: &str = "io.feedloop.erasure.ErasureRequest";

fn request(user: &str) -> ErasureRequest {
    ErasureRequest {
        request_id: Uuid::now_v7(),
        user_ids: vec![user.to_owned()],
        reason: "test".into(),
        requested_by: "test".into(),
        origin: ErasureOrigin::Api,
        idempotency_key: None,
        requested_at: 0,
        deadline_at: 0,
    }
}

#[tokio::test]
async fn records_that_keep_failing_are_dead_lettered_with_their_offset_and_the_rest_go_on() {
    let registry = TestRegistry::start().await;
    let client = Arc::new(registry.client());
    let catalogue = Catalogue::embedded().expect("catalogue");
    let topic: &'static str = Box::leak(format!("test.intake.{}", Uuid::now_v7()).into_boxed_str());
    create_missing(&kafka(), &[(topic, 1, false), (DEADLETTER_TOPIC, 1, false)])
        .await
        .expect("topics");
    let schema = client
        .register_compiled(
            &format!("{topic}-value"),
            &catalogue.composed(RECORD).expect("schema"),
        )
        .await
        .expect("register");
    let deadletter = client
        .register_compiled(
            &format!("{DEADLETTER_TOPIC}-value"),
            &catalogue
                .composed("io.feedloop.deadletter.DeadLetter")
                .expect("schema"),
        )
        .await
        .expect("register");
    let producer = Arc::new(
        HealingProducer::new(
            &kafka(),
            "test-intake",
            &BTreeMap::new(),
            "test_resets_total",
        )
        .expect("producer"),
    );
    // Offsets 0..=4: one of each failure, then a poison record, then one that succeeds.
    for user in ["bad-input", "internal", "unavailable", "poison", "fine"] {
        let mut value = Vec::new();
        schema.encode(&request(user), &mut value).expect("encode");
        producer
            .get()
            .send(
                FutureRecord::<(), _>::to(topic).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("send");
    }

    let attempts: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let shutdown = CancellationToken::new();
    let intake = Intake::new(
        &kafka(),
        &format!("test-intake-{}", Uuid::now_v7()),
        topic,
        "test",
        client.clone(),
        producer.clone(),
        deadletter,
    )
    .expect("intake")
    .with_retries(Retries {
        attempts: 3,
        max_wait: Duration::from_millis(600),
        first_pause: Duration::from_millis(50),
    });
    let seen = attempts.clone();
    let done = shutdown.clone();
    let run = tokio::spawn(intake.run(shutdown.clone(), move |r: ErasureRequest| {
        let seen = seen.clone();
        let done = done.clone();
        async move {
            let user = r.user_ids[0].clone();
            *seen.lock().expect("lock").entry(user.clone()).or_default() += 1;
            let fail = |class| {
                Err(Failure {
                    class,
                    message: format!("{user} failed"),
                })
            };
            match user.as_str() {
                "bad-input" => fail(ErrorClass::BadInput),
                "internal" => fail(ErrorClass::Internal),
                "unavailable" => fail(ErrorClass::Unavailable),
                "poison" => Ok(Handled::Poison("no good".into())),
                _ => {
                    done.cancel();
                    Ok(Handled::Done)
                }
            }
        }
    }));
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the intake must get past every failing record")
        .expect("intake task");

    let attempts = attempts.lock().expect("lock").clone();
    assert_eq!(attempts.get("bad-input"), Some(&1), "{attempts:?}");
    assert_eq!(attempts.get("internal"), Some(&3), "{attempts:?}");
    assert!(
        attempts
            .get("unavailable")
            .is_some_and(|n| (3..=6).contains(n)),
        "a dependency that is down is waited for, up to max_wait: {attempts:?}"
    );
    assert_eq!(attempts.get("fine"), Some(&1), "{attempts:?}");

    let mut letters: Vec<DeadLetter> = Vec::new();
    for r in read_all(&infra().kafka_bootstrap, DEADLETTER_TOPIC).await {
        if let Ok(dl) = client.decode::<DeadLetter>(&r.value).await
            && dl.source_topic.as_deref() == Some(topic)
        {
            letters.push(dl);
        }
    }
    letters.sort_by_key(|d| d.source_offset);
    let offsets: Vec<Option<i64>> = letters.iter().map(|d| d.source_offset).collect();
    assert_eq!(offsets, [Some(0), Some(1), Some(2), Some(3)]);
    for (dl, needle) in letters.iter().zip([
        "bad-input failed",
        "internal failed",
        "unavailable failed",
        "no good",
    ]) {
        assert_eq!(dl.source_partition, Some(0));
        assert_eq!(dl.service, "test");
        assert!(dl.detail.contains(needle), "{}", dl.detail);
        assert!(!dl.original.is_empty());
    }
    assert!(
        letters[1].detail.contains("3 attempts"),
        "{}",
        letters[1].detail
    );
}

/// Records published in one batch, an intake stopped after the first of them, and started
/// again: it must take in the rest. The embedded broker answers a fetch from inside a batch
/// with the batches after it (here: none), so without reading again from further back the
/// rest of the batch is skipped silently.
#[tokio::test]
async fn an_intake_restarted_inside_a_record_batch_takes_in_the_rest_of_it() {
    let registry = TestRegistry::start().await;
    let client = Arc::new(registry.client());
    let catalogue = Catalogue::embedded().expect("catalogue");
    let topic: &'static str = Box::leak(format!("test.intake.{}", Uuid::now_v7()).into_boxed_str());
    create_missing(&kafka(), &[(topic, 1, false), (DEADLETTER_TOPIC, 1, false)])
        .await
        .expect("topics");
    let schema = client
        .register_compiled(
            &format!("{topic}-value"),
            &catalogue.composed(RECORD).expect("schema"),
        )
        .await
        .expect("register");
    let deadletter = client
        .register_compiled(
            &format!("{DEADLETTER_TOPIC}-value"),
            &catalogue
                .composed("io.feedloop.deadletter.DeadLetter")
                .expect("schema"),
        )
        .await
        .expect("register");
    let batching = BTreeMap::from([
        ("linger.ms".to_owned(), "500".to_owned()),
        ("compression.type".to_owned(), "lz4".to_owned()),
    ]);
    let producer = Arc::new(
        HealingProducer::new(&kafka(), "test-intake", &batching, "test_resets_total")
            .expect("producer"),
    );
    let mut sends = Vec::new();
    for i in 0..6 {
        let mut value = Vec::new();
        schema
            .encode(&request(&format!("u{i}")), &mut value)
            .expect("encode");
        sends.push(
            producer
                .get()
                .send_result(FutureRecord::<(), _>::to(topic).payload(&value))
                .expect("enqueue"),
        );
    }
    for s in sends {
        s.await.expect("delivered").expect("acked");
    }
    let group = format!("test-intake-{}", Uuid::now_v7());
    let taken: Arc<Mutex<Vec<String>>> = Arc::default();
    let run = |stop_after: Option<usize>| {
        let taken = taken.clone();
        let shutdown = CancellationToken::new();
        let done = shutdown.clone();
        let intake = Intake::new(
            &kafka(),
            &group,
            topic,
            "test",
            client.clone(),
            producer.clone(),
            deadletter.clone(),
        )
        .expect("intake");
        let task = tokio::spawn(intake.run(shutdown.clone(), move |r: ErasureRequest| {
            let taken = taken.clone();
            let done = done.clone();
            async move {
                let mut t = taken.lock().expect("lock");
                t.push(r.user_ids[0].clone());
                if stop_after.is_some_and(|n| t.len() >= n) || t.len() >= 6 {
                    done.cancel();
                }
                Ok(Handled::Done)
            }
        }));
        (shutdown, task)
    };
    // The first run takes two records in and commits them.
    let (_, task) = run(Some(2));
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("first run")
        .expect("task");
    let committed = {
        use rdkafka::{
            Offset, TopicPartitionList,
            consumer::{BaseConsumer, Consumer},
        };
        let c: BaseConsumer = kafka().group_config(&group).create().expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = c
                .committed_offsets(tpl.clone(), Duration::from_secs(10))
                .expect("committed");
            let at = got.find_partition(topic, 0).map(|p| p.offset());
            if let Some(Offset::Offset(o)) = at
                && o >= 1
            {
                break o;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nothing committed: {at:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The handler cancels after its second record; the intake may have taken a third in by the
    // time it sees that. Any committed offset from 1 to 5 is inside the six-record batch.
    assert!((1..=5).contains(&committed), "{committed}");
    // The second run starts inside the batch, and must take the rest of it in.
    let (shutdown, task) = run(None);
    let finished = tokio::time::timeout(Duration::from_secs(60), task).await;
    shutdown.cancel();
    let taken = taken.lock().expect("lock").clone();
    assert!(
        finished.is_ok(),
        "the rest of the batch never came: {taken:?}"
    );
    let mut unique = taken.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique,
        (0..6).map(|i| format!("u{i}")).collect::<Vec<_>>(),
        "{taken:?}"
    );
}
