//! Wires the parts together for one node: the node agent, and on rank 0 the coordinator and the
//! API. Used by `run` (one node per process) and by `up --local` (every node in one process).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::watch;

use crate::auth::{self, ApiKeys, Secret};
use crate::config::Config;
use crate::coordinator::{api, client::NodeClient, ClusterView, Coordinator};
use crate::node::{self, NodeAgent};
use crate::runner::process::ProcessRunner;
use crate::runner::systemd::SystemdRunner;

/// A node agent with its control API running.
pub struct RunningNode {
    pub agent: Arc<NodeAgent>,
    server: tokio::task::JoinHandle<()>,
}

impl RunningNode {
    pub async fn shutdown(self) {
        self.agent.shutdown().await;
        self.server.abort();
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
    let agent = NodeAgent::new(config, rank, runner, rx)?;
    // A node agent owns its machine's network tuning; local clusters share the user's machine
    // and only report it.
    agent.tune_network(apply_tuning);
    agent.recover().await;
    agent.start_model_hash();
    let server = node::api::serve(node.agent_addr(), agent.clone(), token).await?;
    Ok(RunningNode { agent, server })
}

/// The coordinator and its API, with the handle that stops them.
pub struct RunningCoordinator {
    pub view: watch::Receiver<ClusterView>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    api: tokio::task::JoinHandle<()>,
}

impl RunningCoordinator {
    /// Stops the API and every rank of the ring.
    pub async fn shutdown(self) {
        self.api.abort();
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

pub async fn start_coordinator(
    config: Arc<Config>,
    token_text: String,
    stop_ring_on_exit: bool,
) -> Result<RunningCoordinator> {
    let keys = match &config.api.api_keys_file {
        Some(p) => Some(ApiKeys::load(p)?),
        None => {
            if !config.api.listen.ip().is_loopback() {
                tracing::warn!(listen = %config.api.listen, "no api.api_keys_file: the API is open to anyone who can reach it");
            }
            None
        }
    };
    let coordinator = Coordinator::new(config.clone(), NodeClient::new(token_text)?);
    let view = coordinator.view();
    let router = api::router(view.clone(), config.ports.server, keys)?;
    let api = api::serve(config.api.listen, router).await?;
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(coordinator.run(rx, stop_ring_on_exit));
    Ok(RunningCoordinator {
        view,
        shutdown,
        task,
        api,
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
    let token = auth::load_token(&config.cluster.token_file)?;
    let node = start_node(config.clone(), rank, Secret::new(&token), runner, true).await?;
    let coordinator = if rank == 0 {
        Some(start_coordinator(config.clone(), token, !node.agent.ranks_outlive_agent()).await?)
    } else {
        None
    };
    let sig = stop_signal().await?;
    tracing::info!(signal = sig, "shutting down");
    if let Some(c) = coordinator {
        c.shutdown().await;
    }
    node.shutdown().await;
    Ok(())
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
