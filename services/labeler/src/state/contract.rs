//! The contract every `StateStore` adapter passes: run [`run_all`] against a fresh store.
//! The memory adapter runs it in unit tests; Postgres in the integration tests; ScyllaDB when
//! `SCYLLA_NODES` is set.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::{CloseCursor, StateStore, StoredImpression};
use crate::window::{Impression, Outcome, Scalar, SourceRef, match_key, pair_key};

/// A contract violation, with what was expected.
#[derive(Debug, thiserror::Error)]
#[error("StateStore contract `{case}`: {message}")]
pub struct ContractFailure {
    pub case: &'static str,
    pub message: String,
}

fn check(
    case: &'static str,
    ok: bool,
    message: impl FnOnce() -> String,
) -> Result<(), ContractFailure> {
    if ok {
        Ok(())
    } else {
        Err(ContractFailure {
            case,
            message: message(),
        })
    }
}

fn fail(case: &'static str) -> impl FnOnce(super::StateError) -> ContractFailure {
    move |e| ContractFailure {
        case,
        message: e.to_string(),
    }
}

pub(crate) fn impression(
    n: u128,
    viewer: &str,
    candidate: &str,
    close_ms: i64,
) -> StoredImpression {
    StoredImpression {
        example_id: Uuid::from_u128(n),
        close_ms,
        impression: Impression {
            event_id: Uuid::from_u128(1000 + n),
            match_id: Uuid::from_u128(2000 + n),
            viewer_id: viewer.into(),
            candidate_id: candidate.into(),
            time_ms: close_ms - 1000,
            request_id: format!("req-{n}"),
            model_version: "m1".into(),
            experiment_id: Some("exp".into()),
            experiment_arm: None,
            rank: 3,
            score: 0.25,
            features: BTreeMap::from([(
                "age".to_owned(),
                Some(feedloop_core::model::FeatureValue::Long(31)),
            )]),
            source: SourceRef {
                topic: "feedloop.events".into(),
                partition: 2,
                offset: n as i64,
            },
        },
        emitted: None,
    }
}

pub(crate) fn outcome(key: String, name: &str, id: &str, time_ms: i64, users: &[&str]) -> Outcome {
    Outcome {
        name: name.into(),
        id: id.into(),
        join_key: key,
        time_ms,
        value: Scalar::Double(12.5),
        users: users.iter().map(|u| (*u).to_owned()).collect(),
        origin: format!("t/0/{time_ms}"),
    }
}

fn sorted(mut v: Vec<Outcome>) -> Vec<Outcome> {
    v.sort_by(|a, b| (&a.join_key, &a.name, &a.id).cmp(&(&b.join_key, &b.name, &b.id)));
    v
}

/// Runs every case against `store`, which must be empty for the datasets `ds-a` and `ds-b`.
pub async fn run_all(store: &dyn StateStore) -> Result<(), ContractFailure> {
    roundtrip_and_idempotence(store).await?;
    due_order_and_paging(store).await?;
    lookups_by_key(store).await?;
    expiry(store).await?;
    purge(store).await?;
    emissions(store).await?;
    Ok(())
}

