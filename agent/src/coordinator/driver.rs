//! The driver loop: turns what it observes (node status long polls, action outcomes, timers)
//! into [`Event`]s for the pure [`Supervisor`], performs the [`Action`]s it returns, and
//! publishes the [`ClusterView`].
//!
//! Every task it spawns (node watchers, actions) is tracked and cancelled on shutdown, and
//! generation-scoped actions are cancelled when the ring they were for is stopped, so nothing
//! outlives the coordinator or keeps probing a ring that is gone. Node checks are single-flight:
//! a new check replaces a pending one, so reacting to a node's change never multiplies them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actions;
use super::check::{running_generation, Build, NodeReport};
use super::client::Nodes;
use super::events::{self, Events, Narrator};
use super::metrics::{Metrics, RankSample};
use super::placement;
use super::progress::{Activity, CpuSample, StallJudge};
use super::state::{Action, Event, Phase, Supervisor};
use super::switch::{self, Decision, ModelGate};
use super::view::PlacementView;
use super::view::{ClusterView, Track};
use crate::config::Config;
use crate::proto::{ExitKind, Placement, PlacementSource, RankPhase, RankPlacement, RankStatus};

enum Msg {
    Event(Event),
    Node {
        rank: usize,
        status: Box<anyhow::Result<RankStatus>>,
    },
    Facts(Vec<NodeReport>, Vec<String>),
    /// CPU samples of every rank, in rank order, for `generation`.
    Usage(u64, Vec<CpuSample>),
    ProbeDone,
    /// Where the next (or current) ring's placement comes from.
    Placement(Option<PlacementView>),
    /// What Halda chose for `generation`, read from rank 0 once the ring served.
    PlacementFound(u64, Placement),
}

/// Liveness of the loop, read by the systemd watchdog: the time of the loop's last turn.
#[derive(Clone)]
pub struct Heartbeat(Arc<std::sync::Mutex<std::time::Instant>>);

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat(Arc::new(std::sync::Mutex::new(std::time::Instant::now())))
    }
}

