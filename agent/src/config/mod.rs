//! The cluster configuration: one TOML file, identical on every node, that lists the machines,
//! the engine and the model.
//!
//! Parsing happens in two layers. `raw` mirrors the file for serde (unknown keys rejected, spans
//! kept so every problem can name a line and column); [`Config`] is the validated, span-free form
//! the rest of the agent uses. Validation collects *all* problems before failing, so a person
//! fixes the file in one pass instead of one error per run.

mod raw;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use validate::check_layer_total;
pub(crate) use validate::{toml_problem, Locator};

/// Where packages and the systemd unit expect the file.
pub const DEFAULT_PATH: &str = "/etc/llm-cluster/cluster.toml";

/// Which distributed engine runs the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// prima.cpp: piped-ring parallelism, every rank holds the whole GGUF.
    Prima,
    /// llama.cpp RPC: rank 0 runs llama-server, the others run the stateless rpc server.
    LlamaRpc,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Prima => "prima",
            EngineKind::LlamaRpc => "llama-rpc",
        }
    }

    /// Slots when `model.slots` is absent: what each engine's server does by itself, so a
    /// config without the field runs the engine as before. llama-server's automatic choice is
    /// 4 slots sharing the whole context (a unified KV cache); prima.cpp's server has 1, and
    /// more would split its context between them (ctx_size / slots each).
    pub fn default_slots(self) -> u32 {
        match self {
            EngineKind::Prima => 1,
            EngineKind::LlamaRpc => 4,
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prima" => Ok(EngineKind::Prima),
            "llama-rpc" => Ok(EngineKind::LlamaRpc),
            other => Err(format!(
                "unknown engine `{other}`: expected `prima` or `llama-rpc`"
            )),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file this came from (or a description for generated configs), for messages.
    pub source: PathBuf,
    pub cluster: Cluster,
    /// Every configured model, in file order (the `[model]` form gives one). Read the one a
    /// ring runs through [`Config::model`].
    pub models: Vec<Model>,
    /// Index into `models` of the model this config's ring runs: the default model as loaded,
    /// another after [`Config::with_loaded`] (the coordinator switches by swapping configs).
    pub loaded: usize,
    pub switching: Switching,
    pub api: Api,
    pub ports: Ports,
    pub binaries: Binaries,
    pub supervision: Supervision,
    /// Sorted by rank; `nodes[r].rank == r` is guaranteed by validation.
    pub nodes: Vec<Node>,
    /// Mutual TLS on the control plane; `None`: plain HTTP (warned about at start).
    pub tls: Option<Tls>,
    pub delivery: Delivery,
}

/// `[delivery]`: node agents fetch a missing or mismatched model file from a node that has it
/// (see [`crate::node::deliver`]).
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// The coordinator asks nodes to fetch what they lack; `false`: copy files yourself (the
    /// Ansible model role, or `llm-agent model pull`), and a node without its file is refused.
    pub enabled: bool,
    /// The most a receiving node reads per second, in Mbit/s (`None`: as fast as the link), so
    /// a transfer beside a serving ring leaves its traffic room.
    pub max_mbit: Option<u64>,
}

/// Where the default `[tls]` files live (what `llm-agent pki` writes).
pub const DEFAULT_PKI_DIR: &str = "/etc/llm-cluster/pki";

/// The `[tls]` files. `cert` and `key` may hold `{rank}`, replaced by [`Tls::cert`] and
/// [`Tls::key`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Tls {
    /// Where `llm-agent pki` keeps the CA (and its key, on the machine that issues).
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    /// The defaults for `dir`: `ca.crt`, `rank{rank}.crt`, `rank{rank}.key` in it.
    pub fn in_dir(dir: &Path) -> Tls {
        Tls {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.crt"),
            cert: dir.join("rank{rank}.crt"),
            key: dir.join("rank{rank}.key"),
        }
    }

    /// The CA's private key, next to its certificate (only the issuing machine has it).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    pub fn cert(&self, rank: u32) -> PathBuf {
        for_rank(&self.cert, rank)
    }

    pub fn key(&self, rank: u32) -> PathBuf {
        for_rank(&self.key, rank)
    }
}

fn for_rank(template: &Path, rank: u32) -> PathBuf {
    PathBuf::from(
        template
            .to_string_lossy()
            .replace("{rank}", &rank.to_string()),
    )
}

#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub name: String,
    pub engine: EngineKind,
    /// File holding the shared control token every agent authenticates with.
    pub token_file: PathBuf,
    /// Writable directory for rank working dirs (prima's profiler writes 1 GiB there) and caches.
    pub state_dir: PathBuf,
    /// Unprivileged user the engine ranks run as under systemd.
    pub rank_user: String,
}

