//! `llm-agent status`: the cluster as the coordinator sees it, in the manner of
//! `systemctl status` — the ring's phase, generation, model and uptime, every node's rank, host,
//! state, process, engine build, model hash, model deliveries and network tuning, the last
//! error, and the recent events — read from rank 0's API (`/api/v1/cluster`, `/api/v1/events`).
//!
//! The exit status says what a script wants to know without parsing: 0 serving, 3 not serving,
//! 1 the coordinator cannot be reached. `--watch` follows the event stream while the ring forms
//! and shows what it waits for (a spinner, or a bar while a model is hashed or delivered to a
//! node) until it serves.
//! What is shown and the stage of a forming ring are pure functions of the view.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use futures_util::StreamExt;

use crate::config::{Config, DEFAULT_PATH};
use crate::coordinator::compat::SseFramer;
use crate::coordinator::state::Phase;
use crate::coordinator::view::{ClusterView, ModelState, NodeView, TransferView};
use crate::exit;
use crate::proto::{ClusterEvent, HashState, KeyState, TransferState};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit status:\n  0  the ring serves\n  1  the coordinator cannot be reached (or --watch timed out while it could not)\n  2  a usage error: bad arguments, a config that does not load, or the API wants a key\n  3  the ring does not serve (starting, restarting, refused; --watch: not serving when --timeout ran out)"
)]
pub struct StatusArgs {
    /// Cluster config file: the coordinator is at rank 0's `api.listen`.
    #[arg(long, env = "LLM_CLUSTER_CONFIG", default_value = DEFAULT_PATH)]
    pub config: PathBuf,
    /// The API's base URL instead of the config's, e.g. `http://10.0.0.1:8080`.
    #[arg(long)]
    pub url: Option<String>,
    /// An API key, when the API has keys (`api.api_keys_file`).
    #[arg(long, env = "LLM_CLUSTER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the cluster (`/api/v1/cluster`) and the recent events as one JSON document:
    /// `{"cluster": ..., "events": [...]}`.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Follow the ring while it forms (checking nodes, hashing, delivering the model, starting
    /// ranks, loading) and return once it serves; events are printed as they come.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: give up after this many seconds.
    #[arg(long, value_name = "SECONDS", requires = "watch")]
    pub timeout: Option<u64>,
    /// How many recent events to show.
    #[arg(long, default_value_t = 10)]
    pub events: usize,
}

/// The exit status for a view: 0 serving, 3 not.
pub fn exit_status(view: &ClusterView) -> u8 {
    if view.serving() {
        0
    } else {
        exit::NOT_SERVING
    }
}

/// The API's base URL from the config: rank 0's `api.listen`, reached on the head's address
/// when it listens on every address.
pub fn api_base(config: &Config) -> String {
    let listen = config.api.listen;
    let host = if listen.ip().is_unspecified() {
        config.head().address
    } else {
        listen.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(host, listen.port()))
}

/// What a forming ring is doing now, and how far along when that is known (percent).
pub fn stage(view: &ClusterView) -> (String, Option<u64>) {
    match view.phase {
        Phase::WaitingForNodes => {
            if let Some(s) = delivery_stage(view) {
                return s;
            }
            for n in &view.nodes {
                if let Some(m) = n.facts.as_ref().map(|f| &f.model) {
                    if m.hash == HashState::Hashing {
                        let pct = match (m.hashed_bytes, m.size) {
                            (Some(done), Some(size)) if size > 0 => {
                                Some((done.saturating_mul(100) / size).min(100))
                            }
                            _ => None,
                        };
                        return (format!("hashing the model on rank {}", n.rank), pct);
                    }
                }
            }
            if let Some(n) = view.nodes.iter().find(|n| n.state == "unreachable") {
                return (
                    format!("waiting for rank {}'s agent ({})", n.rank, n.agent),
                    None,
                );
            }
            let why = view.reason.as_deref().unwrap_or("checking the nodes");
            (format!("checking nodes: {why}"), None)
        }
        Phase::Starting => ("starting ranks".into(), None),
        Phase::WaitingReady => ("loading the model (waiting for rank 0)".into(), None),
        Phase::Serving => ("serving".into(), Some(100)),
        Phase::Stopping => (
            format!(
                "stopping the ring to restart it: {}",
                view.reason.as_deref().unwrap_or("")
            ),
            None,
        ),
        Phase::BackingOff => ("backing off before a restart".into(), None),
        Phase::Unloaded => (
            "unloaded when idle (the next request starts the ring)".into(),
            None,
        ),
        Phase::Refused => (
            format!("refused: {}", view.reason.as_deref().unwrap_or("")),
            None,
        ),
    }
}

