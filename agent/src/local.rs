//! `llm-agent up --local N`: a whole cluster on this machine — N node agents and the coordinator
//! in one process over loopback, each rank a child process — for trying the product and for the
//! end-to-end tests. The config is generated as TOML and goes through the same validation as a
//! user's file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::auth;
use crate::config::{Config, EngineKind, Ports};
use crate::engine::find_binary;
use crate::service;

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Number of ranks (node agents) to run on this machine.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub local: u32,
    /// Engine: `llama-rpc` or `prima`.
    #[arg(long, default_value = "llama-rpc")]
    pub engine: EngineKind,
    /// GGUF model file.
    #[arg(long, env = "LLM_MODEL")]
    pub model: PathBuf,
    /// Directory with the engine binaries (PATH when absent). For prima an upstream build
    /// directory with llama-server/llama-cli works too.
    #[arg(long, env = "LLM_ENGINE_DIR")]
    pub engine_dir: Option<PathBuf>,
    /// Address of the OpenAI-compatible API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// prima only: explicit layer windows, e.g. `10,10,10` (tiny models need them).
    #[arg(long)]
    pub layer_windows: Option<String>,
    /// Context size.
    #[arg(long, default_value_t = 2048)]
    pub ctx_size: u32,
    /// Threads per rank.
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Added to every default port (agents 17700+, rpc 50052+, prima 9000+/10000+, rank 0's
    /// server 18080), to run beside another cluster. The highest port, 50052 + offset + the
    /// last rank, must stay at most 65535.
    #[arg(long, default_value_t = 0)]
    pub port_offset: u16,
    /// Where ranks run (working directories), the token and the generated config; by default
    /// `llm-cluster-local-<API port>` under the system temp dir, reused by later runs (the
    /// token too). It must be yours alone: it is created with mode 0700, and an existing one
    /// that is a symlink, another user's, or open to group or others is refused.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// API keys file (api.api_keys_file): one key per line, or TOML `[[key]]` tables with
    /// limits. It is re-read when it changes and on SIGHUP. Without it the API is open.
    #[arg(long, value_name = "FILE")]
    pub api_keys: Option<PathBuf>,
    /// Requests the engine decodes at once (model.slots; default: the engine's own).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: Option<u32>,
    /// Generation requests at the engine at once (api.max_in_flight; default: the slots).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: Option<u32>,
    /// Requests that may wait for the engine (api.queue_size).
    #[arg(long)]
    pub queue_size: Option<u32>,
    /// Seconds a request may wait in the queue before a 503 (api.queue_timeout_s).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub queue_timeout: Option<u64>,
    /// api.header_timeout_s: seconds a client may take to send a request head.
    #[arg(long)]
    pub header_timeout: Option<u64>,
    /// api.body_timeout_s: seconds a client may take to send a request body.
    #[arg(long)]
    pub body_timeout: Option<u64>,
    /// api.idle_timeout_s: seconds a kept-alive connection may wait for its next request.
    #[arg(long)]
    pub idle_timeout: Option<u64>,
    /// api.max_connections_per_client: connections served at once from one address.
    #[arg(long)]
    pub max_connections_per_client: Option<u64>,
    /// Another model the ring may switch to (repeatable; named from its file name): the config
    /// then lists [[models]], `--model` first and loaded at start.
    #[arg(long, value_name = "GGUF")]
    pub also_model: Vec<PathBuf>,
    /// cluster.min_residency_s: seconds a loaded model serves before a switch away.
    #[arg(long, value_name = "SECONDS")]
    pub min_residency: Option<u64>,
    /// cluster.idle_unload_s: stop the ring after this many seconds without requests.
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_unload: Option<u64>,
    /// cluster.switch_grace_s: seconds requests in flight may finish when a switch starts.
    #[arg(long, value_name = "SECONDS")]
    pub switch_grace: Option<u64>,
    /// api.metrics_listen: also serve `/metrics` here, without API keys.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// model_dir of one rank, as RANK=DIR (repeatable): that rank keeps model files in DIR,
    /// so a local cluster can have nodes without the file, which the coordinator then
    /// delivers to them from a node that has it.
    #[arg(long, value_name = "RANK=DIR")]
    pub node_model_dir: Vec<String>,
    /// model.sha256 of `--model`: every copy is checked against it, and a wrong one replaced.
    #[arg(long, value_name = "HEX")]
    pub model_sha256: Option<String>,
    /// delivery.enabled = false: the coordinator does not deliver model files by itself (a
    /// node without its file is refused until `llm-agent model pull` or a person copies it).
    #[arg(long)]
    pub no_delivery: bool,
    /// delivery.max_mbit: the most a node receives per second when it fetches a model file.
    #[arg(long, value_name = "MBIT", value_parser = clap::value_parser!(u64).range(1..))]
    pub transfer_max_mbit: Option<u64>,
    /// For `llm-agent bench --matrix` only: ranks dial their peers this many ports away from
    /// where the peers listen, where the bench's delaying relays wait (0: directly).
    #[arg(long, default_value_t = 0, hide = true)]
    pub relay_shift: u16,
}

