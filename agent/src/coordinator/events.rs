//! The coordinator's event stream (`GET /api/v1/events`): what happened to the ring (phase
//! changes, failures with their reason, restarts, placements), for `llm-agent status --watch`,
//! the dashboard and people, without reading the journal.
//!
//! Events are kept in a bounded buffer, so a client that connects (or reconnects with
//! `Last-Event-ID`) first gets what it missed, then live events. The driver must never wait on a
//! client: live events go through a tokio broadcast channel, and a client too slow for it gets a
//! `lagged` event and goes on from the oldest event still held. What the supervisor's
//! transitions mean as events is decided by the pure [`Narrator`] and [`Buffer`]; [`Events`]
//! and [`route`] are the thin shared and HTTP layers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::state::{Event, Phase, Supervisor};
use super::view::PlacementView;
use crate::proto::{ClusterEvent, EventDetail, EventsLagged};

/// Events the coordinator keeps for clients that connect later.
pub const CAPACITY: usize = 512;
/// A comment this often keeps proxies and clients from timing an idle stream out.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// An event before it is numbered and timed.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub generation: Option<u64>,
    pub rank: Option<u32>,
    pub message: String,
    pub detail: EventDetail,
}

/// The last `cap` events, numbered from 1.
#[derive(Debug)]
pub struct Buffer {
    events: VecDeque<ClusterEvent>,
    next_seq: u64,
    cap: usize,
}

impl Buffer {
    pub fn new(cap: usize) -> Buffer {
        Buffer {
            events: VecDeque::with_capacity(cap),
            next_seq: 1,
            cap: cap.max(1),
        }
    }

    /// Numbers `draft`, stamps it with `at`, keeps it (dropping the oldest when full).
    pub fn push(&mut self, draft: Draft, at: String) -> ClusterEvent {
        let e = ClusterEvent {
            seq: self.next_seq,
            at,
            generation: draft.generation,
            rank: draft.rank,
            message: draft.message,
            detail: draft.detail,
        };
        self.next_seq += 1;
        if self.events.len() == self.cap {
            self.events.pop_front();
        }
        self.events.push_back(e.clone());
        e
    }

    /// The events after `seq` (all held without it), and how many of those are no longer held.
    pub fn after(&self, seq: Option<u64>) -> (u64, Vec<ClusterEvent>) {
        let after = seq.unwrap_or(0);
        // A `seq` from a previous coordinator run (higher than any here) means nothing here:
        // replay everything rather than nothing.
        let after = if after >= self.next_seq { 0 } else { after };
        let oldest = self.events.front().map_or(self.next_seq, |e| e.seq);
        let missed = if seq.is_some() {
            oldest.saturating_sub(after + 1)
        } else {
            0
        };
        let held = self.events.iter().filter(|e| e.seq > after).cloned();
        (missed, held.collect())
    }
}

/// A short, fixed name for the class of failure an event caused (a metrics label, a field).
pub fn cause_of(event: &Event) -> &'static str {
    match event {
        Event::RankExited { .. } => "rank_exited",
        Event::StartFailed { .. } => "start_failed",
        Event::ReadyTimedOut { .. } => "not_ready",
        Event::NodeLost { .. } => "node_lost",
        Event::Stalled { .. } => "stalled",
        Event::RingStopped { .. } => "crash_loop",
        _ => "other",
    }
}

fn rank_of(event: &Event) -> Option<u32> {
    match event {
        Event::RankExited { rank, .. } | Event::NodeLost { rank, .. } => Some(*rank),
        _ => None,
    }
}

