//! Driver loop tests against `FakeCluster`, a mock of the node agents (no processes, no
//! sockets) with tokio's paused clock, so timers run instantly and deterministically. What they
//! pin: the llama.cpp start ordering, a lost node, stale answers, that a finished model hash
//! starts the ring at once rather than on the next timed check, and the stall check: a frozen
//! rank under load or under an idle probe restarts the ring, a slow one does not, and an agent
//! that does not answer does not tear down a ring that makes progress.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::bail;
use async_trait::async_trait;

use super::*;
use crate::coordinator::check::FactsError;
use crate::proto::EventDetail;
use crate::proto::{
    BinaryFact, HashState, ModelFact, NodeFacts, RankSpec, RankUsage, AGENT_VERSION,
    PROTOCOL_VERSION,
};

struct FakeNode {
    status: watch::Sender<RankStatus>,
    hash: Mutex<HashState>,
    reachable: AtomicBool,
    /// Answered once, instead of the current status, by the next status request.
    stale: Mutex<Option<RankStatus>>,
    /// CPU time the rank uses per second of (virtual) time, in ms.
    cpu_ms_per_s: AtomicU64,
    /// The engine build its facts report (an upgrade changes it).
    engine_version: Mutex<String>,
}

struct FakeCluster {
    /// Holds the model file and the state dir.
    _dir: tempfile::TempDir,
    config: Arc<Config>,
    /// What rank 0 reports Halda chose.
    halda: Mutex<Option<crate::proto::Placement>>,
    nodes: Vec<FakeNode>,
    /// What was asked of the nodes, in order.
    log: Mutex<Vec<String>>,
    t0: tokio::time::Instant,
    /// The ring is frozen: a probe never comes back.
    frozen: AtomicBool,
    probes: AtomicU64,
}

impl FakeCluster {
    fn new(engine: &str, world: u32) -> Arc<FakeCluster> {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"GGUF").expect("model");
        let mut text = format!(
            "[cluster]\nname=\"t\"\nengine=\"{engine}\"\nstate_dir=\"{state}\"\n[model]\npath=\"{model}\"\n\
             [supervision]\nnode_timeout_s = 3\nbackoff_initial_ms = 100\nbackoff_max_ms = 200\nready_timeout_s = 30\n\
             stall_timeout_s = 10\nprobe_interval_s = 5\n",
            state = dir.path().join("state").display(),
            model = model.display(),
        );
        for r in 0..world {
            text.push_str(&format!(
                "[[node]]\nrank={r}\naddress=\"127.0.0.1\"\nagent_port={}\n",
                7701 + r
            ));
        }
        let config = Arc::new(Config::parse(&text, std::path::Path::new("t")).expect("config"));
        let nodes = (0..world)
            .map(|r| FakeNode {
                status: watch::Sender::new(RankStatus::idle(r, 1)),
                hash: Mutex::new(HashState::Done {
                    sha256: "aa".into(),
                }),
                reachable: AtomicBool::new(true),
                stale: Mutex::new(None),
                cpu_ms_per_s: AtomicU64::new(500),
                engine_version: Mutex::new("b1".into()),
            })
            .collect();
        Arc::new(FakeCluster {
            _dir: dir,
            halda: Mutex::new(None),
            config,
            nodes,
            log: Mutex::new(Vec::new()),
            t0: tokio::time::Instant::now(),
            frozen: AtomicBool::new(false),
            probes: AtomicU64::new(0),
        })
    }

    fn node(&self, addr: SocketAddr) -> (usize, &FakeNode) {
        let i = self
            .config
            .nodes
            .iter()
            .position(|n| n.agent_addr() == addr)
            .expect("a configured node");
        (i, &self.nodes[i])
    }

    fn log(&self, line: String) {
        self.log.lock().expect("log").push(line);
    }

    fn update(&self, rank: usize, f: impl FnOnce(&mut RankStatus)) {
        self.nodes[rank].status.send_modify(|s| {
            f(s);
            s.version += 1;
        });
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }
}

