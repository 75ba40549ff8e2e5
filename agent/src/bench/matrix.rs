//! `bench --matrix`: for each engine and ring size, one local ring (`llm-agent up --local`, a
//! child process) whose ranks dial each other through the bench's delaying relays
//! (`--relay-shift`, see [`crate::plan::relay_links`]); the relays' delay then steps through
//! the latencies on the same ring, so the ratios against 0 ms come from one ring and one run.
//! The results (JSON, a text table and an SVG plot) go to `--out` with the machine's facts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use tokio::net::TcpStream;

use super::relay::{self, LinkBytes, Relays};
use super::{BenchArgs, Report};
use crate::config::{Config, EngineKind};
use crate::engine::find_binary;

/// Ranks dial peers this many ports away from where they listen (at least the largest ring).
const RELAY_SHIFT: u16 = 100;
/// How long a ring may take from `up` to serving.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    /// /proc/loadavg when the matrix started: others' work on the machine skews the figures.
    pub load_at_start: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineInfo {
    pub engine: EngineKind,
    pub available: bool,
    /// What `--version` of its server said, or why the engine was left out.
    pub detail: String,
    #[serde(skip)]
    dir: Option<PathBuf>,
    #[serde(skip)]
    model: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub engine: EngineKind,
    pub nodes: u32,
    pub latency_ms: u64,
    /// p50 over the streams.
    pub decode_tok_s: Option<f64>,
    pub ttft_s: Option<f64>,
    pub prefill_tok_s: Option<f64>,
    /// decode_tok_s / the same ring's at 0 ms.
    pub decode_ratio: Option<f64>,
    /// Bytes the relays carried during this cell, all links together, and per link.
    pub relay_bytes: u64,
    pub relay_links: Vec<LinkBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Matrix {
    pub kind: &'static str,
    pub date: String,
    pub machine: Machine,
    /// What the latency is: added to each direction of every link, so a round trip between
    /// two ranks gains twice it.
    pub latency: &'static str,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub parallel: u32,
    pub runs: u32,
    pub sweeps: u32,
    pub threads_per_rank: u32,
    pub engines: Vec<EngineInfo>,
    pub cells: Vec<Cell>,
}

/// Parses `up` arguments exactly as the child will, to plan its ring here.
#[derive(Parser)]
struct UpCli {
    #[command(flatten)]
    up: crate::local::UpArgs,
}

pub async fn run(args: &BenchArgs) -> Result<()> {
    if args
        .nodes
        .iter()
        .any(|n| *n < 2 || u32::from(RELAY_SHIFT) < *n)
    {
        bail!(crate::exit::Usage(format!(
            "--nodes {:?}: each ring needs 2 to {RELAY_SHIFT} ranks, so that it has links",
            args.nodes
        )));
    }
    let Some(model) = args.model_file.clone() else {
        bail!(crate::exit::Usage(
            "--matrix needs --model-file (or LLM_MODEL): the GGUF the rings serve".into()
        ));
    };
    let started = Instant::now();
    let machine = machine_facts();
    let mut engines = Vec::new();
    for e in &args.engines {
        engines.push(engine_info(*e, args, &model).await);
    }
    let mut cells = Vec::new();
    let mut ring_index = 0u16;
    for e in engines.iter().filter(|e| e.available) {
        for &n in &args.nodes {
            eprintln!("{} ring of {n}: starting", e.engine);
            // Each ring on ports of its own: prima's HTTP server does not bind a port that
            // the previous ring's connections still hold in TIME_WAIT.
            let offset = args.port_offset.saturating_add(ring_index);
            ring_index += 1;
            match ring_cells(args, e, n, offset).await {
                Ok(c) => cells.extend(c),
                Err(err) => cells.extend(args.latency_ms.iter().map(|l| Cell {
                    engine: e.engine,
                    nodes: n,
                    latency_ms: *l,
                    decode_tok_s: None,
                    ttft_s: None,
                    prefill_tok_s: None,
                    decode_ratio: None,
                    relay_bytes: 0,
                    relay_links: Vec::new(),
                    report: None,
                    error: Some(format!("{err:#}")),
                })),
            }
        }
    }
    add_ratios(&mut cells);
    let result = Matrix {
        kind: "llm-agent bench --matrix",
        date: utc_date(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        ),
        machine,
        latency: "one-way delay added to each direction of every link between ranks",
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
        parallel: args.parallel,
        runs: args.runs,
        sweeps: args.sweeps,
        threads_per_rank: args.threads,
        engines,
        cells,
    };
    let stem = args
        .name
        .clone()
        .unwrap_or_else(|| format!("matrix-{}", result.date));
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let text = text_table(&result);
    let write = |ext: &str, body: &str| -> Result<PathBuf> {
        let p = args.out.join(format!("{stem}.{ext}"));
        std::fs::write(&p, body).with_context(|| format!("cannot write {}", p.display()))?;
        Ok(p)
    };
    let json = serde_json::to_string_pretty(&result).context("cannot write the JSON")?;
    let paths = [
        write("json", &json)?,
        write("txt", &text)?,
        write("svg", &super::svg::plot(&result))?,
    ];
    if args.json {
        println!("{json}");
    } else {
        print!("{text}");
    }
    eprintln!(
        "wrote {} ({:.0} s)",
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64()
    );
    if let Some(c) = result.cells.iter().find(|c| c.error.is_some()) {
        bail!(
            "{} ring of {} at {} ms failed: {}",
            c.engine,
            c.nodes,
            c.latency_ms,
            c.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// Whether the engine's binaries are here, and what they call their version.
async fn engine_info(engine: EngineKind, args: &BenchArgs, model: &Path) -> EngineInfo {
    let (dir, names, model, env) = match engine {
        EngineKind::LlamaRpc => (
            args.llama_dir.clone(),
            vec![("llama-server", "ggml-rpc-server")],
            model.to_path_buf(),
            "LLAMA_CPP_DIR",
        ),
        EngineKind::Prima => (
            args.prima_dir.clone(),
            vec![("prima-server", "prima-cli"), ("llama-server", "llama-cli")],
            args.prima_model_file
                .clone()
                .unwrap_or_else(|| model.to_path_buf()),
            "PRIMA_CPP_DIR",
        ),
    };
    let found = names.iter().find(|(s, w)| {
        find_binary(s, dir.as_deref()).is_some() && find_binary(w, dir.as_deref()).is_some()
    });
    let Some((server, _)) = found else {
        let wanted: Vec<String> = names.iter().map(|(s, w)| format!("{s} + {w}")).collect();
        return EngineInfo {
            engine,
            available: false,
            detail: format!(
                "not run: no {} {} (set {env} or the --{}-dir flag)",
                wanted.join(" or "),
                match &dir {
                    Some(d) => format!("in {}", d.display()),
                    None => "on PATH".into(),
                },
                if engine == EngineKind::Prima {
                    "prima"
                } else {
                    "llama"
                }
            ),
            dir,
            model,
        };
    };
    let server = find_binary(server, dir.as_deref()).unwrap_or_else(|| PathBuf::from(server));
    let version = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(&server)
            .arg("--version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let detail = match version {
        Ok(Ok(o)) => {
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            all.lines()
                .filter(|l| l.contains("version") || l.contains("built with"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; ")
        }
        Ok(Err(e)) => format!("{} --version: {e}", server.display()),
        Err(_) => format!("{} --version did not answer", server.display()),
    };
    EngineInfo {
        engine,
        available: true,
        detail,
        dir,
        model,
    }
}

/// Layer windows as even as the layer count allows (prima needs them to skip profiling).
fn even_windows(layers: u32, ranks: u32) -> Vec<u32> {
    (0..ranks)
        .map(|r| layers / ranks + u32::from(r < layers % ranks))
        .collect()
}

/// The `up` arguments of one ring.
fn up_argv(
    args: &BenchArgs,
    e: &EngineInfo,
    nodes: u32,
    offset: u16,
    state: &Path,
) -> Result<Vec<String>> {
    let ctx = ((args.prompt_tokens + args.max_tokens + 64) * args.parallel.max(1))
        .max(1024)
        .next_multiple_of(256);
    let mut v: Vec<String> = vec![
        "up".into(),
        "--local".into(),
        nodes.to_string(),
        "--engine".into(),
        e.engine.to_string(),
        "--model".into(),
        e.model.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{}", 18500u32 + u32::from(offset)),
        "--port-offset".into(),
        offset.to_string(),
        "--ctx-size".into(),
        ctx.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--slots".into(),
        args.parallel.to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--relay-shift".into(),
        RELAY_SHIFT.to_string(),
    ];
    if let Some(d) = &e.dir {
        v.extend(["--engine-dir".into(), d.display().to_string()]);
    }
    if e.engine == EngineKind::Prima {
        let info = crate::gguf::read_info(&e.model)
            .with_context(|| format!("cannot read the layer count of {}", e.model.display()))?;
        let w: Vec<String> = even_windows(info.block_count, nodes)
            .iter()
            .map(u32::to_string)
            .collect();
        v.extend(["--layer-windows".into(), w.join(",")]);
    }
    Ok(v)
}

/// The relay links of the ring `argv` will start, planned as its coordinator will.
fn planned_links(argv: &[String], state: &Path) -> Result<Vec<crate::plan::RelayLink>> {
    let up = UpCli::try_parse_from(argv)
        .context("the generated up arguments do not parse")?
        .up;
    let text = crate::local::local_config_text(&up, state, &state.join("token"))?;
    let mut config = Config::parse(&text, Path::new("<bench --matrix>"))?;
    config.ports.relay_shift = up.relay_shift;
    let plan = crate::plan::plan(&config, config.model(), 1, None).map_err(anyhow::Error::msg)?;
    Ok(crate::plan::relay_links(&plan))
}

/// What the sweeps took at one latency: reports, relayed bytes, the first error.
type Taken = (u64, Vec<Report>, Vec<LinkBytes>, Option<String>);

/// A ring of `nodes` of engine `e`, benched at every latency.
async fn ring_cells(
    args: &BenchArgs,
    e: &EngineInfo,
    nodes: u32,
    offset: u16,
) -> Result<Vec<Cell>> {
    let state = std::env::temp_dir().join(format!(
        "llm-bench-{}-{}-{nodes}",
        std::process::id(),
        e.engine
    ));
    let argv = up_argv(args, e, nodes, offset, &state)?;
    let links = planned_links(&argv, &state)?;
    if links.is_empty() {
        bail!("the plan has no links to relay");
    }
    // The previous ring's engines may still be letting go of their ports; a ring started
    // over them would fail to bind and be refused by its coordinator.
    let api_port = 18500u16.saturating_add(offset);
    let mut ports: Vec<SocketAddr> = links.iter().map(|l| l.target).collect();
    ports.extend(
        [api_port, 18080u16.saturating_add(offset)].map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
    );
    wait_free(&ports).await?;
    let relays = Relays::start(&links, Duration::ZERO).await?;
    let mut ring = Ring::start(&argv, &state)?;
    let api = format!("http://127.0.0.1:{api_port}");
    let result = async {
        ring.wait_ready(&api).await?;
        // Sweeps interleave: every latency once, then again, so that a change in the
        // machine's load while the ring runs spreads over all of them.
        let mut taken: Vec<Taken> = args
            .latency_ms
            .iter()
            .map(|l| (*l, Vec::new(), Vec::new(), None))
            .collect();
        for sweep in 0..args.sweeps {
            for (lat, reports, bytes, error) in taken.iter_mut() {
                relays.set_delay(Duration::from_millis(*lat));
                let before = relays.bytes();
                let label = format!(
                    "{} {nodes} nodes {lat} ms (sweep {}/{})",
                    e.engine,
                    sweep + 1,
                    args.sweeps
                );
                let report = super::bench_endpoint(args, &api, None, &label).await;
                let links = relay::bytes_between(&before, &relays.bytes());
                *bytes = relay::add(bytes, &links);
                match report {
                    Ok(r) => {
                        eprintln!(
                            "{label}: decode {} tok/s, TTFT {} ms",
                            r.summary
                                .decode_tok_s
                                .as_ref()
                                .map_or("-".into(), |d| format!("{:.1}", d.p50)),
                            r.summary
                                .ttft_s
                                .as_ref()
                                .map_or("-".into(), |d| format!("{:.0}", d.p50 * 1000.0)),
                        );
                        reports.push(r);
                    }
                    Err(err) => {
                        eprintln!("{label}: {err:#}");
                        error.get_or_insert(format!("{err:#}"));
                    }
                }
            }
        }
        let mut cells = Vec::new();
        for (lat, reports, links, error) in taken {
            let report = super::merge_reports(reports);
            let p50 = |f: fn(&super::stats::Summary) -> &Option<super::stats::Dist>| {
                report
                    .as_ref()
                    .and_then(|r| f(&r.summary).as_ref().map(|d| d.p50))
            };
            cells.push(Cell {
                engine: e.engine,
                nodes,
                latency_ms: lat,
                decode_tok_s: p50(|s| &s.decode_tok_s),
                ttft_s: p50(|s| &s.ttft_s),
                prefill_tok_s: p50(|s| &s.prefill_tok_s),
                decode_ratio: None,
                relay_bytes: links
                    .iter()
                    .map(|l| l.bytes_forward + l.bytes_backward)
                    .sum(),
                relay_links: links,
                error,
                report,
            });
        }
        Ok::<_, anyhow::Error>(cells)
    }
    .await;
    let log = ring.stop().await;
    drop(relays);
    let _ = std::fs::remove_dir_all(&state);
    // Bounded, so the next ring finds its ports free or says which is not.
    let _ = wait_free(&ports).await;
    result.map_err(|e| e.context(format!("the ring's log ends:\n{log}")))
}

/// Waits (at most a minute) until nothing listens on `ports` any more.
async fn wait_free(ports: &[SocketAddr]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut busy = None;
        for p in ports {
            let probe = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(p)).await;
            if matches!(probe, Ok(Ok(_))) {
                busy = Some(*p);
                break;
            }
        }
        match busy {
            None => return Ok(()),
            Some(p) if Instant::now() >= deadline => {
                bail!("{p} is still in use (a ring from before?); the ring needs it")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// One `llm-agent up --local` child.
struct Ring {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Ring {
    fn start(argv: &[String], state: &Path) -> Result<Ring> {
        let exe = std::env::current_exe().context("cannot find this program to run `up`")?;
        let log = std::env::temp_dir().join(format!(
            "{}.log",
            state
                .file_name()
                .map_or("llm-bench".into(), |n| n.to_string_lossy())
        ));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = file.try_clone().context("cannot share the log file")?;
        let child = tokio::process::Command::new(exe)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            // In the bench's process group, so a Ctrl-C reaches `up` too and it stops its
            // ranks; they also get SIGTERM should `up` itself die.
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `llm-agent up --local`")?;
        Ok(Ring { child, log })
    }

    async fn wait_ready(&mut self, api: &str) -> Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().context("cannot wait for `up`")? {
                bail!("`llm-agent up --local` exited early ({status})");
            }
            let ok = http
                .get(format!("{api}/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "the ring did not serve within {} s",
            READY_TIMEOUT.as_secs()
        )
    }

    /// SIGINT like a person's Ctrl-C, SIGKILL when that is not enough (the ranks then get
    /// their parent-death SIGTERM); returns the log's tail.
    async fn stop(mut self) -> String {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
            if tokio::time::timeout(Duration::from_secs(60), self.child.wait())
                .await
                .is_err()
            {
                eprintln!("`up` did not stop within 60 s of SIGINT; killing it");
                let _ = self.child.kill().await;
            }
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Each cell's decode rate over its ring's at 0 ms.
fn add_ratios(cells: &mut [Cell]) {
    let base: Vec<(EngineKind, u32, f64)> = cells
        .iter()
        .filter(|c| c.latency_ms == 0)
        .filter_map(|c| c.decode_tok_s.map(|d| (c.engine, c.nodes, d)))
        .collect();
    for c in cells.iter_mut() {
        let zero = base
            .iter()
            .find(|(e, n, _)| *e == c.engine && *n == c.nodes)
            .map(|(_, _, d)| *d);
        c.decode_ratio = match (c.decode_tok_s, zero) {
            (Some(d), Some(z)) if z > 0.0 => Some(d / z),
            _ => None,
        };
    }
}

/// The tables people read: decode tok/s with the ratio against 0 ms, and TTFT.
pub fn text_table(m: &Matrix) -> String {
    let mut out = format!(
        "llm-agent bench --matrix, {} — {} ({} cores, {:.0} GiB), kernel {}, load at start {}\n\
         prompt ~{} tokens, {} tokens out, {} stream(s) x {} run(s) x {} sweep(s), {} thread(s) \
         per rank; latency = {}\n",
        m.date,
        m.machine.cpu_model,
        m.machine.cores,
        m.machine.memory_gib,
        m.machine.kernel,
        m.machine.load_at_start,
        m.prompt_tokens,
        m.max_tokens,
        m.parallel,
        m.runs,
        m.sweeps,
        m.threads_per_rank,
        m.latency
    );
    for e in &m.engines {
        out.push_str(&format!("{}: {}\n", e.engine, e.detail));
    }
    let mut lats: Vec<u64> = m.cells.iter().map(|c| c.latency_ms).collect();
    lats.sort_unstable();
    lats.dedup();
    let mut rings: Vec<(EngineKind, u32)> = m.cells.iter().map(|c| (c.engine, c.nodes)).collect();
    rings.dedup();
    // One table per figure: a row per ring, a column per latency, "failed" where a cell has none.
    let table = |title: &str, cell: &dyn Fn(&Cell) -> Option<String>| {
        let mut t = format!("\n{title}\n{:<11}{:>6}", "engine", "nodes");
        for l in &lats {
            t.push_str(&format!("{:>16}", format!("{l} ms")));
        }
        t.push('\n');
        for (e, n) in &rings {
            t.push_str(&format!("{:<11}{:>6}", e.to_string(), n));
            for l in &lats {
                let s = m
                    .cells
                    .iter()
                    .find(|c| c.engine == *e && c.nodes == *n && c.latency_ms == *l)
                    .and_then(cell)
                    .unwrap_or_else(|| "failed".into());
                t.push_str(&format!("{s:>16}"));
            }
            t.push('\n');
        }
        t
    };
    out.push_str(&table(
        "decode tok/s (p50; ratio vs 0 ms on the same ring)",
        &|c| {
            c.decode_tok_s.map(|d| match c.decode_ratio {
                Some(r) => format!("{d:.1} = {r:.2}x"),
                None => format!("{d:.1}"),
            })
        },
    ));
    out.push_str(&table("TTFT ms (p50)", &|c| {
        c.ttft_s.map(|t| format!("{:.0}", t * 1000.0))
    }));
    out
}

fn machine_facts() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".into(), |(_, v)| v.trim().to_string());
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map_or("unknown".into(), |v| v.trim_matches('"').to_string());
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib: mem_kib / (1024.0 * 1024.0),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into()),
        os,
        load_at_start: read("/proc/loadavg").trim().to_string(),
    }
}

/// YYYY-MM-DD of a Unix time (UTC), by the days-from-civil inverse.
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_796_083_200 + 86_399), "2026-12-01");
    }

    #[test]
    fn windows_cover_every_layer_as_evenly_as_possible() {
        assert_eq!(even_windows(30, 4), [8, 8, 7, 7]);
        assert_eq!(even_windows(30, 3), [10, 10, 10]);
        assert_eq!(even_windows(30, 4).iter().sum::<u32>(), 30);
    }

    fn cell(engine: EngineKind, nodes: u32, lat: u64, d: Option<f64>) -> Cell {
        Cell {
            engine,
            nodes,
            latency_ms: lat,
            decode_tok_s: d,
            ttft_s: d.map(|d| 1.0 / d),
            prefill_tok_s: None,
            decode_ratio: None,
            relay_bytes: 1,
            relay_links: Vec::new(),
            report: None,
            error: d.is_none().then(|| "boom".into()),
        }
    }

    #[test]
    fn ratios_are_against_the_same_ring_at_zero_and_the_table_shows_them() {
        let mut cells = vec![
            cell(EngineKind::LlamaRpc, 3, 0, Some(60.0)),
            cell(EngineKind::LlamaRpc, 3, 5, Some(30.0)),
            cell(EngineKind::Prima, 3, 5, Some(20.0)),
            cell(EngineKind::LlamaRpc, 4, 0, None),
            cell(EngineKind::LlamaRpc, 4, 5, Some(10.0)),
        ];
        add_ratios(&mut cells);
        let r: Vec<Option<f64>> = cells.iter().map(|c| c.decode_ratio).collect();
        assert_eq!(r, [Some(1.0), Some(0.5), None, None, None]);
        let m = Matrix {
            kind: "k",
            date: "2026-12-01".into(),
            machine: machine_facts(),
            latency: "l",
            prompt_tokens: 1,
            max_tokens: 2,
            parallel: 1,
            runs: 1,
            sweeps: 1,
            threads_per_rank: 1,
            engines: Vec::new(),
            cells,
        };
        let t = text_table(&m);
        assert!(t.contains("30.0 = 0.50x"), "{t}");
        assert!(t.contains("failed"), "{t}");
        assert!(t.contains("TTFT ms"), "{t}");
    }

    #[test]
    fn the_ring_the_bench_plans_is_the_one_up_will_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"GGUF").expect("model");
        let args = BenchArgs::try_parse_from_for_test(&["--matrix"]);
        let e = EngineInfo {
            engine: EngineKind::LlamaRpc,
            available: true,
            detail: String::new(),
            dir: None,
            model,
        };
        let state = dir.path().join("state");
        let argv = up_argv(&args, &e, 3, 0, &state).expect("argv");
        let links = planned_links(&argv, &state).expect("links");
        let l: Vec<(u32, u16, u16)> = links
            .iter()
            .map(|l| (l.to, l.listen.port(), l.target.port()))
            .collect();
        assert_eq!(l, [(1, 50153, 50053), (2, 50154, 50054)]);
    }
}