/// Tells the supervisor's transitions as events. It remembers the last failure so that the
/// start of the next generation can say why it is a restart.
#[derive(Debug, Default)]
pub struct Narrator {
    last_failure: Option<(String, &'static str)>,
    /// The reason the last phase event told: the next one repeats it only when it changed.
    last_reason: Option<String>,
    /// Where a rolling upgrade stood at the last event (the supervisor's `upgrade` text).
    last_upgrade: Option<String>,
}

impl Narrator {
    /// What handling `event` meant, given the phase before it and the supervisor after it.
    pub fn transition(&mut self, event: &Event, before: Phase, sup: &Supervisor) -> Vec<Draft> {
        let generation = (sup.generation > 0).then_some(sup.generation);
        // A rolling upgrade moves (pending, ready, complete) while the phase stays serving.
        let upgrade = self.upgrade(sup, generation);
        if sup.phase == before {
            return upgrade.into_iter().collect();
        }
        let reason = sup.reason.clone().unwrap_or_default();
        let (from, to) = (before.as_str(), sup.phase.as_str());
        let told = self.last_reason.replace(reason.clone());
        let mut out = vec![Draft {
            generation,
            rank: None,
            message: if reason.is_empty() || told.as_deref() == Some(reason.as_str()) {
                format!("{from} → {to}")
            } else {
                format!("{from} → {to}: {reason}")
            },
            detail: EventDetail::Phase {
                from: from.into(),
                to: to.into(),
            },
        }];
        out.extend(upgrade);
        if sup.phase == Phase::Stopping && sup.upgrade_restarting() {
            // Not a failure: every node has the same new build and the ring restarts on it.
            out.push(Draft {
                generation,
                rank: None,
                message: format!("restarting the ring on the new build: {reason}"),
                detail: upgrade_detail("restarting", &reason),
            });
            return out;
        }
        if sup.phase == Phase::Stopping && matches!(event, Event::Switch { .. } | Event::Unload) {
            // A model switch or an idle unload stops the ring on purpose: the driver tells it
            // as a `switch` event with its timings, not as a failure.
            return out;
        }
        let failure = match sup.phase {
            Phase::Stopping => Some(cause_of(event)),
            Phase::Refused if before == Phase::Stopping => Some("crash_loop"),
            Phase::Refused => Some("refused"),
            _ => None,
        };
        if let Some(cause) = failure {
            out.push(Draft {
                generation,
                rank: rank_of(event),
                message: if sup.phase == Phase::Stopping {
                    format!("ring failed, restarting it: {reason}")
                } else {
                    format!("ring refused: {reason}")
                },
                detail: EventDetail::Failure {
                    reason: reason.clone(),
                    cause: cause.into(),
                },
            });
            if sup.phase == Phase::Stopping {
                self.last_failure = Some((reason, cause));
            }
        }
        if sup.phase == Phase::Starting {
            if let Some((reason, cause)) = self.last_failure.take() {
                out.push(Draft {
                    generation,
                    rank: None,
                    message: format!(
                        "restarting the ring as generation {} after: {reason}",
                        sup.generation
                    ),
                    detail: EventDetail::Restart {
                        reason,
                        cause: cause.into(),
                    },
                });
            }
        }
        out
    }
}

impl Narrator {
    /// An `upgrade` event when the supervisor's upgrade text changed to a new one.
    fn upgrade(&mut self, sup: &Supervisor, generation: Option<u64>) -> Option<Draft> {
        if sup.upgrade == self.last_upgrade {
            return None;
        }
        self.last_upgrade = sup.upgrade.clone();
        let text = sup.upgrade.clone()?;
        Some(Draft {
            generation,
            rank: None,
            message: text.clone(),
            detail: upgrade_detail("status", &text),
        })
    }
}

fn upgrade_detail(state: &str, text: &str) -> EventDetail {
    let mut fields = serde_json::Map::new();
    fields.insert("state".into(), state.into());
    fields.insert("upgrade".into(), text.into());
    EventDetail::Upgrade { fields }
}

/// A placement event when the ring's placement changed to a known one.
pub fn placement(
    old: Option<&PlacementView>,
    new: Option<&PlacementView>,
    generation: u64,
) -> Option<Draft> {
    let new = new.filter(|n| Some(*n) != old)?;
    let windows = match &new.windows {
        Some(w) => format!("layer windows {w:?}"),
        None => "layer windows chosen by Halda when the ring starts".into(),
    };
    let source = new.source.as_str();
    Some(Draft {
        generation: (generation > 0).then_some(generation),
        rank: None,
        message: format!("placement from {source}: {windows}"),
        detail: EventDetail::Placement {
            source: Some(new.source),
            windows: new.windows.clone(),
        },
    })
}

/// The coordinator's events, shared by the driver (which emits) and the API (which streams).
#[derive(Clone)]
pub struct Events {
    buffer: Arc<Mutex<Buffer>>,
    live: broadcast::Sender<ClusterEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            buffer: Arc::new(Mutex::new(Buffer::new(CAPACITY))),
            live: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers, keeps and sends `draft` to every client; never waits on one.
    pub fn emit(&self, draft: Draft) -> ClusterEvent {
        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        // Kept and sent under one lock, so a client subscribing meanwhile gets each event once.
        let mut buffer = self.lock();
        let e = buffer.push(draft, at);
        tracing::debug!(seq = e.seq, kind = e.detail.kind(), message = %e.message, "event");
        // No receiver is not an error: nobody is watching.
        let _ = self.live.send(e.clone());
        e
    }

