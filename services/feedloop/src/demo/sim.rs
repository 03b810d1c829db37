//! The demo's simulated world: a population of users of a 1:1 video-chat app, what their
//! phones report, and what the product database records. Everything comes from one seed, so
//! the same seed gives the same events, rows and expected examples; only absolute times move
//! with the moment the demo starts (`t0`).
//!
//! Behaviour: each match shows two users to each other (an impression each). Skips outnumber
//! accepts; when both accept they chat, for a long-tailed duration; a few chats end in a report
//! or a block (sent by the app and recorded by the backend in `app.reports` / `app.blocks`).
//! Phones batch their events; some are offline for a while and send late (for minutes to
//! hours, a few for more than a day), some have clocks that are minutes off (and say so with
//! `sent_at`), some retry a batch whose answer they lost (duplicates), and a few send malformed
//! events. The simulation knows the label the example spec gives every impression (computed
//! here from what happened, independently of the labeler): the demo checks the latest version
//! of every example in the dataset against it.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use uuid::Uuid;

/// Impressions happen in the simulated period up to this long before `t0`: every example's
/// longest window (24 h) plus its allowed lateness has closed by the end of the run.
pub const QUIET_TAIL_MS: i64 = 25 * HOUR;
/// Length of the simulated period.
pub const PERIOD_MS: i64 = 4 * 24 * HOUR;
const HOUR: i64 = 3_600_000;
const MINUTE: i64 = 60_000;
/// Events a phone buffers before it sends a batch.
const BATCH_MAX: usize = 20;

/// What to simulate.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    pub users: usize,
    /// Approximate number of events the phones send.
    pub events: usize,
    pub seed: u64,
    /// The demo's start (epoch ms): the simulated period ends here.
    pub t0: i64,
}

/// One user of the product.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: String,
    pub email: String,
    pub phone: String,
    pub display_name: String,
    pub country: &'static str,
    pub bio: String,
    pub device_id: Uuid,
    /// Milliseconds this phone's clock is off (0 for most).
    pub clock_skew_ms: i64,
    /// Offline phones send their events this much later than they happen: minutes to hours,
    /// or (a few) 26 to 40 hours, within the correction horizon of the example spec.
    pub offline_delay_ms: i64,
}

/// Which of the collector's APIs a batch goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/events`: the app's own interaction events.
    Native,
    /// `POST /v1/batch`: the analytics SDK's calls (screen views), in Segment's format.
    Segment,
}

/// One POST to the collector.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub api: Api,
    pub user: usize,
    /// When the phone sends it (simulated epoch ms); batches go out in this order.
    pub send_at: i64,
    pub events: Vec<Value>,
    /// How far the phone's clock is off; its `sent_at` is off by as much.
    pub skew_ms: i64,
    /// The phone lost the answer and sends the same batch again (its events are duplicates).
    pub resend: bool,
}

/// A write the backend makes to the product database.
#[derive(Debug, Clone, PartialEq)]
pub enum ProductWrite {
    Match {
        id: Uuid,
        a: String,
        b: String,
        score: f64,
        at: i64,
    },
    MatchStatus {
        id: Uuid,
        status: &'static str,
    },
    Report {
        reporter: String,
        reported: String,
        match_id: Uuid,
        reason: &'static str,
        comment: String,
        at: i64,
    },
    Block {
        blocker: String,
        blocked: String,
        match_id: Uuid,
        at: i64,
    },
    Bio {
        user: String,
        bio: String,
    },
    /// The user deleted their account (a hard delete: cdc publishes a delete and a tombstone).
    DeleteUser {
        user: String,
    },
}

/// One step of the run, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Send(Batch),
    Write(ProductWrite),
}

/// An impression the labeler should turn into an example.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpectedImpression {
    pub event_id: Uuid,
    pub viewer: String,
    pub candidate: String,
    /// The label the example spec gives it, from every outcome of the run.
    pub label: &'static str,
}