/// The delivery the ring waits for: the loaded model's file arriving at a node (the least
/// advanced one when several receive it), with its percent for the bar.
fn delivery_stage(view: &ClusterView) -> Option<(String, Option<u64>)> {
    use crate::node::deliver::human_bytes;
    let running: Vec<(u32, &TransferView)> = view
        .nodes
        .iter()
        .flat_map(|n| n.transfers.iter().map(move |t| (n.rank, t)))
        .filter(|(_, t)| t.state == TransferState::Running && t.model == view.model.name)
        .collect();
    let (rank, t) = *running.iter().min_by_key(|(_, t)| t.percent.unwrap_or(0))?;
    let mut what = format!(
        "rank {rank} receives model {} from rank {}: ",
        t.model, t.from_rank
    );
    if t.total_bytes > 0 && t.activity.starts_with("receiving") {
        what.push_str(&format!(
            "{} of {}",
            human_bytes(t.done_bytes),
            human_bytes(t.total_bytes)
        ));
        if let Some(r) = t.bytes_per_s {
            what.push_str(&format!(", {}/s", human_bytes(r as u64)));
        }
        if let Some(e) = t.eta_s {
            what.push_str(&format!(", {} s left", e.round()));
        }
    } else {
        what.push_str(&t.activity);
    }
    if running.len() > 1 {
        what.push_str(&format!(" ({} nodes receive it)", running.len()));
    }
    Some((what, t.percent.map(u64::from)))
}

fn since(at: &str, now: SystemTime) -> Option<String> {
    let t = humantime::parse_rfc3339(at).ok()?;
    let secs = now.duration_since(t).ok()?.as_secs();
    Some(humantime::format_duration(Duration::from_secs(secs)).to_string())
}

/// `12:34:56` out of an RFC 3339 time.
fn clock(at: &str) -> &str {
    at.get(11..19).unwrap_or(at)
}

/// Event messages carry whole failure reasons (with the rank's last output); a line shows the
/// start of it (`--json` has all of it).
const EVENT_WIDTH: usize = 200;

pub fn event_line(e: &ClusterEvent) -> String {
    let message = match e.message.char_indices().nth(EVENT_WIDTH) {
        Some((cut, _)) => format!("{}…", &e.message[..cut]),
        None => e.message.clone(),
    };
    format!("{}  {:<9} {message}", clock(&e.at), e.detail.kind())
}

fn node_process(n: &NodeView) -> String {
    let Some(st) = &n.status else {
        return "-".into();
    };
    match (&st.unit, st.pid) {
        (Some(u), Some(p)) => format!("{u} (pid {p})"),
        (Some(u), None) => u.clone(),
        (None, Some(p)) => format!("pid {p}"),
        (None, None) => "-".into(),
    }
}

fn node_engine(n: &NodeView) -> String {
    let Some(f) = &n.facts else {
        return "unknown".into();
    };
    let binary = f
        .rank_binary()
        .map(|b| b.name.clone())
        .unwrap_or_else(|| "engine".into());
    let build = f
        .engine_version
        .as_deref()
        .map(|v| v.trim_start_matches("version:").trim().to_string())
        .unwrap_or_else(|| "build unknown".into());
    match &f.engine_package {
        Some(p) => format!("{binary} {build} (package {} {})", p.name, p.version),
        None => format!("{binary} {build}"),
    }
}

