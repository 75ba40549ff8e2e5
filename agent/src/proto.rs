//! The wire protocol between the coordinator and the node agents, in one place.
//!
//! Everything that crosses the control API (and the files a node keeps to survive its own
//! restart) is defined here, so both ends compile against the same types and a change to the
//! protocol is a change to this file. `runner/`, `node/` and `coordinator/` depend on this
//! module, never on each other. Bodies a node agent receives reject unknown fields: a
//! coordinator of another version gets a 4xx naming the field instead of a silently ignored
//! setting. Facts carry the agent and protocol versions so the coordinator can refuse a node it
//! cannot speak to with a clear message.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::EngineKind;

/// Bumped on every incompatible change to the types below.
pub const PROTOCOL_VERSION: u32 = 2;

/// This build's agent version.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The highest generation a coordinator issues or a node accepts. Generations start at 1 and
/// grow by one per ring start, so nothing legitimate comes near it; a spec beyond it is refused
/// (the next generation must never overflow). 2^53 - 1: the largest integer every JSON client
/// reads exactly.
pub const MAX_GENERATION: u64 = (1 << 53) - 1;

/// Whether `generation` is one a coordinator can have issued: generations start at 1 and grow
/// by one per ring start, so anything past [`MAX_GENERATION`] only comes from someone else (and
/// would make the next generation overflow).
pub fn plausible_generation(generation: u64) -> bool {
    (1..=MAX_GENERATION).contains(&generation)
}

/// How long a rank gets to exit after SIGTERM before SIGKILL.
/// Both engines may ignore SIGTERM (prima once serving, llama-server with a dead rpc worker),
/// and a ring being torn down holds no state worth waiting for: this bounds every restart.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// The name of rank `rank`'s process (or systemd unit, plus `.service`) in `generation`.
/// One scheme for naming and parsing, so an agent that restarts finds its own ranks.
pub fn rank_process_name(rank: u32, generation: u64) -> String {
    format!("{}{generation}", rank_process_prefix(rank))
}

/// The prefix every generation of rank `rank` shares.
pub fn rank_process_prefix(rank: u32) -> String {
    format!("llm-rank{rank}-g")
}

/// The generation in a name made by [`rank_process_name`].
pub fn generation_of(name: &str) -> Option<u64> {
    let (head, g) = name.rsplit_once("-g")?;
    head.strip_prefix("llm-rank")?.parse::<u32>().ok()?;
    g.parse().ok()
}

/// Ports as the engines take them (bases; each rank adds its rank where the engine does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub data: u16,
    pub signal: u16,
    pub rpc: u16,
    pub server: u16,
}

/// One rank's part in one generation of the ring: what the coordinator sends a node agent.
/// It describes the rank's place in the ring, not a command line: each node turns it into argv
/// with its own engine adapter and binaries, so the control API never runs arbitrary commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankSpec {
    /// Increases every time the ring is (re)started; a node ignores older generations.
    pub generation: u64,
    pub engine: EngineKind,
    /// The [[node]] (config rank) that runs this rank.
    pub node: u32,
    /// The place in the ring (0 = head). Equal to `node` unless a remembered placement left
    /// nodes out of the ring.
    pub rank: u32,
    pub world: u32,
    pub address: IpAddr,
    pub master: IpAddr,
    pub next: IpAddr,
    pub ports: PortSpec,
    pub model_path: PathBuf,
    pub model_name: String,
    pub ctx_size: u32,
    /// Set on rank 0 only (prima reads the windows of every rank from rank 0).
    pub layer_windows: Option<Vec<u32>>,
    /// Set on rank 0 only.
    pub tensor_split: Option<Vec<f64>>,
    pub prefetch: bool,
    pub threads: Option<u32>,
    pub gpu_mem: f64,
    pub gpu_layers: Option<u32>,
    /// llama-rpc rank 0: the workers' rpc endpoints in rank order.
    pub rpc_workers: Vec<SocketAddr>,
    /// Every node address in the ring, in rank order: who may reach this rank's ports.
    pub peers: Vec<IpAddr>,
    /// Rank 0 only: the engine server's slots (`-np`). Absent elsewhere, so node agents of
    /// the previous protocol still accept a worker's spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// llama-rpc rank 0 only: `model.cache_idle_slots`. Absent (an older coordinator): the
    /// engine's own default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_idle_slots: Option<bool>,
}

