//! What the coordinator shows (`/api/v1/cluster`) and what the API consults before proxying:
//! the supervisor's state plus each node as last heard from. Built from the driver's state by
//! one pure function, so what is shown cannot drift from what is decided.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::check::NodeReport;
use super::state::{Phase, Supervisor};
use crate::config::{Config, EngineKind};
use crate::proto::{NodeFacts, Placement, PlacementSource, RankStatus};

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
    /// The node checks' warnings, from which `warnings` is made.
    #[serde(skip)]
    check_warnings: Vec<String>,
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

    /// Takes in freshly fetched facts; a node whose facts could not be read keeps its last ones.
    pub fn update_facts(&mut self, facts: &[NodeReport], warnings: Vec<String>) {
        self.check_warnings = warnings;
        for (n, f) in self.nodes.iter_mut().zip(facts) {
            match f {
                Ok(f) => n.facts = Some(f.clone()),
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
}