fn node_hash(n: &NodeView) -> String {
    let Some(m) = n.facts.as_ref().map(|f| &f.model) else {
        return "unknown".into();
    };
    let check = match m.matches_expected {
        Some(true) => ", matches model.sha256",
        Some(false) => ", DIFFERS from model.sha256",
        None => "",
    };
    match &m.hash {
        HashState::NotRequired => "not needed (weights come over the network)".into(),
        HashState::Missing => format!("model file missing: {}", m.path.display()),
        HashState::Hashing => match (m.hashed_bytes, m.size) {
            (Some(d), Some(s)) if s > 0 => format!("hashing, {} %", d * 100 / s),
            _ => "hashing".into(),
        },
        HashState::Done { sha256 } => {
            format!("sha256 {}…{check}", sha256.get(..12).unwrap_or(sha256))
        }
        HashState::Error { message } => format!("error: {message}"),
    }
}

fn node_tuning(n: &NodeView) -> String {
    let Some(f) = &n.facts else {
        return "unknown".into();
    };
    if f.network.is_empty() {
        return "not reported".into();
    }
    let in_effect = f
        .network
        .iter()
        .filter(|k| matches!(k.state, KeyState::AlreadySet | KeyState::Applied))
        .count();
    let mut s = format!("{in_effect} of {} keys in effect", f.network.len());
    let off: Vec<String> = f
        .network
        .iter()
        .filter(|k| !matches!(k.state, KeyState::AlreadySet | KeyState::Applied))
        .map(|k| format!("{} {}", k.key, k.state.as_str()))
        .collect();
    if !off.is_empty() {
        s.push_str(&format!(" ({})", off.join(", ")));
    }
    s
}

fn node_error(n: &NodeView) -> Option<String> {
    n.agent_error
        .clone()
        .or_else(|| n.status.as_ref().and_then(|s| s.last_error.clone()))
        .or_else(|| {
            n.status
                .as_ref()
                .and_then(|s| s.exit.as_ref())
                .map(|e| e.description.clone())
        })
}

/// "chat loaded", "code transferring 42 % (rank 0 from rank 1)", "big missing on rank 1, 2".
fn model_state(m: &ModelState) -> String {
    let mut s = format!("{} {}", m.name, m.state);
    if !m.transfers.is_empty() {
        let t: Vec<String> = m
            .transfers
            .iter()
            .map(|t| format!("rank {} from rank {}", t.rank, t.from_rank))
            .collect();
        s.push_str(&format!(" ({})", t.join(", ")));
    }
    if !m.missing_on.is_empty() {
        let ranks: Vec<String> = m.missing_on.iter().map(u32::to_string).collect();
        s.push_str(&format!(" on rank {}", ranks.join(", ")));
    }
    s
}

/// The report, as `status` prints it.
pub fn render(view: &ClusterView, events: &[ClusterEvent], now: SystemTime) -> String {
    let mut o = String::new();
    let engine = view.engine.as_str();
    let mark = if view.serving() { "●" } else { "○" };
    o.push_str(&format!(
        "{mark} {} ({engine}): {}\n",
        view.cluster,
        view.phase.as_str()
    ));
    let phase = match (&view.serving_since, view.generation) {
        (Some(at), g) => format!(
            "serving generation {g} since {at}{}",
            since(at, now)
                .map(|d| format!("; {d} ago"))
                .unwrap_or_default()
        ),
        (None, 0) => view.phase.as_str().to_string(),
        (None, g) => format!("{} (generation {g})", view.phase.as_str()),
    };
    o.push_str(&format!("      Phase: {phase}\n"));
    if let Some(r) = &view.reason {
        o.push_str(&format!("     Reason: {r}\n"));
    }
    o.push_str(&format!(
        "      Model: {} ({})\n",
        view.model.name,
        view.model.path.display()
    ));
    if !view.models.is_empty() {
        let models: Vec<String> = view.models.iter().map(model_state).collect();
        o.push_str(&format!("     Models: {}\n", models.join("; ")));
    }
    o.push_str(&format!(
        "   Restarts: {} since the coordinator started; {} failed attempt(s) in a row\n",
        view.restarts, view.failures
    ));
    if let Some(p) = &view.placement {
        let source = p.source.as_str();
        let windows = p
            .windows
            .as_ref()
            .map_or_else(|| "chosen at start".to_string(), |w| format!("{w:?}"));
        o.push_str(&format!("  Placement: {source}, layer windows {windows}\n"));
    }
    for w in &view.warnings {
        o.push_str(&format!("    Warning: {w}\n"));
    }
    o.push('\n');
    for n in &view.nodes {
        let host = n
            .facts
            .as_ref()
            .map(|f| format!("{} ({})", f.hostname, n.address))
            .unwrap_or_else(|| n.address.clone());
        o.push_str(&format!(
            "  rank {}  {host}  {}  {}\n",
            n.rank,
            n.state,
            node_process(n)
        ));
        o.push_str(&format!("      engine: {}\n", node_engine(n)));
        o.push_str(&format!("       model: {}\n", node_hash(n)));
        for t in &n.transfers {
            o.push_str(&format!("    transfer: {}\n", t.text));
        }
        o.push_str(&format!("      tuning: {}\n", node_tuning(n)));
        if let Some(e) = node_error(n) {
            o.push_str(&format!("  last error: {e}\n"));
        }
    }
    if !events.is_empty() {
        o.push_str("\nRecent events:\n");
        for e in events {
            o.push_str(&format!("  {}\n", event_line(e)));
        }
    }
    o
}