/// What was emitted for an example is read back with its impression, survives the impression
/// being put again (a replay), and is not written for an impression the state does not hold.
async fn emissions(store: &dyn StateStore) -> Result<(), ContractFailure> {
    const CASE: &str = "emissions";
    let i = impression(600, "kate", "leo", 7_000);
    store
        .put_impressions("ds-a", vec![i.clone()])
        .await
        .map_err(fail(CASE))?;
    let emission = |version, digest, label| super::Emission {
        version,
        digest,
        label,
    };
    let first = emission(1, 11, crate::spec::Label::Unknown);
    let second = emission(2, 22, crate::spec::Label::Positive);
    let absent = impression(601, "kate", "leo", 7_000);
    let put = |e: super::Emission, id: Uuid| super::Emitted {
        example_id: id,
        close_ms: 7_000,
        emission: e,
    };
    store
        .put_emitted(
            "ds-a",
            &[put(first, i.example_id), put(first, absent.example_id)],
        )
        .await
        .map_err(fail(CASE))?;
    store
        .put_emitted("ds-a", &[put(second, i.example_id)])
        .await
        .map_err(fail(CASE))?;
    store
        .put_impressions("ds-a", vec![i.clone()])
        .await
        .map_err(fail(CASE))?;
    let keys = i.impression.keys();
    let got = store
        .impressions_by_keys("ds-a", &keys)
        .await
        .map_err(fail(CASE))?;
    let want = StoredImpression {
        emitted: Some(second),
        ..i.clone()
    };
    check(CASE, got == vec![want.clone()], || {
        format!("by key: {got:?}, want only {want:?}")
    })?;
    let due = store
        .due_impressions("ds-a", CloseCursor::after(i64::MIN), i64::MAX, 10)
        .await
        .map_err(fail(CASE))?;
    check(CASE, due == vec![want.clone()], || {
        format!("due: {due:?}, want only {want:?}")
    })?;
    store
        .expire("ds-a", i64::MAX, i64::MAX)
        .await
        .map_err(fail(CASE))?;
    let left = store
        .impressions_by_keys("ds-a", &keys)
        .await
        .map_err(fail(CASE))?;
    check(CASE, left.is_empty(), || format!("after expiry: {left:?}"))?;
    Ok(())
}

async fn roundtrip_and_idempotence(store: &dyn StateStore) -> Result<(), ContractFailure> {
    const CASE: &str = "roundtrip_and_idempotence";
    let i = impression(1, "alice", "bob", 10_000);
    store
        .put_impressions("ds-a", vec![i.clone()])
        .await
        .map_err(fail(CASE))?;
    store
        .put_impressions("ds-a", vec![i.clone()])
        .await
        .map_err(fail(CASE))?;
    let due = store
        .due_impressions("ds-a", CloseCursor::after(i64::MIN), i64::MAX, 10)
        .await
        .map_err(fail(CASE))?;
    check(CASE, due == vec![i.clone()], || {
        format!("read back {due:?}, wrote {i:?}")
    })?;
    let other = store
        .due_impressions("ds-b", CloseCursor::after(i64::MIN), i64::MAX, 10)
        .await
        .map_err(fail(CASE))?;
    check(CASE, other.is_empty(), || {
        "datasets are not isolated".into()
    })?;
    let o = outcome(
        match_key(&i.impression.match_id),
        "chat_seconds",
        "e1",
        9_500,
        &["alice"],
    );
    store
        .put_outcomes("ds-a", vec![o.clone(), o.clone()])
        .await
        .map_err(fail(CASE))?;
    store
        .put_outcomes("ds-a", vec![o.clone()])
        .await
        .map_err(fail(CASE))?;
    let got = store
        .outcomes_by_keys("ds-a", std::slice::from_ref(&o.join_key))
        .await
        .map_err(fail(CASE))?;
    check(CASE, got == vec![o.clone()], || {
        format!("duplicates kept or value changed: {got:?}")
    })?;
    // The same record id under another outcome name is another entry.
    let mut o2 = o.clone();
    o2.name = "accepted".into();
    o2.value = Scalar::Bool(true);
    store
        .put_outcomes("ds-a", vec![o2.clone()])
        .await
        .map_err(fail(CASE))?;
    let got = store
        .outcomes_by_keys("ds-a", std::slice::from_ref(&o.join_key))
        .await
        .map_err(fail(CASE))?;
    check(CASE, sorted(got.clone()) == sorted(vec![o, o2]), || {
        format!("got {got:?}")
    })?;
    store
        .expire("ds-a", i64::MAX, i64::MAX)
        .await
        .map_err(fail(CASE))?;
    Ok(())
}