/// prima's upstream build names its binaries like llama.cpp's; the packages rename them.
fn prima_binary_names(dir: Option<&Path>) -> (String, String) {
    if find_binary("prima-server", dir).is_none()
        && find_binary("llama-server", dir).is_some()
        && find_binary("llama-cli", dir).is_some()
    {
        ("llama-server".into(), "llama-cli".into())
    } else {
        ("prima-server".into(), "prima-cli".into())
    }
}

/// Agent ports of local ranks start here, clear of a real node's 7700 on the same machine.
const LOCAL_AGENT_PORT: u16 = 17700;

/// The generated file, in the shape of a user's `cluster.toml`; the toml serializer does the
/// quoting, so any path that is valid UTF-8 survives the round trip.
#[derive(Serialize)]
struct LocalFile<'a> {
    cluster: LocalCluster<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<LocalModel<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    models: Vec<LocalModel<'a>>,
    api: LocalApi,
    ports: Ports,
    #[serde(skip_serializing_if = "Option::is_none")]
    binaries: Option<LocalBinaries>,
    supervision: LocalSupervision,
    node: Vec<LocalNode<'a>>,
    tls: LocalTls,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery: Option<LocalDelivery>,
}

#[derive(Serialize)]
struct LocalDelivery {
    enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_mbit: Option<u64>,
}

/// The throwaway PKI of [`throwaway_pki`], in the state dir.
#[derive(Serialize)]
struct LocalTls {
    dir: PathBuf,
}

#[derive(Serialize)]
struct LocalCluster<'a> {
    name: &'static str,
    engine: EngineKind,
    token_file: &'a Path,
    state_dir: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_residency_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_unload_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    switch_grace_s: Option<u64>,
}

#[derive(Serialize)]
struct LocalModel<'a> {
    path: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<&'a str>,
    ctx_size: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    layer_windows: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slots: Option<u32>,
}

#[derive(Serialize)]
struct LocalApi {
    listen: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_keys_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_in_flight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_timeout_s: Option<u64>,
    header_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections_per_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Serialize)]
struct LocalBinaries {
    prima_server: String,
    prima_worker: String,
}

#[derive(Serialize)]
struct LocalSupervision {
    ready_timeout_s: u64,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    node_timeout_s: u64,
    stall_timeout_s: u64,
    probe_interval_s: u64,
}

#[derive(Serialize)]
struct LocalNode<'a> {
    rank: u32,
    address: &'static str,
    agent_port: u16,
    threads: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    engine_dir: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_dir: Option<PathBuf>,
}

