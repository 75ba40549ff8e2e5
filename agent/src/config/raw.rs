//! The file as serde sees it. Spans are kept on everything a semantic check may point at.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::EngineKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Optional here so a missing table is reported by validation, with a location, next to
    /// every other problem (serde's "missing field" carries no position).
    pub cluster: Option<Spanned<ClusterSection>>,
    pub model: Option<Spanned<ModelSection>>,
    /// The several-models form: `[[models]]`, one entry per model. Exclusive with `[model]`.
    #[serde(default)]
    pub models: Vec<Spanned<ModelSection>>,
    #[serde(default)]
    pub api: ApiSection,
    #[serde(default)]
    pub ports: PortsSection,
    #[serde(default)]
    pub binaries: BinariesSection,
    #[serde(default)]
    pub supervision: SupervisionSection,
    #[serde(default, rename = "node")]
    pub nodes: Vec<Spanned<NodeSection>>,
    /// Present (even empty): the control plane speaks mutual TLS.
    pub tls: Option<Spanned<TlsSection>>,
    #[serde(default)]
    pub delivery: DeliverySection,
}

/// `[delivery]`: how node agents copy model files from each other (see `node::deliver`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [delivery] table")]
pub struct DeliverySection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub max_mbit: Option<Spanned<u64>>,
}

impl Default for DeliverySection {
    fn default() -> Self {
        DeliverySection {
            enabled: true,
            max_mbit: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// `[tls]`: where the cluster CA and this node's certificate and key are. `{rank}` in `cert`
/// and `key` stands for the node's rank, so one shared file serves every node.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [tls] table")]
pub struct TlsSection {
    pub dir: Option<Spanned<PathBuf>>,
    pub ca: Option<Spanned<PathBuf>>,
    pub cert: Option<Spanned<PathBuf>>,
    pub key: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [cluster] table")]
pub struct ClusterSection {
    pub name: Spanned<String>,
    pub engine: EngineKind,
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: Spanned<PathBuf>,
    #[serde(default = "default_rank_user")]
    pub rank_user: String,
    /// Name (or alias) of the model the ring loads at start; default: the first listed.
    pub default_model: Option<Spanned<String>>,
    #[serde(default = "default_min_residency")]
    pub min_residency_s: Spanned<u64>,
    pub idle_unload_s: Option<Spanned<u64>>,
    #[serde(default = "default_switch_grace")]
    pub switch_grace_s: Spanned<u64>,
}

// Long enough that alternating requests cannot make a ring reload back and forth (a reload of
// a big model takes tens of seconds), short enough that a waiting request still gets its model
// within a default queue timeout or two.
fn default_min_residency() -> Spanned<u64> {
    Spanned::new(0..0, 30)
}

// Requests already decoding when a switch begins get this long to finish before the ring stops.
fn default_switch_grace() -> Spanned<u64> {
    Spanned::new(0..0, 30)
}

fn default_rank_user() -> String {
    "llm-cluster".into()
}

fn default_token_file() -> PathBuf {
    PathBuf::from("/etc/llm-cluster/token")
}

fn default_state_dir() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("/var/lib/llm-cluster"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [model] table")]
pub struct ModelSection {
    pub path: Spanned<PathBuf>,
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub aliases: Vec<Spanned<String>>,
    pub sha256: Option<Spanned<String>>,
    #[serde(default = "default_ctx")]
    pub ctx_size: Spanned<u32>,
    pub layer_windows: Option<Spanned<Vec<u32>>>,
    pub tensor_split: Option<Spanned<Vec<f64>>>,
    pub prefetch: Option<Spanned<bool>>,
    pub remember_placement: Option<Spanned<bool>>,
    pub slots: Option<Spanned<u32>>,
    pub rpc_cache: Option<Spanned<bool>>,
    pub rpc_cache_max_bytes: Option<Spanned<u64>>,
    pub cache_idle_slots: Option<Spanned<bool>>,
}

fn default_ctx() -> Spanned<u32> {
    Spanned::new(0..0, 4096)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [api] table")]
pub struct ApiSection {
    #[serde(default = "default_listen")]
    pub listen: Spanned<SocketAddr>,
    pub api_keys_file: Option<PathBuf>,
    pub max_in_flight: Option<Spanned<u32>>,
    #[serde(default = "default_queue_size")]
    pub queue_size: Spanned<u32>,
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout_s: Spanned<u64>,
    pub requests_per_minute: Option<Spanned<u32>>,
    pub tokens_per_minute: Option<Spanned<u32>>,
    // --- connection and request limits (see the README's "The API under load") ---
    #[serde(default = "default_header_timeout")]
    pub header_timeout_s: Spanned<u64>,
    #[serde(default = "default_body_timeout")]
    pub body_timeout_s: Spanned<u64>,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_s: Spanned<u64>,
    #[serde(default = "default_max_connections")]
    pub max_connections: Spanned<u64>,
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: Spanned<u64>,
    pub max_body_bytes: Option<Spanned<u64>>,
    pub metrics_listen: Option<Spanned<SocketAddr>>,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: default_listen(),
            api_keys_file: None,
            max_in_flight: None,
            queue_size: default_queue_size(),
            queue_timeout_s: default_queue_timeout(),
            requests_per_minute: None,
            tokens_per_minute: None,
            header_timeout_s: default_header_timeout(),
            body_timeout_s: default_body_timeout(),
            idle_timeout_s: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            max_body_bytes: None,
            metrics_listen: None,
        }
    }
}

fn default_queue_size() -> Spanned<u32> {
    Spanned::new(0..0, 64)
}

fn default_queue_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 30)
}

// A client on a home LAN sends a request head in milliseconds; 10 s leaves room for a slow
// Wi-Fi link and still frees a slowloris connection quickly.
fn default_header_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 10)
}

