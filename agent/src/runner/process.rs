//! Runs each rank as a plain child process in its own process group, so a stop reaches every
//! process the engine spawned, with its output forwarded line by line to the agent's log.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use super::{EventSender, Exit, RunEvent, Runner, Started, ENGINE_LOG_LINES};
use crate::engine::CommandSpec;

/// Lines of output kept per process for failure reports.
const TAIL_LINES: usize = 40;

struct Child {
    pgid: i32,
    kept: Arc<Kept>,
    stop_timeout: Duration,
    stop_requested: Arc<std::sync::atomic::AtomicBool>,
    done: watch::Receiver<bool>,
}

pub struct ProcessRunner {
    children: Mutex<HashMap<String, Child>>,
    events: EventSender,
    /// Where engine output goes: the agent's log; a recorder in tests.
    sink: Sink,
}

impl ProcessRunner {
    pub fn new(events: EventSender) -> ProcessRunner {
        ProcessRunner {
            children: Mutex::new(HashMap::new()),
            events,
            sink: to_log,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Child>> {
        // A panic while holding this lock leaves only a map behind; keep going with it.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Runner for ProcessRunner {
    async fn start(&self, name: &str, cmd: &CommandSpec) -> Result<Started> {
        std::fs::create_dir_all(&cmd.cwd)
            .with_context(|| format!("cannot create working directory {}", cmd.cwd.display()))?;
        let mut c = Command::new(&cmd.program);
        c.args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&cmd.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the child when
        // the thread that forked it (a long-lived runtime worker) dies, so a killed agent leaves
        // no orphaned ranks holding the ring's ports.
        unsafe {
            c.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
        let mut child = c
            .spawn()
            .with_context(|| format!("cannot start {}", cmd.program.display()))?;
        let pid = child.id().context("child exited before its pid was read")?;
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let cap = LogCap::new(ENGINE_LOG_LINES, 2, self.sink);
        let kept = Kept::new(cmd.keep_lines.clone());
        let mut forwarders = Vec::with_capacity(2);
        if let Some(out) = child.stdout.take() {
            forwarders.push(tokio::spawn(forward(
                out,
                name.to_string(),
                tail.clone(),
                cap.clone(),
                kept.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            forwarders.push(tokio::spawn(forward(
                err,
                name.to_string(),
                tail.clone(),
                cap.clone(),
                kept.clone(),
            )));
        }
        let stop_requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done_tx, done_rx) = watch::channel(false);
        self.lock().insert(
            name.to_string(),
            Child {
                pgid: pid as i32,
                kept,
                stop_timeout: cmd.stop_timeout,
                stop_requested: stop_requested.clone(),
                done: done_rx,
            },
        );
        let events = self.events.clone();
        let name_owned = name.to_string();
        tokio::spawn(async move {
            let status = child.wait().await;
            // The report must hold the last lines (a flood's final assertion is the one that
            // explains it), so wait for the forwarders to reach end of file; but not for long:
            // a surviving member of the process group may hold the pipes open.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                futures_util::future::join_all(forwarders),
            )
            .await;
            let (code, signal, unknown) = match &status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    (s.code(), s.signal(), None)
                }
                Err(e) => (
                    None,
                    None,
                    Some(format!("cannot wait for the process: {e}")),
                ),
            };
            let log_tail = tail
                .lock()
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default();
            let exit = Exit {
                code,
                signal,
                unknown,
                stop_requested: stop_requested.load(std::sync::atomic::Ordering::SeqCst),
                log_tail,
            };
            tracing::info!(rank_process = %name_owned, pid, status = %exit.describe(), "engine process ended");
            let _ = done_tx.send(true);
            let _ = events.send(RunEvent {
                name: name_owned,
                exit,
            });
        });
        tracing::info!(rank_process = %name, pid, command = %cmd.display(), "engine process started");
        Ok(Started {
            pid: Some(pid),
            unit: None,
        })
    }

    async fn stop(&self, name: &str) -> Result<()> {
        let Some((pgid, grace, mut done)) = ({
            let map = self.lock();
            map.get(name).map(|c| {
                c.stop_requested
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                (c.pgid, c.stop_timeout, c.done.clone())
            })
        }) else {
            return Ok(());
        };
        if !*done.borrow() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
            // A frozen (SIGSTOPped) engine would hold SIGTERM pending until the grace ends:
            // continue it so it can act on it (systemd does the same for units).
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGCONT);
            // prima's rank 0 ignores SIGINT while the ring forms; SIGTERM works, SIGKILL always.
            if tokio::time::timeout(grace, done.wait_for(|d| *d))
                .await
                .is_err()
            {
                tracing::warn!(rank_process = %name, "no exit after SIGTERM; sending SIGKILL");
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), done.wait_for(|d| *d)).await;
            }
        }
        // Members of the group that outlived the leader.
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        self.lock().remove(name);
        Ok(())
    }

    fn stops_with_agent(&self) -> bool {
        true
    }

    async fn output_lines(&self, name: &str, containing: &[&str]) -> Vec<String> {
        let kept = self.lock().get(name).map(|c| c.kept.clone());
        kept.map(|k| k.matching(containing)).unwrap_or_default()
    }
}