async fn due_order_and_paging(store: &dyn StateStore) -> Result<(), ContractFailure> {
    const CASE: &str = "due_order_and_paging";
    let items: Vec<StoredImpression> = (0..25u128)
        .map(|n| impression(100 + n, "u", "v", 50_000 + (n as i64 % 5) * 1000))
        .collect();
    store
        .put_impressions("ds-a", items.clone())
        .await
        .map_err(fail(CASE))?;
    let mut expected: Vec<StoredImpression> = items
        .iter()
        .filter(|i| i.close_ms <= 53_000)
        .cloned()
        .collect();
    expected.sort_by_key(|i| (i.close_ms, i.example_id));
    let mut seen = Vec::new();
    let mut cursor = CloseCursor::after(i64::MIN);
    loop {
        let page = store
            .due_impressions("ds-a", cursor, 53_000, 7)
            .await
            .map_err(fail(CASE))?;
        check(CASE, page.len() <= 7, || {
            format!("limit 7, got {}", page.len())
        })?;
        let Some(last) = page.last() else { break };
        cursor = CloseCursor {
            close_ms: last.close_ms,
            example_id: last.example_id,
        };
        seen.extend(page);
    }
    check(CASE, seen == expected, || {
        format!(
            "paged {:?}, expected {:?}",
            seen.iter()
                .map(|i| (i.close_ms, i.example_id))
                .collect::<Vec<_>>(),
            expected
                .iter()
                .map(|i| (i.close_ms, i.example_id))
                .collect::<Vec<_>>()
        )
    })?;
    let after = store
        .due_impressions("ds-a", CloseCursor::after(52_000), 52_000, 100)
        .await
        .map_err(fail(CASE))?;
    check(CASE, after.is_empty(), || {
        "the cursor is not exclusive".into()
    })?;
    store
        .expire("ds-a", i64::MAX, i64::MAX)
        .await
        .map_err(fail(CASE))?;
    Ok(())
}

async fn lookups_by_key(store: &dyn StateStore) -> Result<(), ContractFailure> {
    const CASE: &str = "lookups_by_key";
    let a = impression(300, "carol", "dave", 70_000);
    let b = impression(301, "dave", "carol", 70_000);
    let c = impression(302, "erin", "frank", 70_000);
    store
        .put_impressions("ds-a", vec![a.clone(), b.clone(), c.clone()])
        .await
        .map_err(fail(CASE))?;
    let pair = pair_key("dave", "carol");
    let mut found = store
        .impressions_by_keys("ds-a", std::slice::from_ref(&pair))
        .await
        .map_err(fail(CASE))?;
    found.sort_by_key(|i| i.example_id);
    check(CASE, found == vec![a.clone(), b.clone()], || {
        format!("by pair key: {found:?}")
    })?;
    let by_match = store
        .impressions_by_keys(
            "ds-a",
            &[match_key(&c.impression.match_id), "m:none".into()],
        )
        .await
        .map_err(fail(CASE))?;
    check(CASE, by_match == vec![c.clone()], || {
        format!("by match key: {by_match:?}")
    })?;
    let o1 = outcome(pair.clone(), "reported", "r1", 60_000, &["carol", "dave"]);
    let o2 = outcome(
        match_key(&c.impression.match_id),
        "accepted",
        "d1",
        60_000,
        &["erin"],
    );
    store
        .put_outcomes("ds-a", vec![o1.clone(), o2.clone()])
        .await
        .map_err(fail(CASE))?;
    let got = store
        .outcomes_by_keys("ds-a", &[pair, "p:nobody".into()])
        .await
        .map_err(fail(CASE))?;
    check(CASE, got == vec![o1], || {
        format!("outcomes by key: {got:?}")
    })?;
    store
        .expire("ds-a", i64::MAX, i64::MAX)
        .await
        .map_err(fail(CASE))?;
    Ok(())
}

