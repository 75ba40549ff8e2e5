//! What the coordinator shows (`/api/v1/cluster`) and what the API consults before proxying:
//! the supervisor's state plus each node as last heard from. Built from the driver's state by
//! one pure function, so what is shown cannot drift from what is decided.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::check::NodeReport;
use super::state::{Phase, Supervisor};
use super::switch::Snapshot;
use crate::config::{Config, EngineKind};
use crate::proto::{
    HashState, ModelFact, NodeFacts, Placement, PlacementSource, RankStatus, TransferState,
};

/// Serialized for `/api/v1/cluster`, read back by `llm-agent status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub cluster: String,
    pub engine: EngineKind,
    pub model: ModelView,
    pub phase: Phase,
    pub generation: u64,
    /// When the ring last started serving (RFC 3339, UTC); none while it does not serve.
    #[serde(default)]
    pub serving_since: Option<String>,
    /// Why the ring is not serving.
    pub reason: Option<String>,
    /// Failed attempts since the ring last served stably.
    pub failures: u32,
    /// Ring restarts since this coordinator started.
    pub restarts: u64,
    /// A rolling upgrade under way: "upgrade pending: 2/3 nodes on ..." while the nodes differ
    /// (the ring serves on), "upgrade ready: ..." when a person must restart the ring.
    pub upgrade: Option<String>,
    /// Model switches since this coordinator started (loads after an idle unload included).
    pub switches: u64,
    /// What needs a person's attention without stopping the ring: the node checks' warnings,
    /// and agents that do not answer while their ring serves.
    pub warnings: Vec<String>,
    /// prima: the layer placement of the ring and where it came from.
    pub placement: Option<PlacementView>,
    pub nodes: Vec<NodeView>,
    /// Every configured model's state ([`ClusterView::model_states`]). Filled by the API as it
    /// answers (which model is loaded or wanted is the model gate's, not the driver's): empty
    /// in the driver's copy, and from coordinators that predate it.
    #[serde(default)]
    pub models: Vec<ModelState>,
    /// The node checks' warnings, from which `warnings` is made.
    #[serde(skip)]
    check_warnings: Vec<String>,
}

/// One configured model and its state, as `/v1/models` (in `llm_cluster`) and
/// `/api/v1/cluster` (in `models`) show it: `loaded`, `switching` (the ring is moving to it),
/// `transferring NN %` (nodes are receiving its file, each in `transfers`), `available`, or
/// `missing` with the nodes whose file is absent or does not match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    pub name: String,
    pub aliases: Vec<String>,
    pub state: String,
    pub missing_on: Vec<u32>,
    pub transfers: Vec<ModelTransfer>,
}

/// A node receiving a model's file, in [`ModelState::transfers`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelTransfer {
    pub rank: u32,
    pub from_rank: u32,
    pub percent: Option<u32>,
    pub bytes_per_s: Option<f64>,
    pub eta_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelView {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub rank: u32,
    pub address: String,
    pub agent: SocketAddr,
    pub reachable: bool,
    /// The rank's phase (idle, running, exited, failed_to_start), `unreachable` while its agent
    /// does not answer, or `unknown` before it first did.
    pub state: String,
    /// Why the agent cannot be reached, or why its facts could not be used.
    pub agent_error: Option<String>,
    /// The rank as its agent last reported it.
    pub status: Option<RankStatus>,
    /// The node's facts as last fetched (engine build and package, model hash, tuning, ...).
    pub facts: Option<NodeFacts>,
    /// Deliveries of model files to this node, from `facts` (see [`TransferView`]); absent
    /// from coordinators that predate them.
    #[serde(default)]
    pub transfers: Vec<TransferView>,
}

/// One model file's latest delivery to a node, summed up from the node's facts so that
/// `llm-agent status` and the dashboard show the same figures and words: a running one, a
/// finished one, and a failed one while the file is still lacking (once the file is there by
/// other means, its old failure is no news).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferView {
    pub model: String,
    pub from_rank: u32,
    pub state: TransferState,
    /// Of `total_bytes`; none before the source said the file's size.
    pub percent: Option<u32>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    /// What the receiving node is doing now ("receiving from rank 1", "verifying sha256", ...).
    pub activity: String,
    pub error: Option<String>,
    /// All of it as one line for people: "receiving model chat from rank 0: 42 % of 98.4 MB,
    /// 11.0 MB/s, 6 s left", "received model chat from rank 0: 98.4 MB in 9.8 s (10.0 MB/s),
    /// sha256 verified", "delivery of model chat from rank 0 failed: ...".
    pub text: String,
}

