//! The coordinator: runs inside the rank-0 agent. It checks the nodes, plans and starts the ring,
//! watches every rank, restarts the whole ring when any rank fails, and serves the public API.
//!
//! Decisions live in the pure [`state::Supervisor`]; this module performs its actions (HTTP calls
//! to node agents, health polls, timers) and turns what it observes into events.

pub mod api;
pub mod check;
pub mod client;
pub mod compat;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::{check_layer_total, Config, EngineKind};
use crate::engine::ExitKind;
use crate::node::facts::{HashState, NodeFacts};
use crate::node::{ExitReport, RankPhase, RankStatus};
use crate::plan::plan;
use client::NodeClient;
use state::{Action, Event, NodeCheck, Phase, Supervisor};

/// What `/api/v1/cluster` shows and what the API layer consults before proxying.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterView {
    pub cluster: String,
    pub engine: EngineKind,
    pub model: ModelView,
    pub phase: Phase,
    pub generation: u64,
    /// Why the ring is not serving.
    pub reason: Option<String>,
    /// Failed attempts since the ring last served stably.
    pub failures: u32,
    /// Ring restarts since this coordinator started.
    pub restarts: u64,
    pub warnings: Vec<String>,
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelView {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub rank: u32,
    pub address: String,
    pub agent: SocketAddr,
    pub reachable: bool,
    /// idle, running, exited, failed_to_start, or unreachable.
    pub state: String,
    pub generation: u64,
    pub pid: Option<u32>,
    pub unit: Option<String>,
    pub listening: bool,
    pub command: Option<String>,
    pub exit: Option<ExitReport>,
    pub last_error: Option<String>,
    pub hostname: Option<String>,
    pub engine_version: Option<String>,
    pub engine_package: Option<crate::pacman::InstalledPackage>,
    pub model_hash: Option<HashState>,
}

impl ClusterView {
    pub fn initial(config: &Config) -> ClusterView {
        ClusterView {
            cluster: config.cluster.name.clone(),
            engine: config.cluster.engine,
            model: ModelView {
                name: config.model.name.clone(),
                path: config.model.path.clone(),
            },
            phase: Phase::WaitingForNodes,
            generation: 0,
            reason: Some("checking the nodes".into()),
            failures: 0,
            restarts: 0,
            warnings: vec![],
            nodes: config
                .nodes
                .iter()
                .map(|n| NodeView {
                    rank: n.rank,
                    address: n.address.to_string(),
                    agent: n.agent_addr(),
                    reachable: false,
                    state: "unknown".into(),
                    generation: 0,
                    pid: None,
                    unit: None,
                    listening: false,
                    command: None,
                    exit: None,
                    last_error: None,
                    hostname: None,
                    engine_version: None,
                    engine_package: None,
                    model_hash: None,
                })
                .collect(),
        }
    }

    pub fn serving(&self) -> bool {
        self.phase == Phase::Serving
    }

    /// Seconds a client should wait before retrying, from what the ring is doing.
    pub fn retry_after_s(&self) -> u64 {
        match self.phase {
            Phase::Refused => 30,
            _ => 5,
        }
    }
}

enum Msg {
    Event(Event),
    Node {
        rank: usize,
        status: Box<Result<RankStatus, String>>,
    },
    Facts(Vec<Result<NodeFacts, String>>, Vec<String>),
}

/// What the driver remembers of a node between messages.
#[derive(Default)]
struct Track {
    status: Option<RankStatus>,
    unreachable_since: Option<Instant>,
    error: Option<String>,
}

pub struct Coordinator {
    config: Arc<Config>,
    client: NodeClient,
    view: watch::Sender<ClusterView>,
}

impl Coordinator {
    pub fn new(config: Arc<Config>, client: NodeClient) -> Coordinator {
        let (view, _) = watch::channel(ClusterView::initial(&config));
        Coordinator {
            config,
            client,
            view,
        }
    }

    pub fn view(&self) -> watch::Receiver<ClusterView> {
        self.view.subscribe()
    }

