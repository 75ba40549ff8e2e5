//! `llm-agent up --local N`: a whole cluster on this machine — N node agents and the coordinator
//! in one process over loopback, each rank a child process — for trying the product and for the
//! end-to-end tests. The config is generated as TOML and goes through the same validation as a
//! user's file.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::auth;
use crate::config::{Config, EngineKind};
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
    /// server 18080), to run beside another cluster.
    #[arg(long, default_value_t = 0)]
    pub port_offset: u16,
    /// Where ranks run (working directories), the token and the generated config; by default
    /// `llm-cluster-local-<API port>` under the system temp dir, reused by later runs.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
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

pub fn local_config_text(args: &UpArgs, state_dir: &Path, token_file: &Path) -> String {
    let o = args.port_offset;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "[cluster]\nname = \"local\"\nengine = \"{}\"",
        args.engine
    );
    let _ = writeln!(
        t,
        "token_file = {:?}\nstate_dir = {:?}",
        token_file.display().to_string(),
        state_dir.display().to_string()
    );
    let _ = writeln!(
        t,
        "\n[model]\npath = {:?}\nctx_size = {}",
        args.model.display().to_string(),
        args.ctx_size
    );
    if let Some(w) = &args.layer_windows {
        let _ = writeln!(t, "layer_windows = [{w}]");
    }
    let _ = writeln!(t, "\n[api]\nlisten = \"{}\"", args.listen);
    let _ = writeln!(
        t,
        "\n[ports]\ndata = {}\nsignal = {}\nrpc = {}\nserver = {}",
        9000 + o,
        10000 + o,
        50052 + o,
        18080 + o
    );
    if args.engine == EngineKind::Prima {
        let (server, worker) = prima_binary_names(args.engine_dir.as_deref());
        let _ = writeln!(
            t,
            "\n[binaries]\nprima_server = \"{server}\"\nprima_worker = \"{worker}\""
        );
    }
    // Quick restarts make the local demo and its tests responsive; real clusters keep defaults.
    let _ = writeln!(t, "\n[supervision]\nready_timeout_s = 120\nbackoff_initial_ms = 500\nbackoff_max_ms = 10000\nnode_timeout_s = 10");
    for r in 0..args.local {
        let _ = writeln!(
            t,
            "\n[[node]]\nrank = {r}\naddress = \"127.0.0.1\"\nagent_port = {}\nthreads = {}",
            17700 + o as u32 + r,
            args.threads
        );
        if let Some(d) = &args.engine_dir {
            let _ = writeln!(t, "engine_dir = {:?}", d.display().to_string());
        }
    }
    t
}

pub async fn up(args: UpArgs) -> Result<()> {
    let started = Instant::now();
    let model = std::fs::canonicalize(&args.model).map_err(|e| {
        crate::exit::Usage(format!(
            "--model {}: cannot read the model file: {e}",
            args.model.display()
        ))
    })?;
    let args = UpArgs { model, ..args };
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("llm-cluster-local-{}", args.listen.port())),
    };
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&state_dir)?;
    let token = auth::generate_token();
    let token_file = state_dir.join("token");
    write_private(&token_file, &token)?;
    let text = local_config_text(&args, &state_dir, &token_file);
    // Kept as a ConfigError (not flattened to text) so that it exits 2, a usage error.
    let config = Config::parse(&text, Path::new("<up --local>"))?;
    std::fs::write(state_dir.join("cluster.toml"), &text)?;
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
    let announce = async {
        if view.wait_for(|v| v.serving()).await.is_ok() {
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

fn print_ready(args: &UpArgs, config: &Config, secs: f64) {
    let base = format!("http://{}", args.listen);
    println!(
        "llm-cluster is serving `{}` on a {}-rank {} ring (ready {secs:.1} s after start)\n\
         \x20 endpoint: {base}/v1\n\
         \x20 status:   {base}/api/v1/cluster\n\
         \x20 try:      curl {base}/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\
         Press Ctrl-C to stop every rank.",
        config.model.name,
        args.local,
        args.engine,
        config.model.name
    );
}

fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{content}")?;
    Ok(())
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
        let text = local_config_text(&t.up, Path::new("/tmp/s"), Path::new("/tmp/s/token"));
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
        let text = local_config_text(&t.up, Path::new("/s"), Path::new("/s/token"));
        let c = Config::parse(&text, Path::new("<t>")).expect("valid");
        assert_eq!(c.model.layer_windows, Some(vec![10, 10, 10]));
    }
}