/// The default ports moved by `--port-offset`, checked up front: every rank adds its rank to
/// the per-rank bases, and all of it must stay a valid port.
fn offset_ports(offset: u16, ranks: u32) -> Result<(Ports, Vec<u16>)> {
    let d = Ports::default();
    let last_rank = ranks.saturating_sub(1);
    let highest_base = [d.data, d.signal, d.rpc, LOCAL_AGENT_PORT]
        .into_iter()
        .map(|p| u32::from(p) + last_rank)
        .chain([u32::from(d.server)])
        .max()
        .unwrap_or(0);
    let Some(largest) = u32::from(u16::MAX).checked_sub(highest_base) else {
        bail!(
            "--local {ranks}: too many ranks for the port range (the rpc ports {}+rank would pass {})",
            d.rpc,
            u16::MAX
        );
    };
    if u32::from(offset) > largest {
        bail!(
            "--port-offset {offset} is too large: with --local {ranks} the highest port would be {}; \
             the largest offset allowed is {largest}",
            highest_base + u32::from(offset)
        );
    }
    // Cannot overflow: every base plus the offset and the last rank was checked above.
    let ports = Ports {
        data: d.data + offset,
        signal: d.signal + offset,
        rpc: d.rpc + offset,
        server: d.server + offset,
        relay_shift: 0,
    };
    let agent_ports = (0..ranks)
        .map(|r| u16::try_from(u32::from(LOCAL_AGENT_PORT + offset) + r))
        .collect::<Result<_, _>>()
        .context("agent port out of range")?;
    Ok((ports, agent_ports))
}

/// `--node-model-dir RANK=DIR` values, by rank; DIR made absolute.
fn parse_model_dirs(
    values: &[String],
    ranks: u32,
) -> Result<std::collections::BTreeMap<u32, PathBuf>> {
    let mut out = std::collections::BTreeMap::new();
    for v in values {
        let (rank, dir) = v.split_once('=').with_context(|| {
            format!("--node-model-dir `{v}`: expected RANK=DIR, e.g. 1=/tmp/models1")
        })?;
        let rank: u32 = rank
            .trim()
            .parse()
            .ok()
            .filter(|r| *r < ranks)
            .with_context(|| {
                format!(
                    "--node-model-dir `{v}`: `{rank}` is not a rank of this cluster (0..{})",
                    ranks - 1
                )
            })?;
        let dir = std::path::absolute(dir.trim())
            .with_context(|| format!("--node-model-dir `{v}`: cannot make {dir} absolute"))?;
        out.insert(rank, dir);
    }
    Ok(out)
}

fn parse_layer_windows(text: &str) -> Result<Vec<u32>> {
    text.split(',')
        .map(|w| w.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!("--layer-windows {text:?}: expected layer counts separated by commas, such as 10,10,10")
        })
}