/// A problem reaching the API, sorted by the exit status it means.
enum Failure {
    Unreachable(anyhow::Error),
    Usage(String),
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.get(format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        let resp = self
            .get(path)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", self.base))
            .map_err(Failure::Unreachable)?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Failure::Usage(format!(
                "{}{path}: the API wants a key: pass --api-key or set LLM_CLUSTER_API_KEY",
                self.base
            )));
        }
        let resp = resp
            .error_for_status()
            .with_context(|| format!("{}{path}", self.base))
            .map_err(Failure::Unreachable)?;
        resp.json()
            .await
            .with_context(|| {
                format!(
                    "{}{path}: not the answer of an llm-agent coordinator",
                    self.base
                )
            })
            .map_err(Failure::Unreachable)
    }

    async fn snapshot(&self) -> Result<(ClusterView, Vec<ClusterEvent>), Failure> {
        #[derive(serde::Deserialize)]
        struct Held {
            events: Vec<ClusterEvent>,
        }
        let view: ClusterView = self.json("/api/v1/cluster").await?;
        // An older coordinator has no events: the status still shows.
        let events = self
            .json::<Held>("/api/v1/events?follow=false")
            .await
            .map(|h| h.events)
            .unwrap_or_default();
        Ok((view, events))
    }
}

fn client(args: &StatusArgs) -> Result<Client, ExitCode> {
    let base = match &args.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => match Config::load(&args.config) {
            Ok(c) => api_base(&c),
            Err(e) => {
                eprintln!("{e}");
                eprintln!("(or give the API's address with --url)");
                return Err(ExitCode::from(exit::USAGE));
            }
        },
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| exit::report(&e.into()))?;
    Ok(Client {
        http,
        base,
        key: args.api_key.clone().filter(|k| !k.is_empty()),
    })
}

fn failed(f: Failure) -> ExitCode {
    match f {
        Failure::Unreachable(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
        Failure::Usage(m) => {
            eprintln!("error: {m}");
            ExitCode::from(exit::USAGE)
        }
    }
}

pub fn run(args: StatusArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return exit::report(&e.into()),
    };
    rt.block_on(async move {
        let c = match client(&args) {
            Ok(c) => c,
            Err(code) => return code,
        };
        if args.watch {
            return watch(&c, &args).await;
        }
        let (view, mut events) = match c.snapshot().await {
            Ok(s) => s,
            Err(f) => return failed(f),
        };
        let keep = events.len().saturating_sub(args.events);
        events.drain(..keep);
        if args.json {
            let doc = serde_json::json!({ "cluster": view, "events": events });
            match serde_json::to_string_pretty(&doc) {
                Ok(t) => println!("{t}"),
                Err(e) => return exit::report(&e.into()),
            }
        } else {
            print!("{}", render(&view, &events, SystemTime::now()));
        }
        ExitCode::from(exit_status(&view))
    })
}

