//! Rust types of the catalogue records. Each mirrors one `.avsc` in `schemas/` field by field;
//! the tests round-trip every one through its composed schema so the two cannot drift apart.

pub mod deadletter;
pub mod erasure;
pub mod events;

pub use deadletter::{DeadLetter, DeadLetterReason, ORIGINAL_MAX_BYTES, OpenedOriginal, Original};
pub use erasure::{ErasureOrigin, ErasureRequest};
pub use events::{
    ChatEnded, ChatEndedBy, Decision, Envelope, Event, EventDecodeError, EventType, FeatureValue,
    MatchDecision, MatchImpression, Platform, ReportReason, ReportSubmitted, ScreenViewed,
    UserBlocked, UserIdentified,
};

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Serialize, de::DeserializeOwned};
    use uuid::Uuid;

    use super::*;
    use crate::{avro::CompiledSchema, catalogue::Catalogue};

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
        record: &str,
        value: &T,
    ) {
        let cat = Catalogue::embedded().expect("catalogue");
        let schema =
            CompiledSchema::new(1, &cat.composed(record).expect("composes")).expect("compiles");
        let mut buf = Vec::new();
        schema
            .encode(value, &mut buf)
            .unwrap_or_else(|e| panic!("{record}: {e}"));
        let back: T = schema
            .decode_body(&buf[5..])
            .unwrap_or_else(|e| panic!("{record}: {e}"));
        assert_eq!(&back, value, "{record}");
    }

    fn envelope(event_type: EventType) -> Envelope {
        Envelope {
            event_id: Uuid::now_v7(),
            event_type: event_type.name().into(),
            user_id: "u-1".into(),
            anonymous_id: None,
            device_id: Some("dev-1".into()),
            session_id: Some("s-1".into()),
            timestamp: 1_764_000_000_000,
            client_timestamp: 1_764_000_000_100,
            sent_at: Some(1_764_000_000_200),
            received_at: 1_764_000_000_150,
            app_id: "app".into(),
            platform: Platform::Android,
            app_version: "1.2.3".into(),
            os_version: None,
            clock_skew_flagged: false,
        }
    }

    #[test]
    fn every_event_type_round_trips_through_its_schema() {
        let features = BTreeMap::from([
            ("age_gap".to_owned(), Some(FeatureValue::Long(3))),
            ("affinity".to_owned(), Some(FeatureValue::Double(0.25))),
            ("same_country".to_owned(), Some(FeatureValue::Bool(true))),
            ("lang".to_owned(), Some(FeatureValue::String("de".into()))),
            ("missing".to_owned(), None),
        ]);
        let match_id = Uuid::now_v7();
        round_trip(
            EventType::MatchImpression.record(),
            &MatchImpression {
                envelope: envelope(EventType::MatchImpression),
                match_id,
                candidate_id: "u-2".into(),
                request_id: "r-1".into(),
                model_version: "ranker-7".into(),
                experiment_id: Some("exp-1".into()),
                experiment_arm: Some("treatment".into()),
                rank: 2,
                score: 0.83,
                features,
            },
        );
        round_trip(
            EventType::MatchDecision.record(),
            &MatchDecision {
                envelope: envelope(EventType::MatchDecision),
                match_id,
                decision: Decision::Accept,
                decision_latency_ms: Some(1200),
            },
        );
        round_trip(
            EventType::ChatEnded.record(),
            &ChatEnded {
                envelope: envelope(EventType::ChatEnded),
                match_id,
                duration_ms: 95_000,
                ended_by: ChatEndedBy::Myself,
            },
        );
        round_trip(
            EventType::ReportSubmitted.record(),
            &ReportSubmitted {
                envelope: envelope(EventType::ReportSubmitted),
                match_id: Some(match_id),
                reported_user_id: "u-2".into(),
                reason: ReportReason::Harassment,
                comment: Some("rude".into()),
            },
        );
        round_trip(
            EventType::UserBlocked.record(),
            &UserBlocked {
                envelope: envelope(EventType::UserBlocked),
                match_id: None,
                blocked_user_id: "u-2".into(),
            },
        );
        round_trip(
            EventType::ScreenViewed.record(),
            &ScreenViewed {
                envelope: envelope(EventType::ScreenViewed),
                name: Some("Matches".into()),
                category: None,
                properties: BTreeMap::from([(
                    "tab".to_owned(),
                    Some(FeatureValue::String("new".into())),
                )]),
            },
        );
        round_trip(
            EventType::UserIdentified.record(),
            &UserIdentified {
                envelope: envelope(EventType::UserIdentified),
                trait_names: vec!["email".into(), "plan".into()],
            },
        );
    }

    #[test]
    fn personal_fields_are_sealed_for_the_acting_user_and_open_back() {
        use crate::crypto::{DataKey, ERASED};
        let plain = Event::ReportSubmitted(ReportSubmitted {
            envelope: envelope(EventType::ReportSubmitted),
            match_id: None,
            reported_user_id: "u-2".into(),
            reason: ReportReason::Harassment,
            comment: Some("rude".into()),
        });
        assert!(plain.has_personal());
        let key = DataKey::generate();
        let mut sealed = plain.clone();
        sealed.seal_personal(Some(&key)).unwrap();
        let Event::ReportSubmitted(r) = &sealed else {
            unreachable!()
        };
        assert!(r.comment.as_deref().is_some_and(|c| c.starts_with("fl1:")));
        assert!(
            r.envelope
                .device_id
                .as_deref()
                .is_some_and(|d| d.starts_with("fl1:"))
        );
        assert_eq!(r.reported_user_id, "u-2", "only personal fields change");
        let mut opened = sealed.clone();
        opened.open_personal(Some(&key));
        assert_eq!(opened, plain);
        let mut erased = sealed;
        erased.open_personal(None);
        assert_eq!(erased.envelope().device_id.as_deref(), Some(ERASED));
    }

    #[test]
    fn dead_letter_round_trips_with_original_bytes() {
        round_trip(
            "io.feedloop.deadletter.DeadLetter",
            &DeadLetter {
                dead_letter_id: Uuid::now_v7(),
                service: "collector".into(),
                reason: DeadLetterReason::SchemaViolation,
                detail: "rank: expected int".into(),
                path: Some("/rank".into()),
                event_type: Some("match_impression".into()),
                event_id: None,
                app_id: Some("app".into()),
                source_topic: None,
                source_partition: None,
                source_offset: None,
                original: vec![0, 159, 146, 150, 255],
                received_at: 1_764_000_000_000,
                original_size: Some(5),
                original_sha256: Some("ab".repeat(32)),
                sealed_by: Some("u-1".into()),
            },
        );
    }

    #[test]
    fn erasure_request_round_trips() {
        round_trip(
            "io.feedloop.erasure.ErasureRequest",
            &ErasureRequest {
                request_id: Uuid::now_v7(),
                user_ids: vec!["u-1".into(), "u-2".into()],
                reason: "account_deleted".into(),
                requested_by: "cdc".into(),
                origin: ErasureOrigin::CdcSoftDelete,
                idempotency_key: Some("k".into()),
                requested_at: 1_764_000_000_000,
                deadline_at: 1_766_592_000_000,
            },
        );
    }

    #[test]
    fn event_type_names_match_records() {
        for t in EventType::ALL {
            assert_eq!(EventType::from_name(t.name()), Some(t));
            let short = t.record().rsplit('.').next().unwrap_or_default();
            let snake: String = short
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let lower = c.to_ascii_lowercase();
                    if c.is_ascii_uppercase() && i > 0 {
                        vec!['_', lower]
                    } else {
                        vec![lower]
                    }
                })
                .collect();
            assert_eq!(snake, t.name());
        }
    }
}