pub fn local_config_text(args: &UpArgs, state_dir: &Path, token_file: &Path) -> Result<String> {
    let (ports, agent_ports) = offset_ports(args.port_offset, args.local)?;
    let model_dirs = parse_model_dirs(&args.node_model_dir, args.local)?;
    let layer_windows = args
        .layer_windows
        .as_deref()
        .map(parse_layer_windows)
        .transpose()?;
    let binaries = (args.engine == EngineKind::Prima).then(|| {
        let (prima_server, prima_worker) = prima_binary_names(args.engine_dir.as_deref());
        LocalBinaries {
            prima_server,
            prima_worker,
        }
    });
    let file = LocalFile {
        cluster: LocalCluster {
            name: "local",
            engine: args.engine,
            token_file,
            state_dir,
            min_residency_s: args.min_residency,
            idle_unload_s: args.idle_unload,
            switch_grace_s: args.switch_grace,
        },
        model: args.also_model.is_empty().then(|| LocalModel {
            path: &args.model,
            sha256: args.model_sha256.as_deref(),
            ctx_size: args.ctx_size,
            layer_windows: layer_windows.clone(),
            slots: args.slots,
        }),
        models: if args.also_model.is_empty() {
            Vec::new()
        } else {
            std::iter::once(&args.model)
                .chain(&args.also_model)
                .enumerate()
                .map(|(i, path)| LocalModel {
                    path,
                    sha256: args.model_sha256.as_deref().filter(|_| i == 0),
                    ctx_size: args.ctx_size,
                    layer_windows: layer_windows.clone(),
                    slots: args.slots,
                })
                .collect()
        },
        api: LocalApi {
            listen: args.listen,
            api_keys_file: args.api_keys.clone(),
            max_in_flight: args.max_in_flight,
            queue_size: args.queue_size,
            queue_timeout_s: args.queue_timeout,
            header_timeout_s: args.header_timeout,
            body_timeout_s: args.body_timeout,
            idle_timeout_s: args.idle_timeout,
            max_connections_per_client: args.max_connections_per_client,
            metrics_listen: args.metrics_listen,
        },
        ports,
        binaries,
        // Quick restarts make the local demo and its tests responsive; real clusters keep
        // the defaults.
        supervision: LocalSupervision {
            ready_timeout_s: 120,
            backoff_initial_ms: 500,
            backoff_max_ms: 10000,
            node_timeout_s: 10,
            stall_timeout_s: 10,
            probe_interval_s: 5,
        },
        node: (0..args.local)
            .zip(agent_ports)
            .map(|(rank, agent_port)| LocalNode {
                rank,
                address: "127.0.0.1",
                agent_port,
                threads: args.threads,
                engine_dir: args.engine_dir.as_deref(),
                model_dir: model_dirs.get(&rank).cloned(),
            })
            .collect(),
        tls: LocalTls {
            dir: pki_dir(state_dir),
        },
        delivery: (args.no_delivery || args.transfer_max_mbit.is_some()).then_some(LocalDelivery {
            enabled: !args.no_delivery,
            max_mbit: args.transfer_max_mbit,
        }),
    };
    toml::to_string(&file).context(
        "cannot write the generated config: the model, engine and state paths must be valid UTF-8",
    )
}

