//! The node agent: one per machine (per rank). It reports facts about its node and runs the rank
//! the coordinator asks for, through a [`Runner`]. Desired state arrives generation-numbered, so
//! repeating a request is harmless and a late request from an older ring is refused.

pub mod api;
pub mod deliver;
pub mod facts;
mod listen;
pub mod rpc_cache;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::{Config, EngineKind};
use crate::engine::{self, LocalEngine};
use crate::plan::listen_ports;
use crate::proto::{
    self, ExitKind, ExitReport, KeyReport, LinkCheck, LinkReport, NodeFacts, RankPhase,
    RankPlacement, RankSpec, RankStatus, RankUsage,
};
use crate::runner::{RunEvent, Runner};
use facts::ModelHasher;

/// How long a link check waits for a peer to answer.
const LINK_TIMEOUT: Duration = Duration::from_secs(2);

/// What to do with a desired spec, given the current one. Pure.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Same generation and spec: nothing to do (the request was a retry).
    Keep,
    /// A newer generation: stop whatever runs and start this.
    Replace,
    Stale {
        current: u64,
    },
    Conflict,
}

pub fn decide(current: &RankStatus, desired: &RankSpec) -> Decision {
    match current.spec.as_ref() {
        None => Decision::Replace,
        Some(_) if desired.generation < current.generation => Decision::Stale {
            current: current.generation,
        },
        Some(spec) if desired.generation == current.generation => {
            if spec == desired {
                Decision::Keep
            } else {
                Decision::Conflict
            }
        }
        Some(_) => Decision::Replace,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("generation {desired} is older than the current generation {current}")]
    Stale { desired: u64, current: u64 },
    #[error("generation {0} was already applied with a different spec")]
    Conflict(u64),
    #[error("{0}")]
    Invalid(String),
}

pub struct NodeAgent {
    pub rank: u32,
    config: Arc<Config>,
    local: LocalEngine,
    runner: Arc<dyn Runner>,
    hasher: ModelHasher,
    status: watch::Sender<RankStatus>,
    reconcile: tokio::sync::Mutex<()>,
    network: std::sync::Mutex<Vec<KeyReport>>,
    tls: std::sync::OnceLock<Option<proto::TlsFact>>,
    /// llama-rpc workers with `model.rpc_cache`: the rpc server's tensor cache, and what its
    /// cleanup before the last start did.
    rpc_cache: Option<rpc_cache::RpcCache>,
    last_prune: std::sync::Mutex<Option<proto::RpcCachePrune>>,
    /// Model files fetched from other nodes ([`deliver`]).
    pub deliveries: deliver::Deliveries,
}