    /// Supervises the ring until `shutdown` turns true. Then it stops every rank when
    /// `stop_ring_on_exit`; under systemd it leaves the ring serving for the next coordinator to
    /// adopt, so restarting the head's agent does not interrupt inference.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>, stop_ring_on_exit: bool) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let mut watchers = Vec::new();
        for (rank, node) in self.config.nodes.iter().enumerate() {
            watchers.push(tokio::spawn(watch_node(
                self.client.clone(),
                rank,
                node.agent_addr(),
                tx.clone(),
            )));
        }
        let s = &self.config.supervision;
        let (mut sup, actions) = Supervisor::new(
            Duration::from_millis(s.backoff_initial_ms),
            Duration::from_millis(s.backoff_max_ms),
        );
        let node_timeout = Duration::from_secs(s.node_timeout_s);
        let mut tracks: Vec<Track> = self.config.nodes.iter().map(|_| Track::default()).collect();
        let mut restarts = 0u64;
        self.perform(actions, &tx, &tracks);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let mut events = Vec::new();
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                _ = tick.tick() => {
                    for (rank, t) in tracks.iter().enumerate() {
                        if let Some(since) = t.unreachable_since {
                            if since.elapsed() >= node_timeout {
                                events.push(Event::NodeLost {
                                    rank: rank as u32,
                                    detail: format!("agent unreachable for {}s: {}", since.elapsed().as_secs(), t.error.as_deref().unwrap_or("?")),
                                });
                            }
                        }
                    }
                }
                Some(msg) = rx.recv() => match msg {
                    Msg::Event(e) => events.push(e),
                    Msg::Node { rank, status } => {
                        let t = &mut tracks[rank];
                        match *status {
                            Ok(st) => {
                                // An answer produced before one we already have must not win.
                                let newer = t.status.as_ref().is_none_or(|old| old.instance != st.instance || st.version >= old.version);
                                t.unreachable_since = None;
                                t.error = None;
                                if newer {
                                    if let Some(e) = rank_event(&sup, rank as u32, &st) {
                                        events.push(e);
                                    }
                                    t.status = Some(st);
                                }
                            }
                            Err(e) => {
                                t.unreachable_since.get_or_insert_with(Instant::now);
                                t.error = Some(e);
                            }
                        }
                    }
                    Msg::Facts(facts, warnings) => {
                        self.view.send_modify(|v| {
                            v.warnings = warnings;
                            for (n, f) in v.nodes.iter_mut().zip(&facts) {
                                if let Ok(f) = f {
                                    n.hostname = Some(f.hostname.clone());
                                    n.engine_version = f.engine_version.clone();
                                    n.engine_package = f.engine_package.clone();
                                    n.model_hash = Some(f.model.hash.clone());
                                }
                            }
                        });
                    }
                },
            }
            for e in events {
                let before = sup.phase;
                let generation = sup.generation;
                let actions = sup.handle(e.clone(), Instant::now());
                if sup.phase != before {
                    match sup.phase {
                        Phase::Serving => tracing::info!(generation, "ring serving"),
                        Phase::Stopping => {
                            restarts += 1;
                            tracing::warn!(
                                generation,
                                reason = sup.reason.as_deref().unwrap_or(""),
                                "ring failed; stopping every rank to restart it"
                            );
                        }
                        Phase::Refused => tracing::error!(
                            reason = sup.reason.as_deref().unwrap_or(""),
                            "ring refused"
                        ),
                        p => {
                            tracing::info!(phase = ?p, generation = sup.generation, reason = sup.reason.as_deref().unwrap_or(""), "ring phase")
                        }
                    }
                }
                self.publish(&sup, &tracks, restarts);
                self.perform(actions, &tx, &tracks);
            }
            self.publish(&sup, &tracks, restarts);
        }
        for w in watchers {
            w.abort();
        }
        if stop_ring_on_exit {
            tracing::info!("coordinator stopping every rank");
            stop_ring(&self.config, &self.client).await;
        } else {
            tracing::info!(
                "coordinator exiting; the ring's units keep running for the next coordinator"
            );
        }
    }

    fn publish(&self, sup: &Supervisor, tracks: &[Track], restarts: u64) {
        self.view.send_if_modified(|v| {
            let before = v.clone();
            v.phase = sup.phase;
            v.generation = sup.generation;
            v.reason = sup.reason.clone();
            v.failures = sup.failures;
            v.restarts = restarts;
            for (n, t) in v.nodes.iter_mut().zip(tracks) {
                n.reachable = t.unreachable_since.is_none() && t.status.is_some();
                if let Some(st) = &t.status {
                    n.state = st.phase.as_str().into();
                    n.generation = st.generation;
                    n.pid = st.pid;
                    n.unit = st.unit.clone();
                    n.listening = st.listening;
                    n.command = st.command.clone();
                    n.exit = st.exit.clone();
                    n.last_error = st.last_error.clone();
                }
                if t.unreachable_since.is_some() {
                    n.state = "unreachable".into();
                    n.last_error = t.error.clone();
                }
            }
            *v != before
        });
    }

    fn perform(&self, actions: Vec<Action>, tx: &mpsc::UnboundedSender<Msg>, tracks: &[Track]) {
        for action in actions {
            let config = self.config.clone();
            let client = self.client.clone();
            let tx = tx.clone();
            let view = self.view.subscribe();
            match action {
                Action::CheckNodes { after } => {
                    let seen = tracks
                        .iter()
                        .filter_map(|t| t.status.as_ref().map(|s| s.generation))
                        .max()
                        .unwrap_or(0);
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let (check, facts, warnings) = check_all(&config, &client).await;
                        let client = &client;
                        let statuses: Vec<Option<RankStatus>> =
                            join_all(config.nodes.iter().map(|n| async move {
                                client
                                    .rank_status(n.agent_addr(), None, Duration::from_secs(5))
                                    .await
                                    .ok()
                            }))
                            .await;
                        let highest = statuses
                            .iter()
                            .flatten()
                            .map(|s| s.generation)
                            .chain([seen])
                            .max()
                            .unwrap_or(0);
                        let _ = tx.send(Msg::Facts(facts, warnings));
                        let _ = tx.send(Msg::Event(Event::NodesChecked {
                            check,
                            highest_generation: highest,
                            running_generation: check::running_generation(&config, &statuses),
                        }));
                    });
                }
                Action::StartRing { generation } => {
                    tokio::spawn(async move {
                        let ev = match start_ring(&config, &client, generation, &tx).await {
                            Ok(()) => Event::RingStarted { generation },
                            Err(error) => Event::StartFailed { generation, error },
                        };
                        let _ = tx.send(Msg::Event(ev));
                    });
                }
                Action::WaitReady { generation } => {
                    tokio::spawn(async move {
                        let ev = wait_ready(&config, generation, view).await;
                        if let Some(ev) = ev {
                            let _ = tx.send(Msg::Event(ev));
                        }
                    });
                }
                Action::StopRing { generation } => {
                    tokio::spawn(async move {
                        stop_ring(&config, &client).await;
                        let _ = tx.send(Msg::Event(Event::RingStopped { generation }));
                    });
                }
                Action::Backoff { delay } => {
                    tracing::info!(
                        seconds = delay.as_secs_f64(),
                        "backing off before restarting the ring"
                    );
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = tx.send(Msg::Event(Event::BackoffElapsed));
                    });
                }
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