impl RankSpec {
    pub fn is_head(&self) -> bool {
        self.rank == 0
    }
}

/// prima's layer placement: windows (and GPU layers) per [[node]], in config rank order; 0 layers
/// means the node has no place in the ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub windows: Vec<u32>,
    pub gpu_layers: Option<Vec<u32>>,
}

/// Where the ring's placement came from, for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementSource {
    /// `layer_windows` in the config.
    Config,
    /// Halda (prima's scheduler) chose it when this ring started.
    Halda,
    /// What Halda chose when the ring last served, passed explicitly so a restart skips
    /// profiling and cannot drop ranks.
    Remembered,
}

impl PlacementSource {
    /// The serde name ("config", "halda", "remembered"), for people and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementSource::Config => "config",
            PlacementSource::Halda => "halda",
            PlacementSource::Remembered => "remembered",
        }
    }
}

/// `GET /v1/rank/placement`: the placement rank 0's engine printed when it scheduled the ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankPlacement {
    pub generation: u64,
    pub placement: Option<Placement>,
    pub error: Option<String>,
}

/// The query of `GET /v1/rank`: without `after` the current status; with it a long poll that
/// answers on the first change after that version, or after `wait_ms`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    pub after: Option<u64>,
    /// At most [`MAX_WAIT`]; default 30 s.
    pub wait_ms: Option<u64>,
}

/// The longest a long poll is held open.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankPhase {
    /// Nothing asked of this node yet, or the rank was stopped on request.
    Idle,
    Running,
    /// The process ended on its own (see `exit`).
    Exited,
    /// The process could not be started (see `last_error`).
    FailedToStart,
}

impl RankPhase {
    /// The name the APIs show (the serde name).
    pub const fn as_str(self) -> &'static str {
        match self {
            RankPhase::Idle => "idle",
            RankPhase::Running => "running",
            RankPhase::Exited => "exited",
            RankPhase::FailedToStart => "failed_to_start",
        }
    }
}

/// How a rank's exit is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    /// The agent asked it to stop: whatever the status, not a fault (prima's server often
    /// segfaults on its way out).
    Stopped,
    /// prima's scheduler gave it no layers and it left with status 0: the ring goes on without it.
    DroppedByScheduler,
    /// Anything else: the ring is broken.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitReport {
    pub kind: ExitKind,
    pub description: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// The rank as its node sees it; `version` increases with every change so watchers can wait
/// for the next one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankStatus {
    /// Random per agent process: versions of different instances are not comparable.
    pub instance: u64,
    pub version: u64,
    pub rank: u32,
    pub generation: u64,
    pub phase: RankPhase,
    pub pid: Option<u32>,
    pub unit: Option<String>,
    /// Every port the engine listens on for this rank is open.
    pub listening: bool,
    pub command: Option<String>,
    pub exit: Option<ExitReport>,
    pub last_error: Option<String>,
    pub spec: Option<RankSpec>,
    /// Increases when the node's facts change on their own (its model hash finished, a package
    /// upgrade announced by `llm-agent notify-upgrade`): a coordinator waiting for the node, or
    /// serving on it, looks again at once instead of on a timer.
    pub facts_version: u64,
}

impl RankStatus {
    /// A rank nothing has been asked of yet, as a new agent process `instance` reports it.
    pub fn idle(rank: u32, instance: u64) -> RankStatus {
        RankStatus {
            instance,
            version: 0,
            rank,
            generation: 0,
            phase: RankPhase::Idle,
            pid: None,
            unit: None,
            listening: false,
            command: None,
            exit: None,
            last_error: None,
            spec: None,
            facts_version: 0,
        }
    }
}

/// `GET /v1/rank/usage`: the CPU time the running rank has used, sampled by the coordinator
/// while work waits for output (a frozen or blocked rank uses none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankUsage {
    pub generation: u64,
    /// Microseconds of CPU time (the whole unit's cgroup under systemd).
    pub cpu_usec: Option<u64>,
    /// Why `cpu_usec` is missing.
    pub error: Option<String>,
    /// Bytes of memory the rank uses (the unit's cgroup under systemd, else its resident set);
    /// absent from agents that predate it.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// `GET /v1/links`: whether this node reaches every rank its engine will connect to (planned by