pub async fn up(args: UpArgs) -> Result<()> {
    let started = Instant::now();
    // Flag errors first, before anything is created on disk; they are usage errors (exit 2).
    let usage = |e: anyhow::Error| crate::exit::Usage(format!("{e:#}"));
    offset_ports(args.port_offset, args.local).map_err(usage)?;
    parse_model_dirs(&args.node_model_dir, args.local).map_err(usage)?;
    args.layer_windows
        .as_deref()
        .map(parse_layer_windows)
        .transpose()
        .map_err(usage)?;
    let model = std::fs::canonicalize(&args.model).map_err(|e| {
        crate::exit::Usage(format!(
            "--model {}: cannot read the model file: {e}",
            args.model.display()
        ))
    })?;
    // Resolved here: the agent reads the keys file again, later, on every change.
    let api_keys = args
        .api_keys
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .map_err(|e| crate::exit::Usage(format!("--api-keys: {e}")))?;
    let also_model = args
        .also_model
        .iter()
        .map(|m| {
            std::fs::canonicalize(m).map_err(|e| {
                crate::exit::Usage(format!(
                    "--also-model {}: cannot read the model file: {e}",
                    m.display()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let args = UpArgs {
        model,
        api_keys,
        also_model,
        ..args
    };
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("llm-cluster-local-{}", args.listen.port())),
    };
    let state_dir = private_state_dir(&state_dir)?;
    let token_file = state_dir.join("token");
    let token = state_token(&token_file)?;
    let text = local_config_text(&args, &state_dir, &token_file)?;
    throwaway_pki(&state_dir, args.local)?;
    // Kept as a ConfigError (not flattened to text) so that it exits 2, a usage error.
    let mut config = Config::parse(&text, Path::new("<up --local>"))?;
    config.ports.relay_shift = args.relay_shift;
    write_replacing(&state_dir.join("cluster.toml"), text.as_bytes())?;
    let config = Arc::new(config);

    let mut nodes = Vec::new();
    for r in 0..args.local {
        nodes.push(
            service::start_node(
                config.clone(),
                r,
                auth::Secret::new(&token),
                service::RunnerKind::Process,
                false,
            )
            .await?,
        );
    }
    let coordinator = service::start_coordinator(config.clone(), token.clone(), true).await?;
    tracing::info!(ranks = args.local, engine = %args.engine, state_dir = %state_dir.display(), "local cluster starting");

    let mut view = coordinator.view.clone();
    // What the ring waits for (checking nodes, hashing NN %, receiving the model NN %, starting
    // ranks, loading), on a terminal only: a log or a test reading the output gets the lines
    // it had.
    let progress = {
        use std::io::IsTerminal;
        std::io::stderr()
            .is_terminal()
            .then(|| crate::status::Progress::new(true))
    };
    let announce = async {
        loop {
            let (what, pct, serving) = {
                let v = view.borrow_and_update();
                let (what, pct) = crate::status::stage(&v);
                (what, pct, v.serving())
            };
            if serving {
                break;
            }
            if let Some(p) = &progress {
                p.stage(&what, pct);
            }
            if view.changed().await.is_err() {
                break;
            }
        }
        if let Some(p) = &progress {
            p.done();
        }
        if view.borrow().serving() {
            print_ready(&args, &config, started.elapsed().as_secs_f64());
        }
        std::future::pending::<()>().await
    };
    let sig = tokio::select! {
        s = service::stop_signal() => s?,
        _ = announce => unreachable!("announce never returns"),
    };
    eprintln!("{sig}: stopping every rank…");
    coordinator.shutdown().await;
    for n in nodes {
        n.shutdown().await;
    }
    eprintln!("stopped.");
    Ok(())
}

fn pki_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pki")
}

/// A fresh CA and a certificate per rank (for 127.0.0.1) in the state dir, made on every start
/// and used for nothing else: the local ring's control plane runs mutual TLS like a real one.
fn throwaway_pki(state_dir: &Path, ranks: u32) -> Result<()> {
    let dir = pki_dir(state_dir);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove the old {}", dir.display()))
        }
    }
    let tls = crate::config::Tls::in_dir(&dir);
    crate::tls::init_ca(&tls, "local")?;
    for rank in 0..ranks {
        crate::tls::issue(&tls, "local", rank, &["127.0.0.1".into()], 365, false)?;
    }
    Ok(())
}

fn print_ready(args: &UpArgs, config: &Config, secs: f64) {
    let base = format!("http://{}", args.listen);
    println!(
        "llm-cluster is serving `{}` on a {}-rank {} ring (ready {secs:.1} s after start)\n\
         \x20 endpoint: {base}/v1\n\
         \x20 status:   {base}/api/v1/cluster\n\
         \x20 dashboard: {base}/\n\
         \x20 try:      curl {base}/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\
         Press Ctrl-C to stop every rank.",
        config.model().name,
        args.local,
        args.engine,
        config.model().name
    );
}

/// What to tell the user when the state dir or a file in it is not theirs alone.
const STATE_DIR_ADVICE: &str = "up --local keeps its control token there, so it must belong to \
     you alone: remove it (it is recreated), or pass --state-dir with a directory of your own \
     (mode 0700)";

/// Creates the state dir, or checks an existing one: a directory (not a symlink) owned by this
/// user with no group or other permissions. The default path is predictable and in the shared
/// temp dir, so someone else may have created it first to read the token or plant symlinks.
fn private_state_dir(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::path::absolute(dir)
        .with_context(|| format!("--state-dir {}: cannot make it absolute", dir.display()))?;
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        bail!(
            "--state-dir {}: not a directory one can create",
            dir.display()
        );
    };
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    // The parent's symlinks (/tmp on some systems) are resolved; the last component never is.
    let parent = std::fs::canonicalize(parent)
        .with_context(|| format!("cannot resolve {}", parent.display()))?;
    let dir = parent.join(name);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(&dir)
        .with_context(|| format!("cannot inspect {}", dir.display()))?;
    if !meta.file_type().is_dir() {
        bail!(
            "{} is not a directory ({}); {STATE_DIR_ADVICE}",
            dir.display(),
            file_kind(&meta)
        );
    }
    check_private(&dir, &meta)?;
    Ok(dir)
}

