//! `llm-agent pki init` / `pki issue NODE`: the cluster CA and the node certificates, made
//! where the operator keeps the CA key (one machine), then copied to each node with the config.
//! The generation itself is in `tls`; this is the command line around it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::config::{Config, Tls, DEFAULT_PATH, DEFAULT_PKI_DIR};
use crate::tls;

#[derive(clap::Args, Debug)]
pub struct PkiArgs {
    #[command(subcommand)]
    pub action: PkiAction,
}

#[derive(clap::Subcommand, Debug)]
pub enum PkiAction {
    /// Create the cluster CA (ca.key, mode 0600, and ca.crt) in the [tls] directory; refuses to
    /// replace an existing one.
    Init {
        #[command(flatten)]
        at: Where,
    },
    /// Issue NODE's certificate and key (rankN.crt, rankN.key), signed by the CA, for the
    /// node's configured address (plus any --san), valid for server and client authentication.
    Issue {
        /// `rank2` or `2`.
        node: String,
        #[command(flatten)]
        at: Where,
        /// Another name or IP address the certificate is valid for (repeatable).
        #[arg(long, value_name = "NAME|IP")]
        san: Vec<String>,
        /// Days of validity.
        #[arg(long, default_value_t = tls::NODE_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Replace an existing certificate and key (rotation).
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct Where {
    /// Cluster config file: names the cluster, the nodes' addresses and the [tls] paths.
    #[arg(long, env = "LLM_CLUSTER_CONFIG", default_value = DEFAULT_PATH)]
    pub config: PathBuf,
    /// Write into this directory (ca.crt, ca.key, rankN.crt, rankN.key) instead of the paths
    /// the config's [tls] names (default /etc/llm-cluster/pki).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

impl Where {
    fn resolve(&self) -> anyhow::Result<(Config, Tls)> {
        let config = Config::load(&self.config)?;
        let tls = match (&self.dir, &config.tls) {
            (Some(d), _) => Tls::in_dir(&std::path::absolute(d).context("--dir")?),
            (None, Some(t)) => t.clone(),
            (None, None) => Tls::in_dir(std::path::Path::new(DEFAULT_PKI_DIR)),
        };
        Ok((config, tls))
    }
}

pub fn run(args: PkiArgs) -> ExitCode {
    match run_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => crate::exit::report(&e),
    }
}

fn run_inner(args: PkiArgs) -> anyhow::Result<()> {
    match args.action {
        PkiAction::Init { at } => {
            let (config, tls) = at.resolve()?;
            let (cert, key) = tls::init_ca(&tls, &config.cluster.name)?;
            println!(
                "created the CA of cluster `{}`: {} (copy it to every node) and {} (keep it \
                 here, private; it signs node certificates)",
                config.cluster.name,
                cert.display(),
                key.display()
            );
        }
        PkiAction::Issue {
            node,
            at,
            san,
            days,
            force,
        } => {
            let rank = crate::service::parse_node_name(&node)
                .map_err(|e| crate::exit::Usage(e.to_string()))?;
            let (config, tls) = at.resolve()?;
            let Some(mut sans) = tls::default_sans(&config, rank) else {
                return Err(crate::exit::Usage(format!(
                    "{}: no [[node]] with rank = {rank}",
                    config.source.display()
                ))
                .into());
            };
            for s in san {
                if !sans.contains(&s) {
                    sans.push(s);
                }
            }
            let (cert, key) = tls::issue(&tls, &config.cluster.name, rank, &sans, days, force)?;
            println!(
                "issued rank{rank}'s certificate for {} (valid {days} days): {} and {} (mode \
                 0600); install both on that node with the CA certificate {}",
                sans.join(", "),
                cert.display(),
                key.display(),
                tls.ca.display()
            );
        }
    }
    Ok(())
}
