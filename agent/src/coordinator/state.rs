//! The supervision state machine, free of I/O: events in, actions out. The driver
//! (`driver.rs`) performs the actions and feeds their outcomes back as events.
//!
//! Neither engine can repair a ring in place (prima hangs, llama.cpp's head aborts), so every
//! failure takes the same road: stop every rank, back off, check the nodes, start a new
//! generation.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::check::{common_build, upgrade_step, Build, UpgradeStep};
use crate::proto::{ExitKind, MAX_GENERATION};

/// Serving this long without a failure resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How soon to look again at nodes that are not ready, and at nodes that were refused.
pub const RECHECK_WAITING: Duration = Duration::from_secs(1);
pub const RECHECK_REFUSED: Duration = Duration::from_secs(5);
/// How often a serving ring's nodes are looked at again: while an upgrade is under way, and
/// otherwise (an upgrade whose hook did not run, e.g. binaries copied by hand).
pub const RECHECK_UPGRADING: Duration = Duration::from_secs(5);
pub const RECHECK_SERVING: Duration = Duration::from_secs(60);
/// This many failures in a row, each the same way, and the ring is refused instead of being
/// restarted again: a crash loop (rank 0 asserting right after scheduling, a model the engine
/// cannot load) would otherwise restart for ever and flood the journal.
pub const SAME_FAILURE_LIMIT: u32 = 5;

/// A failure reason with its numbers (generations, pids, ports, times) taken out, so that the
/// same failure in two generations compares equal.
fn failure_shape(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut in_number = false;
    for c in reason.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('#');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Some node is unreachable or still preparing (hashing its model).
    WaitingForNodes,
    /// The nodes disagree (engine build, model file) or miss something; a person must act.
    Refused,
    Starting,
    /// Ranks are up; waiting for rank 0's /health.
    WaitingReady,
    Serving,
    Stopping,
    BackingOff,
    /// Stopped after `idle_unload_s` without requests; the next request starts it.
    Unloaded,
}

impl Phase {
    /// Every phase, for whoever lists them all (the metrics' `ring_phase` gauge).
    pub const ALL: [Phase; 8] = [
        Phase::WaitingForNodes,
        Phase::Refused,
        Phase::Starting,
        Phase::WaitingReady,
        Phase::Serving,
        Phase::Stopping,
        Phase::BackingOff,
        Phase::Unloaded,
    ];

    /// The name the API shows (the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::WaitingForNodes => "waiting_for_nodes",
            Phase::Refused => "refused",
            Phase::Starting => "starting",
            Phase::WaitingReady => "waiting_ready",
            Phase::Serving => "serving",
            Phase::Stopping => "stopping",
            Phase::BackingOff => "backing_off",
            Phase::Unloaded => "unloaded",
        }
    }
}

/// Outcome of looking at every node's facts.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeCheck {
    Ready,
    Waiting(String),
    Refused(String),
    /// Refused only because the nodes run different builds (engine, package, agent): a rolling
    /// upgrade halfway. Nothing new starts on it; a serving ring serves on.
    Mixed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    NodesChecked {
        check: NodeCheck,
        /// Highest generation any node has seen: a restarted coordinator continues after it.
        highest_generation: u64,
        /// Every rank runs this generation with exactly the spec the config plans: a ring a
        /// previous coordinator started, which a new one takes over instead of restarting.
        running_generation: Option<u64>,
        /// Each node's build, in rank order (`None`: the node did not answer).
        builds: Vec<Option<Build>>,
    },
    /// A person asked for the ring to be restarted on the build every node has now
    /// (`llm-agent notify-upgrade --restart-ring`, for `restart_on_upgrade = false`).
    RestartRequested,
    RingStarted {
        generation: u64,
    },
    StartFailed {
        generation: u64,
        error: String,
    },
    Ready {
        generation: u64,
    },
    ReadyTimedOut {
        generation: u64,
    },
    RankExited {
        generation: u64,
        rank: u32,
        kind: ExitKind,
        detail: String,
    },
    /// A node agent did not answer for `node_timeout_s`. Tears down a ring that is starting;
    /// a serving ring goes on while it makes progress ([`Event::Stalled`] decides).
    NodeLost {
        rank: u32,
        detail: String,
    },
    /// Work is in flight and the ring has made no progress (see `progress.rs`).
    Stalled {
        generation: u64,
        detail: String,
    },
    /// A node's facts changed on their own (its model hash finished, its agent restarted).
    NodeChanged {
        rank: u32,
    },
    RingStopped {
        generation: u64,
    },
    BackoffElapsed,
    /// The driver moves the ring to another model (its config already names it): stop the
    /// ring and start it again at once, which is no failure.
    Switch {
        reason: String,
    },
    /// Stop the ring for idleness.
    Unload,
    /// Start an unloaded ring.
    Load,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    CheckNodes { after: Duration },
    StartRing { generation: u64 },
    WaitReady { generation: u64 },
    StopRing { generation: u64 },
    Backoff { delay: Duration },
}