/// How the one ring moves between configured models (`[cluster]` keys).
#[derive(Debug, Clone, Serialize)]
pub struct Switching {
    /// Index into `Config::models` of the model loaded at start.
    pub default_model: usize,
    /// A loaded model serves at least this long before a switch away starts.
    pub min_residency_s: u64,
    /// Stop the ring after this long without requests (the next request starts it again).
    pub idle_unload_s: Option<u64>,
    /// How long requests in flight may finish when a switch starts, before the ring stops.
    pub switch_grace_s: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub path: PathBuf,
    /// Name clients use in the `model` field and see in `/v1/models`.
    pub name: String,
    /// Other names clients may send for this model.
    pub aliases: Vec<String>,
    pub sha256: Option<String>,
    pub ctx_size: u32,
    /// prima only: explicit layer windows, one per rank (disables Halda's profiling).
    pub layer_windows: Option<Vec<u32>>,
    /// llama-rpc only: proportions per device as llama-server lists them.
    pub tensor_split: Option<Vec<f64>>,
    /// prima only: prefetch weights ahead of compute.
    pub prefetch: bool,
    /// prima without layer_windows: keep the placement Halda chose when the ring served and pass
    /// it explicitly on restarts (no re-profiling, no dropped ranks). `false` profiles every start.
    pub remember_placement: bool,
    /// Requests the engine decodes at once (its `-np` slots). Defaults per engine, see
    /// [`EngineKind::default_slots`].
    pub slots: u32,
    /// llama-rpc only: the rpc servers keep a tensor cache under the state dir (`-c`), so a
    /// restart does not resend the weights they already hold. See [`crate::node::rpc_cache`].
    pub rpc_cache: bool,
    /// The most bytes one node's rpc cache may hold; `None`: the default of
    /// [`crate::node::rpc_cache::default_max_bytes`].
    pub rpc_cache_max_bytes: Option<u64>,
    /// llama-rpc only: whether llama-server saves an idle slot's state to its prompt cache when
    /// another request arrives (its `--cache-idle-slots`). Off by default: see the llama-rpc
    /// adapter for the figures.
    pub cache_idle_slots: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Api {
    pub listen: SocketAddr,
    /// One key per line, or a TOML file of keys with limits; when absent the API is open (the
    /// agent warns if it listens beyond loopback).
    pub api_keys_file: Option<PathBuf>,
    /// Generation requests at rank 0's engine at once; more wait in the gateway's fair queue.
    /// Defaults to the engine's slots: beyond them the engine would queue first come first
    /// served, out of the gateway's sight.
    pub max_in_flight: u32,
    /// Requests that may wait for admission; beyond it a request gets 503 (or, when one key
    /// holds most of the queue, that key's newest waiting request does).
    pub queue_size: u32,
    /// The longest a request waits in the queue before a 503 with Retry-After.
    pub queue_timeout_s: u64,
    /// Limits over all keys together (absent: none).
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// From accept (or a later request's first byte) to the end of the request head.
    pub header_timeout_s: u64,
    /// From the request head to the end of its body.
    pub body_timeout_s: u64,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout_s: u64,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// The largest request body read; by default derived from `model.ctx_size`.
    pub max_body_bytes: u64,
    /// A second listener that serves only `/metrics`, without API keys (for a Prometheus on a
    /// trusted network); `/metrics` on `listen` stays behind the keys either way.
    pub metrics_listen: Option<SocketAddr>,
}

/// Base ports. prima ranks bind `data + rank` and `signal + rank`; llama.cpp rpc servers listen on
/// `rpc + rank`, so several ranks can share one address. `server` is rank 0's engine HTTP port,
/// bound to loopback only: clients reach it through the coordinator.
#[derive(Debug, Clone, Serialize)]
pub struct Ports {
    pub data: u16,
    pub signal: u16,
    pub rpc: u16,
    pub server: u16,
    /// `llm-agent bench` only (set by `up --local --relay-shift`; no config file can): when
    /// non-zero, ranks dial their peers at ports moved away from where the peers listen, so
    /// the bench can put a delaying relay on every ring link (see [`crate::plan::relay_links`]).
    /// Zero, the same ports, everywhere else.
    #[serde(skip)]
    pub relay_shift: u16,
}

impl Default for Ports {
    /// The `[ports]` a file gets when it names none.
    fn default() -> Ports {
        let d = raw::PortsSection::default();
        Ports {
            data: *d.data.get_ref(),
            signal: *d.signal.get_ref(),
            rpc: *d.rpc.get_ref(),
            server: *d.server.get_ref(),
            relay_shift: 0,
        }
    }
}

/// Engine binary names. Distro packages rename prima.cpp's binaries so they can coexist with
/// llama.cpp's; these defaults follow the project's packages.
#[derive(Debug, Clone, Serialize)]
pub struct Binaries {
    pub prima_server: String,
    pub prima_worker: String,
    pub llama_server: String,
    pub rpc_server: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Supervision {
    /// How long rank 0 may take to report healthy before the attempt counts as failed.
    pub ready_timeout_s: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// How long a node agent may be unreachable while a ring starts before its rank counts as
    /// lost. (While serving, an unreachable agent is a warning; the stall check decides.)
    pub node_timeout_s: u64,
    /// With work in flight, how long the ring may show no progress (no bytes from rank 0, some
    /// rank using no CPU time) before it counts as hung and is restarted.
    pub stall_timeout_s: u64,
    /// How often an idle serving ring is probed with a one-token completion, which crosses every
    /// rank (rank 0's /health stays 200 with a dead worker).
    pub probe_interval_s: u64,
    /// Once every node has the same new engine build (and llm-agent), restart the ring on it by
    /// itself; false: a person does (`llm-agent notify-upgrade --restart-ring` on the head).
    pub restart_on_upgrade: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub rank: u32,
    pub address: IpAddr,
    pub agent_port: u16,
    /// GiB of GPU memory this rank may use; 0 means CPU only.
    pub gpu_mem: f64,
    /// Layers to offload to the GPU; defaults to all when `gpu_mem > 0`.
    pub gpu_layers: Option<u32>,
    pub threads: Option<u32>,
    /// Directory holding the engine binaries; PATH is searched when absent.
    pub engine_dir: Option<PathBuf>,
    /// Where this node keeps model files, when not where `model.path` says: each model's file
    /// is then `model_dir/<file name of model.path>` here (see [`Config::model_path`]).
    pub model_dir: Option<PathBuf>,
}

impl Model {
    /// Its name, then its aliases: every value a client may send for it.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.name).chain(&self.aliases)
    }