    /// The held events after `seq`, how many of those are gone, and the live ones after them.
    pub fn subscribe(
        &self,
        seq: Option<u64>,
    ) -> (u64, Vec<ClusterEvent>, broadcast::Receiver<ClusterEvent>) {
        let buffer = self.lock();
        let (missed, held) = buffer.after(seq);
        (missed, held, self.live.subscribe())
    }

    /// The held events after `seq`.
    pub fn held(&self, seq: Option<u64>) -> Vec<ClusterEvent> {
        self.lock().after(seq).1
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    /// Replay the events after this sequence number (as `Last-Event-ID` does).
    pub since: Option<u64>,
    /// `false`: answer the held events as one JSON document instead of a stream.
    pub follow: Option<bool>,
}

/// What the route needs: the events, and the server's "stopping" signal that ends streams (a
/// stream is a watcher, not work: it must not hold the drain up).
#[derive(Clone)]
struct RouteState {
    events: Events,
    stopping: CancellationToken,
}

/// `GET /api/v1/events`, to be mounted behind the API keys.
pub fn route<S>(events: Events, stopping: CancellationToken) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    get(serve).with_state(RouteState { events, stopping })
}

/// The sequence number to replay after: `?since=` wins over `Last-Event-ID`.
fn resume_point(q: &EventsQuery, headers: &HeaderMap) -> Option<u64> {
    q.since.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    })
}

