//! Wires the parts together for one node: the node agent, and on rank 0 the coordinator and the
//! API. Used by `run` (one node per process) and by `up --local` (every node in one process).
//!
//! Shutdown runs in the reverse order of start-up, each step bounded: the public API stops
//! accepting and drains (streams get [`API_DRAIN`] to finish), the coordinator's tasks are
//! cancelled and awaited (and, with child-process ranks, the ring is stopped), then the node
//! agent stops its rank if it would not outlive the agent, and its control API closes last,
//! because the coordinator stops ranks through it. Under systemd the agent says READY=1 once its
//! APIs listen, STOPPING=1 when it begins to stop, and feeds the watchdog from the same runtime
//! as long as the coordinator's loop keeps turning, so a wedged agent is restarted by systemd.
//! The public API's socket is kept in systemd's fd store (see `server::listen`): across
//! `systemctl restart` of the head's agent clients queue on it instead of being refused, and the
//! new agent takes them once its coordinator has adopted the ring the old one left running.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, Secret};
use crate::config::Config;
use crate::coordinator::driver::Heartbeat;
use crate::coordinator::gateway::Gateway;
use crate::coordinator::{api, client::NodeClient, ClusterView, Coordinator};
use crate::node::{self, NodeAgent};
use crate::runner::process::ProcessRunner;
use crate::runner::systemd::SystemdRunner;
use crate::server::Server;

/// How long responses in flight may go on once the agent is asked to stop.
pub const API_DRAIN: Duration = Duration::from_secs(10);

/// A node agent with its control API running.
pub struct RunningNode {
    pub agent: Arc<NodeAgent>,
    server: Server,
}

impl RunningNode {
    pub async fn shutdown(self) {
        self.agent.shutdown().await;
        // Requests to a node agent are short (a start takes seconds); long polls end at once.
        self.server.shutdown(Duration::from_secs(5)).await;
    }
}

/// Which runner starts the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunnerKind {
    /// systemd when it is PID 1 (/run/systemd/system exists), else child processes.
    Auto,
    /// Transient systemd units over D-Bus.
    Systemd,
    /// Child processes of the agent.
    Process,
}

fn systemd_booted() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

pub async fn start_node(
    config: Arc<Config>,
    rank: u32,
    token: Secret,
    runner: RunnerKind,
    apply_tuning: bool,
) -> Result<RunningNode> {
    let node = config
        .node(rank)
        .with_context(|| {
            format!(
                "{}: no [[node]] with rank = {rank}",
                config.source.display()
            )
        })?
        .clone();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let use_systemd = match runner {
        RunnerKind::Systemd => true,
        RunnerKind::Auto => systemd_booted(),
        RunnerKind::Process => false,
    };
    let runner: Arc<dyn crate::runner::Runner> = if use_systemd {
        let user = Some(config.cluster.rank_user.clone());
        Arc::new(SystemdRunner::connect(user, tx).await?)
    } else {
        Arc::new(ProcessRunner::new(tx))
    };
    let config_tls = config.clone();
    let agent = NodeAgent::new(config, rank, runner, rx)?;
    // A node agent owns its machine's network tuning; local clusters share the user's machine
    // and only report it.
    agent.tune_network(apply_tuning);
    agent.recover().await;
    agent.start_model_hash();
    let tls = crate::tls::acceptor_for(&config_tls, rank)
        .with_context(|| format!("rank {rank}: cannot set up TLS for the node control API"))?;
    let tls = tls.map(|(acceptor, fact)| {
        agent.set_tls_fact(fact);
        acceptor
    });
    agent.follow_upgrade_signals();
    let server = node::api::serve(node.agent_addr(), agent.clone(), token, tls).await?;
    Ok(RunningNode { agent, server })
}

/// The coordinator and its API, with the handle that stops them.
pub struct RunningCoordinator {
    pub view: watch::Receiver<ClusterView>,
    pub heartbeat: Heartbeat,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    api: Server,
    /// `/metrics` alone, without keys (`api.metrics_listen`).
    metrics: Option<Server>,
}

impl RunningCoordinator {
    /// Drains and stops the API, then the coordinator (which stops the ring when its ranks
    /// would not outlive it).
    pub async fn shutdown(self) {
        self.api.shutdown(API_DRAIN).await;
        if let Some(m) = self.metrics {
            m.shutdown(API_DRAIN).await;
        }
        self.shutdown.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the coordinator task failed");
        }
    }
}