impl Heartbeat {
    fn beat(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    /// How long ago the loop last turned.
    pub fn age(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// The loop turns at least this often, so a healthy coordinator always has a fresh heartbeat.
const TICK: Duration = Duration::from_secs(1);

pub struct Driver {
    pub config: Arc<Config>,
    pub nodes: Arc<dyn Nodes>,
    pub view: watch::Sender<ClusterView>,
    pub heartbeat: Heartbeat,
    /// Work in flight at rank 0, shared with the API.
    pub activity: Activity,
    /// What happened to the ring, for `/api/v1/events`.
    pub events: Events,
    /// Restarts and rank usage, for `/metrics`.
    pub metrics: Metrics,
    /// Which model the ring runs and who waits for which (shared with the gateway).
    pub gate: ModelGate,
}

/// A switch under way, with the times of its steps for the `switch` event.
struct SwitchRun {
    from: Option<usize>,
    to: usize,
    reason: String,
    began: std::time::Instant,
    /// In-flight requests finished (or the grace ran out) and the stop was asked for.
    drained: Option<std::time::Instant>,
    stopped: Option<std::time::Instant>,
}

/// The driver's mutable state within one run.
struct Run {
    sup: Supervisor,
    tracks: Vec<Track>,
    restarts: u64,
    tx: mpsc::UnboundedSender<Msg>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Cancels the pending node check when a newer one is asked for.
    pending_check: Option<CancellationToken>,
    /// Cancels the start, readiness and progress probes of the current generation when it is
    /// stopped.
    ring_tasks: CancellationToken,
    judge: StallJudge,
    /// A CPU sample round is out.
    sampling: bool,
    /// A probe is out.
    probing: bool,
    narrator: Narrator,
    switch: Option<SwitchRun>,
    /// Model deliveries already told as events.
    transfers: super::delivery::Seen,
    /// A switch to this model waits for its file's delivery (said once in the log).
    waiting_delivery: Option<usize>,
}

impl Driver {
    /// Supervises the ring until `shutdown` is cancelled. Then it stops every rank when
    /// `stop_ring_on_exit`; under systemd it leaves the ring serving for the next coordinator to
    /// adopt, so restarting the head's agent does not interrupt inference.
    pub async fn run(mut self, shutdown: CancellationToken, stop_ring_on_exit: bool) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let s = &self.config.supervision;
        let (mut sup, first) = Supervisor::new(
            Duration::from_millis(s.backoff_initial_ms),
            Duration::from_millis(s.backoff_max_ms),
        );
        sup.restart_on_upgrade = s.restart_on_upgrade;
        let mut restart_signal = restart_requests();
        let node_timeout = Duration::from_secs(s.node_timeout_s);
        let mut run = Run {
            sup,
            tracks: vec![Track::default(); self.config.nodes.len()],
            restarts: 0,
            tx,
            tasks: TaskTracker::new(),
            shutdown: shutdown.clone(),
            pending_check: None,
            ring_tasks: shutdown.child_token(),
            judge: StallJudge::new(
                Duration::from_secs(s.stall_timeout_s),
                self.config.nodes.len(),
            ),
            sampling: false,
            probing: false,
            narrator: Narrator::default(),
            switch: None,
            transfers: Default::default(),
            waiting_delivery: None,
        };
        let mut gate_changed = self.gate.subscribe();
        for (rank, node) in self.config.nodes.iter().enumerate() {
            let (nodes, tx, stop) = (self.nodes.clone(), run.tx.clone(), shutdown.clone());
            let addr = node.agent_addr();
            run.tasks.spawn(async move {
                tokio::select! {
                    _ = watch_node(nodes.as_ref(), rank, addr, &tx) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        {
            let (config, nodes, metrics) = (
                self.config.clone(),
                self.nodes.clone(),
                self.metrics.clone(),
            );
            let stop = shutdown.clone();
            run.tasks.spawn(async move {
                tokio::select! {
                    _ = sample_ranks(&config, nodes.as_ref(), &metrics) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        self.perform(&mut run, first);
        let mut tick = tokio::time::interval(TICK);
        loop {
            self.heartbeat.beat();
            let mut events = Vec::new();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(()) = recv_signal(&mut restart_signal) => {
                    tracing::info!("SIGUSR2: restarting the ring on the nodes' build if every node has the same one");
                    events.push(Event::RestartRequested);
                }
                _ = gate_changed.changed() => {}
                _ = tick.tick() => {
                    self.watch_progress(&mut run, &mut events);
                    for (rank, t) in run.tracks.iter().enumerate() {
                        if let Some((since, error)) = &t.unreachable {
                            if since.elapsed() >= node_timeout {
                                events.push(Event::NodeLost {
                                    rank: rank as u32,
                                    detail: format!("agent unreachable for {}s: {error}", since.elapsed().as_secs()),
                                });
                            }
                        }
                    }
                }
                Some(msg) = rx.recv() => match msg {
                    Msg::Event(e) => events.push(e),
                    Msg::Node { rank, status } => observe(&mut run, rank, *status, &mut events),
                    Msg::Facts(facts, warnings) => {
                        for (rank, t) in super::delivery::changes(&mut run.transfers, &facts) {
                            self.emit(transfer_event(rank, &t));
                        }
                        self.view.send_modify(|v| v.update_facts(&facts, warnings));
                    }
                    Msg::Usage(generation, samples) => {
                        run.sampling = false;
                        if generation == run.sup.generation {
                            for (rank, s) in samples.into_iter().enumerate() {
                                run.judge.record(rank, s);
                            }
                        }
                    }
                    Msg::ProbeDone => run.probing = false,
                    Msg::Placement(p) => self.set_placement(&run, p),
                    Msg::PlacementFound(generation, found) => {
                        if generation == run.sup.generation {
                            self.remember(&run, found);
                        }
                    }
                },
            }
            for e in events {
                self.feed(&mut run, e);
            }
            self.steer(&mut run);
            self.publish(&run);
        }
        run.tasks.close();
        // Watchers and actions see `shutdown` cancelled and end; wait for them so none is cut
        // off halfway through a request to a node.
        if tokio::time::timeout(Duration::from_secs(10), run.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("coordinator tasks still running 10 s after shutdown");
        }
        if stop_ring_on_exit {
            tracing::info!("coordinator stopping every rank");
            actions::stop_ring(&self.config, self.nodes.as_ref()).await;
        } else {
            tracing::info!(
                "coordinator exiting; the ring's units keep running for the next coordinator"
            );
        }
    }

    /// Hands one event to the supervisor and performs what it decides.
    fn feed(&self, run: &mut Run, e: Event) {
        let before = run.sup.phase;
        let actions = run
            .sup
            .handle(e.clone(), tokio::time::Instant::now().into_std());
        for draft in run.narrator.transition(&e, before, &run.sup) {
            self.emit(draft);
        }
        if run.sup.phase != before {
            log_phase(&run.sup, &mut run.restarts);
            if before == Phase::Stopping {
                if let Some(sw) = run.switch.as_mut().filter(|s| s.stopped.is_none()) {
                    sw.stopped = Some(std::time::Instant::now());
                }
            }
            if run.sup.phase == Phase::Serving {
                self.on_serving(run);
            }
            run.judge = StallJudge::new(
                Duration::from_secs(self.config.supervision.stall_timeout_s),
                self.config.nodes.len(),
            );
        }
        self.publish(run);
        if run.sup.phase == Phase::Serving && run.sup.phase != before {
            // After the view says serving: a request the gate lets through reads the view next.
            self.gate.serving(self.config.loaded);
            if let Some(sw) = run.switch.take() {
                self.switched(&run.sup, sw);
            }
        }
        self.perform(run, actions);
    }

    /// Moves the ring between models as [`switch::decide`] says: begins a switch, finishes its
    /// drain (all requests for the old model done, or the grace over) by stopping the ring with
    /// the new model's config, unloads an idle ring, loads one a request waits for.
    fn steer(&mut self, run: &mut Run) {
        let sw = self.config.switching.clone();
        let now = std::time::Instant::now();
        let snap = self.gate.snapshot();
        if let Some(active) = run.switch.as_mut() {
            let grace = Duration::from_secs(sw.switch_grace_s);
            if active.drained.is_none() && (snap.passed == 0 || active.began.elapsed() >= grace) {
                active.drained = Some(now);
                if snap.passed > 0 {
                    tracing::warn!(
                        in_flight = snap.passed,
                        "switch grace over: stopping the ring under requests still in flight"
                    );
                }
                let to = active.to;
                let reason = format!(
                    "switching to model `{}` ({})",
                    self.gate.name(to),
                    active.reason
                );
                self.config = Arc::new(self.config.with_loaded(to));
                self.set_model_view();
                self.feed(run, Event::Switch { reason });
            }
            return;
        }
        let decision = switch::decide(
            &snap,
            now,
            Duration::from_secs(sw.min_residency_s),
            sw.idle_unload_s.map(Duration::from_secs),
        );
        match decision {
            Decision::Nothing => {}
            Decision::Hold { until, .. } => self.gate.hold(until),
            Decision::Switch { to, .. } if self.delivery_pending(run, to) => {}
            Decision::Switch { to, reason } => {
                run.waiting_delivery = None;
                tracing::info!(
                    from = self.gate.name(snap.loaded),
                    to = self.gate.name(to),
                    "switching the ring to another model"
                );
                self.gate.begin(to);
                run.switch = Some(SwitchRun {
                    from: Some(snap.loaded),
                    to,
                    reason,
                    began: now,
                    drained: None,
                    stopped: None,
                });
                // The drain may be over at once (nothing in flight).
                self.steer(run);
            }
            Decision::Unload => {
                tracing::info!(
                    model = self.gate.name(snap.loaded),
                    "no requests for idle_unload_s: stopping the ring"
                );
                self.gate.unloaded();
                self.emit(events::Draft {
                    generation: Some(run.sup.generation),
                    rank: None,
                    message: format!(
                        "unloading model `{}`: no requests for {} s",
                        self.gate.name(snap.loaded),
                        sw.idle_unload_s.unwrap_or(0)
                    ),
                    detail: switch_detail(serde_json::json!({
                        "from": self.gate.name(snap.loaded),
                        "to": null,
                        "reason": "idle",
                    })),
                });
                self.feed(run, Event::Unload);
            }
            Decision::Load { model } => {
                self.gate.begin(model);
                self.config = Arc::new(self.config.with_loaded(model));
                self.set_model_view();
                run.switch = Some(SwitchRun {
                    from: None,
                    to: model,
                    reason: "a request arrived for the unloaded ring".into(),
                    began: now,
                    drained: Some(now),
                    stopped: Some(now),
                });
                self.feed(run, Event::Load);
            }
        }
    }

    /// Whether model `to`'s file is still arriving on some node (logged once per wait): the
    /// switch begins when it is in place, and the loaded model serves meanwhile.
    fn delivery_pending(&self, run: &mut Run, to: usize) -> bool {
        let why = {
            let v = self.view.borrow();
            super::delivery::pending(
                v.nodes.iter().filter_map(|n| n.facts.as_ref()),
                to,
                self.config.loaded,
            )
        };
        match why {
            Some(why) => {
                if run.waiting_delivery != Some(to) {
                    run.waiting_delivery = Some(to);
                    tracing::info!(to = self.gate.name(to), %why, "a switch waits for the model's delivery; the loaded model serves on");
                }
                true
            }
            None => false,
        }
    }

    /// The view's model follows the loaded one.
    fn set_model_view(&self) {
        let m = self.config.model();
        self.view.send_modify(|v| {
            v.model.name = m.name.clone();
            v.model.path = m.path.clone();
        });
    }

    /// A switch is done: the `switch` event with its step times.
    fn switched(&self, sup: &Supervisor, sw: SwitchRun) {
        let now = std::time::Instant::now();
        let ms = |a: Option<std::time::Instant>, b: Option<std::time::Instant>| match (a, b) {
            (Some(a), Some(b)) => {
                serde_json::json!(b.saturating_duration_since(a).as_millis() as u64)
            }
            _ => serde_json::Value::Null,
        };
        let from = sw.from.map(|m| self.gate.name(m).to_string());
        let to = self.gate.name(sw.to).to_string();
        let fields = serde_json::json!({
            "from": from,
            "to": to,
            "reason": sw.reason,
            "drain_ms": ms(Some(sw.began), sw.drained),
            "stop_ms": ms(sw.drained, sw.stopped),
            "start_ms": ms(sw.stopped, Some(now)),
            "total_ms": ms(Some(sw.began), Some(now)),
        });
        tracing::info!(%fields, "model switch done");
        self.view.send_modify(|v| v.switches += 1);
        self.emit(events::Draft {
            generation: Some(sup.generation),
            rank: None,
            message: format!(
                "switched {} to model `{to}` in {} ms",
                from.map(|f| format!("from model `{f}`"))
                    .unwrap_or_else(|| "the unloaded ring".into()),
                sw.began.elapsed().as_millis()
            ),
            detail: switch_detail(fields),
        });
    }

    /// While serving: samples CPU time while work waits without output, asks the judge whether
    /// the ring is hung, and probes an idle ring through every rank now and then.
    fn watch_progress(&self, run: &mut Run, events: &mut Vec<Event>) {
        if run.sup.phase != Phase::Serving {
            return;
        }
        let now = tokio::time::Instant::now();
        let in_flight = self.activity.in_flight() > 0;
        let last = self.activity.last_progress();
        run.judge.forget_before(last);
        if let Some(detail) = run.judge.judge(now, in_flight, last) {
            events.push(Event::Stalled {
                generation: run.sup.generation,
                detail,
            });
            return;
        }
        let generation = run.sup.generation;
        if !run.sampling && run.judge.wants_samples(in_flight, now - last) {
            run.sampling = true;
            let (config, nodes) = (self.config.clone(), self.nodes.clone());
            Self::spawn(run, run.ring_tasks.clone(), async move {
                Some(Msg::Usage(
                    generation,
                    sample_cpu(&config, nodes.as_ref(), generation).await,
                ))
            });
        }
        let probe_every = Duration::from_secs(self.config.supervision.probe_interval_s);
        if !run.probing && !in_flight && now - self.activity.last_idle() >= probe_every {
            run.probing = true;
            let work = self.activity.begin();
            let (port, nodes) = (self.config.ports.server, self.nodes.clone());
            Self::spawn(run, run.ring_tasks.clone(), async move {
                if let Err(e) = nodes.probe(port).await {
                    tracing::debug!(error = %format!("{e:#}"), "probe failed");
                }
                drop(work);
                Some(Msg::ProbeDone)
            });
        }
    }

    /// A Halda-placed prima ring serves: read the placement it chose from rank 0, to pass it
    /// explicitly on later starts.
    fn on_serving(&self, run: &Run) {
        let placed_by_halda = self
            .view
            .borrow()
            .placement
            .as_ref()
            .is_some_and(|p| p.source == PlacementSource::Halda);
        if !placed_by_halda || !self.config.model().remember_placement {
            return;
        }
        let generation = run.sup.generation;
        let (nodes, head) = (self.nodes.clone(), self.config.head().agent_addr());
        Self::spawn(run, run.ring_tasks.clone(), async move {
            match nodes.placement(head).await {
                Ok(RankPlacement {
                    placement: Some(p), ..
                }) => Some(Msg::PlacementFound(generation, p)),
                Ok(r) => {
                    tracing::warn!(
                        error = r.error.as_deref().unwrap_or(""),
                        "Halda's placement could not be read; the next start profiles again"
                    );
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "Halda's placement could not be read; the next start profiles again");
                    None
                }
            }
        });
    }

    /// Shows the ring's placement, telling the events when it changed.
    fn set_placement(&self, run: &Run, p: Option<PlacementView>) {
        let mut changed = None;
        self.view.send_modify(|v| {
            changed = events::placement(v.placement.as_ref(), p.as_ref(), run.sup.generation);
            v.placement = p;
        });
        if let Some(draft) = changed {
            self.emit(draft);
        }
    }

    fn emit(&self, draft: events::Draft) {
        let e = self.events.emit(draft);
        self.metrics.event(&e);
    }

    fn remember(&self, run: &Run, found: Placement) {
        match placement::save(&self.config, &found) {
            Ok(()) => {
                tracing::info!(windows = ?found.windows, "remembered Halda's placement for later starts")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep Halda's placement; the next start profiles again")
            }
        }
        self.set_placement(
            run,
            Some(PlacementView {
                source: PlacementSource::Halda,
                windows: Some(found.windows.clone()),
                gpu_layers: found.gpu_layers.clone(),
            }),
        );
    }

    fn publish(&self, run: &Run) {
        self.view
            .send_if_modified(|v| v.update(&run.sup, &run.tracks, run.restarts));
    }

    /// Runs `work` as a tracked task that ends early when `cancel` is cancelled, sending what it
    /// returns (if anything) back to the loop.
    fn spawn<F>(run: &Run, cancel: CancellationToken, work: F)
    where
        F: std::future::Future<Output = Option<Msg>> + Send + 'static,
    {
        let tx = run.tx.clone();
        run.tasks.spawn(async move {
            tokio::select! {
                msg = work => if let Some(m) = msg { let _ = tx.send(m); },
                _ = cancel.cancelled() => {}
            }
        });
    }

    fn perform(&self, run: &mut Run, actions: Vec<Action>) {
        for action in actions {
            let config = self.config.clone();
            let nodes = self.nodes.clone();
            match action {
                Action::CheckNodes { after } => {
                    if let Some(old) = run.pending_check.take() {
                        old.cancel();
                    }
                    let cancel = run.shutdown.child_token();
                    run.pending_check = Some(cancel.clone());
                    let seen = run
                        .tracks
                        .iter()
                        .filter_map(|t| t.status.as_ref().map(|s| s.generation))
                        .max()
                        .unwrap_or(0);
                    let tx = run.tx.clone();
                    // A serving ring's checks (upgrades) leave the placement it runs on shown.
                    let serving = run.sup.phase == Phase::Serving;
                    Self::spawn(run, cancel, async move {
                        tokio::time::sleep(after).await;
                        // Read anew each time: `forget-placement` applies to the next start.
                        let (source, remembered) = placement::source(&config);
                        if !serving {
                            let _ = tx.send(Msg::Placement(PlacementView::planned(
                                &config,
                                source,
                                remembered.as_ref(),
                            )));
                        }
                        let look =
                            actions::look_at_nodes(&config, nodes.as_ref(), remembered.as_ref())
                                .await;
                        let highest = look
                            .statuses
                            .iter()
                            .flatten()
                            .map(|s| s.generation)
                            .chain([seen])
                            .max()
                            .unwrap_or(0);
                        let builds = look.facts.iter().map(Build::of).collect();
                        let _ = tx.send(Msg::Facts(look.facts, look.warnings));
                        Some(Msg::Event(Event::NodesChecked {
                            builds,
                            check: look.check,
                            highest_generation: highest,
                            running_generation: running_generation(
                                &config,
                                &look.statuses,
                                remembered.as_ref(),
                            ),
                        }))
                    });
                }
                Action::StartRing { generation } => {
                    run.ring_tasks = run.shutdown.child_token();
                    let tx = run.tx.clone();
                    Self::spawn(run, run.ring_tasks.clone(), async move {
                        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
                        let forward = async {
                            while let Some((rank, st)) = seen_rx.recv().await {
                                let _ = tx.send(Msg::Node {
                                    rank,
                                    status: Box::new(Ok(st)),
                                });
                            }
                        };
                        let (source, remembered) = placement::source(&config);
                        let _ = tx.send(Msg::Placement(PlacementView::planned(
                            &config,
                            source,
                            remembered.as_ref(),
                        )));
                        let start = async {
                            let r = actions::start_ring(
                                &config,
                                nodes.as_ref(),
                                generation,
                                remembered.as_ref(),
                                &seen_tx,
                            )
                            .await;
                            drop(seen_tx);
                            r
                        };
                        let (result, ()) = tokio::join!(start, forward);
                        Some(Msg::Event(match result {
                            Ok(()) => Event::RingStarted { generation },
                            Err(error) => Event::StartFailed { generation, error },
                        }))
                    });
                }
                Action::WaitReady { generation } => {
                    let timeout = Duration::from_secs(config.supervision.ready_timeout_s);
                    Self::spawn(run, run.ring_tasks.clone(), async move {
                        let ready = actions::wait_ready(&config, nodes.as_ref(), timeout).await;
                        Some(Msg::Event(if ready {
                            Event::Ready { generation }
                        } else {
                            Event::ReadyTimedOut { generation }
                        }))
                    });
                }
                Action::StopRing { generation } => {
                    run.ring_tasks.cancel();
                    // Cancelled with the ring's tasks: neither comes back.
                    run.sampling = false;
                    run.probing = false;
                    Self::spawn(run, run.shutdown.child_token(), async move {
                        actions::stop_ring(&config, nodes.as_ref()).await;
                        Some(Msg::Event(Event::RingStopped { generation }))
                    });
                }
                Action::Backoff { delay } => {
                    tracing::info!(
                        seconds = delay.as_secs_f64(),
                        "backing off before restarting the ring"
                    );
                    Self::spawn(run, run.shutdown.child_token(), async move {
                        tokio::time::sleep(delay).await;
                        Some(Msg::Event(Event::BackoffElapsed))
                    });
                }
            }
        }
    }
}

/// A delivery that started, resumed, finished or failed, for `/api/v1/events` and the counter.
fn transfer_event(rank: u32, t: &crate::proto::TransferFact) -> events::Draft {
    use crate::proto::TransferState;
    let message = match t.state {
        TransferState::Running if t.resumed_from > 0 => format!(
            "rank {rank} resumes receiving model {} from rank {} at byte {}",
            t.model, t.from_rank, t.resumed_from
        ),
        TransferState::Running => format!(
            "rank {rank} receives model {} from rank {}",
            t.model, t.from_rank
        ),
        TransferState::Done => format!("rank {rank} {}", super::delivery::received(t)),
        TransferState::Failed => format!(
            "rank {rank} could not receive model {} from rank {}: {}",
            t.model,
            t.from_rank,
            t.error.as_deref().unwrap_or("no reason given")
        ),
    };
    let fields = match serde_json::to_value(t) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    events::Draft {
        generation: None,
        rank: Some(rank),
        message,
        detail: crate::proto::EventDetail::Transfer { fields },
    }
}

fn switch_detail(fields: serde_json::Value) -> crate::proto::EventDetail {
    crate::proto::EventDetail::Switch {
        fields: match fields {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
    }
}

fn log_phase(sup: &Supervisor, restarts: &mut u64) {
    let generation = sup.generation;
    let reason = sup.reason.as_deref().unwrap_or("");
    match sup.phase {
        Phase::Serving => tracing::info!(generation, "ring serving"),
        Phase::Stopping if sup.upgrade_restarting() => {
            *restarts += 1;
            tracing::info!(generation, reason, "restarting the ring for an upgrade");
        }
        Phase::Stopping => {
            *restarts += 1;
            tracing::warn!(
                generation,
                reason,
                "ring failed; stopping every rank to restart it"
            );
        }
        Phase::Refused => tracing::error!(reason, "ring refused"),
        p => tracing::info!(phase = p.as_str(), generation, reason, "ring phase"),
    }
}

/// SIGUSR2 (`llm-agent notify-upgrade --restart-ring`): the manual restart on a new build.
/// `None` where the signal cannot be watched (logged); the ring then restarts only by itself.
fn restart_requests() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGUSR2; `notify-upgrade --restart-ring` will not reach this coordinator");
            None
        }
    }
}

async fn recv_signal(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Takes in a node's answer. An answer produced before one already seen must not win; a node
/// whose facts changed (or whose agent restarted) is worth looking at again at once.
fn observe(
    run: &mut Run,
    rank: usize,
    status: anyhow::Result<RankStatus>,
    events: &mut Vec<Event>,
) {
    let t = &mut run.tracks[rank];
    match status {
        Ok(st) => {
            t.unreachable = None;
            let newer = t
                .status
                .as_ref()
                .is_none_or(|old| old.instance != st.instance || st.version >= old.version);
            if !newer {
                return;
            }
            // The first answer counts as a change too: the node may have finished hashing
            // between the last check's facts and this answer.
            let facts_changed = t.status.as_ref().is_none_or(|old| {
                old.instance != st.instance || old.facts_version != st.facts_version
            });
            if facts_changed {
                events.push(Event::NodeChanged { rank: rank as u32 });
            }
            if let Some(e) = rank_event(&run.sup, rank as u32, &st) {
                events.push(e);
            }
            t.status = Some(st);
        }
        Err(e) => {
            let error = format!("{e:#}");
            match &mut t.unreachable {
                Some((_, last)) => *last = error,
                None => t.unreachable = Some((tokio::time::Instant::now(), error)),
            }
        }
    }
}

/// Turns a node's reported status into a supervision event, when it means the rank is gone.
fn rank_event(sup: &Supervisor, rank: u32, st: &RankStatus) -> Option<Event> {
    if st.generation != sup.generation {
        return None;
    }
    match st.phase {
        RankPhase::Exited | RankPhase::FailedToStart => {
            let (kind, detail) = match &st.exit {
                Some(e) => (
                    e.kind,
                    st.last_error
                        .clone()
                        .unwrap_or_else(|| e.description.clone()),
                ),
                None => (
                    ExitKind::Failed,
                    st.last_error
                        .clone()
                        .unwrap_or_else(|| "failed to start".into()),
                ),
            };
            Some(Event::RankExited {
                generation: st.generation,
                rank,
                kind,
                detail,
            })
        }
        // Stopped by someone other than this coordinator while it should run.
        RankPhase::Idle if matches!(sup.phase, Phase::WaitingReady | Phase::Serving) => {
            Some(Event::RankExited {
                generation: st.generation,
                rank,
                kind: ExitKind::Failed,
                detail: "was stopped outside the coordinator".into(),
            })
        }
        _ => None,
    }
}

/// Every rank's CPU time now; a node that cannot say is an unknown sample, never progress.
async fn sample_cpu(config: &Config, nodes: &dyn Nodes, generation: u64) -> Vec<CpuSample> {
    futures_util::future::join_all(config.nodes.iter().map(|n| async move {
        let r = nodes.usage(n.agent_addr()).await;
        let at = tokio::time::Instant::now();
        match r {
            Ok(u) if u.generation != generation => CpuSample::Unknown {
                at,
                why: format!("its agent runs generation {}", u.generation),
            },
            Ok(u) => match u.cpu_usec {
                Some(cpu_usec) => CpuSample::Used { at, cpu_usec },
                None => CpuSample::Unknown {
                    at,
                    why: u.error.unwrap_or_else(|| "no CPU time reported".into()),
                },
            },
            Err(e) => CpuSample::Unknown {
                at,
                why: format!("agent unreachable: {e:#}"),
            },
        }
    }))
    .await
}

/// How often every rank's CPU time and memory are sampled for `/metrics`.
const RANK_SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Samples every rank's usage for `/metrics` until cancelled; a node that does not answer is
/// left out of that round.
async fn sample_ranks(config: &Config, nodes: &dyn Nodes, metrics: &Metrics) {
    let mut every = tokio::time::interval(RANK_SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let rounds = futures_util::future::join_all(
            config
                .nodes
                .iter()
                .map(|n| async move { (n.rank, nodes.usage(n.agent_addr()).await) }),
        )
        .await;
        metrics.set_ranks(
            rounds
                .into_iter()
                .filter_map(|(rank, r)| {
                    let u = r.ok()?;
                    Some((
                        rank,
                        RankSample {
                            cpu_usec: u.cpu_usec,
                            memory_bytes: u.memory_bytes,
                        },
                    ))
                })
                .collect(),
        );
    }
}

/// How long one long poll of a node's status waits for a change. Short, because a frozen agent
/// still accepts connections (the kernel does) and is only noticed when a poll times out: this
/// plus the client's margin is how soon an agent that stopped answering shows as unreachable.
const WATCH_WAIT: Duration = Duration::from_secs(5);

/// Follows one node's rank status with long polls, reporting every change and every failure.
async fn watch_node(
    nodes: &dyn Nodes,
    rank: usize,
    addr: std::net::SocketAddr,
    tx: &mpsc::UnboundedSender<Msg>,
) {
    let mut after: Option<u64> = None;
    loop {
        let res = nodes.rank_status(addr, after, WATCH_WAIT).await;
        let failed = res.is_err();
        // After a failure ask without `after`: a restarted agent counts versions from zero again.
        after = res.as_ref().ok().map(|st| st.version);
        if tx
            .send(Msg::Node {
                rank,
                status: Box::new(res),
            })
            .is_err()
        {
            return;
        }
        if failed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests;
