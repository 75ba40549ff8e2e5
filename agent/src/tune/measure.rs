//! `llm-agent tune --measure`: shows, with numbers, why the tuning matters. Two network
//! namespaces joined by a shaped veth stand in for two nodes; one side sends prefill-sized
//! bursts (hidden size × 2 bytes × 512 tokens, as a ring hop carries) and waits for a one-byte
//! answer, with a pause between bursts as compute would leave. The same run is made with the
//! kernel's default socket settings and with the tuned ones.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

use super::{parse_conf, Sysctl, SYSCTL_CONF};

/// Linux's compiled-in defaults, set explicitly: a new namespace inherits the machine's values,
/// which may already be tuned.
const KERNEL_DEFAULTS: &[(&str, &str)] = &[
    ("net.ipv4.tcp_rmem", "4096 131072 6291456"),
    ("net.ipv4.tcp_wmem", "4096 16384 4194304"),
];

pub struct Options {
    pub rate: String,
    pub delay: String,
    pub bytes: u64,
    pub rounds: u32,
    pub gap: Duration,
}

pub struct Outcome {
    pub config: &'static str,
    pub median_mb_s: f64,
    pub median_ms: f64,
}

pub struct Report {
    pub shaping: String,
    pub outcomes: Vec<Outcome>,
}

impl Report {
    pub fn render(&self, bytes: u64) -> String {
        let mut s = format!(
            "link: {}\ntransfer: {bytes} bytes per burst\n",
            self.shaping
        );
        for o in &self.outcomes {
            s.push_str(&format!(
                "{:<8} median {:>8.1} MB/s  ({:.2} ms per burst)\n",
                o.config, o.median_mb_s, o.median_ms
            ));
        }
        if let [d, t] = &self.outcomes[..] {
            s.push_str(&format!(
                "tuned / default throughput: {:.2}x\n",
                t.median_mb_s / d.median_mb_s
            ));
        }
        s
    }
}

/// Two namespaces and their veth; deleted on drop.
struct Pair {
    a: String,
    b: String,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn tc(ns: &str, dev: &str, qdisc: &str) -> Result<()> {
    let mut args = vec![
        "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
    ];
    args.extend(qdisc.split(' '));
    ip(&args)
}

fn setup(tag: &str, o: &Options) -> Result<(Pair, String)> {
    let pair = Pair {
        a: format!("llm-tune-{}-{tag}a", std::process::id()),
        b: format!("llm-tune-{}-{tag}b", std::process::id()),
    };
    ip(&["netns", "add", &pair.a])?;
    ip(&["netns", "add", &pair.b])?;
    ip(&[
        "link", "add", "tva", "netns", &pair.a, "type", "veth", "peer", "name", "tvb", "netns",
        &pair.b,
    ])?;
    for (ns, dev, addr) in [
        (&pair.a, "tva", "169.254.77.1/30"),
        (&pair.b, "tvb", "169.254.77.2/30"),
    ] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    // netem gives rate and delay; kernels without it still have tbf for the rate alone.
    let netem = format!("netem delay {} rate {}", o.delay, o.rate);
    let shaping = if tc(&pair.a, "tva", &netem).is_ok() && tc(&pair.b, "tvb", &netem).is_ok() {
        format!("{} each way, {} delay each way (netem)", o.rate, o.delay)
    } else {
        let tbf = format!("tbf rate {} burst 256kb latency 100ms", o.rate);
        tc(&pair.a, "tva", &tbf)?;
        tc(&pair.b, "tvb", &tbf)?;
        format!(
            "{} each way (tbf); no added delay: this kernel has no netem qdisc",
            o.rate
        )
    };
    Ok((pair, shaping))
}

/// Runs `f` on a thread that lives in network namespace `ns` (sockets and /proc/sys/net follow).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        setns(&fd, CloneFlags::CLONE_NEWNET).context("setns failed (root needed)")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("measurement thread panicked"))?
}

fn configure(ns: &str, tuned: bool) -> Result<()> {
    in_netns(ns, move || {
        let s = Sysctl::default();
        if tuned {
            s.tune(&parse_conf(SYSCTL_CONF), true);
        } else {
            // Exact values, not floors: written as they are.
            for (k, v) in KERNEL_DEFAULTS {
                s.write(k, v)?;
            }
        }
        Ok(())
    })
}

fn transfer(pair: &Pair, o: &Options) -> Result<Vec<Duration>> {
    let (bytes, rounds, gap) = (o.bytes as usize, o.rounds, o.gap);
    let addr = SocketAddrV4::new(Ipv4Addr::new(169, 254, 77, 2), 47_000);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let b = pair.b.clone();
    let receiver = std::thread::spawn(move || {
        in_netns(&b, move || {
            let l = TcpListener::bind(addr)?;
            let _ = ready_tx.send(());
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; bytes];
            for _ in 0..rounds {
                s.read_exact(&mut buf)?;
                s.write_all(&[1])?;
            }
            Ok(())
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("receiver did not start")?;
    let a = pair.a.clone();
    let times = in_netns(&a, move || {
        let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        let buf = vec![7u8; bytes];
        let mut ack = [0u8; 1];
        let mut times = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            s.write_all(&buf)?;
            s.read_exact(&mut ack)?;
            times.push(t.elapsed());
            std::thread::sleep(gap);
        }
        Ok(times)
    })?;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(times)
}

pub fn run(o: &Options) -> Result<Report> {
    let mut outcomes = Vec::new();
    let mut shaping = String::new();
    for (tag, tuned) in [("d", false), ("t", true)] {
        let (pair, how) = setup(tag, o)?;
        shaping = how;
        configure(&pair.a, tuned)?;
        configure(&pair.b, tuned)?;
        let mut times = transfer(&pair, o)?;
        times.sort();
        let median = times[times.len() / 2].as_secs_f64();
        outcomes.push(Outcome {
            config: if tuned { "tuned" } else { "default" },
            median_mb_s: o.bytes as f64 / median / 1e6,
            median_ms: median * 1e3,
        });
    }
    Ok(Report { shaping, outcomes })
}