async fn expiry(store: &dyn StateStore) -> Result<(), ContractFailure> {
    const CASE: &str = "expiry";
    let early = impression(400, "g", "h", 1_000);
    let late = impression(401, "g", "h", 2_000);
    store
        .put_impressions("ds-a", vec![early.clone(), late.clone()])
        .await
        .map_err(fail(CASE))?;
    let key = match_key(&Uuid::from_u128(9));
    let old = outcome(key.clone(), "accepted", "old", 500, &["g"]);
    let new = outcome(key.clone(), "accepted", "new", 1_500, &["g"]);
    store
        .put_outcomes("ds-a", vec![old, new.clone()])
        .await
        .map_err(fail(CASE))?;
    store
        .expire("ds-a", 2_000, 1_500)
        .await
        .map_err(fail(CASE))?;
    let due = store
        .due_impressions("ds-a", CloseCursor::after(i64::MIN), i64::MAX, 10)
        .await
        .map_err(fail(CASE))?;
    check(CASE, due == vec![late], || format!("after expiry: {due:?}"))?;
    let got = store
        .outcomes_by_keys("ds-a", &[key])
        .await
        .map_err(fail(CASE))?;
    check(CASE, got == vec![new], || {
        format!("outcomes after expiry: {got:?}")
    })?;
    store
        .expire("ds-a", i64::MAX, i64::MAX)
        .await
        .map_err(fail(CASE))?;
    Ok(())
}

async fn purge(store: &dyn StateStore) -> Result<(), ContractFailure> {
    const CASE: &str = "purge";
    let keep = impression(500, "ivan", "judy", 5_000);
    let gone_viewer = impression(501, "mallory", "judy", 5_000);
    let gone_candidate = impression(502, "ivan", "mallory", 5_000);
    store
        .put_impressions("ds-a", vec![keep.clone(), gone_viewer])
        .await
        .map_err(fail(CASE))?;
    store
        .put_impressions("ds-b", vec![gone_candidate])
        .await
        .map_err(fail(CASE))?;
    let key = pair_key("ivan", "judy");
    let kept = outcome(key.clone(), "reported", "k", 4_000, &["ivan", "judy"]);
    let dropped = outcome(key.clone(), "reported", "d", 4_000, &["mallory", "judy"]);
    store
        .put_outcomes("ds-a", vec![kept.clone(), dropped])
        .await
        .map_err(fail(CASE))?;
    let n = store
        .purge_users(&["mallory".to_owned()])
        .await
        .map_err(fail(CASE))?;
    check(CASE, n == 3, || format!("purged {n} entries, expected 3"))?;
    let a = store
        .due_impressions("ds-a", CloseCursor::after(i64::MIN), i64::MAX, 10)
        .await
        .map_err(fail(CASE))?;
    check(CASE, a == vec![keep], || format!("ds-a after purge: {a:?}"))?;
    let b = store
        .due_impressions("ds-b", CloseCursor::after(i64::MIN), i64::MAX, 10)
        .await
        .map_err(fail(CASE))?;
    check(CASE, b.is_empty(), || format!("ds-b after purge: {b:?}"))?;
    let by_user = store
        .impressions_by_keys("ds-b", &[pair_key("ivan", "mallory")])
        .await
        .map_err(fail(CASE))?;
    check(CASE, by_user.is_empty(), || {
        "key index still finds a purged impression".into()
    })?;
    let o = store
        .outcomes_by_keys("ds-a", &[key])
        .await
        .map_err(fail(CASE))?;
    check(CASE, o == vec![kept], || {
        format!("outcomes after purge: {o:?}")
    })?;
    let again = store
        .purge_users(&["mallory".to_owned()])
        .await
        .map_err(fail(CASE))?;
    check(CASE, again == 0, || {
        format!("a second purge removed {again}")
    })?;
    store
        .expire("ds-a", i64::MAX, i64::MAX)
        .await
        .map_err(fail(CASE))?;
    store
        .expire("ds-b", i64::MAX, i64::MAX)
        .await
        .map_err(fail(CASE))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_store_passes_the_contract() {
        let store = super::super::memory::MemoryStore::default();
        super::run_all(&store).await.unwrap();
    }
}