/// Owned by the effective user, no permission bits for group or others.
fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        bail!(
            "{} is owned by uid {}, not by you (uid {me}); {STATE_DIR_ADVICE}",
            path.display(),
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!(
            "{} has mode {mode:04o}, open to group or others; {STATE_DIR_ADVICE}",
            path.display()
        );
    }
    Ok(())
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// The control token in `path`: an existing one is reused when it is a regular file of this
/// user's that nobody else can read; otherwise a fresh one is created with mode 0600, never
/// written into a file that was already there.
fn state_token(path: &Path) -> Result<String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let nofollow = nix::fcntl::OFlag::O_NOFOLLOW.bits();
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow)
        .open(path)
    {
        Ok(mut f) => {
            // Checked on the open file, so what is read is what was checked.
            let meta = f
                .metadata()
                .with_context(|| format!("cannot inspect {}", path.display()))?;
            if !meta.file_type().is_file() {
                bail!(
                    "{} is not a regular file ({}); {STATE_DIR_ADVICE}",
                    path.display(),
                    file_kind(&meta)
                );
            }
            check_private(path, &meta)?;
            let mut text = String::new();
            f.read_to_string(&mut text).with_context(|| {
                format!("cannot read the control token file {}", path.display())
            })?;
            auth::token_from_text(&text, path)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = auth::generate_token();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nofollow)
                .open(path)
                .with_context(|| {
                    format!("cannot create the control token file {}", path.display())
                })?;
            writeln!(f, "{token}").with_context(|| format!("cannot write {}", path.display()))?;
            Ok(token)
        }
        // ELOOP: O_NOFOLLOW met a symlink.
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            bail!("{} is a symbolic link; {STATE_DIR_ADVICE}", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot open {}", path.display())),
    }
}