/// the node from its own config). Asked before a ring starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    pub rank: u32,
    pub links: Vec<LinkCheck>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkCheck {
    pub to_rank: u32,
    pub addr: SocketAddr,
    pub reachable: bool,
    /// What the connection attempt found ("refused: nothing listens yet", "timed out", ...).
    pub detail: String,
}

/// What a node knows about itself, so the coordinator can refuse inconsistent rings (different
/// agent, protocol or engine builds, model files) before starting anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeFacts {
    pub agent_version: String,
    pub protocol_version: u32,
    pub rank: u32,
    pub hostname: String,
    pub engine: EngineKind,
    /// The binary this node's rank runs, and the engine's server binary (whose `--version`
    /// identifies the build).
    pub binaries: Vec<BinaryFact>,
    /// `version:` line of the engine's server binary, when it could be run.
    pub engine_version: Option<String>,
    /// The Arch package that installed this rank's engine binary (pacman's local database).
    pub engine_package: Option<InstalledPackage>,
    pub model: ModelFact,
    /// Every configured model's file on this node, in the config's order (`model` is the
    /// default one's); empty from agents that predate several models.
    #[serde(default)]
    pub models: Vec<ModelFact>,
    pub memory: Option<MemoryFact>,
    pub cpu: Option<CpuFact>,
    pub gpus: Vec<GpuFact>,
    /// Network tuning for ring traffic, per key, as applied (or checked) at agent start.
    pub network: Vec<KeyReport>,
    /// llama-rpc workers with `model.rpc_cache`: the rpc server's tensor cache on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc_cache: Option<RpcCacheFact>,
    /// Under `[tls]`: the certificate this node's control API presents, and the CA's, as loaded
    /// at agent start. Absent without `[tls]`; defaulted so that adding it changed no version.
    #[serde(default)]
    pub tls: Option<TlsFact>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TlsFact {
    pub cert: CertExpiry,
    pub ca: CertExpiry,
}

/// A certificate's end of validity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertExpiry {
    pub path: PathBuf,
    /// RFC 3339, UTC.
    pub not_after: String,
    pub not_after_unix: i64,
    /// Whole days from when the facts were taken until `not_after` (negative once expired).
    pub days_left: i64,
}

impl TlsFact {
    /// `days_left` as of `now` (Unix seconds).
    pub fn at(mut self, now: i64) -> TlsFact {
        for e in [&mut self.cert, &mut self.ca] {
            e.days_left = (e.not_after_unix - now).div_euclid(86_400);
        }
        self
    }
}

/// A node's llama.cpp rpc tensor cache (see `node::rpc_cache`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcCacheFact {
    /// Where the entries are (`$LLAMA_CACHE/rpc`).
    pub dir: PathBuf,
    pub bytes: u64,
    pub entries: u64,
    /// The bound the agent prunes to before each start.
    pub max_bytes: u64,
    /// Why the directory could not be read, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the cleanup before the last start did (none yet since the agent started: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_prune: Option<RpcCachePrune>,
}

/// One cleanup of an rpc cache before a start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcCachePrune {
    pub at_unix: u64,
    /// New entries hashed to check they are whole.
    pub verified_entries: u64,
    /// Of those, the ones whose content did not match (removed).
    pub corrupt_entries: u64,
    pub removed_entries: u64,
    pub removed_bytes: u64,
    pub millis: u64,
}

impl NodeFacts {
    /// The state of the model file at `path` (a configured model's), falling back to `model`
    /// for agents that report one model only.
    pub fn model_at(&self, path: &std::path::Path) -> &ModelFact {
        self.models
            .iter()
            .find(|m| m.path == path)
            .unwrap_or(&self.model)
    }

    /// The binary this rank will run, if it was found.
    pub fn rank_binary(&self) -> Option<&BinaryFact> {
        self.binaries.iter().find(|b| b.used_by_this_rank)
    }
}