/// The simulated world and what should come out of it.
#[derive(Debug, Clone)]
pub struct World {
    pub users: Vec<User>,
    pub steps: Vec<Step>,
    /// Well-formed impressions (one example each), by event id.
    pub impressions: BTreeMap<Uuid, ExpectedImpression>,
    /// Ids of the events that are malformed on purpose (the collector must reject them).
    pub malformed: BTreeSet<String>,
    /// Users who ask to be erased (through the eraser's API, after the events are in).
    pub erase: Vec<String>,
    /// Users who delete their account in the product database: cdc turns the delete into an
    /// erasure request, so they are erased too.
    pub deleted: Vec<String>,
    /// Events the erased users' phones send after their erasure (the collector suppresses them).
    pub after_erasure: Vec<Batch>,
}

impl World {
    /// The events the phones send, duplicates and malformed ones included.
    pub fn events_sent(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Send(b) => b.events.len(),
                Step::Write(_) => 0,
            })
            .sum()
    }

    /// Malformed events the phones send (a retried batch sends its malformed events again).
    pub fn malformed_sent(&self) -> usize {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Send(b) => Some(b.events.iter()),
                Step::Write(_) => None,
            })
            .flatten()
            .filter(|e| {
                let id = e.get("event_id").or_else(|| e.get("messageId"));
                id.and_then(Value::as_str)
                    .is_some_and(|id| self.malformed.contains(id))
            })
            .count()
    }

    /// Product-database row changes (inserted, updated or deleted rows), users included.
    pub fn row_changes(&self) -> usize {
        self.users.len()
            + self
                .steps
                .iter()
                .filter(|s| matches!(s, Step::Write(_)))
                .count()
    }

    /// Impressions whose example must be in the dataset once `erased` are gone.
    pub fn expected_examples(&self, erased: &BTreeSet<String>) -> BTreeSet<Uuid> {
        self.expected_labels(erased).into_keys().collect()
    }

    /// The label of each impression whose example must be in the dataset once `erased` are
    /// gone (the latest version of the example must say it).
    pub fn expected_labels(&self, erased: &BTreeSet<String>) -> BTreeMap<Uuid, &'static str> {
        self.impressions
            .values()
            .filter(|i| !erased.contains(&i.viewer) && !erased.contains(&i.candidate))
            .map(|i| (i.event_id, i.label))
            .collect()
    }
}

const COUNTRIES: [&str; 6] = ["DE", "US", "BR", "IN", "FR", "JP"];
const PLATFORMS: [(&str, &str); 2] = [("ios", "18.1"), ("android", "15")];
const REASONS: [&str; 4] = ["spam", "harassment", "nudity", "other"];
const SCREENS: [&str; 4] = ["home", "settings", "profile", "queue"];

