//! The supervisor's actions as I/O: checking the nodes, starting, probing and stopping a ring.
//! Each takes the [`Nodes`] it talks to and returns what it found as values; the driver turns
//! those into events.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::check::{self, NodeReport};
use super::client::Nodes;
use super::delivery;
use super::state::NodeCheck;
use crate::config::{check_layer_total, Config, EngineKind};
use crate::plan::plan;
use crate::proto::{Placement, RankPhase, RankStatus};

/// Looks at every node: facts judged by [`check::check_nodes`] (plus the model's layer count
/// for prima's explicit windows: the head reads the GGUF header, it has the model in both
/// engines), each rank's status, for the highest generation seen and a ring to adopt, and,
/// before a fresh start, every link between ranks ([`check::broken_links`]).
pub struct NodesLook {
    pub check: NodeCheck,
    pub facts: Vec<NodeReport>,
    pub warnings: Vec<String>,
    pub statuses: Vec<Option<RankStatus>>,
}

pub async fn look_at_nodes(
    config: &Config,
    nodes: &dyn Nodes,
    remembered: Option<&Placement>,
) -> NodesLook {
    let mut facts: Vec<NodeReport> =
        join_all(config.nodes.iter().map(|n| nodes.facts(n.agent_addr()))).await;
    deliver(config, nodes, &mut facts).await;
    let (mut check, warnings) = check::check_nodes(config, &facts);
    if check == NodeCheck::Ready {
        if let Some(windows) = &config.model().layer_windows {
            match crate::gguf::read_info(&config.model_path(0, config.model())) {
                Ok(info) => {
                    if let Err(e) = check_layer_total(windows, info.block_count) {
                        check = NodeCheck::Refused(format!("{}: {e}", config.source.display()));
                    }
                }
                Err(e) => {
                    check = NodeCheck::Refused(format!(
                        "cannot check layer_windows against the model: {e:#}"
                    ))
                }
            }
        }
    }
    let statuses = join_all(config.nodes.iter().map(|n| async move {
        nodes
            .rank_status(n.agent_addr(), None, Duration::from_secs(5))
            .await
            .ok()
    }))
    .await;
    // Links only before a fresh start: a ring to adopt is running on them (and probing a
    // running llama.cpp rpc server's port would make the probe its client).
    if check == NodeCheck::Ready
        && check::running_generation(config, &statuses, remembered).is_none()
    {
        let links = join_all(config.nodes.iter().map(|n| async move {
            nodes
                .links(n.agent_addr())
                .await
                .map_err(|e| format!("{e:#}"))
        }))
        .await;
        if let Some(why) = check::broken_links(config, &links) {
            check = NodeCheck::Waiting(why);
        }
    }
    NodesLook {
        check,
        facts,
        warnings,
        statuses,
    }
}

/// Asks every node that lacks a model file to fetch it ([`delivery::plan`]) and puts the
/// transfers' states into `facts`, so the check that follows waits for them instead of refusing
/// the missing files.
async fn deliver(config: &Config, nodes: &dyn Nodes, facts: &mut [NodeReport]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let wanted = delivery::plan(config, facts, now);
    let asked = join_all(wanted.iter().map(|d| async move {
        let addr = config.nodes[d.rank as usize].agent_addr();
        (d, nodes.fetch(addr, &d.request).await)
    }))
    .await;
    for (d, answer) in asked {
        match answer {
            Ok(t) => {
                tracing::info!(rank = d.rank, model = %d.request.model, from_rank = d.request.from_rank, "asked a node to fetch a model file");
                let Some(Ok(f)) = facts.get_mut(d.rank as usize) else {
                    continue;
                };
                let Some(i) = config.find_model(&d.request.model) else {
                    continue;
                };
                if let Some(m) = f.models.get_mut(i) {
                    m.transfer = Some(t.clone());
                }
                if i == config.loaded {
                    f.model.transfer = Some(t);
                }
            }
            Err(e) => {
                tracing::warn!(rank = d.rank, model = %d.request.model, error = %format!("{e:#}"), "cannot ask a node to fetch a model file")
            }
        }
    }
}