    /// Whether a client's `model` value names this model.
    pub fn answers_to(&self, name: &str) -> bool {
        self.names().any(|n| n == name)
    }
}

impl Node {
    pub fn agent_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.agent_port)
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let fail = |p| ConfigError {
            source: path.to_path_buf(),
            problems: vec![p],
        };
        let bytes = std::fs::read(path)
            .map_err(|e| fail(Problem::general(format!("cannot read the file: {e}"))))?;
        let text = validate::decode(&bytes).map_err(fail)?;
        Config::parse(text, path)
    }

    /// Parses and validates config text; `source` only names it in messages.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        validate::parse(text, source)
    }

    pub fn world(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, rank: u32) -> Option<&Node> {
        self.nodes.get(rank as usize)
    }

    /// The model this config's ring runs (the default model until a switch). Every reader of
    /// "the loaded model" goes through here.
    pub fn model(&self) -> &Model {
        // Validation guarantees at least one model and an index in range; with_loaded keeps it.
        &self.models[self.loaded.min(self.models.len().saturating_sub(1))]
    }

    /// The index of the model a client names, by name or alias.
    pub fn find_model(&self, name: &str) -> Option<usize> {
        self.models.iter().position(|m| m.answers_to(name))
    }

    /// This config with model `index` loaded (out of range: unchanged).
    pub fn with_loaded(&self, index: usize) -> Config {
        let mut c = self.clone();
        if index < c.models.len() {
            c.loaded = index;
        }
        c
    }

    /// Where node `rank` keeps `model`'s file: `model.path`, or under the node's `model_dir`.
    /// Every reader of a node's model path (its facts, its engine's command line, the plan the
    /// coordinator sends, the node's check of it) goes through here.
    pub fn model_path(&self, rank: u32, model: &Model) -> PathBuf {
        match self.node(rank).and_then(|n| n.model_dir.as_ref()) {
            Some(dir) => dir.join(model.path.file_name().unwrap_or(model.path.as_os_str())),
            None => model.path.clone(),
        }
    }

    /// Whether `rank`'s engine reads the model file itself: every prima rank; only rank 0 of a
    /// llama.cpp RPC ring (its workers get the weights over the network).
    pub fn reads_model(&self, rank: u32) -> bool {
        self.cluster.engine == EngineKind::Prima || rank == 0
    }

    pub fn head(&self) -> &Node {
        // Validation guarantees at least one node, with rank 0 first.
        &self.nodes[0]
    }
}

/// One thing wrong with a config file, located when it can be.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl Problem {
    pub fn general(message: impl Into<String>) -> Problem {
        Problem {
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

/// All problems found in one file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub source: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match (p.line, p.column) {
                (Some(l), Some(c)) => {
                    write!(f, "{}:{l}:{c}: {}", self.source.display(), p.message)?
                }
                (Some(l), None) => write!(f, "{}:{l}: {}", self.source.display(), p.message)?,
                _ => write!(f, "{}: {}", self.source.display(), p.message)?,
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests;