/// Shows a forming ring until it serves: a spinner (a bar while hashing or delivering) on a terminal, plain
/// lines otherwise; every event is printed as it comes.
async fn watch(c: &Client, args: &StatusArgs) -> ExitCode {
    let deadline = args
        .timeout
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let show = Progress::new(std::io::stderr().is_terminal());
    let mut last_seq: Option<u64> = None;
    let mut unreachable: Option<String>;
    loop {
        // Each turn: the current view, then the event stream until something changes.
        match c.snapshot().await {
            Ok((view, events)) => {
                unreachable = None;
                // Later events come from the stream (a later snapshot could skip one).
                if last_seq.is_none() {
                    let keep = events.len().saturating_sub(args.events);
                    for e in &events[keep..] {
                        show.line(&event_line(e));
                    }
                    last_seq = Some(events.last().map_or(0, |e| e.seq));
                }
                let (what, pct) = stage(&view);
                show.stage(&what, pct);
                if view.serving() {
                    show.done();
                    print!("{}", render(&view, &[], SystemTime::now()));
                    return ExitCode::SUCCESS;
                }
            }
            Err(Failure::Usage(m)) => {
                show.done();
                return failed(Failure::Usage(m));
            }
            Err(Failure::Unreachable(e)) => {
                let e = format!("{e:#}");
                show.stage(&format!("waiting for the coordinator: {e}"), None);
                unreachable = Some(e);
            }
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            show.done();
            eprintln!("--timeout ran out before the ring served");
            return match unreachable {
                None => ExitCode::from(exit::NOT_SERVING),
                Some(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(exit::FAILURE)
                }
            };
        }
        follow(c, &show, &mut last_seq, Duration::from_secs(1)).await;
    }
}