fn uuid(rng: &mut StdRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid()
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Builds the world: users, their matches and everything the phones and the backend record.
pub fn generate(opts: SimOptions) -> World {
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let users: Vec<User> = (0..opts.users.max(4))
        .map(|i| {
            let skewed = rng.random_bool(0.05);
            let offline = rng.random_bool(0.04);
            let for_days = rng.random_bool(0.4);
            User {
                id: format!("u-{i:06}"),
                email: format!("user{i}.{:04x}@example.org", rng.random::<u16>()),
                phone: format!("+1555{:07}", rng.random_range(0..10_000_000)),
                display_name: format!("User {i}"),
                country: COUNTRIES[rng.random_range(0..COUNTRIES.len())],
                bio: format!("hello from user {i}"),
                device_id: uuid(&mut rng),
                clock_skew_ms: if skewed {
                    rng.random_range(-3 * HOUR..2 * HOUR)
                } else {
                    0
                },
                offline_delay_ms: match (offline, for_days) {
                    (false, _) => 0,
                    (true, false) => rng.random_range(10 * MINUTE..2 * HOUR),
                    (true, true) => rng.random_range(26 * HOUR..40 * HOUR),
                },
            }
        })
        .collect();
    let n = users.len();
    let start = opts.t0 - PERIOD_MS;
    let last_impression = opts.t0 - QUIET_TAIL_MS - 3 * HOUR;
    // About 5.35 events per match (2 impressions, 2 decisions, screen views, some chats).
    let matches = ((opts.events as f64 / 5.35) as usize).max(1);
    let mut timeline: Vec<(i64, usize, Value)> = Vec::with_capacity(opts.events + 1024);
    let mut writes: Vec<(i64, ProductWrite)> = Vec::new();
    let mut impressions = BTreeMap::new();
    let mut malformed = BTreeSet::new();
    let event = |rng: &mut StdRng, t: i64, user: usize, kind: &str, props: Value| -> Value {
        let (platform, os) = PLATFORMS[user % 2];
        json!({
            "event_id": uuid(rng),
            "event_type": kind,
            "user_id": users[user].id,
            "device_id": users[user].device_id,
            "session_id": format!("s-{user}-{}", t / HOUR),
            "timestamp": t,
            "platform": platform,
            "app_version": "5.3.0",
            "os_version": os,
            "properties": props,
        })
    };
    for k in 0..matches {
        let t = start + (k as i64) * (last_impression - start) / matches as i64;
        let a = rng.random_range(0..n);
        let mut b = rng.random_range(0..n - 1);
        if b >= a {
            b += 1;
        }
        let match_id = uuid(&mut rng);
        let score: f64 = rng.random_range(0.05..0.99);
        writes.push((
            t - 1,
            ProductWrite::Match {
                id: match_id,
                a: users[a].id.clone(),
                b: users[b].id.clone(),
                score: (score * 1000.0).round() / 1000.0,
                at: t - 1,
            },
        ));
        let request_id = format!("r-{k}");
        let mut accepted = [false; 2];
        for (side, (viewer, candidate)) in [(a, b), (b, a)].into_iter().enumerate() {
            let shown = t + rng.random_range(0..2_000);
            let arm = if rng.random_bool(0.5) {
                "control"
            } else {
                "treatment"
            };
            let imp = event(
                &mut rng,
                shown,
                viewer,
                "match_impression",
                json!({"match_id": match_id, "candidate_id": users[candidate].id,
                    "request_id": request_id, "model_version": "ranker-2026-11-20",
                    "experiment_id": "exp-42", "experiment_arm": arm, "rank": side + 1,
                    "score": score, "features": {"age_gap": (viewer as i64 - candidate as i64).abs() % 15,
                    "same_country": users[viewer].country == users[candidate].country,
                    "affinity": (score * 0.8 * 1000.0).round() / 1000.0}}),
            );
            if let Some(id) = imp["event_id"].as_str().and_then(|s| s.parse().ok()) {
                impressions.insert(
                    id,
                    ExpectedImpression {
                        event_id: id,
                        viewer: users[viewer].id.clone(),
                        candidate: users[candidate].id.clone(),
                        label: "unknown",
                    },
                );
            }
            timeline.push((shown, viewer, imp));
            // Skips outnumber accepts; a few viewers never decide.
            let p: f64 = rng.random();
            if p < 0.93 {
                let accept = p < 0.33;
                accepted[side] = accept;
                let latency = (1_500.0 * (0.6 * normal(&mut rng)).exp()) as i64;
                let decision = event(
                    &mut rng,
                    shown + latency,
                    viewer,
                    "match_decision",
                    json!({"match_id": match_id, "decision": if accept {"accept"} else {"skip"},
                        "decision_latency_ms": latency}),
                );
                timeline.push((shown + latency, viewer, decision));
            }
            if rng.random_bool(0.6) {
                let at = shown + rng.random_range(0..30 * MINUTE);
                let screen = SCREENS[rng.random_range(0..SCREENS.len())];
                let e = event(
                    &mut rng,
                    at,
                    viewer,
                    "screen_viewed",
                    json!({"name": screen, "category": "app"}),
                );
                timeline.push((at, viewer, e));
            }
        }
        writes.push((
            t + 10_000,
            ProductWrite::MatchStatus {
                id: match_id,
                status: if accepted == [true, true] {
                    "connected"
                } else {
                    "declined"
                },
            },
        ));
        if accepted == [true, true] {
            // Chat length: log-normal, median about a minute, a long tail of hours.
            let mut secs = (60.0 * (1.3 * normal(&mut rng)).exp()).clamp(2.0, 6.0 * 3600.0);
            // Not within seconds of the 2-hour chat window's end, where request latency (a few
            // ms added to every corrected event time) would decide.
            if (7_170.0..7_190.0).contains(&secs) {
                secs = 7_160.0;
            }
            let end = t + 20_000 + (secs * 1000.0) as i64;
            for (who, ended_by) in [(a, "self"), (b, "peer")] {
                if who == a || rng.random_bool(0.5) {
                    let at = end + rng.random_range(0..1_000);
                    let e = event(
                        &mut rng,
                        at,
                        who,
                        "chat_ended",
                        json!({"match_id": match_id, "duration_ms": (secs * 1000.0) as i64,
                            "ended_by": ended_by}),
                    );
                    timeline.push((end, who, e));
                }
            }
            let (reporter, reported) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
            if rng.random_bool(0.04) {
                let at = end + rng.random_range(MINUTE..6 * HOUR);
                let reason = REASONS[rng.random_range(0..REASONS.len())];
                let comment = format!("reported after a chat with {}", users[reported].id);
                let e = event(
                    &mut rng,
                    at,
                    reporter,
                    "report_submitted",
                    json!({"match_id": match_id, "reported_user_id": users[reported].id,
                        "reason": reason, "comment": comment}),
                );
                timeline.push((at, reporter, e));
                writes.push((
                    at + 500,
                    ProductWrite::Report {
                        reporter: users[reporter].id.clone(),
                        reported: users[reported].id.clone(),
                        match_id,
                        reason,
                        comment,
                        at,
                    },
                ));
            } else if rng.random_bool(0.03) {
                let at = end + rng.random_range(MINUTE..12 * HOUR);
                let e = event(
                    &mut rng,
                    at,
                    reporter,
                    "user_blocked",
                    json!({"match_id": match_id, "blocked_user_id": users[reported].id}),
                );
                timeline.push((at, reporter, e));
                writes.push((
                    at + 500,
                    ProductWrite::Block {
                        blocker: users[reporter].id.clone(),
                        blocked: users[reported].id.clone(),
                        match_id,
                        at,
                    },
                ));
            }
        }
        // Now and then someone edits their bio.
        if rng.random_bool(0.01) {
            let u = rng.random_range(0..n);
            writes.push((
                t + HOUR,
                ProductWrite::Bio {
                    user: users[u].id.clone(),
                    bio: format!("updated bio {k}"),
                },
            ));
        }
    }
    // Activity up to the end of the period moves every watermark past the last window.
    for h in 0..(QUIET_TAIL_MS / HOUR + 3) {
        let user = rng.random_range(0..n);
        let at = opts.t0 - (QUIET_TAIL_MS + 3 * HOUR) + h * HOUR;
        let e = event(
            &mut rng,
            at,
            user,
            "screen_viewed",
            json!({"name": "home", "category": "app"}),
        );
        timeline.push((at, user, e));
    }
    for user in 0..n {
        let at = opts.t0 - rng.random_range(MINUTE..10 * MINUTE);
        let e = event(
            &mut rng,
            at,
            user,
            "screen_viewed",
            json!({"name": "home", "category": "app"}),
        );
        timeline.push((at, user, e));
    }
    // A few accounts are deleted in the product database (not erased: their events stay).
    let deleted: Vec<usize> = (0..(n / 400).max(1)).map(|i| (i * 397 + 11) % n).collect();
    for &u in &deleted {
        writes.push((
            opts.t0 - QUIET_TAIL_MS,
            ProductWrite::DeleteUser {
                user: users[u].id.clone(),
            },
        ));
    }
    timeline.sort_by_key(|(t, _, _)| *t);

    // Malformed events: a value of the wrong type, a missing field, an unknown event type.
    for (i, (_, _, e)) in timeline.iter_mut().enumerate() {
        if i % 331 != 7 || !(e["event_type"] == "match_decision" || e["event_type"] == "chat_ended")
        {
            continue;
        }
        match i % 3 {
            0 => e["properties"]["match_id"] = json!("not-a-uuid"),
            1 => e["event_type"] = json!("teleported"),
            _ => {
                if let Some(o) = e.as_object_mut() {
                    o.remove("user_id");
                }
            }
        }
        if let Some(id) = e["event_id"].as_str() {
            malformed.insert(id.to_owned());
        }
    }

    label_impressions(&mut impressions, &timeline, &writes, &malformed);

    // Phones: buffer events per user, send when the buffer is full or a session goes quiet.
    let mut buffers: Vec<Vec<(i64, Value)>> = vec![Vec::new(); n];
    let mut batches: Vec<Batch> = Vec::new();
    let flush = |batches: &mut Vec<Batch>, user: usize, buf: &mut Vec<(i64, Value)>| {
        let Some(&(last, _)) = buf.last() else {
            return;
        };
        let u = &users[user];
        let (mut native, mut segment) = (Vec::new(), Vec::new());
        for (t, mut e) in buf.drain(..) {
            e["timestamp"] = json!(t + u.clock_skew_ms);
            if e["event_type"] == "screen_viewed" {
                segment.push(segment_screen(&e));
            } else {
                native.push(e);
            }
        }
        for (api, events) in [(Api::Native, native), (Api::Segment, segment)] {
            if !events.is_empty() {
                batches.push(Batch {
                    api,
                    user,
                    send_at: last + 1_000 + u.offline_delay_ms,
                    events,
                    skew_ms: u.clock_skew_ms,
                    resend: false,
                });
            }
        }
    };
    for (t, user, e) in timeline {
        let buf = &mut buffers[user];
        if buf.last().is_some_and(|(last, _)| t - last > 5 * MINUTE) {
            flush(&mut batches, user, buf);
        }
        buf.push((t, e));
        if buf.len() >= BATCH_MAX {
            flush(&mut batches, user, buf);
        }
    }
    for (user, buf) in buffers.iter_mut().enumerate() {
        flush(&mut batches, user, buf);
    }
    // One batch in a hundred is sent twice: the phone lost the first answer.
    let resends: Vec<Batch> = batches
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 100 == 42)
        .map(|(_, b)| Batch {
            send_at: b.send_at + 30_000,
            resend: true,
            ..b.clone()
        })
        .collect();
    batches.extend(resends);

    let mut steps: Vec<(i64, Step)> = batches
        .into_iter()
        .map(|b| (b.send_at, Step::Send(b)))
        .collect();
    steps.extend(writes.into_iter().map(|(t, w)| (t, Step::Write(w))));
    steps.sort_by_key(|(t, _)| *t);

    let erase: Vec<String> = (0..(n / 300).max(2))
        .map(|i| users[(i * 211 + 5) % n].id.clone())
        .filter(|id| !deleted.iter().any(|&d| users[d].id == *id))
        .collect();
    let after_erasure = erase
        .iter()
        .filter_map(|id| users.iter().position(|u| &u.id == id))
        .map(|user| Batch {
            api: Api::Segment,
            user,
            send_at: opts.t0,
            events: (0..3)
                .map(|i| {
                    segment_screen(&json!({
                        "event_id": uuid(&mut rng),
                        "user_id": users[user].id,
                        "device_id": users[user].device_id,
                        "timestamp": opts.t0 + i,
                        "platform": "ios",
                        "os_version": "18.1",
                        "properties": {"name": "home", "category": "app"},
                    }))
                })
                .collect(),
            skew_ms: 0,
            resend: false,
        })
        .collect();

    let deleted_ids = deleted.iter().map(|&u| users[u].id.clone()).collect();
    World {
        users,
        steps: steps.into_iter().map(|(_, s)| s).collect(),
        impressions,
        malformed,
        erase,
        deleted: deleted_ids,
        after_erasure,
    }
}