/// The two fields any version of the facts carries, read before the rest so that a node of
/// another version is refused by name instead of failing to parse.
#[derive(Debug, Deserialize)]
pub struct FactsVersion {
    pub agent_version: Option<String>,
    pub protocol_version: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinaryFact {
    pub name: String,
    pub path: Option<PathBuf>,
    pub used_by_this_rank: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HashState {
    /// This rank does not read the model (llama.cpp rpc workers get weights over the network).
    NotRequired,
    Missing,
    Hashing,
    Done {
        sha256: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFact {
    pub path: PathBuf,
    pub size: Option<u64>,
    pub hash: HashState,
    /// The configured sha256, if any, and whether the file matches it.
    pub expected_sha256: Option<String>,
    pub matches_expected: Option<bool>,
    /// While hashing: the bytes hashed so far (of `size`), for progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashed_bytes: Option<u64>,
    /// The latest delivery of this file to this node since the agent started, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferFact>,
}

/// The node control API's model deliveries: `GET` lists them, `POST` a [`FetchRequest`] starts
/// one.
pub const TRANSFERS_ROUTE: &str = "/v1/models/transfers";

/// `POST /v1/models/transfers`: get `model`'s file from node `from_rank` (the receiving node
/// looks both up in its own config: nobody can point it at another address or path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub model: String,
    pub from_rank: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    /// Bytes are arriving (or the source is still hashing its copy).
    Running,
    /// The whole file arrived, matched its sha256 and was renamed into place.
    Done,
    /// Given up; `error` says why. What arrived stays in the partial file for a resume, unless
    /// it was the bytes that were wrong.
    Failed,
}

/// One model file's delivery to a node, as the receiving node reports it (in its facts, and at
/// `GET /v1/models/transfers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferFact {
    pub model: String,
    pub from_rank: u32,
    pub state: TransferState,
    /// The file's size once the source said it (0 before).
    pub total_bytes: u64,
    /// Bytes in the partial file so far, counting those kept from an earlier attempt.
    pub done_bytes: u64,
    /// Bytes already there when this attempt began (a resume), 0 for a fresh start.
    pub resumed_from: u64,
    /// While running: the rate over the last second (none before the first). Once done: the
    /// mean over the bytes received, from the first byte asked for to the last written (a wait
    /// for the source to hash its copy not counted; `seconds` counts it).
    pub bytes_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    /// What it is doing now, for people ("receiving", "waiting for rank 0 to hash its copy",
    /// "verifying sha256").
    pub activity: String,
    pub error: Option<String>,
    pub started_unix: u64,
    pub finished_unix: Option<u64>,
    /// Seconds from start to finish (or until now), and the mean rate over the bytes this
    /// attempt received.
    pub seconds: f64,
}

impl TransferFact {
    /// Percent done, for "transferring 42 %".
    pub fn percent(&self) -> Option<u32> {
        (self.total_bytes > 0)
            .then(|| ((self.done_bytes as f64 / self.total_bytes as f64) * 100.0).floor() as u32)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryFact {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuFact {
    pub model: String,
    pub logical_cores: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuFact {
    pub name: String,
    pub memory_total_mib: Option<u64>,
    pub memory_free_mib: Option<u64>,
}

/// An Arch package as pacman's local database records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledPackage {
    pub name: String,
    pub version: String,
}

/// One sysctl key of the network tuning and what the agent found or did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyReport {
    pub key: String,
    pub wanted: String,
    pub before: Option<String>,
    pub after: Option<String>,
    #[serde(flatten)]
    pub state: KeyState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyState {
    AlreadySet,
    Applied,
    /// Check-only mode: the value differs and would be applied.
    Differs,
    NotSettable {
        reason: String,
    },
    Unsupported {
        reason: String,
    },
}

impl KeyState {
    /// The name the reports show (the serde tag).
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyState::AlreadySet => "already_set",
            KeyState::Applied => "applied",
            KeyState::Differs => "differs",
            KeyState::NotSettable { .. } => "not_settable",
            KeyState::Unsupported { .. } => "unsupported",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_source_names_are_the_serde_names() {
        for s in [
            PlacementSource::Config,
            PlacementSource::Halda,
            PlacementSource::Remembered,
        ] {
            assert_eq!(serde_json::to_value(s).expect("json"), s.as_str());
        }
    }

    /// The names shown in messages and node views are the ones the JSON APIs use.
    #[test]
    fn as_str_equals_the_serde_names() {
        for p in [
            RankPhase::Idle,
            RankPhase::Running,
            RankPhase::Exited,
            RankPhase::FailedToStart,
        ] {
            assert_eq!(serde_json::to_value(p).expect("json"), p.as_str());
        }
        for k in [
            KeyState::AlreadySet,
            KeyState::Applied,
            KeyState::Differs,
            KeyState::NotSettable { reason: "r".into() },
            KeyState::Unsupported { reason: "r".into() },
        ] {
            assert_eq!(serde_json::to_value(&k).expect("json")["state"], k.as_str());
        }
    }

    #[test]
    fn process_names_round_trip() {
        let n = rank_process_name(3, 17);
        assert_eq!(n, "llm-rank3-g17");
        assert!(n.starts_with(&rank_process_prefix(3)));
        assert_eq!(generation_of(&n), Some(17));
        assert_eq!(generation_of("llm-rank3-gx"), None);
        assert_eq!(generation_of("other-g4"), None);
    }

    #[test]
    fn a_rank_spec_with_an_unknown_field_is_refused_by_name() {
        let spec = RankSpec {
            generation: 1,
            engine: EngineKind::LlamaRpc,
            node: 0,
            rank: 0,
            world: 1,
            address: "127.0.0.1".parse().expect("ip"),
            master: "127.0.0.1".parse().expect("ip"),
            next: "127.0.0.1".parse().expect("ip"),
            ports: PortSpec {
                data: 1,
                signal: 2,
                rpc: 3,
                server: 4,
            },
            model_path: "/m.gguf".into(),
            model_name: "m".into(),
            ctx_size: 1,
            layer_windows: None,
            tensor_split: None,
            prefetch: false,
            threads: None,
            gpu_mem: 0.0,
            gpu_layers: None,
            rpc_workers: vec![],
            peers: vec![],
            slots: None,
            cache_idle_slots: None,
        };
        let mut v = serde_json::to_value(&spec).expect("json");
        assert_eq!(
            serde_json::from_value::<RankSpec>(v.clone()).expect("round trip"),
            spec
        );
        v["exec"] = serde_json::json!("/bin/sh");
        let err = serde_json::from_value::<RankSpec>(v).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `exec`"), "{err}");
        let err = serde_json::from_str::<WaitQuery>(r#"{"after":1,"wait":5}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `wait`"), "{err}");
    }
}

/// `GET /api/v1/events`: one thing that happened to the ring, as the coordinator's event
/// stream (SSE) carries it. `seq` counts from 1 per coordinator run; `kind` and its fields come
/// from [`EventDetail`], flattened into the same object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterEvent {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub at: String,
    pub generation: Option<u64>,
    pub rank: Option<u32>,
    /// For people.
    pub message: String,
    #[serde(flatten)]
    pub detail: EventDetail,
}

/// What kind of event, with the fields each kind adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventDetail {
    /// The supervisor's phase changed (phase names as `/api/v1/cluster` shows them).
    Phase { from: String, to: String },
    /// The ring failed or was refused. `cause` is a short, fixed name for the class of failure
    /// (rank_exited, start_failed, not_ready, node_lost, stalled, refused).
    Failure { reason: String, cause: String },
    /// A new generation starts after a failure.
    Restart { reason: String, cause: String },
    /// The ring's layer placement was planned or found.
    Placement {
        source: Option<PlacementSource>,
        windows: Option<Vec<u32>>,
    },
    /// Kinds whose producers are still to come (model switches, transfers, upgrades): their
    /// fields are free-form until then.
    Switch {
        #[serde(flatten)]
        fields: serde_json::Map<String, serde_json::Value>,
    },
    /// A model delivery to `rank` started, resumed, ended or failed: the fields of its
    /// [`TransferFact`] (`state` running, done or failed).
    Transfer {
        #[serde(flatten)]
        fields: serde_json::Map<String, serde_json::Value>,
    },
    Upgrade {
        #[serde(flatten)]
        fields: serde_json::Map<String, serde_json::Value>,
    },
}

impl EventDetail {
    /// The SSE event name: the `kind` field's value.
    pub fn kind(&self) -> &'static str {
        match self {
            EventDetail::Phase { .. } => "phase",
            EventDetail::Failure { .. } => "failure",
            EventDetail::Restart { .. } => "restart",
            EventDetail::Placement { .. } => "placement",
            EventDetail::Switch { .. } => "switch",
            EventDetail::Transfer { .. } => "transfer",
            EventDetail::Upgrade { .. } => "upgrade",
        }
    }
}

/// The data of the SSE `lagged` event: this client fell behind the coordinator's buffer and
/// `missed` events are gone; the stream goes on with the next one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsLagged {
    pub missed: u64,
}