#[async_trait]
impl Nodes for FakeCluster {
    async fn facts(&self, addr: SocketAddr) -> NodeReport {
        let (rank, n) = self.node(addr);
        if !n.reachable.load(Ordering::SeqCst) {
            return Err(FactsError::Unreachable("connection refused".into()));
        }
        Ok(NodeFacts {
            agent_version: AGENT_VERSION.into(),
            protocol_version: PROTOCOL_VERSION,
            rank: rank as u32,
            hostname: format!("h{rank}"),
            engine: self.config.cluster.engine,
            binaries: vec![BinaryFact {
                name: "engine".into(),
                path: Some("/usr/bin/engine".into()),
                used_by_this_rank: true,
            }],
            engine_version: Some(n.engine_version.lock().expect("version").clone()),
            engine_package: None,
            models: Vec::new(),
            model: ModelFact {
                path: "/m.gguf".into(),
                size: Some(1),
                hash: n.hash.lock().expect("hash").clone(),
                expected_sha256: None,
                matches_expected: None,
                hashed_bytes: None,
                transfer: None,
            },
            memory: None,
            cpu: None,
            gpus: vec![],
            network: vec![],
            tls: None,
            rpc_cache: None,
        })
    }

    async fn rank_status(
        &self,
        addr: SocketAddr,
        after: Option<u64>,
        wait: Duration,
    ) -> anyhow::Result<RankStatus> {
        let (_, n) = self.node(addr);
        if !n.reachable.load(Ordering::SeqCst) {
            // An unreachable agent lets a connection attempt time out.
            tokio::time::sleep(Duration::from_secs(3)).await;
            bail!("connect timed out");
        }
        if let Some(old) = n.stale.lock().expect("stale").take() {
            return Ok(old);
        }
        let mut rx = n.status.subscribe();
        if let Some(after) = after {
            let _ = tokio::time::timeout(wait, rx.wait_for(|s| s.version > after)).await;
        }
        let st = rx.borrow().clone();
        Ok(st)
    }

    async fn fetch(
        &self,
        _addr: SocketAddr,
        req: &crate::proto::FetchRequest,
    ) -> anyhow::Result<crate::proto::TransferFact> {
        // Mock for the driver tests: the fake nodes have every file, so nothing asks.
        bail!("the fake cluster delivers no model {}", req.model)
    }

    async fn apply(&self, addr: SocketAddr, spec: &RankSpec) -> anyhow::Result<RankStatus> {
        let (rank, n) = self.node(addr);
        if !n.reachable.load(Ordering::SeqCst) {
            bail!("connection refused");
        }
        let workers_listening = self.nodes[1..].iter().all(|w| {
            w.status.borrow().listening && w.status.borrow().generation == spec.generation
        });
        self.log(format!(
            "apply rank{rank} g{} workers_listening={workers_listening}",
            spec.generation
        ));
        self.update(rank, |s| {
            s.generation = spec.generation;
            s.phase = RankPhase::Running;
            s.listening = false;
            s.spec = Some(spec.clone());
        });
        let st = n.status.borrow().clone();
        Ok(st)
    }

    async fn stop(&self, addr: SocketAddr) -> anyhow::Result<RankStatus> {
        let (rank, n) = self.node(addr);
        if !n.reachable.load(Ordering::SeqCst) {
            bail!("connection refused");
        }
        self.log(format!("stop rank{rank}"));
        self.update(rank, |s| {
            s.phase = RankPhase::Idle;
            s.listening = false;
        });
        let st = n.status.borrow().clone();
        Ok(st)
    }

