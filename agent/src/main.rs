//! llm-agent: the node agent and coordinator of llm-cluster.
//!
//! Every machine runs `llm-agent run --node rankN`; the rank-0 agent is also the coordinator and
//! serves the OpenAI-compatible API. `llm-agent up --local N` runs a whole cluster on one machine.

mod auth;
mod bench;
mod check_config;
mod config;
mod coordinator;
mod engine;
mod exit;
mod gguf;
mod local;
mod node;
mod pacman;
mod pki;
mod plan;
mod proto;
mod pull;
mod runner;
mod server;
mod service;
mod status;
mod tls;
mod tune;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use config::DEFAULT_PATH;

#[derive(Parser)]
#[command(
    name = "llm-agent",
    version,
    about = "Node agent and coordinator for llm-cluster: one OpenAI-compatible endpoint over a \
             prima.cpp or llama.cpp RPC ring spread across your machines",
    after_help = exit::help()
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
        #[arg(long, value_parser = node_name)]
        node: String,
        /// How ranks are started.
        #[arg(long, value_enum, default_value = "auto")]
        runner: service::RunnerKind,
    },
    /// Validate a config file: exit 0, or print every problem (file:line:column) and exit 2.
    CheckConfig {
        /// Config file to check.
        #[arg(default_value = DEFAULT_PATH)]
        path: PathBuf,
    },
    /// prima: forget the layer placement remembered from Halda, so the next ring start profiles
    /// the nodes again (run it on the head node; the running ring is not touched).
    ForgetPlacement {
        /// Cluster config file (its cluster.state_dir holds the placement).
        #[arg(long, env = "LLM_CLUSTER_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Run a whole cluster on this machine: N node agents and the coordinator over loopback.
    Up(Box<local::UpArgs>),
    /// Make the cluster's CA and node certificates for mutual TLS on the control plane.
    Pki(pki::PkiArgs),
    /// Measure an OpenAI-compatible endpoint: time to first token, prefill and decode tok/s
    /// per stream and p50/p95; with --matrix, local rings of both engines over ring sizes and
    /// link latencies (delaying relays between ranks), written under bench/results/.
    Bench(Box<bench::BenchArgs>),
    /// Report the network tuning for ring traffic, key by key; --apply sets what is not in effect.
    ///
    /// Exits 0 when every key is in effect, 3 when some are not (they differ, or cannot be set
    /// here), 1 when persisting or measuring fails.
    Tune {
        /// Only check and report (the default).
        #[arg(long, conflicts_with = "apply")]
        check: bool,
        /// Apply the values (needs root) instead of only checking them.
        #[arg(long)]
        apply: bool,
        /// With --apply: also write the keys in effect, with their values, to
        /// /etc/sysctl.d/99-llm-net.conf (replacing the packaged file of that name), so that boot
        /// restores them; rewritten only when they change.
        #[arg(long, requires = "apply")]
        persist: bool,
        /// Print the report as JSON: `keys` (per key: key, wanted, before, after, state, reason),
        /// `in_effect`, `changed` (a key applied or the file written), `persisted`.
        #[arg(long, conflicts_with = "measure")]
        json: bool,
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
    /// Show the cluster like `systemctl status`: the ring's phase, generation, model and uptime,
    /// every node (rank, host, state, process, engine build, model hash, network tuning, last
    /// error) and the recent events, from rank 0's API.
    ///
    /// Exits 0 when the ring serves, 3 when it does not, 1 when the coordinator cannot be
    /// reached, 2 on a usage error (a config that does not load, a missing API key).
    Status(status::StatusArgs),
    /// Tell this machine's node agents that engine or llm-agent packages changed (the pacman
    /// hook runs it): each re-reads its facts, or is restarted if its own binary was replaced.
    /// The coordinator restarts the ring once every node has the same new build.
    NotifyUpgrade {
        /// Also ask the head's coordinator to restart the ring on the new build now (for
        /// supervision.restart_on_upgrade = false; only when every node has the same build).
        #[arg(long)]
        restart_ring: bool,
    },
    /// Model files on this node: `model pull NAME` fetches one from another node now.
    Model(pull::ModelArgs),
    /// Print a shell completion script (for packages).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page in roff (for packages).
    Manpage,
}

/// `rank2` or `2`, checked while parsing so that a bad name is a usage error (exit 2).
fn node_name(s: &str) -> Result<String, String> {
    service::parse_node_name(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// Logs go to journald with structured fields when systemd connected our output to the journal
/// (JOURNAL_STREAM is set, or stderr is a socket while journald's socket exists), else to stderr,
/// coloured only when stderr is a terminal and NO_COLOR (https://no-color.org) is unset or
/// empty, so a log redirected to a file or a pipe carries no escape codes.
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
        None => {
            use std::io::IsTerminal;
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            tracing_subscriber::registry()
                .with(filter)
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(colour),
                )
                .init()
        }
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
        Command::Manpage => match manpage(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot write the man page: {e}");
                ExitCode::from(exit::FAILURE)
            }
        },
        Command::CheckConfig { path } => check_config::run(&path),
        Command::Status(args) => status::run(args),
        Command::Model(args) => run_async_status(pull::run(args)),
        Command::NotifyUpgrade { restart_ring } => match upgrade::notify(restart_ring) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(exit::FAILURE)
            }
        },
        Command::ForgetPlacement { config } => forget_placement(&config),
        Command::Pki(args) => pki::run(args),
        Command::Tune {
            check: _,
            apply,
            persist,
            json,
            measure,
            model,
            rate,
            delay,
        } => {
            init_logging("warn");
            let status = tune_command(apply, persist, json);
            if measure && status != ExitCode::from(exit::FAILURE) {
                let measured = measure_transfer(model.as_deref(), rate, delay);
                if measured != ExitCode::SUCCESS {
                    return measured;
                }
            }
            status
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
            run_async(local::up(*args))
        }
        Command::Bench(args) => {
            init_logging("warn");
            run_async(bench::run(*args))
        }
    }
}