/// Starts generation `generation`. llama.cpp's head connects to its rpc workers once, at start,
/// so workers must listen first; prima's ranks may start in any order. Every status a node
/// answers goes to `seen` as it arrives.
pub async fn start_ring(
    config: &Config,
    nodes: &dyn Nodes,
    generation: u64,
    remembered: Option<&Placement>,
    seen: &mpsc::UnboundedSender<(usize, RankStatus)>,
) -> Result<(), String> {
    let plan = plan(config, config.model(), generation, remembered)?;
    // Nodes the placement leaves out run nothing (an old generation may still run there).
    for &node in &plan.idle {
        let addr = config.nodes[node as usize].agent_addr();
        if let Ok(st) = nodes.stop(addr).await {
            let _ = seen.send((node as usize, st));
        }
    }
    // `idx`: a ring rank; the spec names its node.
    let apply = |idx: usize| {
        let spec = plan.ranks[idx].clone();
        let node = spec.node as usize;
        let addr = config.nodes[node].agent_addr();
        async move {
            let st = nodes
                .apply(addr, &spec)
                .await
                .map_err(|e| format!("rank {idx} ({addr}): {e:#}"))?;
            let _ = seen.send((node, st.clone()));
            if st.phase != RankPhase::Running {
                return Err(format!(
                    "rank {idx} ({addr}): {}",
                    st.last_error
                        .unwrap_or_else(|| st.phase.as_str().to_string())
                ));
            }
            Ok(st)
        }
    };
    let first: Vec<usize> = match config.cluster.engine {
        EngineKind::LlamaRpc => (1..plan.ranks.len()).collect(),
        EngineKind::Prima => (0..plan.ranks.len()).collect(),
    };
    let started = join_all(first.iter().map(|&i| apply(i))).await;
    let mut statuses = Vec::new();
    for r in started {
        statuses.push(r?);
    }
    if config.cluster.engine == EngineKind::LlamaRpc {
        let deadline = Instant::now() + Duration::from_secs(60);
        for (st, &idx) in statuses.iter().zip(&first) {
            let addr = config.nodes[plan.ranks[idx].node as usize].agent_addr();
            let mut cur = st.clone();
            while !cur.listening {
                if cur.phase != RankPhase::Running || cur.generation != generation {
                    return Err(format!(
                        "rank {idx} ({addr}) stopped before listening: {}",
                        cur.last_error.unwrap_or_default()
                    ));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!(
                        "rank {idx} ({addr}): rpc server not listening after 60 s"
                    ));
                }
                cur = nodes
                    .rank_status(addr, Some(cur.version), left.min(Duration::from_secs(5)))
                    .await
                    .map_err(|e| format!("rank {idx} ({addr}): {e:#}"))?;
            }
        }
        apply(0).await?;
    }
    Ok(())
}

/// How often rank 0's health is probed while a ring comes up: often, since every probe saved
/// is time to the first served token, and a probe on loopback costs next to nothing.
const READY_POLL: Duration = Duration::from_millis(50);

/// Probes rank 0's engine until it reports healthy (true) or `timeout` passes (false).
pub async fn wait_ready(config: &Config, nodes: &dyn Nodes, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if nodes.head_healthy(config.ports.server).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Stops every rank (all nodes at once); unreachable nodes are skipped: they stop an old
/// generation themselves when they receive the next one.
pub async fn stop_ring(config: &Config, nodes: &dyn Nodes) {
    let results = join_all(config.nodes.iter().map(|n| nodes.stop(n.agent_addr()))).await;
    for (n, r) in config.nodes.iter().zip(results) {
        if let Err(e) = r {
            tracing::warn!(rank = n.rank, error = %format!("{e:#}"), "could not stop rank");
        }
    }
}