/// Writes `path` through a new temporary file beside it and a rename, so whatever was at `path`
/// (a symlink included) is replaced, never written through.
fn write_replacing(path: &Path, content: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".{name}.{}",
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&tmp)
        .and_then(|mut f| f.write_all(content))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        up: UpArgs,
    }

    #[test]
    fn generated_config_is_valid_and_distinct_per_rank() {
        let t = T::parse_from([
            "t",
            "--model",
            "/m.gguf",
            "--local",
            "4",
            "--port-offset",
            "100",
        ]);
        let text = local_config_text(&t.up, Path::new("/tmp/s"), Path::new("/tmp/s/token"))
            .expect("config text");
        let c = Config::parse(&text, Path::new("<t>")).expect("valid");
        assert_eq!(c.world(), 4);
        let ports: Vec<u16> = c.nodes.iter().map(|n| n.agent_port).collect();
        assert_eq!(ports, [17800, 17801, 17802, 17803]);
        assert_eq!(c.ports.rpc, 50152);
    }

    #[test]
    fn prima_windows_pass_through() {
        let t = T::parse_from([
            "t",
            "--model",
            "/m.gguf",
            "--engine",
            "prima",
            "--layer-windows",
            "10,10,10",
        ]);
        let text =
            local_config_text(&t.up, Path::new("/s"), Path::new("/s/token")).expect("config text");
        let c = Config::parse(&text, Path::new("<t>")).expect("valid");
        assert_eq!(c.model().layer_windows, Some(vec![10, 10, 10]));
    }

    fn args(extra: &[&str]) -> UpArgs {
        let mut argv = vec!["t", "--model", "/m.gguf"];
        argv.extend_from_slice(extra);
        T::parse_from(argv).up
    }

    /// TOML's escapes are not Rust's `{:?}` ones (`\u{200b}` is no TOML escape): every path
    /// goes through the serializer and loads back as itself.
    #[test]
    fn odd_paths_survive_the_generated_toml() {
        let odd = "/srv/a \"quoted\" dir\\back\\slash/ünï 😀\u{200b}\u{7}\nline.gguf";
        let mut a = args(&["--engine", "prima", "--layer-windows", "10, 10,10"]);
        a.model = PathBuf::from(odd);
        a.engine_dir = Some(PathBuf::from(format!("{odd}.d")));
        let state = PathBuf::from(format!("{odd}.state"));
        let token = state.join("tok\"en");
        let text = local_config_text(&a, &state, &token).expect("config text");
        let c = Config::parse(&text, Path::new("<t>"))
            .unwrap_or_else(|e| panic!("generated config does not load: {e}\n{text}"));
        assert_eq!(c.model().path, Path::new(odd));
        assert_eq!(c.cluster.state_dir, state);
        assert_eq!(c.cluster.token_file, token);
        assert_eq!(c.model().layer_windows, Some(vec![10, 10, 10]));
        assert!(c
            .nodes
            .iter()
            .all(|n| n.engine_dir.as_deref() == Some(Path::new(&format!("{odd}.d")))));
    }

    #[test]
    fn keys_and_admission_flags_reach_the_config() {
        let a = args(&[
            "--api-keys",
            "/etc/keys.toml",
            "--slots",
            "2",
            "--max-in-flight",
            "1",
            "--queue-size",
            "3",
            "--queue-timeout",
            "4",
        ]);
        let text = local_config_text(&a, Path::new("/s"), Path::new("/s/t")).expect("text");
        let c = Config::parse(&text, Path::new("<t>")).expect("valid");
        assert_eq!(
            c.api.api_keys_file.as_deref(),
            Some(Path::new("/etc/keys.toml"))
        );
        assert_eq!(c.model().slots, 2);
        assert_eq!(
            (c.api.max_in_flight, c.api.queue_size, c.api.queue_timeout_s),
            (1, 3, 4)
        );
        // Without them, the config's defaults.
        let c = Config::parse(
            &local_config_text(&args(&[]), Path::new("/s"), Path::new("/s/t")).expect("text"),
            Path::new("<t>"),
        )
        .expect("valid");
        assert_eq!((c.model().slots, c.api.max_in_flight), (4, 4));
        assert!(c.api.api_keys_file.is_none());
    }

    #[test]
    fn layer_windows_are_numbers_not_toml() {
        let a = args(&[
            "--engine",
            "prima",
            "--layer-windows",
            "1]\n[api]\nlisten = \"0.0.0.0:1\"\n#",
        ]);
        let err = local_config_text(&a, Path::new("/s"), Path::new("/s/token"))
            .expect_err("not layer counts")
            .to_string();
        assert!(
            err.contains("--layer-windows") && err.contains("10,10,10"),
            "{err}"
        );
    }

    /// Ports are u16: the highest one (rpc base + offset + last rank) must fit, and the error
    /// names the flag and the largest offset for this many ranks.
    #[test]
    fn port_offset_is_checked_against_the_port_range() {
        let rpc = Ports::default().rpc;
        let largest = u16::MAX - rpc;
        let ok = args(&["--local", "1", "--port-offset", &largest.to_string()]);
        let c = Config::parse(
            &local_config_text(&ok, Path::new("/s"), Path::new("/s/t")).expect("fits"),
            Path::new("<t>"),
        )
        .expect("valid");
        assert_eq!(c.ports.rpc, u16::MAX);
        for (ranks, offset) in [(1, largest + 1), (4, largest - 2), (3, u16::MAX)] {
            let a = args(&[
                "--local",
                &ranks.to_string(),
                "--port-offset",
                &offset.to_string(),
            ]);
            let err = local_config_text(&a, Path::new("/s"), Path::new("/s/t"))
                .expect_err("out of range")
                .to_string();
            let allowed = largest - (ranks - 1);
            assert!(
                err.contains(&format!("--port-offset {offset}"))
                    && err.contains(&format!("largest offset allowed is {allowed}")),
                "{err}"
            );
        }
        let a = args(&["--local", "20000"]);
        let err = local_config_text(&a, Path::new("/s"), Path::new("/s/t"))
            .expect_err("too many ranks")
            .to_string();
        assert!(err.contains("--local 20000"), "{err}");
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    fn chmod(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn the_state_dir_is_created_private_and_its_token_reused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = private_state_dir(&tmp.path().join("new/state")).expect("created");
        assert_eq!(mode(&dir), 0o700);
        let token = state_token(&dir.join("token")).expect("new token");
        assert_eq!(mode(&dir.join("token")), 0o600);
        assert_eq!(private_state_dir(&dir).expect("reused"), dir);
        assert_eq!(state_token(&dir.join("token")).expect("reused"), token);
    }

    /// Someone created the predictable directory first, open to them.
    #[test]
    fn a_state_dir_open_to_others_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("llm-cluster-local-8080");
        std::fs::create_dir(&dir).expect("mkdir");
        for m in [0o777, 0o755, 0o1733, 0o710] {
            chmod(&dir, m);
            let err = private_state_dir(&dir).expect_err("open dir").to_string();
            assert!(
                err.contains(&format!("mode {m:04o}")) && err.contains("--state-dir"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_symlinked_state_dir_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = tmp.path().join("theirs");
        std::fs::create_dir(&target).expect("mkdir");
        chmod(&target, 0o700);
        let link = tmp.path().join("llm-cluster-local-8080");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let err = private_state_dir(&link).expect_err("symlink").to_string();
        assert!(err.contains("symbolic link"), "{err}");
    }

    /// A `cluster.toml` symlink is replaced, never written through.
    #[test]
    fn the_config_is_written_beside_not_through_a_symlink() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").expect("write");
        let dir = private_state_dir(&tmp.path().join("state")).expect("dir");
        std::os::unix::fs::symlink(&victim, dir.join("cluster.toml")).expect("symlink");
        write_replacing(&dir.join("cluster.toml"), b"[cluster]\n").expect("written");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
        let meta = std::fs::symlink_metadata(dir.join("cluster.toml")).expect("stat");
        assert!(meta.file_type().is_file());
        assert_eq!(
            std::fs::read_to_string(dir.join("cluster.toml")).expect("read"),
            "[cluster]\n"
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["cluster.toml"], "no temporary file left behind");
    }

    /// A token file someone else could read, or a symlink to one, is neither reused nor
    /// written into.
    #[test]
    fn a_token_file_open_to_others_or_a_symlink_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = private_state_dir(&tmp.path().join("state")).expect("dir");
        let token = dir.join("token");
        std::fs::write(&token, "").expect("pre-create");
        chmod(&token, 0o666);
        let err = state_token(&token).expect_err("0666 token").to_string();
        assert!(err.contains("mode 0666"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&token).expect("read"),
            "",
            "nothing written into it"
        );

        std::fs::remove_file(&token).expect("rm");
        let theirs = tmp.path().join("theirs");
        std::fs::write(&theirs, "").expect("write");
        chmod(&theirs, 0o600);
        std::os::unix::fs::symlink(&theirs, &token).expect("symlink");
        let err = state_token(&token)
            .expect_err("symlinked token")
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&theirs).expect("read"), "");

        std::fs::remove_file(&token).expect("rm");
        std::fs::create_dir(&token).expect("mkdir");
        let err = state_token(&token).expect_err("a directory").to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    /// Ownership needs another uid to own the files: only root can arrange that.
    #[test]
    fn state_owned_by_someone_else_is_refused_when_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown a directory to another user");
            return;
        }
        let nobody = Some(nix::unistd::Uid::from_raw(65534));
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).expect("mkdir");
        chmod(&dir, 0o700);
        nix::unistd::chown(&dir, nobody, None).expect("chown");
        let err = private_state_dir(&dir).expect_err("not ours").to_string();
        assert!(
            err.contains("owned by uid 65534, not by you (uid 0)"),
            "{err}"
        );

        let dir = private_state_dir(&tmp.path().join("mine")).expect("dir");
        let token = dir.join("token");
        std::fs::write(&token, "0123456789abcdef0123\n").expect("write");
        chmod(&token, 0o600);
        nix::unistd::chown(&token, nobody, None).expect("chown");
        let err = state_token(&token).expect_err("not ours").to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
    }
}