/// The man page: clap's sections, with an EXIT STATUS section from the same table as --help
/// (clap_mangen would render after_help as one run-together paragraph).
fn manpage(w: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap::CommandFactory;
    let man = clap_mangen::Man::new(Cli::command());
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    man.render_subcommands_section(w)?;
    exit::man_section().to_writer(w)?;
    man.render_version_section(w)
}

/// `tune`: the report (a table, or JSON), persisted on request; the status says whether every
/// key is in effect.
fn tune_command(apply: bool, persist: bool, json: bool) -> ExitCode {
    let report = tune::Sysctl::default().tune(&tune::parse_conf(tune::SYSCTL_CONF), apply);
    let path = std::path::Path::new(tune::cli::PERSIST_PATH);
    let persisted = match persist.then(|| tune::cli::persist(&report, path)) {
        None => None,
        Some(Ok(written)) => Some(tune::cli::Persisted {
            path: path.to_path_buf(),
            written,
        }),
        Some(Err(e)) => {
            // The keys were applied; say so before the error (JSON readers only get the error).
            if !json {
                print!("{}", tune::render(&report));
            }
            return exit::report(&e);
        }
    };
    let summary = tune::cli::Summary::new(&report, persisted);
    if json {
        match serde_json::to_string_pretty(&summary) {
            Ok(text) => println!("{text}"),
            Err(e) => return exit::report(&e.into()),
        }
    } else {
        print!("{}", tune::render(&report));
        if let Some(p) = &summary.persisted {
            let what = if p.written { "written" } else { "unchanged" };
            println!("persisted: {} ({what})", p.path.display());
        }
    }
    if summary.in_effect {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::NOT_IN_EFFECT)
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    run_async_status(async { fut.await.map(|()| ExitCode::SUCCESS) })
}

/// As [`run_async`], for a command that picks its own exit status.
fn run_async_status(fut: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    // One event loop, as nginx runs one per worker: the agent waits on sockets and processes,
    // and its CPU work (model hashes) runs on the blocking pool. With two worker threads the
    // API proxy spent about a quarter of its CPU time waking the other thread: 61 µs of CPU
    // per proxied request against 45 µs with one (same build, 2 cores, bench/gateway.py's
    // measure).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match rt.block_on(fut) {
        Ok(code) => code,
        Err(e) => exit::report(&e),
    }
}

fn measure_transfer(model: Option<&std::path::Path>, rate: String, delay: String) -> ExitCode {
    let hidden = match model.map(gguf::read_info) {
        Some(Ok(info)) => info.embedding_length.unwrap_or(8192),
        // A --model that is not a readable GGUF is a bad argument.
        Some(Err(e)) => {
            eprintln!("error: --model: {e:#}");
            return ExitCode::from(exit::USAGE);
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
        Err(e) => exit::report(&e),
    }
}

fn forget_placement(path: &std::path::Path) -> ExitCode {
    let config = match config::Config::load(path) {
        Ok(c) => c,
        Err(e) => return exit::report(&anyhow::Error::new(e)),
    };
    let file = coordinator::placement::file(&config.cluster.state_dir);
    match coordinator::placement::forget(&config.cluster.state_dir) {
        Ok(true) => {
            println!(
                "forgot the placement in {}: the next ring start profiles again",
                file.display()
            );
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!(
                "no placement remembered ({} does not exist)",
                file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => exit::report(
            &anyhow::Error::new(e).context(format!("cannot remove {}", file.display())),
        ),
    }
}