/// Follows one node's rank status with long polls, reporting every change and every failure.
async fn watch_node(
    client: NodeClient,
    rank: usize,
    addr: SocketAddr,
    tx: mpsc::UnboundedSender<Msg>,
) {
    let mut after: Option<u64> = None;
    loop {
        let res = client
            .rank_status(addr, after, Duration::from_secs(20))
            .await;
        let failed = res.is_err();
        let status = res.map_err(|e| format!("{e:#}"));
        // After a failure ask without `after`: a restarted agent counts versions from zero again.
        after = status.as_ref().ok().map(|st| st.version);
        if tx
            .send(Msg::Node {
                rank,
                status: Box::new(status),
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

/// Fetches every node's facts and judges them, including the model's layer count for prima's
/// explicit windows (the head reads the GGUF header; it has the model in both engines).
async fn check_all(
    config: &Config,
    client: &NodeClient,
) -> (NodeCheck, Vec<Result<NodeFacts, String>>, Vec<String>) {
    let facts: Vec<Result<NodeFacts, String>> = join_all(config.nodes.iter().map(|n| async move {
        client
            .facts(n.agent_addr())
            .await
            .map_err(|e| format!("{e:#}"))
    }))
    .await;
    let (mut check, warnings) = check::check_nodes(config, &facts);
    if check == NodeCheck::Ready {
        if let Some(windows) = &config.model.layer_windows {
            match crate::gguf::read_info(&config.model.path) {
                Ok(info) => {
                    if let Err(e) = check_layer_total(windows, info.block_count) {
                        check = NodeCheck::Refused(format!("{}: {e}", config.source.display()));
                    }
                }
                Err(e) => {
                    check = NodeCheck::Refused(format!(
                        "cannot check layer_windows against the model: {e:#}"
                    ))
                }
            }
        }
    }
    (check, facts, warnings)
}

/// Starts generation `generation`. llama.cpp's head connects to its rpc workers once, at start,
/// so workers must listen first; prima's ranks may start in any order.
async fn start_ring(
    config: &Config,
    client: &NodeClient,
    generation: u64,
    tx: &mpsc::UnboundedSender<Msg>,
) -> Result<(), String> {
    let plan = plan(config, generation, None)?;
    let apply = |idx: usize| {
        let spec = plan.ranks[idx].clone();
        let addr = config.nodes[idx].agent_addr();
        async move {
            let st = client
                .apply(addr, &spec)
                .await
                .map_err(|e| format!("rank {idx} ({addr}): {e:#}"))?;
            let _ = tx.send(Msg::Node {
                rank: idx,
                status: Box::new(Ok(st.clone())),
            });
            if st.phase != RankPhase::Running {
                return Err(format!(
                    "rank {idx} ({addr}): {}",
                    st.last_error.unwrap_or_else(|| format!("{:?}", st.phase))
                ));
            }
            Ok(st)
        }
    };
    let first: Vec<usize> = match config.cluster.engine {
        EngineKind::LlamaRpc => (1..config.world()).collect(),
        EngineKind::Prima => (0..config.world()).collect(),
    };
    let started = join_all(first.iter().map(|&i| apply(i))).await;
    let mut statuses = Vec::new();
    for r in started {
        statuses.push(r?);
    }
    if config.cluster.engine == EngineKind::LlamaRpc {
        let deadline = Instant::now() + Duration::from_secs(60);
        for (st, &idx) in statuses.iter().zip(&first) {
            let addr = config.nodes[idx].agent_addr();
            let mut cur = st.clone();
            while !cur.listening {
                if cur.phase != RankPhase::Running || cur.generation != generation {
                    return Err(format!(
                        "rank {idx} ({addr}) stopped before listening: {}",
                        cur.last_error.unwrap_or_default()
                    ));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "rank {idx} ({addr}): rpc server not listening after 60 s"
                    ));
                }
                cur = client
                    .rank_status(addr, Some(cur.version), left.min(Duration::from_secs(5)))
                    .await
                    .map_err(|e| format!("rank {idx} ({addr}): {e:#}"))?;
            }
        }
        apply(0).await?;
    }
    Ok(())
}

/// Polls rank 0's `/health` on loopback until it answers 200. Returns None if the ring moved on.
async fn wait_ready(
    config: &Config,
    generation: u64,
    view: watch::Receiver<ClusterView>,
) -> Option<Event> {
    let url = format!("http://127.0.0.1:{}/health", config.ports.server);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(config.supervision.ready_timeout_s);
    loop {
        {
            let v = view.borrow();
            if v.generation != generation || v.phase != Phase::WaitingReady {
                return None;
            }
        }
        if let Ok(r) = http.get(&url).send().await {
            if r.status().is_success() {
                return Some(Event::Ready { generation });
            }
        }
        if Instant::now() >= deadline {
            return Some(Event::ReadyTimedOut { generation });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops every rank (all nodes at once); unreachable nodes are skipped: they stop an old
/// generation themselves when they receive the next one.
async fn stop_ring(config: &Config, client: &NodeClient) {
    let results = join_all(config.nodes.iter().map(|n| client.stop(n.agent_addr()))).await;
    for (n, r) in config.nodes.iter().zip(results) {
        if let Err(e) = r {
            tracing::warn!(rank = n.rank, error = %format!("{e:#}"), "could not stop rank");
        }
    }
}