async fn serve(
    State(s): State<RouteState>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    let seq = resume_point(&q, &headers);
    if q.follow == Some(false) {
        return Json(serde_json::json!({ "events": s.events.held(seq) })).into_response();
    }
    let (missed, held, live) = s.events.subscribe(seq);
    Sse::new(stream_of(missed, held, live, s.stopping))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

enum Item {
    Event(ClusterEvent),
    Lagged(u64),
}

fn sse_event(item: Item) -> sse::Event {
    match item {
        Item::Event(e) => {
            let ev = sse::Event::default()
                .id(e.seq.to_string())
                .event(e.detail.kind());
            ev.json_data(&e)
                .unwrap_or_else(|_| sse::Event::default().event(e.detail.kind()).data("{}"))
        }
        Item::Lagged(missed) => sse::Event::default()
            .event("lagged")
            .json_data(EventsLagged { missed })
            .unwrap_or_else(|_| sse::Event::default().event("lagged").data("{}")),
    }
}

/// The replay, then live events until the server stops.
fn stream_of(
    missed: u64,
    held: Vec<ClusterEvent>,
    live: broadcast::Receiver<ClusterEvent>,
    stopping: CancellationToken,
) -> impl Stream<Item = Result<sse::Event, Infallible>> {
    let mut replay: VecDeque<Item> = held.into_iter().map(Item::Event).collect();
    if missed > 0 {
        replay.push_front(Item::Lagged(missed));
    }
    stream::unfold(
        (replay, live, stopping),
        |(mut replay, mut live, stopping)| async move {
            let item = match replay.pop_front() {
                Some(i) => i,
                None => tokio::select! {
                    _ = stopping.cancelled() => return None,
                    r = live.recv() => match r {
                        Ok(e) => Item::Event(e),
                        Err(broadcast::error::RecvError::Lagged(n)) => Item::Lagged(n),
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                },
            };
            Some((Ok(sse_event(item)), (replay, live, stopping)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::state::NodeCheck;
    use crate::proto::{ExitKind, PlacementSource};
    use std::time::Instant;

    fn draft(message: &str) -> Draft {
        Draft {
            generation: Some(1),
            rank: None,
            message: message.into(),
            detail: EventDetail::Phase {
                from: "a".into(),
                to: "b".into(),
            },
        }
    }

    #[test]
    fn the_buffer_keeps_the_last_events_and_says_how_many_a_resume_missed() {
        let mut b = Buffer::new(3);
        for i in 1..=5 {
            let e = b.push(draft(&format!("e{i}")), "t".into());
            assert_eq!(e.seq, i);
        }
        let (missed, held) = b.after(None);
        assert_eq!(missed, 0, "a fresh client asked for nothing in particular");
        assert_eq!(held.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
        let (missed, held) = b.after(Some(1));
        assert_eq!(missed, 1, "event 2 is gone");
        assert_eq!(held.len(), 3);
        let (missed, held) = b.after(Some(4));
        assert_eq!((missed, held.len()), (0, 1));
        assert_eq!(b.after(Some(5)).1.len(), 0, "up to date");
        assert_eq!(
            b.after(Some(99)).1.len(),
            3,
            "a seq from an earlier coordinator replays everything"
        );
    }

    #[test]
    fn events_serialize_with_their_kind_and_fields_flat() {
        let mut b = Buffer::new(4);
        let e = b.push(
            Draft {
                generation: None,
                rank: Some(2),
                message: "m".into(),
                detail: EventDetail::Failure {
                    reason: "r".into(),
                    cause: "rank_exited".into(),
                },
            },
            "2026-01-01T00:00:00.000Z".into(),
        );
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"seq": 1, "at": "2026-01-01T00:00:00.000Z", "kind": "failure",
                "generation": null, "rank": 2, "message": "m", "reason": "r", "cause": "rank_exited"})
        );
        let back: ClusterEvent = serde_json::from_value(v).expect("parse back");
        assert_eq!(back, e);
    }

    /// Drives a supervisor through `events`, collecting the drafts a narrator makes.
    fn narrate(events: Vec<Event>) -> Vec<Draft> {
        let (mut sup, _) = Supervisor::new(Duration::from_secs(1), Duration::from_secs(2));
        let mut n = Narrator::default();
        let mut out = vec![];
        for e in events {
            let before = sup.phase;
            sup.handle(e.clone(), Instant::now());
            out.extend(n.transition(&e, before, &sup));
        }
        out
    }

    fn kinds(d: &[Draft]) -> Vec<&'static str> {
        d.iter().map(|d| d.detail.kind()).collect()
    }

    fn checked(check: NodeCheck) -> Event {
        Event::NodesChecked {
            check,
            highest_generation: 0,
            running_generation: None,
            builds: vec![],
        }
    }

    #[test]
    fn a_model_switch_or_an_idle_unload_is_no_failure() {
        let d = narrate(vec![
            checked(NodeCheck::Ready),
            Event::RingStarted { generation: 1 },
            Event::Ready { generation: 1 },
            Event::Switch {
                reason: "switching to model b".into(),
            },
            Event::RingStopped { generation: 1 },
            checked(NodeCheck::Ready),
            Event::RingStarted { generation: 2 },
            Event::Ready { generation: 2 },
            Event::Unload,
            Event::RingStopped { generation: 2 },
        ]);
        let k = kinds(&d);
        assert!(
            !k.contains(&"failure") && !k.contains(&"restart"),
            "{k:?} {d:?}"
        );
    }

    #[test]
    fn a_rolling_upgrade_is_told_as_upgrade_events_not_as_a_failure() {
        use crate::coordinator::check::Build;
        let b = |engine: &str| {
            Some(Build {
                engine: Some(engine.into()),
                package: None,
                agent: Some("0.3".into()),
                protocol: Some(1),
            })
        };
        let checked =
            |check: NodeCheck, g: u64, running: Option<u64>, e: [&str; 3]| Event::NodesChecked {
                check,
                highest_generation: g,
                running_generation: running,
                builds: e.iter().map(|e| b(e)).collect(),
            };
        let d = narrate(vec![
            checked(NodeCheck::Ready, 0, None, ["b1", "b1", "b1"]),
            Event::RingStarted { generation: 1 },
            Event::Ready { generation: 1 },
            checked(
                NodeCheck::Mixed("engines differ".into()),
                1,
                Some(1),
                ["b1", "b2", "b2"],
            ),
            checked(NodeCheck::Ready, 1, Some(1), ["b2", "b2", "b2"]),
            Event::RingStopped { generation: 1 },
            checked(NodeCheck::Ready, 1, None, ["b2", "b2", "b2"]),
            Event::RingStarted { generation: 2 },
            Event::Ready { generation: 2 },
        ]);
        let upgrades: Vec<&Draft> = d.iter().filter(|d| d.detail.kind() == "upgrade").collect();
        assert!(
            upgrades
                .first()
                .is_some_and(|u| u.message.starts_with("upgrade pending: 2/3 nodes")),
            "{d:?}"
        );
        assert!(
            upgrades.iter().any(|u| u
                .message
                .starts_with("restarting the ring on the new build")),
            "{d:?}"
        );
        assert!(
            !kinds(&d).contains(&"failure") && !kinds(&d).contains(&"restart"),
            "an upgrade restart is no failure: {:?}",
            kinds(&d)
        );
    }

    #[test]
    fn a_rank_crash_is_a_failure_with_its_rank_then_a_restart_with_the_same_reason() {
        let d = narrate(vec![
            checked(NodeCheck::Ready),
            Event::RingStarted { generation: 1 },
            Event::Ready { generation: 1 },
            Event::RankExited {
                generation: 1,
                rank: 2,
                kind: ExitKind::Failed,
                detail: "exited with status 1".into(),
            },
            Event::RingStopped { generation: 1 },
            Event::BackoffElapsed,
            checked(NodeCheck::Ready),
        ]);
        assert_eq!(
            kinds(&d),
            ["phase", "phase", "phase", "phase", "failure", "phase", "phase", "phase", "restart"]
        );
        let EventDetail::Phase { from, to } = &d[2].detail else {
            panic!("{d:?}")
        };
        assert_eq!((from.as_str(), to.as_str()), ("waiting_ready", "serving"));
        assert_eq!(d[4].rank, Some(2));
        assert_eq!(
            (d[3].message.as_str(), d[5].message.as_str()),
            (
                "serving → stopping: rank 2 exited with status 1",
                "stopping → backing_off"
            ),
            "a reason is told once"
        );
        assert_eq!(
            d[4].detail,
            EventDetail::Failure {
                reason: "rank 2 exited with status 1".into(),
                cause: "rank_exited".into()
            }
        );
        assert_eq!(d[8].generation, Some(2));
        assert_eq!(
            d[8].detail,
            EventDetail::Restart {
                reason: "rank 2 exited with status 1".into(),
                cause: "rank_exited".into()
            }
        );
    }

    #[test]
    fn a_refusal_is_a_failure_and_no_change_is_no_event() {
        let d = narrate(vec![
            checked(NodeCheck::Refused("model hash differs on rank 1".into())),
            checked(NodeCheck::Refused("model hash differs on rank 1".into())),
        ]);
        assert_eq!(kinds(&d), ["phase", "failure"]);
        assert_eq!(
            d[1].detail,
            EventDetail::Failure {
                reason: "model hash differs on rank 1".into(),
                cause: "refused".into()
            }
        );
        assert_eq!(d[1].generation, None, "nothing started yet");
    }

    #[test]
    fn a_placement_is_told_once_per_change() {
        let p = PlacementView {
            source: PlacementSource::Config,
            windows: Some(vec![10, 14]),
            gpu_layers: None,
        };
        let d = placement(None, Some(&p), 3).expect("new placement");
        assert_eq!(
            d.detail,
            EventDetail::Placement {
                source: Some(PlacementSource::Config),
                windows: Some(vec![10, 14])
            }
        );
        assert!(d.message.contains("[10, 14]"), "{}", d.message);
        assert!(placement(Some(&p), Some(&p), 3).is_none());
        assert!(placement(Some(&p), None, 3).is_none());
    }

    #[tokio::test]
    async fn a_slow_client_gets_lagged_and_goes_on() {
        use futures_util::StreamExt;
        let events = Events::default();
        let (missed, held, live) = events.subscribe(None);
        assert_eq!((missed, held.len()), (0, 0));
        for i in 0..(CAPACITY + 10) {
            events.emit(draft(&format!("e{i}")));
        }
        let stop = CancellationToken::new();
        let mut s = Box::pin(stream_of(missed, held, live, stop.clone()));
        // Rendered SSE text of the first item: the lagged marker.
        let first = s.next().await.expect("an item").expect("infallible");
        let text = format!("{first:?}");
        assert!(text.contains("lagged"), "{text}");
        assert!(s.next().await.is_some(), "then events go on");
        stop.cancel();
        // The rest of the buffered channel may still come; the stream ends once it is drained
        // or at once: either way it ends.
        let rest = tokio::time::timeout(Duration::from_secs(5), s.count()).await;
        assert!(rest.is_ok(), "the stream ends when the server stops");
    }
}