/// Reads the event stream for up to `wait`, printing what comes.
async fn follow(c: &Client, show: &Progress, last_seq: &mut Option<u64>, wait: Duration) {
    let mut req = c.get("/api/v1/events");
    if let Some(s) = last_seq {
        req = req.query(&[("since", s.to_string())]);
    }
    let read = async {
        let Ok(resp) = req.send().await else {
            tokio::time::sleep(wait).await;
            return;
        };
        let mut body = resp.bytes_stream();
        let mut framer = SseFramer::default();
        while let Some(Ok(chunk)) = body.next().await {
            for frame in framer.push(&chunk) {
                let data: String = frame
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if let Ok(e) = serde_json::from_str::<ClusterEvent>(&data) {
                    *last_seq = Some(e.seq);
                    show.line(&event_line(&e));
                }
            }
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
}

/// The display of a wait (`status --watch`, `up --local`): indicatif on a terminal, plain lines
/// (each stage once) otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: std::sync::Mutex<String>,
}

impl Progress {
    pub fn new(terminal: bool) -> Progress {
        let bar = terminal.then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress {
            bar,
            last: std::sync::Mutex::default(),
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => println!("{text}"),
        }
    }

    pub fn stage(&self, what: &str, pct: Option<u64>) {
        match &self.bar {
            Some(b) => {
                match pct.filter(|p| *p < 100) {
                    Some(p) => {
                        b.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{spinner} {msg} [{bar:30}] {pos:>3} %",
                            )
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                        );
                        b.set_length(100);
                        b.set_position(p);
                    }
                    None => b.set_style(indicatif::ProgressStyle::default_spinner()),
                }
                b.set_message(what.to_string());
            }
            None => {
                let text = match pct.filter(|p| *p < 100) {
                    Some(p) => format!("{what} ({p} %)"),
                    None => what.to_string(),
                };
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                if *last != text {
                    println!("… {text}");
                    *last = text;
                }
            }
        }
    }

    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{EventDetail, NodeFacts};

    fn view() -> ClusterView {
        let text = "[cluster]\nname=\"lab\"\nengine=\"llama-rpc\"\n[model]\npath=\"/m.gguf\"\n\
                    [api]\nlisten=\"0.0.0.0:8080\"\n\
                    [[node]]\nrank=0\naddress=\"10.0.0.1\"\n\
                    [[node]]\nrank=1\naddress=\"10.0.0.2\"\n";
        let c = Config::parse(text, std::path::Path::new("t")).expect("config");
        assert_eq!(api_base(&c), "http://10.0.0.1:8080", "the head's address");
        ClusterView::initial(&c)
    }

    fn facts(hash: HashState, hashed: Option<u64>) -> NodeFacts {
        let mut f = crate::coordinator::check::tests_support::facts(0);
        f.hostname = "head".into();
        f.engine = crate::config::EngineKind::LlamaRpc;
        f.binaries = vec![];
        f.engine_version = Some("version: 4589 (abc)".into());
        f.model.size = Some(1000);
        f.model.hash = hash;
        f.model.hashed_bytes = hashed;
        f
    }

    #[test]
    fn a_forming_ring_says_what_it_waits_for() {
        let mut v = view();
        assert_eq!(exit_status(&v), 3);
        v.nodes[0].facts = Some(facts(HashState::Hashing, Some(420)));
        assert_eq!(
            stage(&v),
            ("hashing the model on rank 0".to_string(), Some(42))
        );
        v.nodes[0].facts = Some(facts(
            HashState::Done {
                sha256: "ab".repeat(32),
            },
            None,
        ));
        v.nodes[1].state = "unreachable".into();
        assert!(
            stage(&v).0.starts_with("waiting for rank 1's agent"),
            "{:?}",
            stage(&v)
        );
        v.phase = Phase::WaitingReady;
        assert!(stage(&v).0.starts_with("loading the model"));
        v.phase = Phase::Serving;
        assert_eq!(exit_status(&v), 0);
    }

    #[test]
    fn the_report_shows_the_ring_its_nodes_and_events() {
        let mut v = view();
        v.phase = Phase::Serving;
        v.generation = 2;
        v.reason = None;
        v.serving_since = Some("2026-01-01T00:00:00Z".into());
        v.nodes[0].state = "running".into();
        v.nodes[0].facts = Some(facts(
            HashState::Done {
                sha256: "ab".repeat(32),
            },
            None,
        ));
        v.nodes[1].agent_error = Some("connection refused".into());
        let events = [ClusterEvent {
            seq: 3,
            at: "2026-01-01T00:00:00.000Z".into(),
            generation: Some(2),
            rank: None,
            message: "waiting_ready → serving".into(),
            detail: EventDetail::Phase {
                from: "waiting_ready".into(),
                to: "serving".into(),
            },
        }];
        let now = humantime::parse_rfc3339("2026-01-01T00:05:03Z").expect("time");
        let out = render(&v, &events, now);
        for want in [
            "● lab (llama-rpc): serving",
            "Phase: serving generation 2 since 2026-01-01T00:00:00Z; 5m 3s ago",
            "rank 0  head (10.0.0.1)  running",
            "engine: engine 4589 (abc)",
            "model: sha256 abababababab…",
            "tuning: not reported",
            "last error: connection refused",
            "00:00:00  phase     waiting_ready → serving",
        ] {
            assert!(out.contains(want), "missing {want:?} in:\n{out}");
        }
    }

    fn transfer(state: TransferState, done: u64, activity: &str) -> crate::proto::TransferFact {
        crate::proto::TransferFact {
            model: "m".into(),
            from_rank: 1,
            state,
            total_bytes: 98_400_000,
            done_bytes: done,
            resumed_from: 0,
            bytes_per_s: Some(11_000_000.0),
            eta_s: Some(5.5),
            activity: activity.into(),
            error: (state == TransferState::Failed).then(|| "rank 1 went away".to_string()),
            started_unix: 100,
            finished_unix: None,
            seconds: 3.7,
        }
    }

    /// `v`'s rank 0 with its model file missing and `t` as its delivery, as the view reads it.
    fn receiving(v: &mut ClusterView, t: crate::proto::TransferFact) {
        let mut f = facts(HashState::Missing, None);
        f.model.transfer = Some(t);
        v.nodes[0].transfers = TransferView::all(&f);
        v.nodes[0].facts = Some(f);
    }

    #[test]
    fn a_delivery_the_ring_waits_for_drives_the_progress_and_shows_per_node() {
        let mut v = view();
        assert_eq!(v.model.name, "m");
        v.reason = Some("waiting for nodes: rank 0 (10.0.0.1) is receiving model m ...".into());
        receiving(
            &mut v,
            transfer(
                TransferState::Running,
                0,
                "waiting for rank 1 to hash its copy",
            ),
        );
        assert_eq!(
            stage(&v),
            (
                "rank 0 receives model m from rank 1: waiting for rank 1 to hash its copy".into(),
                Some(0)
            )
        );
        receiving(
            &mut v,
            transfer(TransferState::Running, 41_328_000, "receiving from rank 1"),
        );
        assert_eq!(
            stage(&v),
            (
                "rank 0 receives model m from rank 1: 41.3 MB of 98.4 MB, 11.0 MB/s, 6 s left"
                    .into(),
                Some(42)
            )
        );
        v.models = vec![ModelState {
            name: "m".into(),
            aliases: vec![],
            state: "transferring 42 %".into(),
            missing_on: vec![],
            transfers: vec![crate::coordinator::view::ModelTransfer {
                rank: 0,
                from_rank: 1,
                percent: Some(42),
                bytes_per_s: Some(11e6),
                eta_s: Some(5.5),
            }],
        }];
        let out = render(&v, &[], SystemTime::now());
        assert!(
            out.contains("model: model file missing: /m.gguf\n    transfer: receiving model m from rank 1: 42 % of 98.4 MB, 11.0 MB/s, 6 s left\n"),
            "{out}"
        );
        assert!(
            out.contains("     Models: m transferring 42 % (rank 0 from rank 1)\n"),
            "{out}"
        );
        // Two nodes receive it (prima): the ring waits for the one furthest behind.
        let mut behind = facts(HashState::Missing, None);
        behind.rank = 1;
        let mut t = transfer(TransferState::Running, 9_840_000, "receiving from rank 0");
        t.from_rank = 0;
        behind.model.transfer = Some(t);
        v.nodes[1].transfers = TransferView::all(&behind);
        assert_eq!(
            stage(&v),
            (
                "rank 1 receives model m from rank 0: 9.8 MB of 98.4 MB, 11.0 MB/s, 6 s left (2 nodes receive it)"
                    .into(),
                Some(10)
            )
        );
        v.nodes[1].transfers.clear();
        // A transfer of another model than the loaded one is not what the ring waits for.
        let mut other = transfer(TransferState::Running, 10, "receiving from rank 1");
        other.model = "code".into();
        receiving(&mut v, other);
        assert!(stage(&v)
            .0
            .starts_with("checking nodes: waiting for nodes: rank 0"));
        assert!(render(&v, &[], SystemTime::now()).contains("transfer: receiving model code"));

        receiving(&mut v, transfer(TransferState::Failed, 10, "failed"));
        v.models[0].state = "missing".into();
        v.models[0].transfers.clear();
        v.models[0].missing_on = vec![0, 2];
        let out = render(&v, &[], SystemTime::now());
        assert!(
            out.contains("     Models: m missing on rank 0, 2\n"),
            "{out}"
        );
        assert!(
            out.contains("transfer: delivery of model m from rank 1 failed: rank 1 went away\n"),
            "{out}"
        );
        assert!(
            stage(&v).0.starts_with("checking nodes:"),
            "a failure is not progress: {:?}",
            stage(&v)
        );

        // Once the file is there: the delivery stays in the report, no more in the stage.
        let mut f = facts(
            HashState::Done {
                sha256: "ab".repeat(32),
            },
            None,
        );
        f.model.transfer = Some(transfer(TransferState::Done, 98_400_000, "done"));
        v.nodes[0].transfers = TransferView::all(&f);
        v.nodes[0].facts = Some(f);
        v.phase = Phase::Serving;
        let out = render(&v, &[], SystemTime::now());
        assert!(
            out.contains(
                "transfer: received model m from rank 1: 98.4 MB in 3.7 s (11.0 MB/s), sha256 verified\n"
            ),
            "{out}"
        );
    }
}