/// Lines kept per process for [`Runner::output_lines`] at most (a placement is a few dozen).
const KEPT_LINES: usize = 1000;

/// The output lines of one process that contain one of the command's `keep_lines`.
struct Kept {
    markers: Vec<String>,
    lines: Mutex<Vec<String>>,
}

impl Kept {
    fn new(markers: Vec<String>) -> Arc<Kept> {
        Arc::new(Kept {
            markers,
            lines: Mutex::new(Vec::new()),
        })
    }

    fn offer(&self, line: &str) {
        if self.markers.iter().any(|m| line.contains(m.as_str())) {
            if let Ok(mut l) = self.lines.lock() {
                if l.len() < KEPT_LINES {
                    l.push(line.to_string());
                }
            }
        }
    }

    fn matching(&self, containing: &[&str]) -> Vec<String> {
        self.lines
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|line| containing.iter().any(|c| line.contains(c)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What the output forwarders of one rank process report.
#[derive(Debug, Clone, PartialEq)]
enum Logged<'a> {
    Line(&'a str),
    /// The first line over the cap; nothing more is logged for this process.
    CapReached {
        limit: usize,
    },
    /// Both streams ended: how many lines were not logged.
    Dropped {
        dropped: usize,
        limit: usize,
    },
}

type Sink = fn(&str, Logged<'_>);

fn to_log(name: &str, what: Logged<'_>) {
    match what {
        Logged::Line(line) => tracing::info!(target: "engine", rank_process = %name, "{line}"),
        Logged::CapReached { limit } => tracing::warn!(
            rank_process = %name,
            "engine output reached {limit} lines; the rest of this process's output is not logged (its last {TAIL_LINES} lines still go into the exit report)"
        ),
        Logged::Dropped { dropped, limit } => tracing::warn!(
            rank_process = %name,
            dropped,
            "{dropped} lines of engine output were not logged (cap: {limit} lines per process)"
        ),
    }
}

/// The budget of log lines one rank process (stdout and stderr together) may spend, so an
/// engine stuck in an error loop cannot flood the agent's log. The failure tail still sees
/// every line: only the log is capped.
struct LogCap {
    limit: usize,
    seen: AtomicUsize,
    /// Streams still open; the last one to close reports what was dropped.
    open: AtomicUsize,
    sink: Sink,
}

impl LogCap {
    fn new(limit: usize, streams: usize, sink: Sink) -> Arc<LogCap> {
        Arc::new(LogCap {
            limit,
            seen: AtomicUsize::new(0),
            open: AtomicUsize::new(streams),
            sink,
        })
    }

    /// Logs a line while the budget lasts, and says so once when it runs out.
    fn line(&self, name: &str, line: &str) {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if n < self.limit {
            (self.sink)(name, Logged::Line(line));
        } else if n == self.limit {
            (self.sink)(name, Logged::CapReached { limit: self.limit });
        }
    }

    /// Marks one stream ended; the last one reports how many lines were not logged.
    fn close(&self, name: &str) {
        if self.open.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let seen = self.seen.load(Ordering::Relaxed);
        if seen > self.limit {
            (self.sink)(
                name,
                Logged::Dropped {
                    dropped: seen - self.limit,
                    limit: self.limit,
                },
            );
        }
    }
}

async fn forward(
    stream: impl AsyncRead + Unpin,
    name: String,
    tail: Arc<Mutex<VecDeque<String>>>,
    cap: Arc<LogCap>,
    kept: Arc<Kept>,
) {
    // Split on bytes, not `lines()`: that one ends at the first line that is not UTF-8 (engines
    // print model text), and a pipe nobody reads any more blocks the engine once it is full.
    let mut lines = BufReader::new(stream).split(b'\n');
    while let Ok(Some(raw)) = lines.next_segment().await {
        let raw = raw.strip_suffix(b"\r").unwrap_or(&raw);
        let line = String::from_utf8_lossy(raw).into_owned();
        cap.line(&name, &line);
        kept.offer(&line);
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
    cap.close(&name);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sh(script: &str) -> CommandSpec {
        CommandSpec {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".into(), script.into()],
            env: vec![("GREETING".into(), "hello".into())],
            cwd: std::env::temp_dir(),
            allowed_peers: vec![],
            stop_timeout: Duration::from_millis(300),
            keep_lines: vec!["KEEP".into()],
            writable: None,
        }
    }

    #[tokio::test]
    async fn reports_exit_status_and_output_tail() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = ProcessRunner::new(tx);
        let s = r
            .start("t1", &sh("echo $GREETING; echo oops >&2; exit 3"))
            .await
            .expect("start");
        assert!(s.pid.is_some());
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("in time")
            .expect("event");
        assert_eq!(ev.name, "t1");
        assert_eq!(ev.exit.code, Some(3));
        assert!(!ev.exit.stop_requested);
        assert!(
            ev.exit.log_tail.contains(&"hello".to_string()),
            "{:?}",
            ev.exit.log_tail
        );
        assert!(
            ev.exit.log_tail.contains(&"oops".to_string()),
            "{:?}",
            ev.exit.log_tail
        );
    }

    /// What a recording sink saw of the process `t-cap` (a fn pointer cannot capture).
    static RECORDED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    fn record(name: &str, what: Logged<'_>) {
        if name == "t-cap" {
            RECORDED.lock().expect("recorder").push(format!("{what:?}"));
        }
    }

    #[tokio::test]
    async fn engine_output_in_the_log_is_capped_per_process_and_the_tail_kept() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = ProcessRunner {
            sink: record,
            ..ProcessRunner::new(tx)
        };
        // Both streams count against one budget: 500 + (cap + 500) lines, the last on stderr.
        let script = format!(
            "seq -f 'out-%.0f' 1 500; seq -f 'err-%.0f' 1 {} >&2",
            ENGINE_LOG_LINES + 500
        );
        r.start("t-cap", &sh(&script)).await.expect("start");
        let ev = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("in time")
            .expect("event");
        let seen = RECORDED.lock().expect("recorder").clone();
        let lines = seen.iter().filter(|l| l.starts_with("Line(")).count();
        assert_eq!(lines, ENGINE_LOG_LINES, "lines forwarded to the log");
        assert_eq!(
            seen[lines..],
            [
                format!("CapReached {{ limit: {ENGINE_LOG_LINES} }}"),
                format!("Dropped {{ dropped: 1000, limit: {ENGINE_LOG_LINES} }}"),
            ],
            "after the cap: one notice, then the count"
        );
        let last = format!("err-{}", ENGINE_LOG_LINES + 500);
        assert_eq!(
            ev.exit.log_tail.last(),
            Some(&last),
            "the tail still sees every line"
        );
    }

    #[tokio::test]
    async fn output_that_is_not_utf8_does_not_stop_forwarding() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = ProcessRunner::new(tx);
        r.start("t-bytes", &sh("printf 'a\\377b\\r\\nafter\\n'; exit 1"))
            .await
            .expect("start");
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("in time")
            .expect("event");
        assert_eq!(
            ev.exit.log_tail,
            vec!["a\u{fffd}b".to_string(), "after".to_string()]
        );
    }

    #[tokio::test]
    async fn stop_kills_the_whole_group_even_when_sigterm_is_ignored() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = ProcessRunner::new(tx);
        // The shell ignores TERM and has a grandchild that must die with it.
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let script = format!("trap '' TERM; sleep 300 & touch {}; wait", ready.display());
        let s = r.start("t2", &sh(&script)).await.expect("start");
        let pgid = s.pid.expect("pid") as i32;
        for _ in 0..100 {
            if ready.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.stop("t2").await.expect("stop");
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("in time")
            .expect("event");
        assert!(ev.exit.stop_requested);
        assert_eq!(ev.exit.signal, Some(9));
        // Nothing of the group is left running (a killed grandchild may linger as a zombie
        // until its new parent reaps it; it holds no resources).
        let live = |pgid: i32| -> usize {
            std::fs::read_dir("/proc")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                        .filter(|stat| {
                            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
                            let f: Vec<&str> = rest.split_whitespace().collect();
                            f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z"
                        })
                        .count()
                })
                .unwrap_or(0)
        };
        assert_eq!(live(pgid), 0, "process group still has live members");
    }

    #[tokio::test]
    async fn start_error_names_the_program() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let r = ProcessRunner::new(tx);
        let mut c = sh("true");
        c.program = PathBuf::from("/nonexistent/llama-server");
        let err = r.start("t3", &c).await.expect_err("missing binary");
        assert!(
            format!("{err:#}").contains("/nonexistent/llama-server"),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn lines_with_a_kept_marker_can_be_read_back() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = ProcessRunner::new(tx);
        r.start(
            "t-kept",
            &sh("echo noise; echo 'KEEP window : 3'; echo more; sleep 5"),
        )
        .await
        .expect("start");
        let mut kept = Vec::new();
        for _ in 0..100 {
            kept = r.output_lines("t-kept", &["window"]).await;
            if !kept.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(kept, vec!["KEEP window : 3".to_string()]);
        assert!(
            r.output_lines("t-kept", &["noise"]).await.is_empty(),
            "only kept lines"
        );
        r.stop("t-kept").await.expect("stop");
        let _ = rx.recv().await;
    }
}