    async fn usage(&self, addr: SocketAddr) -> anyhow::Result<RankUsage> {
        let (_, n) = self.node(addr);
        if !n.reachable.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3)).await;
            bail!("connect timed out");
        }
        let elapsed_ms = u64::try_from(self.t0.elapsed().as_millis()).expect("ms");
        let st = n.status.borrow().clone();
        Ok(RankUsage {
            generation: st.generation,
            cpu_usec: Some(n.cpu_ms_per_s.load(Ordering::SeqCst) * elapsed_ms),
            error: None,
            memory_bytes: None,
        })
    }

    async fn links(&self, addr: SocketAddr) -> anyhow::Result<crate::proto::LinkReport> {
        let (rank, _) = self.node(addr);
        Ok(crate::proto::LinkReport {
            rank: rank as u32,
            links: vec![],
        })
    }

    async fn placement(&self, addr: SocketAddr) -> anyhow::Result<crate::proto::RankPlacement> {
        let (_, n) = self.node(addr);
        let generation = n.status.borrow().generation;
        let placement = self.halda.lock().expect("halda").clone();
        Ok(crate::proto::RankPlacement {
            generation,
            error: placement.is_none().then(|| "not printed".to_string()),
            placement,
        })
    }

    async fn head_healthy(&self, _port: u16) -> bool {
        self.nodes[0].status.borrow().phase == RankPhase::Running
    }

    async fn probe(&self, _port: u16) -> anyhow::Result<()> {
        self.probes.fetch_add(1, Ordering::SeqCst);
        if self.frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

/// The engines' side of the fake: rpc workers start listening a little after they start.
fn listen_after_start(fake: &Arc<FakeCluster>) {
    for rank in 1..fake.nodes.len() {
        let fake = fake.clone();
        tokio::spawn(async move {
            let mut rx = fake.nodes[rank].status.subscribe();
            loop {
                if rx.changed().await.is_err() {
                    return;
                }
                let st = rx.borrow_and_update().clone();
                if st.phase == RankPhase::Running && !st.listening {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    fake.update(rank, |s| s.listening = true);
                }
            }
        });
    }
}

struct Running {
    view: watch::Receiver<ClusterView>,
    events: crate::coordinator::events::Events,
    metrics: crate::coordinator::metrics::Metrics,
    activity: Activity,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(fake: &Arc<FakeCluster>) -> Running {
    let (view, rx) = watch::channel(ClusterView::initial(&fake.config));
    let activity = Activity::default();
    let (events, metrics) = (
        crate::coordinator::events::Events::default(),
        crate::coordinator::metrics::Metrics::default(),
    );
    let driver = Driver {
        config: fake.config.clone(),
        nodes: fake.clone(),
        view,
        heartbeat: Heartbeat::default(),
        activity: activity.clone(),
        events: events.clone(),
        metrics: metrics.clone(),
        gate: crate::coordinator::switch::ModelGate::new(&fake.config),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(driver.run(stop.clone(), true));
    Running {
        view: rx,
        events,
        metrics,
        activity,
        stop,
        task,
    }
}

async fn serving_after(r: &mut Running, generation: u64) -> ClusterView {
    let v = tokio::time::timeout(
        Duration::from_secs(120),
        r.view
            .wait_for(|v| v.serving() && v.generation > generation),
    )
    .await
    .expect("serving in (virtual) time")
    .expect("driver alive")
    .clone();
    v
}

#[tokio::test(start_paused = true)]
async fn llama_rpc_head_starts_only_after_every_worker_listens() {
    let fake = FakeCluster::new("llama-rpc", 3);
    listen_after_start(&fake);
    let mut r = start(&fake);
    let v = serving_after(&mut r, 0).await;
    assert_eq!(v.generation, 1);
    let lines = fake.lines();
    let head = lines
        .iter()
        .position(|l| l.starts_with("apply rank0"))
        .expect("head applied");
    assert!(lines[head].ends_with("workers_listening=true"), "{lines:?}");
    assert!(
        lines[..head]
            .iter()
            .filter(|l| l.starts_with("apply rank"))
            .count()
            == 2,
        "both workers before the head: {lines:?}"
    );
    r.stop.cancel();
    r.task.await.expect("driver ends");
    assert!(
        fake.lines()
            .iter()
            .filter(|l| l.starts_with("stop rank"))
            .count()
            >= 3,
        "stop_ring_on_exit stops every rank"
    );
}

#[tokio::test(start_paused = true)]
async fn a_finished_model_hash_starts_the_ring_at_once() {
    let fake = FakeCluster::new("prima", 2);
    *fake.nodes[1].hash.lock().expect("hash") = HashState::Hashing;
    let t0 = tokio::time::Instant::now();
    let mut r = start(&fake);
    tokio::time::timeout(
        Duration::from_secs(5),
        r.view.wait_for(|v| {
            v.phase == Phase::WaitingForNodes
                && v.reason.as_deref().is_some_and(|r| r.contains("hashing"))
        }),
    )
    .await
    .expect("waiting for the hash")
    .expect("driver alive");
    // The hash finishes 100 ms in; the node bumps its facts version, as a node agent does.
    tokio::time::sleep_until(t0 + Duration::from_millis(100)).await;
    *fake.nodes[1].hash.lock().expect("hash") = HashState::Done {
        sha256: "aa".into(),
    };
    fake.update(1, |s| s.facts_version += 1);
    serving_after(&mut r, 0).await;
    let first_apply = t0.elapsed();
    // The timed recheck would have come at RECHECK_WAITING (1 s); reacting to the change starts
    // the ring right after the hash (virtual time: no scheduling noise).
    assert!(
        first_apply < crate::coordinator::state::RECHECK_WAITING,
        "ring started {first_apply:?} after start"
    );
    r.stop.cancel();
    r.task.await.expect("driver ends");
}

#[tokio::test(start_paused = true)]
async fn a_stale_answer_does_not_restart_a_serving_ring() {
    let fake = FakeCluster::new("prima", 2);
    let mut r = start(&fake);
    let v = serving_after(&mut r, 0).await;
    // An answer older than what the driver has seen, claiming the rank exited.
    let mut old = fake.nodes[1].status.borrow().clone();
    old.version -= 1;
    old.phase = RankPhase::Exited;
    *fake.nodes[1].stale.lock().expect("stale") = Some(old);
    // Make the watcher ask again now: a real change after the stale answer.
    fake.update(1, |s| s.pid = Some(7));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = r.view.borrow().clone();
    assert!(now.serving(), "{:?}", now.reason);
    assert_eq!(now.generation, v.generation, "no restart");
    assert_eq!(now.restarts, 0);
    r.stop.cancel();
    r.task.await.expect("driver ends");
}

#[tokio::test(start_paused = true)]
async fn a_lost_node_restarts_the_ring_once_it_is_back() {
    let fake = FakeCluster::new("prima", 3);
    let mut r = start(&fake);
    let v = serving_after(&mut r, 0).await;
    // The whole machine goes: its agent does not answer and the ring stops (a probe hangs).
    fake.nodes[2].reachable.store(false, Ordering::SeqCst);
    fake.frozen.store(true, Ordering::SeqCst);
    let mut view = r.view.clone();
    let lost = tokio::time::timeout(Duration::from_secs(60), view.wait_for(|v| !v.serving()))
        .await
        .is_ok();
    assert!(lost, "not lost in time: {:#?}", r.view.borrow().nodes[2]);
    let down = r.view.borrow().clone();
    assert!(
        down.reason
            .as_deref()
            .is_some_and(|r| r.contains("rank 2 cannot say: agent unreachable")),
        "{:?}",
        down.reason
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!r.view.borrow().serving(), "no ring without rank 2");
    fake.nodes[2].reachable.store(true, Ordering::SeqCst);
    fake.frozen.store(false, Ordering::SeqCst);
    let back = serving_after(&mut r, v.generation).await;
    assert_eq!(back.restarts, 1);
    assert_eq!(back.nodes[2].state, "running");
    // Told as events, counted as a restart.
    let told = r.events.held(None);
    let failure = told
        .iter()
        .find_map(|e| match &e.detail {
            EventDetail::Failure { reason, cause } => Some((e.generation, reason, cause)),
            _ => None,
        })
        .expect("a failure event");
    assert_eq!(failure.0, Some(v.generation));
    assert_eq!(failure.2, "stalled");
    assert!(failure.1.contains("rank 2 cannot say"), "{failure:?}");
    assert!(
        told.iter().any(|e| e.generation == Some(back.generation)
            && matches!(&e.detail, EventDetail::Restart { cause, .. } if cause == "stalled")),
        "{told:#?}"
    );
    let last = told.last().expect("events");
    assert_eq!(
        last.detail,
        EventDetail::Phase {
            from: "waiting_ready".into(),
            to: "serving".into()
        }
    );
    assert_eq!(r.metrics.restarts_of("stalled"), 1);
    r.stop.cancel();
    r.task.await.expect("driver ends");
}

#[tokio::test(start_paused = true)]
async fn a_frozen_rank_under_load_restarts_the_ring_within_the_stall_timeout() {
    let fake = FakeCluster::new("llama-rpc", 3);
    listen_after_start(&fake);
    let mut r = start(&fake);
    let v = serving_after(&mut r, 0).await;
    // A stream is in flight; then rank 1 freezes: no more output, no more CPU time.
    let work = r.activity.begin();
    fake.nodes[1].cpu_ms_per_s.store(0, Ordering::SeqCst);
    let t = tokio::time::Instant::now();
    let mut view = r.view.clone();
    tokio::time::timeout(Duration::from_secs(60), view.wait_for(|v| !v.serving()))
        .await
        .expect("detected")
        .expect("driver alive");
    let detected = t.elapsed();
    assert!(
        detected <= Duration::from_secs(10 + 2),
        "detected after {detected:?}"
    );
    let reason = r.view.borrow().reason.clone().unwrap_or_default();
    assert!(
        reason.contains("ring stalled") && reason.contains("rank 1 used 0 ms of CPU time"),
        "{reason}"
    );
    drop(work);
    fake.nodes[1].cpu_ms_per_s.store(500, Ordering::SeqCst);
    let back = serving_after(&mut r, v.generation).await;
    assert_eq!(back.restarts, 1);
    r.stop.cancel();
    r.task.await.expect("driver ends");
}

#[tokio::test(start_paused = true)]
async fn a_slow_rank_that_computes_is_not_a_hang() {
    let fake = FakeCluster::new("prima", 3);
    let mut r = start(&fake);
    let v = serving_after(&mut r, 0).await;
    // A long prompt: no output for 25 s (2.5 stall timeouts), rank 2 throttled but computing.
    fake.nodes[2].cpu_ms_per_s.store(30, Ordering::SeqCst);
    let work = r.activity.begin();
    tokio::time::sleep(Duration::from_secs(25)).await;
    work.progressed();
    drop(work);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = r.view.borrow().clone();
    assert!(now.serving(), "{:?}", now.reason);
    assert_eq!((now.generation, now.restarts), (v.generation, 0));
    r.stop.cancel();
    r.task.await.expect("driver ends");
}

#[tokio::test(start_paused = true)]
async fn an_idle_ring_is_probed_and_a_hung_probe_restarts_it() {
    let fake = FakeCluster::new("prima", 2);
    let mut r = start(&fake);
    let v = serving_after(&mut r, 0).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(fake.probes.load(Ordering::SeqCst) >= 2, "probed every 5 s");
    assert!(r.view.borrow().serving());
    // Rank 0 freezes while idle: the next probe never returns, and rank 0 uses no CPU.
    fake.frozen.store(true, Ordering::SeqCst);
    fake.nodes[0].cpu_ms_per_s.store(0, Ordering::SeqCst);
    let mut view = r.view.clone();
    tokio::time::timeout(
        Duration::from_secs(5 + 10 + 2),
        view.wait_for(|v| !v.serving()),
    )
    .await
    .expect("a hung probe is detected")
    .expect("driver alive");
    fake.frozen.store(false, Ordering::SeqCst);
    fake.nodes[0].cpu_ms_per_s.store(500, Ordering::SeqCst);
    serving_after(&mut r, v.generation).await;
    r.stop.cancel();
    r.task.await.expect("driver ends");
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_agent_is_a_warning_while_the_ring_progresses() {
    let fake = FakeCluster::new("prima", 3);
    let mut r = start(&fake);
    let v = serving_after(&mut r, 0).await;
    fake.nodes[1].reachable.store(false, Ordering::SeqCst);
    // Requests keep coming back for a minute: well past node_timeout_s (3 s).
    for _ in 0..60 {
        let w = r.activity.begin();
        tokio::time::sleep(Duration::from_millis(500)).await;
        w.progressed();
        drop(w);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let now = r.view.borrow().clone();
    assert!(now.serving(), "{:?}", now.reason);
    assert_eq!(now.generation, v.generation);
    assert_eq!(now.nodes[1].state, "unreachable");
    assert!(
        now.warnings
            .iter()
            .any(|w| w.contains("rank 1's agent") && w.contains("serves on")),
        "{:?}",
        now.warnings
    );
    // If the ring then stops progressing, the unreachable agent cannot vouch for its rank.
    let _work = r.activity.begin();
    let mut view = r.view.clone();
    tokio::time::timeout(Duration::from_secs(10 + 5), view.wait_for(|v| !v.serving()))
        .await
        .expect("torn down once it stops progressing")
        .expect("driver alive");
    let reason = r.view.borrow().reason.clone().unwrap_or_default();
    assert!(
        reason.contains("rank 1 cannot say: agent unreachable"),
        "{reason}"
    );
    r.stop.cancel();
    r.task.await.expect("driver ends");
}

#[tokio::test(start_paused = true)]
async fn halda_placement_is_remembered_and_passed_explicitly_on_the_next_start() {
    use crate::proto::{Placement, PlacementSource};
    let fake = FakeCluster::new("prima", 3);
    *fake.halda.lock().expect("halda") = Some(Placement {
        windows: vec![1, 0, 29],
        gpu_layers: Some(vec![0, 0, 0]),
    });
    let mut r = start(&fake);
    let v = serving_after(&mut r, 0).await;
    let mut view = r.view.clone();
    let placed = tokio::time::timeout(
        Duration::from_secs(10),
        view.wait_for(|v| v.placement.as_ref().is_some_and(|p| p.windows.is_some())),
    )
    .await
    .expect("placement read")
    .expect("driver alive")
    .placement
    .clone()
    .expect("placement");
    assert_eq!(placed.source, PlacementSource::Halda);
    assert_eq!(placed.windows, Some(vec![1, 0, 29]));
    assert!(crate::coordinator::placement::file(&fake.config.cluster.state_dir).exists());
    // Rank 2 crashes: the next generation uses the remembered windows and leaves node 1 out.
    fake.update(2, |s| s.phase = RankPhase::Exited);
    let back = serving_after(&mut r, v.generation).await;
    let p = back.placement.clone().expect("placement");
    assert_eq!(p.source, PlacementSource::Remembered);
    let g = back.generation;
    let lines = fake.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("apply rank0 g{g}"))),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("apply rank2 g{g}"))),
        "{lines:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with(&format!("apply rank1 g{g}"))),
        "{lines:?}"
    );
    let head = fake.nodes[0].status.borrow().spec.clone().expect("spec");
    assert_eq!((head.world, head.layer_windows), (2, Some(vec![1, 29])));
    let worker = fake.nodes[2].status.borrow().spec.clone().expect("spec");
    assert_eq!((worker.node, worker.rank), (2, 1));
    r.stop.cancel();
    r.task.await.expect("driver ends");
}

