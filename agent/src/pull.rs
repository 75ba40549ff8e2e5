//! `llm-agent model pull NAME`: asks this machine's node agent to fetch a model's file from
//! another node now, and follows the transfer with a progress bar until the file is verified
//! and in place. The agent does the work (`node::deliver`), the same as when the coordinator
//! asks before a ring start, so both paths leave the same file; this command only watches, and
//! a Ctrl-C leaves the transfer running.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::exit;
use crate::node::deliver::human_bytes;
use crate::proto::{FetchRequest, TransferFact, TransferState, TRANSFERS_ROUTE};

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub action: ModelAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum ModelAction {
    /// Fetch a configured model's file onto this node from another node (the head by default),
    /// resuming a partial copy, verified by sha256 before it replaces anything; shows bytes,
    /// rate and time left. Exits 0 once the file is in place, 1 when the transfer fails, 2 on
    /// a usage error (unknown model or rank, a config that does not load).
    Pull {
        /// The model's name or alias, as in the config.
        name: String,
        /// Cluster config file.
        #[arg(long, env = "LLM_CLUSTER_CONFIG", default_value = crate::config::DEFAULT_PATH)]
        config: PathBuf,
        /// Which [[node]] this machine is (`rank2` or `2`); by default the one whose address
        /// is this machine's.
        #[arg(long)]
        node: Option<String>,
        /// The rank to copy from; by default rank 0 (rank 1 when this is rank 0).
        #[arg(long)]
        from: Option<u32>,
        /// Start the transfer and return at once instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
}

pub async fn run(args: ModelArgs) -> Result<ExitCode> {
    let ModelAction::Pull {
        name,
        config,
        node,
        from,
        no_wait,
    } = args.action;
    let config = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => return Ok(exit::report(&anyhow::Error::new(e))),
    };
    let rank = match which_rank(&config, node.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(exit::USAGE));
        }
    };
    let from = from.unwrap_or(if rank == 0 { 1 } else { 0 });
    pull(&config, rank, &name, from, no_wait).await
}

/// `--node`, or the one [[node]] whose address this machine has (a bind to it succeeds).
fn which_rank(config: &Config, node: Option<&str>) -> Result<u32> {
    if let Some(n) = node {
        let rank = crate::service::parse_node_name(n)?;
        if config.node(rank).is_none() {
            bail!(
                "--node {n}: {} has no [[node]] with rank = {rank}",
                config.source.display()
            );
        }
        return Ok(rank);
    }
    let local = |a: IpAddr| std::net::UdpSocket::bind((a, 0)).is_ok();
    let mine: Vec<u32> = config
        .nodes
        .iter()
        .filter(|n| local(n.address))
        .map(|n| n.rank)
        .collect();
    match mine.as_slice() {
        [r] => Ok(*r),
        [] => bail!(
            "none of the [[node]] addresses in {} is this machine's: pass --node rankN",
            config.source.display()
        ),
        many => bail!(
            "ranks {many:?} of {} all have an address of this machine: pass --node rankN",
            config.source.display()
        ),
    }
}

async fn pull(
    config: &Config,
    rank: u32,
    name: &str,
    from: u32,
    no_wait: bool,
) -> Result<ExitCode> {
    let node = config
        .node(rank)
        .with_context(|| format!("no [[node]] with rank = {rank}"))?;
    let client = crate::coordinator::client::NodeClient::for_rank(config, rank)?;
    let addr = node.agent_addr();
    let resp = client
        .request(reqwest::Method::POST, addr, TRANSFERS_ROUTE)
        .json(&FetchRequest {
            model: name.to_string(),
            from_rank: from,
        })
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("cannot reach rank {rank}'s agent at {addr}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let why = body
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given");
        eprintln!("error: rank {rank} refused: {why}");
        // The agent's 4xx are about what was asked (an unknown model or rank).
        return Ok(ExitCode::from(if status.is_client_error() {
            exit::USAGE
        } else {
            exit::FAILURE
        }));
    }
    let mut fact: TransferFact = resp.json().await.context("unreadable answer")?;
    if fact.state == TransferState::Done {
        println!("rank {rank}: model {}: {}", fact.model, fact.activity);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "rank {rank} ({}) fetches model {} from rank {}",
        addr, fact.model, fact.from_rank
    );
    if no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let started = fact.started_unix;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {eta} left",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut last_line = Instant::now();
    let mut unreachable_since: Option<Instant> = None;
    loop {
        match fact.state {
            TransferState::Done => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                println!(
                    "model {}: {} from rank {} in {:.1} s ({}/s), sha256 verified, in place at {}",
                    fact.model,
                    human_bytes(fact.total_bytes.saturating_sub(fact.resumed_from)),
                    fact.from_rank,
                    fact.seconds,
                    human_bytes(fact.bytes_per_s.unwrap_or(0.0) as u64),
                    config
                        .find_model(&fact.model)
                        .map(|i| config
                            .model_path(rank, &config.models[i])
                            .display()
                            .to_string())
                        .unwrap_or_default()
                );
                return Ok(ExitCode::SUCCESS);
            }
            TransferState::Failed => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                eprintln!(
                    "error: model {} did not arrive: {}",
                    fact.model,
                    fact.error.as_deref().unwrap_or("no reason given")
                );
                return Ok(ExitCode::from(exit::FAILURE));
            }
            TransferState::Running => match &bar {
                Some(b) => {
                    b.set_length(fact.total_bytes);
                    b.set_position(fact.done_bytes);
                    b.set_message(fact.activity.clone());
                }
                None if last_line.elapsed() >= Duration::from_secs(5) => {
                    last_line = Instant::now();
                    println!("{}", crate::coordinator::delivery::describe(&fact));
                }
                None => {}
            },
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = async {
            let resp = client
                .request(reqwest::Method::GET, addr, TRANSFERS_ROUTE)
                .timeout(Duration::from_secs(5))
                .send()
                .await?
                .error_for_status()?;
            resp.json::<Vec<TransferFact>>().await
        }
        .await;
        match got {
            Ok(all) => {
                unreachable_since = None;
                match all.into_iter().find(|t| t.model == fact.model) {
                    Some(t) if t.started_unix >= started => fact = t,
                    _ => bail!("rank {rank}'s agent no longer reports the transfer (restarted?); run the command again to resume it"),
                }
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(15) {
                    bail!("rank {rank}'s agent stopped answering: {e}; the transfer resumes when it is asked again");
                }
            }
        }
    }
}
