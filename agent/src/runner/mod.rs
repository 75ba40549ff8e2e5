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
}