// The largest body the context allows (a few MiB) takes well under a second on a LAN.
fn default_body_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 30)
}

// Longer than clients' usual pool idle times (30-60 s), so a client reuses its connection
// rather than racing the server's close.
fn default_idle_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 60)
}

// Far beyond what a household's clients open, and far below the unit's LimitNOFILE (65536): a
// proxied request holds two descriptors.
fn default_max_connections() -> Spanned<u64> {
    Spanned::new(0..0, 4096)
}

// Above the connection pools of common HTTP clients (100 in httpx and aiohttp) and of a web UI
// that proxies many users from one address.
fn default_max_connections_per_client() -> Spanned<u64> {
    Spanned::new(0..0, 256)
}

fn default_listen() -> Spanned<SocketAddr> {
    Spanned::new(0..0, SocketAddr::from(([0, 0, 0, 0], 8080)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [ports] table")]
pub struct PortsSection {
    pub data: Spanned<u16>,
    pub signal: Spanned<u16>,
    pub rpc: Spanned<u16>,
    pub server: Spanned<u16>,
}

impl Default for PortsSection {
    fn default() -> Self {
        PortsSection {
            data: Spanned::new(0..0, 9000),
            signal: Spanned::new(0..0, 10000),
            rpc: Spanned::new(0..0, 50052),
            server: Spanned::new(0..0, 18080),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [binaries] table")]
pub struct BinariesSection {
    pub prima_server: String,
    pub prima_worker: String,
    pub llama_server: String,
    pub rpc_server: String,
}

impl Default for BinariesSection {
    fn default() -> Self {
        BinariesSection {
            prima_server: "prima-server".into(),
            prima_worker: "prima-cli".into(),
            llama_server: "llama-server".into(),
            rpc_server: "ggml-rpc-server".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default, expecting = "a [supervision] table")]
pub struct SupervisionSection {
    pub ready_timeout_s: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub node_timeout_s: u64,
    pub stall_timeout_s: u64,
    pub probe_interval_s: u64,
    pub restart_on_upgrade: bool,
}

impl Default for SupervisionSection {
    fn default() -> Self {
        SupervisionSection {
            ready_timeout_s: 600,
            backoff_initial_ms: 1000,
            backoff_max_ms: 60_000,
            node_timeout_s: 15,
            stall_timeout_s: 30,
            probe_interval_s: 15,
            restart_on_upgrade: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[node]] table")]
pub struct NodeSection {
    pub rank: Spanned<i64>,
    pub address: Spanned<String>,
    #[serde(default = "default_agent_port")]
    pub agent_port: Spanned<u16>,
    #[serde(default = "default_gpu_mem")]
    pub gpu_mem: Spanned<f64>,
    pub gpu_layers: Option<u32>,
    pub threads: Option<Spanned<u32>>,
    pub engine_dir: Option<PathBuf>,
    pub model_dir: Option<Spanned<PathBuf>>,
}

fn default_gpu_mem() -> Spanned<f64> {
    Spanned::new(0..0, 0.0)
}

fn default_agent_port() -> Spanned<u16> {
    Spanned::new(0..0, 7700)
}