pub async fn start_coordinator(
    config: Arc<Config>,
    token_text: String,
    stop_ring_on_exit: bool,
) -> Result<RunningCoordinator> {
    let gateway = Gateway::from_config(&config)?;
    if config.api.api_keys_file.is_none() && !config.api.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.api.listen, "no api.api_keys_file: the API is open to anyone who can reach it");
    }
    // Ends by itself once the API (which holds the gateway) is gone.
    gateway.spawn_reload();
    let tls = crate::tls::client_config_for(&config, 0)
        .context("rank 0: cannot set up TLS for the coordinator's connections to the nodes")?;
    let coordinator = Coordinator::new(
        config.clone(),
        Arc::new(NodeClient::new(token_text, tls)?),
        gateway.gate(),
    )
    .with_metrics(gateway.metrics());
    let view = coordinator.view();
    let heartbeat = coordinator.heartbeat();
    let metrics = match config.api.metrics_listen {
        Some(addr) => Some(
            crate::coordinator::metrics::serve(
                addr,
                gateway.clone(),
                view.clone(),
                config.ports.server,
            )
            .await?,
        ),
        None => None,
    };
    let api = api::serve(
        config.api.listen,
        view.clone(),
        config.ports.server,
        gateway,
        coordinator.activity(),
        coordinator.events(),
        &config,
    )
    .await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(coordinator.run(shutdown.clone(), stop_ring_on_exit));
    Ok(RunningCoordinator {
        view,
        heartbeat,
        shutdown,
        task,
        api,
        metrics,
    })
}

/// Parses `rank2` or `2`.
pub fn parse_node_name(name: &str) -> Result<u32> {
    let digits = name.strip_prefix("rank").unwrap_or(name);
    digits.parse().map_err(|_| {
        anyhow::anyhow!("--node {name:?}: expected `rankN` or `N` (e.g. rank0 for the head node)")
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn stop_signal() -> Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// `llm-agent run --node rankN`.
pub async fn run_node(config_path: PathBuf, node_name: String, runner: RunnerKind) -> Result<()> {
    let rank = parse_node_name(&node_name)?;
    let config = Arc::new(Config::load(&config_path)?);
    if config.node(rank).is_none() {
        return Err(crate::exit::Usage(format!(
            "{}: no [[node]] with rank = {rank} (the config lists ranks 0..{})",
            config_path.display(),
            config.world().saturating_sub(1)
        ))
        .into());
    }
    if let Some(w) = crate::tls::plaintext_warning(&config) {
        tracing::warn!("{w}");
    }
    let token = auth::load_token(&config.cluster.token_file)?;
    let node = start_node(config.clone(), rank, Secret::new(&token), runner, true).await?;
    let coordinator = if rank == 0 {
        Some(start_coordinator(config.clone(), token, !node.agent.ranks_outlive_agent()).await?)
    } else {
        None
    };
    if coordinator.is_none() {
        tokio::spawn(hangup_ignored());
    }
    crate::server::release_unclaimed();
    notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = tokio::spawn(feed_watchdog(
        coordinator.as_ref().map(|c| c.heartbeat.clone()),
    ));
    let sig = stop_signal().await?;
    tracing::info!(signal = sig, "shutting down");
    notify(&[sd_notify::NotifyState::Stopping]);
    watchdog.abort();
    if let Some(c) = coordinator {
        c.shutdown().await;
    }
    node.shutdown().await;
    Ok(())
}

/// SIGHUP reloads the API keys on rank 0; elsewhere there is nothing to
/// reload, and the signal's default action would end the agent.
async fn hangup_ignored() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: nothing to reload on this node (rank 0 reads the API keys file)");
    }
}

/// Tells systemd (Type=notify) about the agent's state; a no-op when not run by systemd.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// Pings systemd's watchdog (WatchdogSec=) at a quarter of its interval while the coordinator's
/// loop turns. A ping comes from this runtime, so a runtime that no longer schedules tasks, or a
/// coordinator loop stuck for half the interval, stops the pings and systemd restarts the agent.
async fn feed_watchdog(heartbeat: Option<Heartbeat>) {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let interval = Duration::from_micros(usec);
    tracing::info!(
        seconds = interval.as_secs_f64(),
        "feeding the systemd watchdog"
    );
    let mut tick = tokio::time::interval(interval / 4);
    loop {
        tick.tick().await;
        match &heartbeat {
            Some(h) if h.age() > interval / 2 => tracing::error!(
                stalled_s = h.age().as_secs_f64(),
                "the coordinator loop has stalled; not feeding the watchdog"
            ),
            _ => notify(&[sd_notify::NotifyState::Watchdog]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert_eq!(parse_node_name("rank3").expect("ok"), 3);
        assert_eq!(parse_node_name("0").expect("ok"), 0);
        assert!(parse_node_name("node1").is_err());
    }
}
