//! llm-agent: the node agent and coordinator of llm-cluster.
//!
//! Every machine runs `llm-agent run --node rankN`; the rank-0 agent is also the coordinator and
//! serves the OpenAI-compatible API. `llm-agent up --local N` runs a whole cluster on one machine.

mod auth;
mod check_config;
mod config;
mod coordinator;
mod engine;
mod gguf;
mod local;
mod node;
mod pacman;
mod plan;
mod proto;
mod runner;
mod server;
mod service;
mod tune;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use config::DEFAULT_PATH;

#[derive(Parser)]
#[command(
    name = "llm-agent",
    version,
    about = "Node agent and coordinator for llm-cluster: one OpenAI-compatible endpoint over a \
             prima.cpp or llama.cpp RPC ring spread across your machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run this machine's node agent; the rank-0 agent also coordinates the ring and serves the API.
    Run {
        /// Cluster config file.
        #[arg(long, env = "LLM_CLUSTER_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Which [[node]] of the config this machine is: `rank2` or `2` (the systemd instance name).
        #[arg(long)]
        node: String,
        /// How ranks are started.
        #[arg(long, value_enum, default_value = "auto")]
        runner: service::RunnerKind,
    },
    /// Validate a config file: exit 0, or print every problem (file:line:column) and exit 1.
    CheckConfig {
        /// Config file to check.
        #[arg(default_value = DEFAULT_PATH)]
        path: PathBuf,
    },
    /// Run a whole cluster on this machine: N node agents and the coordinator over loopback.
    Up(local::UpArgs),
    /// Report the network tuning for ring traffic, key by key; --apply sets what is not in effect.
    Tune {
        /// Only check and report (the default).
        #[arg(long, conflicts_with = "apply")]
        check: bool,
        /// Apply the values (needs root) instead of only checking them.
        #[arg(long)]
        apply: bool,
        /// Also measure a prefill-sized transfer between two network namespaces over a shaped
        /// link, with default and with tuned settings (needs root and iproute2).
        #[arg(long)]
        measure: bool,
        /// GGUF whose hidden size sets the transfer size (hidden × 2 bytes × 512 tokens);
        /// default: a 70B-class hidden size of 8192.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Link rate for --measure (tc syntax).
        #[arg(long, default_value = "1gbit")]
        rate: String,
        /// One-way delay for --measure (tc syntax; needs netem in the kernel).
        #[arg(long, default_value = "5ms")]
        delay: String,
    },
    /// Print a shell completion script (for packages).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page in roff (for packages).
    Manpage,
}

/// Logs go to journald with structured fields when systemd connected our output to the journal
/// (JOURNAL_STREAM is set, or stderr is a socket while journald's socket exists), else to stderr.
fn init_logging(default_filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let stderr_is_socket = {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.file_type().is_socket())
    };
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some()
        || (stderr_is_socket && std::path::Path::new("/run/systemd/journal/socket").exists());
    let journald = under_journald
        .then(tracing_journald::layer)
        .and_then(Result::ok)
        .map(|l| {
            l.with_syslog_identifier("llm-agent".into())
                .with_field_prefix(None)
        });
    match journald {
        Some(j) => tracing_subscriber::registry().with(filter).with(j).init(),
        None => tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "llm-agent",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Manpage => {
            use clap::CommandFactory;
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: cannot write the man page: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { path } => check_config::run(&path),
        Command::Tune {
            check: _,
            apply,
            measure,
            model,
            rate,
            delay,
        } => {
            init_logging("warn");
            let report = tune::Sysctl::default().tune(&tune::parse_conf(tune::SYSCTL_CONF), apply);
            print!("{}", tune::render(&report));
            if measure {
                return measure_transfer(model.as_deref(), rate, delay);
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            config,
            node,
            runner,
        } => {
            init_logging("info");
            run_async(service::run_node(config, node, runner))
        }
        Command::Up(args) => {
            init_logging("info,engine=warn");
            run_async(local::up(args))
        }
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn measure_transfer(model: Option<&std::path::Path>, rate: String, delay: String) -> ExitCode {
    let hidden = match model.map(gguf::read_info) {
        Some(Ok(info)) => info.embedding_length.unwrap_or(8192),
        Some(Err(e)) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
        None => 8192,
    };
    let opts = tune::measure::Options {
        rate,
        delay,
        bytes: u64::from(hidden) * 2 * 512,
        rounds: 30,
        gap: std::time::Duration::from_millis(20),
    };
    println!("\nmeasuring (hidden size {hidden})…");
    match tune::measure::run(&opts) {
        Ok(r) => {
            print!("{}", r.render(opts.bytes));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