/// A node's copy that the ring cannot use: absent, unreadable, or not the configured sha256.
fn unusable(m: &ModelFact) -> bool {
    matches!(m.hash, HashState::Missing | HashState::Error { .. })
        || m.matches_expected == Some(false)
}

impl TransferView {
    /// The delivery recorded in `m`, if there is one worth showing.
    pub fn of(m: &ModelFact) -> Option<TransferView> {
        let t = m.transfer.as_ref()?;
        let lacking = unusable(m);
        let text = match t.state {
            TransferState::Running => super::delivery::describe(t),
            TransferState::Done => super::delivery::received(t),
            TransferState::Failed if lacking => format!(
                "delivery of model {} from rank {} failed: {}",
                t.model,
                t.from_rank,
                t.error.as_deref().unwrap_or("no reason given")
            ),
            TransferState::Failed => return None,
        };
        Some(TransferView {
            model: t.model.clone(),
            from_rank: t.from_rank,
            state: t.state,
            percent: t.percent().map(|p| p.min(100)),
            done_bytes: t.done_bytes,
            total_bytes: t.total_bytes,
            bytes_per_s: t.bytes_per_s,
            eta_s: t.eta_s,
            activity: t.activity.clone(),
            error: t.error.clone(),
            text,
        })
    }

    /// Every configured model's delivery to the node with facts `f`, in the config's order
    /// (an agent that reports one model: that one's).
    pub fn all(f: &NodeFacts) -> Vec<TransferView> {
        let models = if f.models.is_empty() {
            std::slice::from_ref(&f.model)
        } else {
            &f.models[..]
        };
        models.iter().filter_map(TransferView::of).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementView {
    pub source: PlacementSource,
    /// Layers per node in config rank order (0: no place in the ring); unknown while Halda has
    /// not been read yet.
    pub windows: Option<Vec<u32>>,
    pub gpu_layers: Option<Vec<u32>>,
}

impl PlacementView {
    /// What a start with this source will use.
    pub fn planned(
        config: &Config,
        source: Option<PlacementSource>,
        remembered: Option<&Placement>,
    ) -> Option<PlacementView> {
        let source = source?;
        let (windows, gpu_layers) = match source {
            PlacementSource::Config => (config.model().layer_windows.clone(), None),
            PlacementSource::Remembered => (
                remembered.map(|p| p.windows.clone()),
                remembered.and_then(|p| p.gpu_layers.clone()),
            ),
            PlacementSource::Halda => (None, None),
        };
        Some(PlacementView {
            source,
            windows,
            gpu_layers,
        })
    }
}

/// What the driver knows of one node between messages.
#[derive(Debug, Default, Clone)]
pub struct Track {
    pub status: Option<RankStatus>,
    /// Set while the agent does not answer, with the latest error. (tokio's clock, so tests
    /// with a paused clock see time pass.)
    pub unreachable: Option<(tokio::time::Instant, String)>,
}

impl ClusterView {
    pub fn initial(config: &Config) -> ClusterView {
        ClusterView {
            cluster: config.cluster.name.clone(),
            engine: config.cluster.engine,
            model: ModelView {
                name: config.model().name.clone(),
                path: config.model().path.clone(),
            },
            phase: Phase::WaitingForNodes,
            generation: 0,
            serving_since: None,
            reason: Some("checking the nodes".into()),
            failures: 0,
            restarts: 0,
            upgrade: None,
            switches: 0,
            warnings: vec![],
            placement: None,
            models: vec![],
            check_warnings: vec![],
            nodes: config
                .nodes
                .iter()
                .map(|n| NodeView {
                    rank: n.rank,
                    address: n.address.to_string(),
                    agent: n.agent_addr(),
                    reachable: false,
                    state: "unknown".into(),
                    agent_error: None,
                    status: None,
                    facts: None,
                    transfers: vec![],
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

    /// Takes in the supervisor's state and the nodes as tracked. Returns whether anything changed.
    pub fn update(&mut self, sup: &Supervisor, tracks: &[Track], restarts: u64) -> bool {
        let before = self.clone();
        self.phase = sup.phase;
        self.generation = sup.generation;
        if sup.phase != Phase::Serving {
            self.serving_since = None;
        } else if self.serving_since.is_none() {
            let since = std::time::SystemTime::now()
                - sup
                    .serving_since
                    .map_or(std::time::Duration::ZERO, |t| t.elapsed());
            self.serving_since = Some(humantime::format_rfc3339_seconds(since).to_string());
        }
        self.reason = sup.reason.clone();
        self.failures = sup.failures;
        self.restarts = restarts;
        self.upgrade = sup.upgrade.clone();
        self.warnings = self.check_warnings.clone();
        for (n, t) in self.nodes.iter_mut().zip(tracks) {
            if let (Some((since, error)), Phase::Serving) = (&t.unreachable, sup.phase) {
                self.warnings.push(format!(
                    "rank {}'s agent ({}) has not answered for {} s ({error}); the ring serves on while it makes progress",
                    n.rank,
                    n.agent,
                    since.elapsed().as_secs()
                ));
            }
            n.reachable = t.unreachable.is_none() && t.status.is_some();
            n.status = t.status.clone();
            match (&t.unreachable, &t.status) {
                (Some((_, error)), _) => {
                    n.state = "unreachable".into();
                    n.agent_error = Some(error.clone());
                }
                (None, Some(st)) => {
                    n.state = st.phase.as_str().into();
                    n.agent_error = None;
                }
                (None, None) => n.state = "unknown".into(),
            }
        }
        *self != before
    }

    /// Every configured model's state, from the model gate's `snap` and the nodes' facts.
    /// `names[i]`: model `i`'s name, then its aliases.
    pub fn model_states(&self, names: &[&[String]], snap: &Snapshot) -> Vec<ModelState> {
        names
            .iter()
            .enumerate()
            .map(|(i, names)| {
                let mut missing_on = Vec::new();
                let mut transfers = Vec::new();
                let (mut done, mut total) = (0u64, 0u64);
                for n in &self.nodes {
                    let Some(fact) = n
                        .facts
                        .as_ref()
                        .and_then(|f| super::delivery::model_fact(f, i, snap.loaded))
                    else {
                        continue;
                    };
                    let bad = unusable(fact);
                    let running = fact
                        .transfer
                        .as_ref()
                        .filter(|t| t.state == TransferState::Running);
                    if let Some(t) = running.filter(|_| bad) {
                        done += t.done_bytes;
                        total += t.total_bytes;
                        transfers.push(ModelTransfer {
                            rank: n.rank,
                            from_rank: t.from_rank,
                            percent: t.percent(),
                            bytes_per_s: t.bytes_per_s,
                            eta_s: t.eta_s,
                        });
                    } else if bad {
                        missing_on.push(n.rank);
                    }
                }
                let percent =
                    (total > 0).then(|| (done as f64 / total as f64 * 100.0).floor() as u32);
                let state = if snap.target == Some(i) && transfers.is_empty() {
                    "switching".to_string()
                } else if snap.loaded == i
                    && !snap.unloaded
                    && snap.target.is_none()
                    && self.serving()
                {
                    "loaded".to_string()
                } else if !transfers.is_empty() {
                    format!("transferring {} %", percent.unwrap_or(0))
                } else if !missing_on.is_empty() {
                    "missing".to_string()
                } else {
                    "available".to_string()
                };
                ModelState {
                    name: names.first().cloned().unwrap_or_default(),
                    aliases: names.get(1..).unwrap_or_default().to_vec(),
                    state,
                    missing_on,
                    transfers,
                }
            })
            .collect()
    }

    /// Takes in freshly fetched facts; a node whose facts could not be read keeps its last ones
    /// (and the transfers read from them).
    pub fn update_facts(&mut self, facts: &[NodeReport], warnings: Vec<String>) {
        self.check_warnings = warnings;
        for (n, f) in self.nodes.iter_mut().zip(facts) {
            match f {
                Ok(f) => {
                    n.transfers = TransferView::all(f);
                    n.facts = Some(f.clone());
                }
                Err(e) if n.reachable => n.agent_error = Some(e.to_string()),
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RankPhase;
    use std::time::Duration;
    use tokio::time::Instant;

    fn config() -> Config {
        let text = "[cluster]\nname=\"t\"\nengine=\"llama-rpc\"\n[model]\npath=\"/m.gguf\"\n\
                    [[node]]\nrank=0\naddress=\"127.0.0.1\"\nagent_port=7701\n\
                    [[node]]\nrank=1\naddress=\"127.0.0.1\"\nagent_port=7702\n";
        Config::parse(text, std::path::Path::new("t")).expect("config")
    }

    fn status(phase: RankPhase) -> RankStatus {
        RankStatus {
            instance: 1,
            version: 1,
            rank: 0,
            generation: 3,
            phase,
            pid: Some(42),
            unit: None,
            listening: true,
            command: None,
            exit: None,
            last_error: None,
            spec: None,
            facts_version: 0,
        }
    }

    #[test]
    fn nodes_show_their_reported_status_or_why_they_are_unreachable() {
        let c = config();
        let mut v = ClusterView::initial(&c);
        let sup = Supervisor::new(Duration::from_secs(1), Duration::from_secs(2)).0;
        let tracks = vec![
            Track {
                status: Some(status(RankPhase::Running)),
                unreachable: None,
            },
            Track {
                status: Some(status(RankPhase::Running)),
                unreachable: Some((Instant::now(), "connection refused".into())),
            },
        ];
        assert!(v.update(&sup, &tracks, 0));
        assert!(!v.update(&sup, &tracks, 0), "same input, no change");
        assert_eq!(v.nodes[0].state, "running");
        assert!(v.nodes[0].reachable);
        assert_eq!(v.nodes[0].status.as_ref().and_then(|s| s.pid), Some(42));
        assert_eq!(v.nodes[1].state, "unreachable");
        assert!(!v.nodes[1].reachable);
        assert_eq!(
            v.nodes[1].agent_error.as_deref(),
            Some("connection refused")
        );
        let json = serde_json::to_value(&v).expect("json");
        assert_eq!(json["nodes"][0]["status"]["pid"], 42);
    }

    fn transfer(state: TransferState, done: u64) -> crate::proto::TransferFact {
        crate::proto::TransferFact {
            model: "chat".into(),
            from_rank: 1,
            state,
            total_bytes: 98_400_000,
            done_bytes: done,
            resumed_from: 0,
            bytes_per_s: Some(11_000_000.0),
            eta_s: Some(5.6),
            activity: "receiving from rank 1".into(),
            error: (state == TransferState::Failed).then(|| "rank 1 went away".to_string()),
            started_unix: 100,
            finished_unix: None,
            seconds: 8.9,
        }
    }

    fn model(hash: HashState, t: Option<crate::proto::TransferFact>) -> ModelFact {
        ModelFact {
            path: "/m/chat.gguf".into(),
            size: None,
            hash,
            expected_sha256: None,
            matches_expected: None,
            hashed_bytes: None,
            transfer: t,
        }
    }

    #[test]
    fn a_nodes_deliveries_are_summed_up_from_its_facts() {
        let running = model(
            HashState::Missing,
            Some(transfer(TransferState::Running, 41_328_000)),
        );
        let t = TransferView::of(&running).expect("a running transfer is shown");
        assert_eq!(t.percent, Some(42));
        assert_eq!((t.done_bytes, t.total_bytes), (41_328_000, 98_400_000));
        assert_eq!(
            t.text,
            "receiving model chat from rank 1: 42 % of 98.4 MB, 11.0 MB/s, 6 s left"
        );

        let mut done = transfer(TransferState::Done, 98_400_000);
        done.resumed_from = 400_000;
        let arrived = model(
            HashState::Done {
                sha256: "ab".into(),
            },
            Some(done),
        );
        let t = TransferView::of(&arrived).expect("a finished transfer is shown");
        assert_eq!(t.percent, Some(100));
        assert_eq!(
            t.text,
            "received model chat from rank 1: 98.0 MB in 8.9 s (11.0 MB/s), sha256 verified"
        );

        let failed = model(
            HashState::Missing,
            Some(transfer(TransferState::Failed, 10)),
        );
        let t = TransferView::of(&failed).expect("a failure is shown while the file lacks");
        assert_eq!(t.error.as_deref(), Some("rank 1 went away"));
        assert_eq!(
            t.text,
            "delivery of model chat from rank 1 failed: rank 1 went away"
        );
        let copied_by_hand = model(
            HashState::Done {
                sha256: "ab".into(),
            },
            Some(transfer(TransferState::Failed, 10)),
        );
        assert_eq!(TransferView::of(&copied_by_hand), None, "an old failure");
        assert_eq!(TransferView::of(&model(HashState::Missing, None)), None);

        // From the facts: every configured model, or the one an older agent reports.
        let mut f = crate::coordinator::check::tests_support::facts(0);
        f.model = running.clone();
        assert_eq!(TransferView::all(&f).len(), 1, "an agent of one model");
        f.models = vec![model(HashState::Missing, None), arrived, running];
        let all = TransferView::all(&f);
        let states: Vec<_> = all.iter().map(|t| t.state).collect();
        assert_eq!(states, [TransferState::Done, TransferState::Running]);

        // In the view: read with the facts, kept with them when they cannot be read.
        let c = config();
        let mut v = ClusterView::initial(&c);
        v.update_facts(&[Ok(f.clone()), Ok(f)], vec![]);
        assert_eq!(v.nodes[1].transfers, all);
        let lost = || {
            Err(super::super::check::FactsError::Unreachable(
                "timed out".into(),
            ))
        };
        v.update_facts(&[lost(), lost()], vec![]);
        assert_eq!(v.nodes[0].transfers, all);
        let json = serde_json::to_value(&v).expect("json");
        assert_eq!(json["nodes"][0]["transfers"][1]["state"], "running");
        assert_eq!(json["nodes"][0]["transfers"][1]["percent"], 42);
    }

    #[test]
    fn each_models_state_comes_from_the_gate_and_the_nodes_files() {
        let c = config();
        let mut v = ClusterView::initial(&c);
        let mut snap = Snapshot {
            loaded: 0,
            unloaded: false,
            target: None,
            loaded_since: None,
            last_request: std::time::Instant::now(),
            passed: 0,
            waiting: vec![],
        };
        let (chat, code) = (["chat".to_string(), "c".to_string()], ["code".to_string()]);
        let names: [&[String]; 2] = [&chat, &code];
        let states = |v: &ClusterView, snap: &Snapshot| -> Vec<String> {
            v.model_states(&names, snap)
                .into_iter()
                .map(|m| m.state)
                .collect()
        };
        let node = |code: ModelFact| {
            let mut f = crate::coordinator::check::tests_support::facts(0);
            f.models = vec![
                model(
                    HashState::Done {
                        sha256: "ab".into(),
                    },
                    None,
                ),
                code,
            ];
            f
        };
        // Rank 0 receives `code` at 42 %, rank 1 at 10 %: 26 % of both files together.
        let mut f0 = node(model(
            HashState::Missing,
            Some(transfer(TransferState::Running, 41_328_000)),
        ));
        f0.rank = 0;
        let mut f1 = node(model(
            HashState::Missing,
            Some(transfer(TransferState::Running, 9_840_000)),
        ));
        f1.rank = 1;
        v.nodes[0].facts = Some(f0);
        v.nodes[1].facts = Some(f1.clone());
        assert_eq!(states(&v, &snap), ["available", "transferring 26 %"]);
        let m = &v.model_states(&names, &snap)[1];
        assert_eq!(m.name, "code");
        assert_eq!(
            m.transfers
                .iter()
                .map(|t| (t.rank, t.percent))
                .collect::<Vec<_>>(),
            [(0, Some(42)), (1, Some(10))]
        );
        assert_eq!(v.model_states(&names, &snap)[0].aliases, ["c"]);
        v.phase = Phase::Serving;
        assert_eq!(states(&v, &snap)[0], "loaded");
        // A failed delivery leaves the file missing there.
        v.nodes[1].facts = Some(node(model(
            HashState::Missing,
            Some(transfer(TransferState::Failed, 10)),
        )));
        v.nodes[0].facts = Some(node(model(HashState::Missing, None)));
        assert_eq!(states(&v, &snap), ["loaded", "missing"]);
        assert_eq!(v.model_states(&names, &snap)[1].missing_on, [0, 1]);
        snap.target = Some(1);
        assert_eq!(states(&v, &snap), ["available", "switching"]);
        // Served with the view, read back by `status`.
        v.models = v.model_states(&names, &snap);
        let back: ClusterView =
            serde_json::from_value(serde_json::to_value(&v).expect("json")).expect("view");
        assert_eq!(back.models, v.models);
    }
}
