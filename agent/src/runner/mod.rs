//! Runners start and stop the engine process of a rank. The node agent reconciles through the
//! [`Runner`] trait so the same logic drives plain child processes (local demo, machines without
//! systemd) and, on real nodes, systemd units.

pub mod process;
pub mod systemd;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::engine::CommandSpec;

/// A running rank as the runner knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub pid: Option<u32>,
    /// The systemd unit, for runners that have one.
    pub unit: Option<String>,
}

/// How a rank's process ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Why neither a code nor a signal is known (the runner could not read them).
    pub unknown: Option<String>,
    /// True when the agent itself asked the process to stop.
    pub stop_requested: bool,
    /// The last lines the process printed, to explain a failure.
    pub log_tail: Vec<String>,
}

impl Exit {
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => match &self.unknown {
                Some(why) => format!("ended with an unknown status ({why})"),
                None => "ended with an unknown status".into(),
            },
        }
    }
}

/// Sent by a runner when a process it started ends, whoever ended it.
#[derive(Debug, Clone)]
pub struct RunEvent {
    pub name: String,
    pub exit: Exit,
}

pub type EventSender = mpsc::UnboundedSender<RunEvent>;

/// Lines of a rank process's output that reach the journal: all of them for a rank that starts
/// and serves normally, a bounded amount for one that loops on an error (a prima rank once
/// logged 4,613 lines on its way to a GGML_ASSERT). The process runner stops forwarding after
/// this many lines per process; systemd units get it as journald's burst per interval.
pub const ENGINE_LOG_LINES: usize = 2000;

#[async_trait]
pub trait Runner: Send + Sync + 'static {
    /// Starts `cmd` under `name` (unique per rank and generation). Its end is reported as a
    /// [`RunEvent`] on the runner's channel.
    async fn start(&self, name: &str, cmd: &CommandSpec) -> anyhow::Result<Started>;

    /// Stops `name`: SIGTERM, then SIGKILL after the command's `stop_timeout`. Returns once it
    /// is gone; unknown or already-ended names are not an error.
    async fn stop(&self, name: &str) -> anyhow::Result<()>;

    /// Names of processes started under `prefix` that are still running from an earlier agent
    /// process, newest generation first. Child processes never outlive the agent: none.
    async fn running(&self, _prefix: &str) -> anyhow::Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Takes over a process found by [`Runner::running`]; its exit is then reported as usual.
    async fn adopt(&self, name: &str) -> anyhow::Result<Started> {
        anyhow::bail!("this runner cannot adopt {name}")
    }

    /// Whether the agent's own exit should stop the ranks it started. A child process dies with
    /// its parent anyway; a systemd unit outlives an agent restart by design.
    fn stops_with_agent(&self) -> bool;

    /// The lines `name` printed that contain one of `containing` (the command's `keep_lines`).
    async fn output_lines(&self, _name: &str, _containing: &[&str]) -> Vec<String> {
        Vec::new()
    }

    /// CPU time the rank whose main process is `pid` has used, in microseconds: how the
    /// coordinator tells a slow rank from a frozen one. A child process: its own counters.
    fn cpu_usec(&self, pid: u32) -> Result<u64, String> {
        process_cpu_usec(pid)
    }

    /// Memory the rank whose main process is `pid` uses, in bytes (for metrics). A child
    /// process: its resident set.
    fn memory_bytes(&self, pid: u32) -> Result<u64, String> {
        process_memory_bytes(pid)
    }
}

/// The resident set of a process, from /proc/PID/status (`VmRSS`, in kB).
pub fn process_memory_bytes(pid: u32) -> Result<u64, String> {
    let file = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {file}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no VmRSS in {file}"))
}

/// utime + stime of a process (all its threads), from /proc/PID/stat.
pub fn process_cpu_usec(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // Fields 14 and 15 of stat(5), i.e. 11 and 12 after the state field at index 0.
    let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
        return Err(format!("unexpected /proc/{pid}/stat: {stat}"));
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|h| u64::try_from(h).ok())
        .filter(|h| *h > 0)
        .unwrap_or(100);
    Ok((utime + stime).saturating_mul(1_000_000) / hz)
}

/// `name` in the cgroup v2 directory of `pid`.
fn cgroup_file(pid: u32, name: &str) -> Result<String, String> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("cannot read /proc/{pid}/cgroup: {e}"))?;
    let path = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| format!("process {pid} is in no cgroup v2 hierarchy"))?;
    Ok(format!("/sys/fs/cgroup{}/{name}", path.trim()))
}

/// Memory of the whole cgroup `pid` is in (a systemd unit: every process of the rank), from
/// the cgroup v2 `memory.current`.
pub fn cgroup_memory_bytes(pid: u32) -> Result<u64, String> {
    let file = cgroup_file(pid, "memory.current")?;
    let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {file}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("unexpected {file}: {text}"))
}

/// CPU time of the whole cgroup `pid` is in (a systemd unit: every process of the rank), from
/// the cgroup v2 `cpu.stat`, which the kernel keeps without the cpu controller enabled.
pub fn cgroup_cpu_usec(pid: u32) -> Result<u64, String> {
    let file = cgroup_file(pid, "cpu.stat")?;
    let stat = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {file}: {e}"))?;
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no usage_usec in {file}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Works until `counter` has risen by `by` µs, or 30 s of wall time have passed: on a loaded
    /// machine a fixed wall-clock spin may get little CPU, so the wait follows the counter itself.
    fn spin_until_rises(counter: impl Fn() -> u64, by: u64) -> (u64, u64) {
        let start = counter();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        let mut now = start;
        while now < start + by && t.elapsed() < std::time::Duration::from_secs(30) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            now = counter();
        }
        (start, now)
    }

    #[test]
    fn cpu_time_of_a_working_process_rises() {
        let me = std::process::id();
        let (before, after) =
            spin_until_rises(|| process_cpu_usec(me).expect("own /proc stat"), 100_000);
        assert!(after >= before + 100_000, "{before} -> {after}");
        assert!(process_cpu_usec(u32::MAX).is_err(), "no such process");
        let rss = process_memory_bytes(me).expect("own /proc status");
        assert!(rss > 1 << 20, "{rss}");
        assert!(process_memory_bytes(u32::MAX).is_err(), "no such process");
        // The cgroup counter exists wherever cgroup v2 is mounted (CI and the systemd hosts).
        if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            let (a, b) = spin_until_rises(|| cgroup_cpu_usec(me).expect("cgroup cpu.stat"), 10_000);
            assert!(b > a, "{a} -> {b}");
        }
    }
}