/// Gives every impression the label of the example spec (`services/labeler/specs/
/// match_outcomes.toml`), from the well-formed events and the product rows: the viewer's first
/// decision within 10 minutes, the longest chat of the match within 2 hours, and a report or a
/// block between the two users, either way, within 24 hours.
fn label_impressions(
    impressions: &mut BTreeMap<Uuid, ExpectedImpression>,
    timeline: &[(i64, usize, Value)],
    writes: &[(i64, ProductWrite)],
    malformed: &BTreeSet<String>,
) {
    let mut shown: BTreeMap<Uuid, (i64, String)> = BTreeMap::new();
    let mut decisions: BTreeMap<(String, String), Vec<(i64, bool)>> = BTreeMap::new();
    let mut chats: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    let mut reports: Vec<(String, String, i64)> = Vec::new();
    let mut blocks: Vec<(String, String, i64)> = Vec::new();
    for (t, _, e) in timeline {
        let id = e["event_id"].as_str().unwrap_or_default();
        if malformed.contains(id) {
            continue;
        }
        let user = e["user_id"].as_str().unwrap_or_default().to_owned();
        let props = &e["properties"];
        let match_id = props["match_id"].as_str().unwrap_or_default().to_owned();
        match e["event_type"].as_str() {
            Some("match_impression") => {
                if let Ok(id) = id.parse() {
                    shown.insert(id, (*t, match_id));
                }
            }
            Some("match_decision") => decisions
                .entry((match_id, user))
                .or_default()
                .push((*t, props["decision"] == "accept")),
            Some("chat_ended") => chats.entry(match_id).or_default().push((
                *t,
                props["duration_ms"].as_i64().unwrap_or(0) as f64 / 1000.0,
            )),
            Some("report_submitted") => reports.push((
                user,
                props["reported_user_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                *t,
            )),
            Some("user_blocked") => blocks.push((
                user,
                props["blocked_user_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                *t,
            )),
            _ => {}
        }
    }
    for (_, w) in writes {
        match w {
            ProductWrite::Report {
                reporter,
                reported,
                at,
                ..
            } => reports.push((reporter.clone(), reported.clone(), *at)),
            ProductWrite::Block {
                blocker,
                blocked,
                at,
                ..
            } => blocks.push((blocker.clone(), blocked.clone(), *at)),
            _ => {}
        }
    }
    let within = |t: i64, from: i64, window: i64| t >= from && t < from + window;
    for (id, imp) in impressions.iter_mut() {
        let Some((t, match_id)) = shown.get(id) else {
            continue;
        };
        let (t, viewer, candidate) = (*t, &imp.viewer, &imp.candidate);
        let mut mine: Vec<(i64, bool)> = decisions
            .get(&(match_id.clone(), viewer.clone()))
            .into_iter()
            .flatten()
            .filter(|(at, _)| within(*at, t, 10 * MINUTE))
            .copied()
            .collect();
        mine.sort_by_key(|(at, _)| *at);
        let accepted = mine.first().map(|(_, a)| *a);
        let chat = chats
            .get(match_id)
            .into_iter()
            .flatten()
            .filter(|(at, _)| within(*at, t, 2 * HOUR))
            .map(|(_, secs)| *secs)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let between = |list: &[(String, String, i64)]| {
            list.iter().any(|(x, y, at)| {
                ((x == viewer && y == candidate) || (x == candidate && y == viewer))
                    && within(*at, t, 24 * HOUR)
            })
        };
        imp.label = if between(&reports) || between(&blocks) || accepted == Some(false) {
            "negative"
        } else if accepted == Some(true) && chat.is_some_and(|c| c >= 30.0) {
            "positive"
        } else if accepted == Some(true) && chat.is_some() {
            "negative"
        } else {
            "unknown"
        };
    }
}

/// A screen view as the analytics SDK sends it (a Segment `screen` call).
fn segment_screen(e: &Value) -> Value {
    let os = if e["platform"] == "ios" {
        "iOS"
    } else {
        "Android"
    };
    json!({
        "type": "screen",
        "messageId": e["event_id"],
        "userId": e["user_id"],
        "timestamp": e["timestamp"],
        "name": e["properties"]["name"],
        "properties": {"category": e["properties"]["category"]},
        "context": {
            "device": {"id": e["device_id"]},
            "os": {"name": os, "version": e["os_version"]},
            "app": {"version": "5.3.0"},
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seed: u64) -> SimOptions {
        SimOptions {
            users: 200,
            events: 6_000,
            seed,
            t0: 1_795_000_000_000,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_world() {
        let (a, b) = (generate(opts(7)), generate(opts(7)));
        assert_eq!(a.steps, b.steps);
        assert_eq!(a.impressions, b.impressions);
        assert_eq!(a.users, b.users);
        assert_ne!(generate(opts(8)).steps, a.steps);
    }

    #[test]
    fn behaviour_is_realistic() {
        let w = generate(opts(1));
        let sent = w.events_sent();
        assert!((5_000..8_000).contains(&sent), "{sent} events");
        let count = |kind: &str, field: &str, value: &str| {
            w.steps
                .iter()
                .filter_map(|s| match s {
                    Step::Send(b) if !b.resend => Some(b.events.iter()),
                    _ => None,
                })
                .flatten()
                .filter(|e| e["event_type"] == kind && e["properties"][field] == value)
                .count()
        };
        let (accepts, skips) = (
            count("match_decision", "decision", "accept"),
            count("match_decision", "decision", "skip"),
        );
        assert!(skips > accepts, "skips {skips} accepts {accepts}");
        assert!(accepts > 0);
        assert!(!w.malformed.is_empty() && w.malformed_sent() < sent / 100);
        assert!(w.malformed_sent() >= w.malformed.len());
        assert!(
            w.steps
                .iter()
                .any(|s| matches!(s, Step::Send(b) if b.resend))
        );
        assert!(w.users.iter().any(|u| u.clock_skew_ms != 0));
        assert!(
            w.users.iter().any(|u| u.offline_delay_ms > 24 * HOUR),
            "some phones are offline for more than a day"
        );
        let mut labels = BTreeMap::new();
        for i in w.impressions.values() {
            *labels.entry(i.label).or_insert(0) += 1;
        }
        for l in ["positive", "negative", "unknown"] {
            assert!(labels.get(l).copied().unwrap_or(0) > 20, "{labels:?}");
        }
        assert!(
            w.steps
                .iter()
                .any(|s| matches!(s, Step::Write(ProductWrite::Report { .. })))
        );
        assert!(
            w.steps
                .iter()
                .any(|s| matches!(s, Step::Write(ProductWrite::DeleteUser { .. })))
        );
        assert!(w.erase.len() >= 2);
        // Batches go out in order of their send time, and no impression is in a batch sent
        // after the quiet tail began (its windows close before the run ends).
        let times: Vec<i64> = w
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Send(b) => Some(b.send_at),
                Step::Write(_) => None,
            })
            .collect();
        assert!(times.windows(2).all(|p| p[0] <= p[1]));
    }

    #[test]
    fn expected_examples_leave_out_erased_users() {
        let w = generate(opts(3));
        let all = w.expected_examples(&BTreeSet::new());
        assert_eq!(all.len(), w.impressions.len());
        let erased: BTreeSet<String> = w.erase.iter().cloned().collect();
        let kept = w.expected_examples(&erased);
        assert!(kept.len() < all.len());
        assert!(
            w.impressions
                .values()
                .filter(|i| kept.contains(&i.event_id))
                .all(|i| !erased.contains(&i.viewer) && !erased.contains(&i.candidate))
        );
    }
}