impl NodeAgent {
    /// Creates the agent and starts consuming the runner's exit events from `events`.
    pub fn new(
        config: Arc<Config>,
        rank: u32,
        runner: Arc<dyn Runner>,
        mut events: mpsc::UnboundedReceiver<RunEvent>,
    ) -> anyhow::Result<Arc<NodeAgent>> {
        let node = config.node(rank).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no [[node]] with rank = {rank}",
                config.source.display()
            )
        })?;
        let rpc_cache = (config.cluster.engine == EngineKind::LlamaRpc
            && rank != 0
            && config.model().rpc_cache)
            .then(|| {
                let max = config.model().rpc_cache_max_bytes.unwrap_or_else(|| {
                    rpc_cache::default_max_bytes(
                        std::fs::metadata(config.model_path(rank, config.model()))
                            .ok()
                            .map(|m| m.len()),
                    )
                });
                rpc_cache::RpcCache::new(&config.cluster.state_dir, rank, max)
            });
        let local = LocalEngine {
            binaries: config.binaries.clone(),
            engine_dir: node.engine_dir.clone(),
            workdir: config.cluster.state_dir.join(format!("rank{rank}")),
            rpc_cache: rpc_cache.as_ref().map(|c| c.root.clone()),
        };
        let (status, _) = watch::channel(RankStatus::idle(rank, rand::random()));
        let hasher = ModelHasher::with_store(
            config
                .cluster
                .state_dir
                .join(format!("rank{rank}.model-hashes.json")),
        );
        let agent = Arc::new(NodeAgent {
            rank,
            config,
            local,
            runner,
            hasher,
            status,
            reconcile: tokio::sync::Mutex::new(()),
            network: std::sync::Mutex::new(Vec::new()),
            tls: std::sync::OnceLock::new(),
            rpc_cache,
            last_prune: std::sync::Mutex::new(None),
            deliveries: deliver::Deliveries::default(),
        });
        let weak = Arc::downgrade(&agent);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match weak.upgrade() {
                    Some(a) => a.on_exit(ev),
                    None => break,
                }
            }
        });
        // A finished model hash changes the facts: say so in the status, which the coordinator
        // follows with a long poll, so it looks again at once instead of on its next timer.
        let weak = Arc::downgrade(&agent);
        let mut hashed = agent.hasher.finished();
        tokio::spawn(async move {
            while hashed.changed().await.is_ok() {
                match weak.upgrade() {
                    Some(a) => a.facts_changed(),
                    None => break,
                }
            }
        });
        Ok(agent)
    }

    pub fn status(&self) -> RankStatus {
        self.status.borrow().clone()
    }

    /// `llm-agent notify-upgrade` (the pacman hook) sends SIGUSR1 after a package upgrade: the
    /// facts (engine build, package) are read anew on every request, so saying that they
    /// changed is enough for the coordinator to look. SIGUSR2 is the head's manual ring restart
    /// (the coordinator watches it); watched here too, so that it never kills an agent without a
    /// coordinator (the signal's default action).
    pub fn follow_upgrade_signals(self: &Arc<Self>) {
        use tokio::signal::unix::{signal, SignalKind};
        let (usr1, usr2) = match (
            signal(SignalKind::user_defined1()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot watch SIGUSR1/SIGUSR2; upgrades are noticed by the coordinator's periodic check only");
                return;
            }
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let (mut usr1, mut usr2) = (usr1, usr2);
            loop {
                tokio::select! {
                    Some(()) = usr1.recv() => match weak.upgrade() {
                        Some(a) => {
                            tracing::info!(rank = a.rank, "SIGUSR1: packages changed; facts will be read anew");
                            a.facts_changed();
                        }
                        None => return,
                    },
                    Some(()) = usr2.recv() => {
                        if weak.strong_count() == 0 {
                            return;
                        }
                    }
                    else => return,
                }
            }
        });
    }

    /// Tries every connection this rank's engine will open (see [`crate::plan::link_targets`]),
    /// planned from this node's own config: a peer that answers, even with a refusal (nothing
    /// listens before the ring starts), is reachable; a timeout or a routing error is not.
    pub async fn check_links(&self) -> Result<LinkReport, String> {
        let plan = crate::plan::plan(&self.config, self.config.model(), 0, None)?;
        let spec = plan
            .for_node(self.rank)
            .cloned()
            .ok_or_else(|| format!("the config plans no rank {}", self.rank))?;
        let checks =
            crate::plan::link_targets(&spec)
                .into_iter()
                .map(|(to_rank, addr)| async move {
                    let (reachable, detail) = match tokio::time::timeout(
                        LINK_TIMEOUT,
                        tokio::net::TcpStream::connect(addr),
                    )
                    .await
                    {
                        Ok(Ok(_)) => (true, "connected".to_string()),
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => (
                            true,
                            "refused: the host answers, nothing listens yet".to_string(),
                        ),
                        Ok(Err(e)) => (false, e.to_string()),
                        Err(_) => (
                            false,
                            format!("timed out after {} s", LINK_TIMEOUT.as_secs()),
                        ),
                    };
                    LinkCheck {
                        to_rank,
                        addr,
                        reachable,
                        detail,
                    }
                });
        Ok(LinkReport {
            rank: self.rank,
            links: futures_util::future::join_all(checks).await,
        })
    }

    /// The layer placement prima's scheduler printed when this (head) rank scheduled the ring.
    pub async fn placement(&self) -> RankPlacement {
        let st = self.status();
        let generation = st.generation;
        let fail = |e: String| RankPlacement {
            generation,
            placement: None,
            error: Some(e),
        };
        let Some(spec) = st.spec.filter(|_| st.phase == RankPhase::Running) else {
            return fail("no rank running".into());
        };
        if spec.engine != EngineKind::Prima || !spec.is_head() {
            return fail("only prima's rank 0 schedules the ring".into());
        }
        let lines = self
            .runner
            .output_lines(
                &self.process_name(generation),
                engine::prima::PLACEMENT_MARKERS,
            )
            .await;
        match engine::prima::parse_placement(&lines, spec.world) {
            Some(p) => RankPlacement {
                generation,
                placement: Some(p),
                error: None,
            },
            None => fail(format!(
                "no complete placement in the engine's output ({} matching lines)",
                lines.len()
            )),
        }
    }

    /// The running rank's CPU time, from the runner (process counters or the unit's cgroup).
    pub fn usage(&self) -> RankUsage {
        let st = self.status();
        let cpu = match (st.phase, st.pid) {
            (RankPhase::Running, Some(pid)) => self.runner.cpu_usec(pid),
            (RankPhase::Running, None) => Err("the running rank has no known pid".to_string()),
            (phase, _) => Err(format!("no rank running ({})", phase.as_str())),
        };
        let memory = match (st.phase, st.pid) {
            (RankPhase::Running, Some(pid)) => self.runner.memory_bytes(pid).ok(),
            _ => None,
        };
        RankUsage {
            generation: st.generation,
            cpu_usec: cpu.as_ref().ok().copied(),
            error: cpu.err(),
            memory_bytes: memory,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<RankStatus> {
        self.status.subscribe()
    }

    /// Says in the status that the facts changed (a hash finished, a package or a delivery
    /// changed), so the coordinator, which follows the status, looks at them again.
    fn facts_changed(&self) {
        self.update(|s| s.facts_version += 1);
    }

    fn update(&self, f: impl FnOnce(&mut RankStatus)) {
        self.status.send_modify(|s| {
            f(s);
            s.version += 1;
        });
    }

    /// Starts hashing the model in the background now: on a large file this takes minutes, and
    /// the coordinator waits for the hash before it starts a ring.
    pub fn start_model_hash(&self) {
        if self.needs_model() {
            // Every configured model: the ring may switch to any of them.
            for m in &self.config.models {
                self.hasher.state(&self.config.model_path(self.rank, m));
            }
        }
    }

    /// Whether this node's rank reads the model file itself.
    fn needs_model(&self) -> bool {
        self.config.reads_model(self.rank)
    }

    /// The configured model `name` (or alias) names, or the 404 for the control API.
    fn configured_model(
        &self,
        name: &str,
    ) -> Result<&crate::config::Model, (axum::http::StatusCode, String)> {
        self.config
            .find_model(name)
            .map(|i| &self.config.models[i])
            .ok_or_else(|| {
                (
                    axum::http::StatusCode::NOT_FOUND,
                    format!("no model named {name} in {}", self.config.source.display()),
                )
            })
    }

    /// Serves this node's copy of model `name` to another node ([`deliver::serve`]). A node
    /// whose rank does not read the model (a llama.cpp rpc worker) hashes a copy it has on the
    /// first request.
    pub async fn serve_model_file(
        &self,
        name: &str,
        headers: &axum::http::HeaderMap,
    ) -> axum::response::Response {
        let model = match self.configured_model(name) {
            Ok(m) => m,
            Err((status, why)) => return api::error(status, why),
        };
        let path = self.config.model_path(self.rank, model);
        let state = self.hasher.state(&path);
        deliver::serve(
            self.rank,
            &model.name,
            &path,
            model.sha256.as_deref(),
            state,
            self.hasher.hashed_bytes(&path),
            headers,
        )
        .await
    }

    /// Starts fetching `req.model`'s file from `req.from_rank` in the background; the fact of
    /// the transfer (a running one if there is one) comes back at once.
    pub fn fetch_model(
        self: &Arc<Self>,
        req: &proto::FetchRequest,
    ) -> Result<proto::TransferFact, (axum::http::StatusCode, String)> {
        use axum::http::StatusCode;
        let source = self.config.source.display();
        let model = self.configured_model(&req.model)?.clone();
        let from = self.config.node(req.from_rank).ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("no [[node]] with rank = {} in {source}", req.from_rank),
            )
        })?;
        if req.from_rank == self.rank {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("rank {} cannot fetch a model from itself", self.rank),
            ));
        }
        let client = crate::coordinator::client::NodeClient::for_rank(&self.config, self.rank)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        let dest = self.config.model_path(self.rank, &model);
        if let (Some(want), (_, proto::HashState::Done { sha256 })) =
            (&model.sha256, self.hasher.state(&dest))
        {
            if want.eq_ignore_ascii_case(&sha256) {
                return Ok(proto::TransferFact {
                    state: proto::TransferState::Done,
                    activity: format!(
                        "already in place at {}, sha256 {sha256} as configured",
                        dest.display()
                    ),
                    finished_unix: Some(deliver::now_unix()),
                    ..deliver::fresh(&model.name, req.from_rank)
                });
            }
        }
        let fact = match self.deliveries.begin(&model.name, req.from_rank) {
            Ok(f) => f,
            Err(running) => return Ok(*running),
        };
        let me = self.config.node(self.rank).map(|n| n.agent_addr());
        let fetch = deliver::Fetch {
            model: model.name.clone(),
            from_rank: req.from_rank,
            source: from.agent_addr(),
            client,
            dest,
            expected: model.sha256.clone(),
            max_mbit: self.config.delivery.max_mbit,
            who: match me {
                Some(a) => format!("rank {} ({a})", self.rank),
                None => format!("rank {}", self.rank),
            },
            hasher: self.hasher.clone(),
        };
        let first = fact.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let dest = fetch.dest.clone();
        let weak = Arc::downgrade(self);
        let notify = {
            let weak = weak.clone();
            move || {
                if let Some(a) = weak.upgrade() {
                    a.facts_changed();
                }
            }
        };
        tracing::info!(rank = self.rank, model = %model.name, from_rank = req.from_rank, dest = %dest.display(), "fetching a model file");
        let shared = fact.clone();
        let task = tokio::spawn(deliver::run(fetch, fact, self.deliveries.turn(), notify));
        tokio::spawn(async move {
            let result = match task.await {
                Ok(r) => r,
                Err(e) => {
                    let why = format!("the transfer task ended abnormally: {e}");
                    deliver::mark_lost(&shared, why.clone());
                    if let Some(a) = weak.upgrade() {
                        a.facts_changed();
                    }
                    Err(why)
                }
            };
            if let Err(e) = result {
                tracing::error!(model = %model.name, error = %e, "model delivery failed");
            }
        });
        self.facts_changed();
        Ok(first)
    }

    /// Checks (and with `apply`, sets) the network tuning, logs it and keeps it for the facts.
    pub fn tune_network(&self, apply: bool) {
        let report = crate::tune::Sysctl::default()
            .tune(&crate::tune::parse_conf(crate::tune::SYSCTL_CONF), apply);
        crate::tune::log_report(&report);
        *self.network.lock().unwrap_or_else(|e| e.into_inner()) = report;
    }

    pub async fn facts(&self) -> NodeFacts {
        // Every configured model's file, once; the loaded one's is also the facts' `model`.
        let models: Vec<proto::ModelFact> = self
            .config
            .models
            .iter()
            .map(|m| {
                let mut fact = facts::model_fact(
                    &self.config.model_path(self.rank, m),
                    m.sha256.as_deref(),
                    self.needs_model(),
                    &self.hasher,
                );
                fact.transfer = self.deliveries.fact(&m.name);
                fact
            })
            .collect();
        let loaded = models[self.config.loaded.min(models.len().saturating_sub(1))].clone();
        let mut f =
            facts::collect(self.rank, self.config.cluster.engine, &self.local, loaded).await;
        f.models = models;
        f.network = self
            .network
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        f.tls = self
            .tls
            .get()
            .cloned()
            .flatten()
            .map(|t| t.at(crate::tls::now_unix()));
        if let Some(cache) = self.rpc_cache.clone() {
            let last = self
                .last_prune
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            f.rpc_cache = tokio::task::spawn_blocking(move || cache.fact(last))
                .await
                .ok();
        }
        f
    }

    /// The certificates the control API presents, for the facts (set once, at start).
    pub fn set_tls_fact(&self, fact: Option<proto::TlsFact>) {
        let _ = self.tls.set(fact);
    }

    /// Cleans and bounds the rpc tensor cache before this node's rpc server starts (no rank
    /// runs here now, so nothing writes the cache meanwhile). A failure is logged and the rank
    /// starts anyway: the cache only saves transfer time.
    async fn prune_rpc_cache(&self, spec: &RankSpec) {
        let Some(cache) = self.rpc_cache.clone() else {
            return;
        };
        let current = spec.model_name.clone();
        // Every model of the config: a switch back must find its tensors still cached.
        let configured: Vec<String> = self.config.models.iter().map(|m| m.name.clone()).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let res = tokio::task::spawn_blocking(move || {
            let configured: Vec<&str> = configured.iter().map(String::as_str).collect();
            cache.prune(&current, &configured, now)
        })
        .await;
        match res {
            Ok(Ok(r)) => {
                tracing::info!(
                    rank = self.rank,
                    verified = r.verified_entries,
                    corrupt = r.corrupt_entries,
                    removed = r.removed_entries,
                    removed_bytes = r.removed_bytes,
                    millis = r.millis,
                    "rpc cache cleaned before the start"
                );
                *self.last_prune.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            }
            Ok(Err(e)) => {
                tracing::warn!(rank = self.rank, error = %format!("{e:#}"), "cannot clean the rpc cache; starting anyway")
            }
            Err(e) => {
                tracing::warn!(rank = self.rank, error = %e, "the rpc cache cleanup panicked; starting anyway")
            }
        }
    }

    fn process_name(&self, generation: u64) -> String {
        proto::rank_process_name(self.rank, generation)
    }

    /// Makes `spec` the running rank.
    pub async fn apply(self: &Arc<Self>, spec: RankSpec) -> Result<RankStatus, ApplyError> {
        self.verify(&spec)?;
        let _guard = self.reconcile.lock().await;
        let current = self.status();
        match decide(&current, &spec) {
            Decision::Keep => return Ok(current),
            Decision::Stale { current } => {
                return Err(ApplyError::Stale {
                    desired: spec.generation,
                    current,
                })
            }
            Decision::Conflict => return Err(ApplyError::Conflict(spec.generation)),
            Decision::Replace => {}
        }
        if current.phase == RankPhase::Running {
            self.stop_current(&current).await;
        }
        self.prune_rpc_cache(&spec).await;
        let cmd = engine::command(&spec, &self.local);
        let name = self.process_name(spec.generation);
        tracing::info!(rank = self.rank, generation = spec.generation, command = %cmd.display(), "starting rank");
        match self.runner.start(&name, &cmd).await {
            Ok(started) => {
                self.save_spec(&spec);
                self.update(|s| {
                    s.generation = spec.generation;
                    s.phase = RankPhase::Running;
                    s.pid = started.pid;
                    s.unit = started.unit;
                    s.listening = false;
                    s.command = Some(cmd.display());
                    s.exit = None;
                    s.last_error = None;
                    s.spec = Some(spec.clone());
                });
                self.watch_listening(spec);
            }
            Err(e) => {
                tracing::error!(rank = self.rank, generation = spec.generation, error = %format!("{e:#}"), "rank failed to start");
                self.update(|s| {
                    s.generation = spec.generation;
                    s.phase = RankPhase::FailedToStart;
                    s.pid = None;
                    s.unit = None;
                    s.listening = false;
                    s.command = Some(cmd.display());
                    s.exit = None;
                    s.last_error = Some(format!("{e:#}"));
                    s.spec = Some(spec.clone());
                });
            }
        }
        Ok(self.status())
    }

    /// Refuses a spec that is not what this node plans from its own config ([`verify`]).
    fn verify(&self, spec: &RankSpec) -> Result<(), ApplyError> {
        // The layer count, only where Halda's windows or GPU layers are to be checked against it.
        let config = self
            .config
            .with_loaded(verify::spec_model(&self.config, spec));
        let layers = (crate::plan::halda_places(&config)
            && (spec.layer_windows.is_some() || spec.gpu_layers.is_some()))
        .then(|| crate::gguf::read_info(&config.model_path(self.rank, config.model())).ok())
        .flatten()
        .map(|i| i.block_count);
        verify::verify(&self.config, self.rank, spec, layers).map_err(|r| {
            tracing::warn!(rank = self.rank, generation = spec.generation, fields = ?r.fields(), refusal = %r, "refused a rank spec that differs from this node's plan");
            ApplyError::Invalid(format!(
                "the spec differs from what this node plans from its config ({}): {r}",
                self.config.source.display()
            ))
        })
    }

    /// Where the applied spec is kept, so a restarted agent knows what its running unit is.
    fn spec_file(&self) -> std::path::PathBuf {
        self.config
            .cluster
            .state_dir
            .join(format!("rank{}.spec.json", self.rank))
    }

    fn save_spec(&self, spec: &RankSpec) {
        let res = serde_json::to_vec_pretty(spec)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                std::fs::create_dir_all(&self.config.cluster.state_dir)?;
                let tmp = self.spec_file().with_extension("json.tmp");
                std::fs::write(&tmp, b)?;
                std::fs::rename(tmp, self.spec_file())
            });
        if let Err(e) = res {
            tracing::warn!(file = %self.spec_file().display(), error = %e, "cannot record the applied spec; an agent restart will not adopt this rank");
        }
    }

    /// After an agent restart: adopts the rank still running for the recorded generation, so
    /// inference goes on, and stops any other leftover generation.
    pub async fn recover(self: &Arc<Self>) {
        let prefix = proto::rank_process_prefix(self.rank);
        let running = match self.runner.running(&prefix).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot list running ranks");
                return;
            }
        };
        if running.is_empty() {
            return;
        }
        let spec: Option<RankSpec> = std::fs::read(self.spec_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let _guard = self.reconcile.lock().await;
        for name in running {
            let keep = spec
                .as_ref()
                .filter(|s| self.process_name(s.generation) == name);
            match keep {
                Some(spec) => match self.runner.adopt(&name).await {
                    Ok(started) => {
                        let cmd = engine::command(spec, &self.local);
                        self.update(|s| {
                            s.generation = spec.generation;
                            s.phase = RankPhase::Running;
                            s.pid = started.pid;
                            s.unit = started.unit;
                            s.command = Some(cmd.display());
                            s.spec = Some(spec.clone());
                        });
                        self.watch_listening(spec.clone());
                    }
                    Err(e) => {
                        tracing::warn!(%name, error = %format!("{e:#}"), "cannot adopt running rank")
                    }
                },
                None => {
                    tracing::info!(%name, "stopping a leftover rank of an unknown generation");
                    let _ = self.runner.stop(&name).await;
                }
            }
        }
    }

    /// Stops the rank, whatever its generation. Idempotent.
    pub async fn stop(&self) -> RankStatus {
        let _guard = self.reconcile.lock().await;
        let current = self.status();
        if current.phase == RankPhase::Running {
            self.stop_current(&current).await;
        }
        self.status()
    }

    async fn stop_current(&self, current: &RankStatus) {
        let name = self.process_name(current.generation);
        if let Err(e) = self.runner.stop(&name).await {
            tracing::warn!(rank = self.rank, error = %format!("{e:#}"), "stopping the rank failed");
        }
        self.update(|s| {
            if s.generation == current.generation && s.phase == RankPhase::Running {
                s.phase = RankPhase::Idle;
                s.listening = false;
            }
        });
    }

    fn on_exit(&self, ev: RunEvent) {
        let current = self.status();
        if ev.name != self.process_name(current.generation) {
            return; // an older generation's process, already accounted for
        }
        let kind = engine::classify_exit(
            self.config.cluster.engine,
            ev.exit.stop_requested,
            ev.exit.code,
            &ev.exit.log_tail,
        );
        let description = match kind {
            ExitKind::DroppedByScheduler => {
                "dropped by the scheduler (no layers assigned)".to_string()
            }
            ExitKind::Stopped => format!("stopped on request ({})", ev.exit.describe()),
            ExitKind::Failed => ev.exit.describe(),
        };
        if kind == ExitKind::Failed {
            tracing::error!(rank = self.rank, generation = current.generation, status = %description, "rank exited");
        }
        let last_error = (kind == ExitKind::Failed).then(|| {
            let what = match engine::explain_failure(self.config.cluster.engine, &ev.exit.log_tail)
            {
                Some(why) => format!("{description}: {why}"),
                None => description.clone(),
            };
            let tail: Vec<&String> = ev.exit.log_tail.iter().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().map(String::as_str).collect();
            if tail.is_empty() {
                what
            } else {
                format!("{what}; last output: {}", tail.join(" | "))
            }
        });
        self.update(|s| {
            s.phase = if kind == ExitKind::Stopped {
                RankPhase::Idle
            } else {
                RankPhase::Exited
            };
            s.listening = false;
            s.exit = Some(ExitReport {
                kind,
                description,
                code: ev.exit.code,
                signal: ev.exit.signal,
            });
            if last_error.is_some() {
                s.last_error = last_error;
            }
        });
    }

    /// Marks the rank as listening once every port it should bind is open.
    fn watch_listening(self: &Arc<Self>, spec: RankSpec) {
        let ports = listen_ports(&spec);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(agent) = weak.upgrade() else { return };
                let st = agent.status();
                if st.generation != spec.generation || st.phase != RankPhase::Running {
                    return;
                }
                if ports.iter().all(|p| listen::is_listening(*p)) {
                    agent.update(|s| {
                        if s.generation == spec.generation && s.phase == RankPhase::Running {
                            s.listening = true;
                        }
                    });
                    return;
                }
                drop(agent);
                // Short: the head of a llama.cpp ring starts only once its workers listen, so
                // this poll is on the path to the first served token (and costs one small read).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    /// Whether ranks outlive this agent process (systemd units do; child processes do not).
    pub fn ranks_outlive_agent(&self) -> bool {
        !self.runner.stops_with_agent()
    }

    /// Stops the rank when the agent itself shuts down, if the runner's processes would not
    /// outlive it anyway.
    pub async fn shutdown(&self) {
        if self.runner.stops_with_agent() {
            self.stop().await;
        }
    }
}

#[cfg(test)]
mod tests;