/// What `llm-agent notify-upgrade` makes a node agent do after its engine package changed.
fn upgrade(fake: &FakeCluster, rank: usize, version: &str) {
    *fake.nodes[rank].engine_version.lock().expect("version") = version.into();
    fake.update(rank, |s| s.facts_version += 1);
}

#[tokio::test(start_paused = true)]
async fn a_rolling_upgrade_keeps_serving_while_mixed_and_restarts_once_when_consistent() {
    let fake = FakeCluster::new("prima", 3);
    let mut r = start(&fake);
    let v = serving_after(&mut r, 0).await;
    for (done, rank) in [(1, 2), (2, 1)] {
        upgrade(&fake, rank, "b2");
        let seen = tokio::time::timeout(
            Duration::from_secs(5),
            r.view.wait_for(|v| {
                v.upgrade
                    .as_deref()
                    .is_some_and(|u| u.starts_with(&format!("upgrade pending: {done}/3 nodes")))
            }),
        )
        .await
        .expect("upgrade pending shown soon after the notification")
        .expect("driver alive")
        .clone();
        assert!(seen.serving(), "{:?}", seen.reason);
        assert_eq!((seen.generation, seen.restarts), (v.generation, 0));
    }
    upgrade(&fake, 0, "b2");
    let after = serving_after(&mut r, v.generation).await;
    assert_eq!(
        (after.generation, after.restarts, after.failures),
        (v.generation + 1, 1, 0)
    );
    assert_eq!(after.upgrade, None);
    // Minutes later, with more notifications and the periodic checks, no second restart.
    for rank in 0..3 {
        upgrade(&fake, rank, "b2");
    }
    tokio::time::sleep(Duration::from_secs(180)).await;
    let later = r.view.borrow().clone();
    assert!(later.serving(), "{:?}", later.reason);
    assert_eq!((later.generation, later.restarts), (v.generation + 1, 1));
    r.stop.cancel();
    r.task.await.expect("driver ends");
}