/// The generation after `current` and the `highest` any node reports, if it is one a
/// coordinator may issue: checked, so a node's absurd generation can never make it wrap.
pub fn next_generation(current: u64, highest: u64) -> Option<u64> {
    current
        .max(highest)
        .checked_add(1)
        .filter(|g| *g <= MAX_GENERATION)
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    pub phase: Phase,
    pub generation: u64,
    /// Failed attempts since the ring last served stably.
    pub failures: u32,
    /// Why the ring is not serving, for people and for 503 bodies.
    pub reason: Option<String>,
    pub serving_since: Option<Instant>,
    pub backoff: Option<Duration>,
    backoff_initial: Duration,
    backoff_max: Duration,
    /// The shape of the last failure and how many failures in a row had it.
    same_failure: Option<(String, u32)>,
    /// Set once the same failure repeated [`SAME_FAILURE_LIMIT`] times: nothing is started
    /// again until a node changes (an upgrade, a restarted agent) or the coordinator restarts.
    crash_loop: bool,
    /// Restart the ring by itself once every node has the same new build; otherwise a person
    /// asks for it ([`Event::RestartRequested`]).
    pub restart_on_upgrade: bool,
    /// The build every node had when the current ring started; `None` when unknown (a ring
    /// adopted while the nodes differed).
    pub ring_build: Option<Build>,
    /// Where a rolling upgrade stands, for people (`/api/v1/cluster`): pending, ready, complete.
    pub upgrade: Option<String>,
    /// The ring is being stopped to restart it on a new build, not because it failed.
    upgrade_restart: bool,
    /// A person asked for the restart; honoured by the next node check if every node agrees.
    restart_requested: bool,
    /// What the current stop leads to.
    after_stop: AfterStop,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum AfterStop {
    /// A failure: back off, then start again.
    Backoff,
    /// A switch: start again at once.
    Restart,
    /// Idle: stay stopped.
    Stay,
}

impl Supervisor {
    pub fn new(backoff_initial: Duration, backoff_max: Duration) -> (Supervisor, Vec<Action>) {
        (
            Supervisor {
                phase: Phase::WaitingForNodes,
                generation: 0,
                failures: 0,
                reason: Some("checking the nodes".into()),
                serving_since: None,
                backoff: None,
                backoff_initial,
                backoff_max,
                same_failure: None,
                crash_loop: false,
                restart_on_upgrade: true,
                ring_build: None,
                upgrade: None,
                upgrade_restart: false,
                restart_requested: false,
                after_stop: AfterStop::Backoff,
            },
            vec![Action::CheckNodes {
                after: Duration::ZERO,
            }],
        )
    }

    /// The delay before attempt number `failures + 1`: doubling from the initial value, capped.
    pub fn backoff_for(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_initial
            .saturating_mul(factor)
            .min(self.backoff_max)
    }

    /// The ring is being stopped to restart it on a new build (not a failure).
    pub fn upgrade_restarting(&self) -> bool {
        self.upgrade_restart
    }

    fn is_current(&self, generation: u64) -> bool {
        generation == self.generation
    }

    fn ring_active(&self) -> bool {
        matches!(
            self.phase,
            Phase::Starting | Phase::WaitingReady | Phase::Serving
        )
    }

    fn fail(&mut self, reason: String, now: Instant) -> Vec<Action> {
        if self
            .serving_since
            .is_some_and(|t| now.duration_since(t) >= STABLE_AFTER)
        {
            self.failures = 0;
        }
        self.failures += 1;
        let shape = failure_shape(&reason);
        self.same_failure = match self.same_failure.take() {
            Some((s, n)) if s == shape && self.failures > 1 => Some((s, n + 1)),
            _ => Some((shape, 1)),
        };
        self.serving_since = None;
        self.phase = Phase::Stopping;
        self.reason = Some(reason);
        self.after_stop = AfterStop::Backoff;
        vec![Action::StopRing {
            generation: self.generation,
        }]
    }

    /// A serving ring's nodes were looked at: it serves on while they differ (each rank runs the
    /// binary it was started from), and is restarted once, as a new generation, when every node
    /// has the same new build (or, with `restart_on_upgrade = false`, when a person asks).
    fn serving_checked(&mut self, check: &NodeCheck, builds: &[Option<Build>]) -> Vec<Action> {
        let requested = std::mem::take(&mut self.restart_requested);
        let step = upgrade_step(
            self.ring_build.as_ref(),
            builds,
            *check == NodeCheck::Ready,
            self.restart_on_upgrade || requested,
        );
        let again = |after| vec![Action::CheckNodes { after }];
        match step {
            UpgradeStep::Current => {
                self.upgrade = None;
                again(RECHECK_SERVING)
            }
            UpgradeStep::Pending(why) | UpgradeStep::Ready(why) => {
                self.upgrade = Some(why);
                again(RECHECK_UPGRADING)
            }
            UpgradeStep::Restart(why) => {
                self.upgrade = Some(why.clone());
                self.upgrade_restart = true;
                self.serving_since = None;
                self.phase = Phase::Stopping;
                self.reason = Some(why);
                vec![Action::StopRing {
                    generation: self.generation,
                }]
            }
        }
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match event {
            Event::NodesChecked { check, builds, .. } if self.phase == Phase::Serving => {
                self.serving_checked(&check, &builds)
            }
            Event::NodesChecked {
                check,
                highest_generation,
                running_generation,
                builds,
            } => {
                if !matches!(self.phase, Phase::WaitingForNodes | Phase::Refused) || self.crash_loop
                {
                    return vec![];
                }
                match (check, running_generation) {
                    // Only a coordinator that has not started anything yet adopts; also halfway
                    // through a rolling upgrade (the head's agent restarted on a new version),
                    // where the ring serves on until every node has the new build.
                    (NodeCheck::Ready | NodeCheck::Mixed(_), Some(generation))
                        if self.generation == 0 =>
                    {
                        self.generation = generation;
                        self.ring_build = common_build(&builds);
                        self.phase = Phase::WaitingReady;
                        self.reason = Some(format!("adopting the running generation {generation}"));
                        vec![Action::WaitReady { generation }]
                    }
                    (NodeCheck::Ready, _) => {
                        let Some(next) = next_generation(self.generation, highest_generation)
                        else {
                            tracing::warn!(
                                highest_generation,
                                "a node reports a generation no coordinator issues"
                            );
                            self.phase = Phase::Refused;
                            self.reason = Some(format!(
                                "a node reports generation {highest_generation}, beyond any a \
                                 coordinator issues (at most {MAX_GENERATION}): on that node \
                                 stop its rank (systemctl stop 'llm-rank*') and restart its \
                                 agent, which then reports no generation"
                            ));
                            return vec![Action::CheckNodes {
                                after: RECHECK_REFUSED,
                            }];
                        };
                        self.ring_build = common_build(&builds);
                        self.upgrade = None;
                        self.generation = next;
                        self.phase = Phase::Starting;
                        self.reason = Some(format!("starting generation {}", self.generation));
                        vec![Action::StartRing {
                            generation: self.generation,
                        }]
                    }
                    (NodeCheck::Waiting(why), _) => {
                        self.phase = Phase::WaitingForNodes;
                        self.reason = Some(why);
                        vec![Action::CheckNodes {
                            after: RECHECK_WAITING,
                        }]
                    }
                    (NodeCheck::Refused(why) | NodeCheck::Mixed(why), _) => {
                        self.phase = Phase::Refused;
                        self.reason = Some(why);
                        vec![Action::CheckNodes {
                            after: RECHECK_REFUSED,
                        }]
                    }
                }
            }
            Event::RingStarted { generation }
                if self.is_current(generation) && self.phase == Phase::Starting =>
            {
                self.phase = Phase::WaitingReady;
                self.reason = Some("waiting for rank 0 to report healthy".into());
                vec![Action::WaitReady { generation }]
            }
            Event::StartFailed { generation, error }
                if self.is_current(generation) && self.phase == Phase::Starting =>
            {
                self.fail(
                    format!("generation {generation} failed to start: {error}"),
                    now,
                )
            }
            Event::Ready { generation }
                if self.is_current(generation) && self.phase == Phase::WaitingReady =>
            {
                self.same_failure = None;
                self.phase = Phase::Serving;
                self.reason = None;
                self.serving_since = Some(now);
                self.backoff = None;
                vec![Action::CheckNodes {
                    after: RECHECK_SERVING,
                }]
            }
            Event::ReadyTimedOut { generation }
                if self.is_current(generation) && self.phase == Phase::WaitingReady =>
            {
                self.fail(
                    format!("generation {generation}: rank 0 did not become healthy in time"),
                    now,
                )
            }
            Event::RankExited {
                generation,
                rank,
                kind,
                detail,
            } if self.is_current(generation) && self.ring_active() => {
                match kind {
                    ExitKind::Failed => self.fail(format!("rank {rank} {detail}"), now),
                    // The ring goes on without a rank the scheduler dropped; a stop we asked for
                    // is accounted for by the action that asked.
                    ExitKind::DroppedByScheduler | ExitKind::Stopped => vec![],
                }
            }
            Event::NodeLost { rank, detail }
                if matches!(self.phase, Phase::Starting | Phase::WaitingReady) =>
            {
                self.fail(format!("lost contact with rank {rank}: {detail}"), now)
            }
            Event::Stalled { generation, detail }
                if self.is_current(generation) && self.phase == Phase::Serving =>
            {
                self.fail(detail, now)
            }
            // Look again now rather than at the next timed check: this is what makes a ring start
            // the moment the last model hash finishes.
            // A serving ring's node changed (`notify-upgrade`, a restarted agent): see whether
            // an upgrade started or completed.
            Event::NodeChanged { .. } if self.phase == Phase::Serving => vec![Action::CheckNodes {
                after: Duration::ZERO,
            }],
            Event::RestartRequested if self.phase == Phase::Serving => {
                self.restart_requested = true;
                vec![Action::CheckNodes {
                    after: Duration::ZERO,
                }]
            }
            Event::NodeChanged { .. }
                if matches!(self.phase, Phase::WaitingForNodes | Phase::Refused) =>
            {
                if self.crash_loop {
                    // Something changed on a node: worth one more try.
                    self.crash_loop = false;
                    self.same_failure = None;
                    self.failures = 0;
                }
                vec![Action::CheckNodes {
                    after: Duration::ZERO,
                }]
            }
            Event::RingStopped { generation }
                if self.is_current(generation)
                    && self.phase == Phase::Stopping
                    && self.after_stop != AfterStop::Backoff =>
            {
                let after = std::mem::replace(&mut self.after_stop, AfterStop::Backoff);
                if after == AfterStop::Stay {
                    self.phase = Phase::Unloaded;
                    self.reason = Some("unloaded after idle_unload_s without requests; the next request starts the ring".into());
                    return vec![];
                }
                self.phase = Phase::WaitingForNodes;
                vec![Action::CheckNodes {
                    after: Duration::ZERO,
                }]
            }
            Event::Switch { reason } if self.ring_active() || self.phase == Phase::BackingOff => {
                self.serving_since = None;
                self.reason = Some(reason);
                self.failures = 0;
                self.same_failure = None;
                if self.phase == Phase::BackingOff {
                    // Nothing runs: start the new model now instead of after the backoff.
                    self.phase = Phase::WaitingForNodes;
                    return vec![Action::CheckNodes {
                        after: Duration::ZERO,
                    }];
                }
                self.phase = Phase::Stopping;
                self.after_stop = AfterStop::Restart;
                vec![Action::StopRing {
                    generation: self.generation,
                }]
            }
            // A switch while the nodes are being checked or refused: the next check is for the
            // new model already (the driver swapped the config).
            Event::Switch { reason }
                if matches!(self.phase, Phase::WaitingForNodes | Phase::Refused) =>
            {
                self.reason = Some(reason);
                self.crash_loop = false;
                vec![Action::CheckNodes {
                    after: Duration::ZERO,
                }]
            }
            Event::Unload if self.phase == Phase::Serving => {
                self.serving_since = None;
                self.phase = Phase::Stopping;
                self.reason = Some("unloading: idle".into());
                self.after_stop = AfterStop::Stay;
                vec![Action::StopRing {
                    generation: self.generation,
                }]
            }
            Event::Load if self.phase == Phase::Unloaded => {
                self.phase = Phase::WaitingForNodes;
                self.reason = Some("loading: a request arrived".into());
                vec![Action::CheckNodes {
                    after: Duration::ZERO,
                }]
            }
            Event::RingStopped { generation }
                if self.is_current(generation) && self.phase == Phase::Stopping =>
            {
                if self.upgrade_restart {
                    // Not a failure: no backoff, straight to the start on the new build.
                    self.upgrade_restart = false;
                    self.phase = Phase::WaitingForNodes;
                    return vec![Action::CheckNodes {
                        after: Duration::ZERO,
                    }];
                }
                if let Some((_, n)) = &self.same_failure {
                    if *n >= SAME_FAILURE_LIMIT {
                        self.crash_loop = true;
                        self.phase = Phase::Refused;
                        self.reason = Some(format!(
                            "refused: the ring failed the same way {n} times in a row, so it is not restarted again until a node changes (an upgrade, a restarted agent) or this coordinator restarts; last failure: {}",
                            self.reason.as_deref().unwrap_or("?")
                        ));
                        return vec![];
                    }
                }
                let delay = self.backoff_for(self.failures);
                self.phase = Phase::BackingOff;
                self.backoff = Some(delay);
                vec![Action::Backoff { delay }]
            }
            Event::BackoffElapsed if self.phase == Phase::BackingOff => {
                self.phase = Phase::WaitingForNodes;
                vec![Action::CheckNodes {
                    after: Duration::ZERO,
                }]
            }
            // Events from older generations or for other phases change nothing.
            _ => vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sup() -> Supervisor {
        Supervisor::new(Duration::from_secs(1), Duration::from_secs(8)).0
    }

    fn serve(s: &mut Supervisor, now: Instant) -> u64 {
        let a = s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: 0,
                running_generation: None,
                builds: vec![],
            },
            now,
        );
        let Action::StartRing { generation } = a[0] else {
            panic!("expected start, got {a:?}")
        };
        assert_eq!(
            s.handle(Event::RingStarted { generation }, now),
            vec![Action::WaitReady { generation }]
        );
        assert_eq!(
            s.handle(Event::Ready { generation }, now),
            vec![Action::CheckNodes {
                after: RECHECK_SERVING
            }]
        );
        assert_eq!(s.phase, Phase::Serving);
        generation
    }

    #[test]
    fn a_switch_stops_and_starts_at_once_without_counting_a_failure() {
        let now = Instant::now();
        let mut s = sup();
        let g = serve(&mut s, now);
        let a = s.handle(
            Event::Switch {
                reason: "switching to b".into(),
            },
            now,
        );
        assert_eq!(a, vec![Action::StopRing { generation: g }]);
        assert_eq!(s.phase, Phase::Stopping);
        assert_eq!(
            s.handle(Event::RingStopped { generation: g }, now),
            vec![Action::CheckNodes {
                after: Duration::ZERO
            }]
        );
        assert_eq!((s.phase, s.failures), (Phase::WaitingForNodes, 0));
        let g2 = serve(&mut s, now);
        assert_eq!(g2, g + 1);
        // A failure after it still backs off.
        assert!(crash(&mut s, g2, now) > Duration::ZERO);
    }

    #[test]
    fn an_unload_stays_stopped_until_a_load() {
        let now = Instant::now();
        let mut s = sup();
        let g = serve(&mut s, now);
        assert_eq!(
            s.handle(Event::Unload, now),
            vec![Action::StopRing { generation: g }]
        );
        assert!(s
            .handle(Event::RingStopped { generation: g }, now)
            .is_empty());
        assert_eq!(s.phase, Phase::Unloaded);
        assert!(s.handle(Event::NodeChanged { rank: 0 }, now).is_empty());
        assert_eq!(
            s.handle(Event::Load, now),
            vec![Action::CheckNodes {
                after: Duration::ZERO
            }]
        );
        assert_eq!(serve(&mut s, now), g + 1);
    }

    fn crash(s: &mut Supervisor, generation: u64, now: Instant) -> Duration {
        let a = s.handle(
            Event::RankExited {
                generation,
                rank: 1,
                kind: ExitKind::Failed,
                detail: "exited with status 1".into(),
            },
            now,
        );
        assert_eq!(a, vec![Action::StopRing { generation }]);
        assert_eq!(s.phase, Phase::Stopping);
        let a = s.handle(Event::RingStopped { generation }, now);
        let [Action::Backoff { delay }] = a[..] else {
            panic!("expected backoff, got {a:?}")
        };
        assert_eq!(
            s.handle(Event::BackoffElapsed, now),
            vec![Action::CheckNodes {
                after: Duration::ZERO
            }]
        );
        delay
    }

    fn b(engine: &str, agent: &str) -> Option<Build> {
        Some(Build {
            engine: Some(engine.into()),
            package: None,
            agent: Some(agent.into()),
            protocol: Some(1),
        })
    }

    fn checked(check: NodeCheck, generation: u64, builds: &[Option<Build>]) -> Event {
        Event::NodesChecked {
            check,
            highest_generation: generation,
            running_generation: Some(generation),
            builds: builds.to_vec(),
        }
    }

    /// Serving generation 1 on `b1` everywhere.
    fn serving_on_b1(now: Instant) -> Supervisor {
        let mut s = sup();
        let all = [b("b1", "0.3"), b("b1", "0.3"), b("b1", "0.3")];
        s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: 0,
                running_generation: None,
                builds: all.to_vec(),
            },
            now,
        );
        s.handle(Event::RingStarted { generation: 1 }, now);
        s.handle(Event::Ready { generation: 1 }, now);
        assert_eq!(
            (s.phase, s.ring_build.clone()),
            (Phase::Serving, b("b1", "0.3"))
        );
        s
    }

    #[test]
    fn mixed_builds_keep_a_serving_ring_serving_and_say_the_upgrade_is_pending() {
        let now = Instant::now();
        let mut s = serving_on_b1(now);
        assert_eq!(
            s.handle(Event::NodeChanged { rank: 1 }, now),
            vec![Action::CheckNodes {
                after: Duration::ZERO
            }],
            "a node that says it changed is looked at at once"
        );
        let mixed = [b("b1", "0.3"), b("b2", "0.3"), b("b2", "0.3")];
        let a = s.handle(
            checked(NodeCheck::Mixed("engines differ".into()), 1, &mixed),
            now,
        );
        assert_eq!(
            a,
            vec![Action::CheckNodes {
                after: RECHECK_UPGRADING
            }]
        );
        assert_eq!((s.phase, s.generation), (Phase::Serving, 1));
        let up = s.upgrade.clone().unwrap_or_default();
        assert!(
            up.starts_with("upgrade pending: 2/3 nodes on engine `b2`"),
            "{up}"
        );
        assert_eq!(s.reason, None, "still serving: no reason to show");
    }

    #[test]
    fn consistent_new_builds_restart_the_ring_exactly_once_without_backoff() {
        let now = Instant::now();
        let mut s = serving_on_b1(now);
        let new = [b("b2", "0.3"), b("b2", "0.3"), b("b2", "0.3")];
        let a = s.handle(checked(NodeCheck::Ready, 1, &new), now);
        assert_eq!(a, vec![Action::StopRing { generation: 1 }]);
        assert!(s.upgrade_restarting());
        // Checks arriving while it stops change nothing.
        assert!(s.handle(checked(NodeCheck::Ready, 1, &new), now).is_empty());
        assert_eq!(
            s.handle(Event::RingStopped { generation: 1 }, now),
            vec![Action::CheckNodes {
                after: Duration::ZERO
            }],
            "no backoff: an upgrade is not a failure"
        );
        let a = s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: 1,
                running_generation: None,
                builds: new.to_vec(),
            },
            now,
        );
        assert_eq!(a, vec![Action::StartRing { generation: 2 }]);
        s.handle(Event::RingStarted { generation: 2 }, now);
        s.handle(Event::Ready { generation: 2 }, now);
        assert_eq!(
            (s.phase, s.failures, s.upgrade.clone()),
            (Phase::Serving, 0, None)
        );
        // The ring now runs b2: later checks (and notifications) restart nothing.
        for _ in 0..3 {
            s.handle(Event::NodeChanged { rank: 0 }, now);
            assert_eq!(
                s.handle(checked(NodeCheck::Ready, 2, &new), now),
                vec![Action::CheckNodes {
                    after: RECHECK_SERVING
                }]
            );
        }
        assert_eq!((s.phase, s.generation), (Phase::Serving, 2));
    }

    #[test]
    fn a_node_lost_during_an_upgrade_holds_the_restart_until_it_is_back() {
        let now = Instant::now();
        let mut s = serving_on_b1(now);
        assert!(s
            .handle(
                Event::NodeLost {
                    rank: 2,
                    detail: "timeout".into()
                },
                now
            )
            .is_empty());
        let lost = [b("b2", "0.3"), b("b2", "0.3"), None];
        let a = s.handle(
            checked(NodeCheck::Waiting("rank 2 unreachable".into()), 1, &lost),
            now,
        );
        assert_eq!(
            a,
            vec![Action::CheckNodes {
                after: RECHECK_UPGRADING
            }]
        );
        assert_eq!(s.phase, Phase::Serving);
        let up = s.upgrade.clone().unwrap_or_default();
        assert!(
            up.contains("2/3 nodes") && up.contains("1 not answering"),
            "{up}"
        );
        // Back, still on the old build: pending; then upgraded: the one restart.
        let back = [b("b2", "0.3"), b("b2", "0.3"), b("b1", "0.3")];
        s.handle(checked(NodeCheck::Mixed("differ".into()), 1, &back), now);
        assert_eq!(s.phase, Phase::Serving);
        let new = [b("b2", "0.3"), b("b2", "0.3"), b("b2", "0.3")];
        assert_eq!(
            s.handle(checked(NodeCheck::Ready, 1, &new), now),
            vec![Action::StopRing { generation: 1 }]
        );
    }

    #[test]
    fn an_agent_upgrade_adopts_the_ring_while_mixed_and_restarts_it_once_consistent() {
        // The head's agent was restarted on llm-agent {AGENT_VERSION}: its new coordinator adopts the ring
        // the old one left running although the other nodes still run 0.3.
        let now = Instant::now();
        let mut s = sup();
        let mixed = [
            b("b1", crate::proto::AGENT_VERSION),
            b("b1", "0.3"),
            b("b1", "0.3"),
        ];
        let a = s.handle(
            checked(NodeCheck::Mixed("agents differ".into()), 5, &mixed),
            now,
        );
        assert_eq!(a, vec![Action::WaitReady { generation: 5 }]);
        s.handle(Event::Ready { generation: 5 }, now);
        assert_eq!(s.phase, Phase::Serving);
        assert_eq!(
            s.ring_build, None,
            "what the adopted ring runs is not known"
        );
        s.handle(
            checked(NodeCheck::Mixed("agents differ".into()), 5, &mixed),
            now,
        );
        assert!(s
            .upgrade
            .as_deref()
            .unwrap_or("")
            .contains("upgrade pending: 1/3"));
        let new = [
            b("b1", crate::proto::AGENT_VERSION),
            b("b1", crate::proto::AGENT_VERSION),
            b("b1", crate::proto::AGENT_VERSION),
        ];
        assert_eq!(
            s.handle(checked(NodeCheck::Ready, 5, &new), now),
            vec![Action::StopRing { generation: 5 }]
        );
        // A fresh coordinator that is not mid-upgrade never adopts refused nodes.
        let mut s = sup();
        let a = s.handle(
            checked(NodeCheck::Refused("model differs".into()), 5, &mixed),
            now,
        );
        assert_eq!(
            a,
            vec![Action::CheckNodes {
                after: RECHECK_REFUSED
            }]
        );
    }

    #[test]
    fn with_manual_restarts_the_ring_serves_on_until_asked() {
        let now = Instant::now();
        let mut s = serving_on_b1(now);
        s.restart_on_upgrade = false;
        let new = [b("b2", "0.3"), b("b2", "0.3"), b("b2", "0.3")];
        assert_eq!(
            s.handle(checked(NodeCheck::Ready, 1, &new), now),
            vec![Action::CheckNodes {
                after: RECHECK_UPGRADING
            }]
        );
        assert_eq!(s.phase, Phase::Serving);
        let up = s.upgrade.clone().unwrap_or_default();
        assert!(up.starts_with("upgrade ready: 3/3 nodes"), "{up}");
        assert_eq!(
            s.handle(Event::RestartRequested, now),
            vec![Action::CheckNodes {
                after: Duration::ZERO
            }]
        );
        assert_eq!(
            s.handle(checked(NodeCheck::Ready, 1, &new), now),
            vec![Action::StopRing { generation: 1 }]
        );
    }

    #[test]
    fn starts_with_a_node_check_and_serves_after_health() {
        let (s, actions) = Supervisor::new(Duration::from_secs(1), Duration::from_secs(8));
        assert_eq!(
            actions,
            vec![Action::CheckNodes {
                after: Duration::ZERO
            }]
        );
        assert_eq!(s.phase, Phase::WaitingForNodes);
        let mut s = s;
        assert_eq!(serve(&mut s, Instant::now()), 1);
        assert_eq!(s.reason, None);
    }

    /// A node once accepted `"generation": u64::MAX`; the next generation wrapped to 0 and
    /// every later start was refused as stale. Now nothing wraps and the reason says why.
    #[test]
    fn an_absurd_node_generation_never_wraps_the_next_one() {
        assert_eq!(next_generation(0, 0), Some(1));
        assert_eq!(next_generation(7, 3), Some(8));
        assert_eq!(next_generation(7, 30), Some(31));
        assert_eq!(next_generation(0, MAX_GENERATION - 1), Some(MAX_GENERATION));
        assert_eq!(next_generation(0, MAX_GENERATION), None);
        assert_eq!(next_generation(0, u64::MAX), None);
        let mut s = sup();
        let a = s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: u64::MAX,
                running_generation: None,
                builds: vec![],
            },
            Instant::now(),
        );
        assert_eq!(
            a,
            vec![Action::CheckNodes {
                after: RECHECK_REFUSED
            }]
        );
        assert_eq!(s.phase, Phase::Refused);
        assert_eq!(s.generation, 0, "no generation adopted or wrapped");
        assert!(s
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("18446744073709551615"));
        // Once the node no longer reports it, the ring starts after what was issued.
        assert_eq!(serve(&mut s, Instant::now()), 1);
    }

    #[test]
    fn any_rank_failure_restarts_the_whole_ring_with_a_new_generation() {
        let mut s = sup();
        let now = Instant::now();
        let g1 = serve(&mut s, now);
        crash(&mut s, g1, now);
        assert!(s
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("rank 1 exited with status 1"));
        let g2 = serve(&mut s, now);
        assert_eq!(g2, g1 + 1);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_after_stable_serving() {
        let mut s = sup();
        let t0 = Instant::now();
        let mut delays = vec![];
        for _ in 0..5 {
            let g = serve(&mut s, t0);
            delays.push(crash(&mut s, g, t0).as_secs());
        }
        assert_eq!(delays, [1, 2, 4, 8, 8]);
        let g = serve(&mut s, t0);
        let later = t0 + STABLE_AFTER + Duration::from_secs(1);
        assert_eq!(
            crash(&mut s, g, later),
            Duration::from_secs(1),
            "stable serving resets backoff"
        );
    }

    #[test]
    fn stale_and_benign_events_are_ignored() {
        let mut s = sup();
        let now = Instant::now();
        let g = serve(&mut s, now);
        let old = Event::RankExited {
            generation: g - 1,
            rank: 2,
            kind: ExitKind::Failed,
            detail: "old".into(),
        };
        assert!(s.handle(old, now).is_empty());
        let dropped = Event::RankExited {
            generation: g,
            rank: 2,
            kind: ExitKind::DroppedByScheduler,
            detail: String::new(),
        };
        assert!(s.handle(dropped, now).is_empty());
        assert!(s.handle(Event::Ready { generation: g }, now).is_empty());
        assert_eq!(s.phase, Phase::Serving);
    }

    #[test]
    fn refused_and_waiting_nodes_are_rechecked_without_starting() {
        let mut s = sup();
        let now = Instant::now();
        let a = s.handle(
            Event::NodesChecked {
                check: NodeCheck::Refused("rank 2 has engine b2".into()),
                highest_generation: 0,
                running_generation: None,
                builds: vec![],
            },
            now,
        );
        assert_eq!(
            a,
            vec![Action::CheckNodes {
                after: RECHECK_REFUSED
            }]
        );
        assert_eq!(s.phase, Phase::Refused);
        let a = s.handle(
            Event::NodesChecked {
                check: NodeCheck::Waiting("hashing".into()),
                highest_generation: 0,
                running_generation: None,
                builds: vec![],
            },
            now,
        );
        assert_eq!(
            a,
            vec![Action::CheckNodes {
                after: RECHECK_WAITING
            }]
        );
        assert_eq!(s.phase, Phase::WaitingForNodes);
    }

    #[test]
    fn a_new_coordinator_adopts_a_running_ring_but_an_active_one_never_does() {
        let mut s = sup();
        let now = Instant::now();
        let a = s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: 7,
                running_generation: Some(7),
                builds: vec![],
            },
            now,
        );
        assert_eq!(a, vec![Action::WaitReady { generation: 7 }]);
        s.handle(Event::Ready { generation: 7 }, now);
        assert_eq!((s.phase, s.generation), (Phase::Serving, 7));
        // After a failure the same coordinator restarts with a new generation, never re-adopts.
        crash(&mut s, 7, now);
        let a = s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: 7,
                running_generation: Some(7),
                builds: vec![],
            },
            now,
        );
        assert_eq!(a, vec![Action::StartRing { generation: 8 }]);
    }

    #[test]
    fn a_restarted_coordinator_continues_after_the_nodes_generation() {
        let mut s = sup();
        let a = s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: 7,
                running_generation: None,
                builds: vec![],
            },
            Instant::now(),
        );
        assert_eq!(a, vec![Action::StartRing { generation: 8 }]);
    }

    #[test]
    fn start_failure_and_health_timeout_go_through_stop_and_backoff() {
        let mut s = sup();
        let now = Instant::now();
        s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: 0,
                running_generation: None,
                builds: vec![],
            },
            now,
        );
        let a = s.handle(
            Event::StartFailed {
                generation: 1,
                error: "rank 2 unreachable".into(),
            },
            now,
        );
        assert_eq!(a, vec![Action::StopRing { generation: 1 }]);
        s.handle(Event::RingStopped { generation: 1 }, now);
        s.handle(Event::BackoffElapsed, now);
        s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: 1,
                running_generation: None,
                builds: vec![],
            },
            now,
        );
        s.handle(Event::RingStarted { generation: 2 }, now);
        let a = s.handle(Event::ReadyTimedOut { generation: 2 }, now);
        assert_eq!(a, vec![Action::StopRing { generation: 2 }]);
        assert_eq!(s.failures, 2);
    }

    #[test]
    fn node_lost_tears_down_a_starting_ring_but_not_a_serving_one() {
        let lost = || Event::NodeLost {
            rank: 1,
            detail: "timeout".into(),
        };
        let mut s = sup();
        let now = Instant::now();
        assert!(s.handle(lost(), now).is_empty(), "no ring yet");
        s.handle(
            Event::NodesChecked {
                check: NodeCheck::Ready,
                highest_generation: 0,
                running_generation: None,
                builds: vec![],
            },
            now,
        );
        assert_eq!(s.phase, Phase::Starting);
        assert_eq!(
            s.handle(lost(), now),
            vec![Action::StopRing { generation: 1 }]
        );
        let mut s = sup();
        let g = serve(&mut s, now);
        assert!(
            s.handle(lost(), now).is_empty(),
            "a serving ring goes on while it makes progress"
        );
        assert_eq!(s.phase, Phase::Serving);
        let stalled = |generation| Event::Stalled {
            generation,
            detail: "ring stalled: rank 1 used 0 ms of CPU time".into(),
        };
        assert!(s.handle(stalled(g - 1), now).is_empty(), "stale generation");
        assert_eq!(
            s.handle(stalled(g), now),
            vec![Action::StopRing { generation: g }]
        );
        assert!(s
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("rank 1 used 0 ms")));
    }

    #[test]
    fn the_same_failure_five_times_in_a_row_is_refused_until_a_node_changes() {
        let mut s = sup();
        let now = Instant::now();
        let ready = Event::NodesChecked {
            check: NodeCheck::Ready,
            highest_generation: 0,
            running_generation: None,
            builds: vec![],
        };
        for i in 1..=SAME_FAILURE_LIMIT {
            let a = s.handle(ready.clone(), now);
            let [Action::StartRing { generation }] = a[..] else {
                panic!("attempt {i}: expected a start, got {a:?}")
            };
            s.handle(Event::RingStarted { generation }, now);
            s.handle(
                Event::RankExited {
                    generation,
                    rank: 0,
                    kind: ExitKind::Failed,
                    detail: format!("exited with status 134 (pid {}); GGML_ASSERT", 1000 + i),
                },
                now,
            );
            let a = s.handle(Event::RingStopped { generation }, now);
            if i < SAME_FAILURE_LIMIT {
                assert!(
                    matches!(a[..], [Action::Backoff { .. }]),
                    "attempt {i}: {a:?}"
                );
                s.handle(Event::BackoffElapsed, now);
            } else {
                assert!(a.is_empty(), "no more restarts: {a:?}");
            }
        }
        assert_eq!(s.phase, Phase::Refused);
        let why = s.reason.clone().unwrap_or_default();
        assert!(
            why.contains("failed the same way 5 times") && why.contains("GGML_ASSERT"),
            "{why}"
        );
        assert!(
            s.handle(ready.clone(), now).is_empty(),
            "checks do not restart it"
        );
        assert_eq!(
            s.handle(Event::NodeChanged { rank: 0 }, now),
            vec![Action::CheckNodes {
                after: Duration::ZERO
            }]
        );
        assert!(matches!(
            s.handle(ready, now)[..],
            [Action::StartRing { .. }]
        ));
    }

    #[test]
    fn different_failures_keep_restarting() {
        let mut s = sup();
        let now = Instant::now();
        for i in 0..(SAME_FAILURE_LIMIT * 2) {
            let g = serve(&mut s, now);
            // Alternating ranks: not the same failure twice in a row.
            let a = s.handle(
                Event::RankExited {
                    generation: g,
                    rank: 1 + (i % 2),
                    kind: ExitKind::Failed,
                    detail: "exited".into(),
                },
                now,
            );
            assert_eq!(a, vec![Action::StopRing { generation: g }]);
            let a = s.handle(Event::RingStopped { generation: g }, now);
            assert!(matches!(a[..], [Action::Backoff { .. }]), "{a:?}");
            s.handle(Event::BackoffElapsed, now);
        }
    }
}

#[cfg(test)]
mod name_tests {
    use super::Phase;

    /// The names shown in messages are the ones the JSON APIs use.
    #[test]
    fn as_str_equals_the_serde_names() {
        for p in Phase::ALL {
            assert_eq!(serde_json::to_value(p).expect("json"), p.as_str());
        }
    }
}
