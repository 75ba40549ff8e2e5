//! Runs each rank as a transient systemd unit, driven over D-Bus.
//!
//! Why a unit and not a child: the engine gets its own cgroup, journald logging, a clean stop
//! with SIGTERM then SIGKILL, an unprivileged user, a memlock limit, an IP fence, and it
//! outlives a restart of the agent, which adopts the running unit instead of restarting the
//! ring. Exits are observed through D-Bus signals (`JobRemoved`, `PropertiesChanged` on the
//! unit's ActiveState), never by polling.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::watch;
use zbus::zvariant::{OwnedObjectPath, Value};

use super::{EventSender, Exit, RunEvent, Runner, Started, ENGINE_LOG_LINES};
use crate::engine::CommandSpec;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: Vec<(&str, Value<'_>)>,
        aux: Vec<(&str, Vec<(&str, Value<'_>)>)>,
    ) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: Vec<&str>,
        patterns: Vec<&str>,
    ) -> zbus::Result<
        Vec<(
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        )>,
    >;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn exec_main_code(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn exec_main_status(&self) -> zbus::Result<i32>;
    #[zbus(property, name = "TimeoutStopUSec")]
    fn timeout_stop_usec(&self) -> zbus::Result<u64>;
}

/// journald's rate-limit window for a rank unit's output (its default, made explicit beside the
/// burst that goes with it).
const LOG_RATE_LIMIT_INTERVAL: Duration = Duration::from_secs(30);

/// `si_code` values systemd reports in ExecMainCode.
const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;
const CLD_DUMPED: i32 = 3;

struct Tracked {
    stop_requested: Arc<std::sync::atomic::AtomicBool>,
    stop_timeout: Duration,
    done: watch::Receiver<bool>,
}

/// Reads systemd's ExecMainCode/ExecMainStatus as (code, signal, why unknown). A failed read
/// is an unknown exit, never "signal 0" (systemd unloads a transient unit that ended cleanly,
/// so its properties may be gone by the time they are read).
fn exit_status(
    code: zbus::Result<i32>,
    status: zbus::Result<i32>,
) -> (Option<i32>, Option<i32>, Option<String>) {
    match (code, status) {
        (Ok(CLD_EXITED), Ok(s)) => (Some(s), None, None),
        (Ok(CLD_KILLED | CLD_DUMPED), Ok(s)) => (None, Some(s), None),
        (Ok(c), Ok(s)) => (
            None,
            None,
            Some(format!(
                "systemd reports ExecMainCode={c} ExecMainStatus={s}"
            )),
        ),
        (Err(e), _) | (_, Err(e)) => (
            None,
            None,
            Some(format!("cannot read the exit status over D-Bus: {e}")),
        ),
    }
}

pub struct SystemdRunner {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
    user: Option<String>,
    events: EventSender,
    units: Mutex<HashMap<String, Tracked>>,
}

/// Unit names are the rank process names ([`crate::proto::rank_process_name`]) plus the suffix
/// systemd needs.
pub fn unit_name(name: &str) -> String {
    format!("{name}.service")
}

impl SystemdRunner {
    /// Connects to the system bus (honouring DBUS_SYSTEM_BUS_ADDRESS). `user` runs the ranks.
    pub async fn connect(user: Option<String>, events: EventSender) -> Result<SystemdRunner> {
        let conn = zbus::Connection::system()
            .await
            .context("cannot connect to the system D-Bus (is systemd running?)")?;
        let manager = ManagerProxy::new(&conn).await?;
        // Without Subscribe, systemd does not broadcast unit and job signals to this client.
        manager
            .subscribe()
            .await
            .context("systemd Manager.Subscribe failed")?;
        Ok(SystemdRunner {
            conn,
            manager,
            user,
            events,
            units: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.units.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows a unit until it stops, then reports its exit. `stop_timeout`: the unit's
    /// TimeoutStopSec when known (a unit this agent started), else read from the unit.
    async fn monitor(
        &self,
        name: &str,
        path: OwnedObjectPath,
        stop_timeout: Option<Duration>,
    ) -> Result<Started> {
        let unit = UnitProxy::builder(&self.conn)
            .path(path.clone())?
            .build()
            .await?;
        // Uncached: systemd does not signal changes of ExecMainCode/ExecMainStatus, so a cached
        // proxy would still hold the values from when the unit started.
        let service = ServiceProxy::builder(&self.conn)
            .path(path)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let pid = service.main_pid().await.ok().filter(|p| *p != 0);
        let stop_timeout = match stop_timeout {
            Some(t) => t,
            None => service
                .timeout_stop_usec()
                .await
                .map(Duration::from_micros)
                .unwrap_or(crate::proto::STOP_GRACE),
        };
        let stop_requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done_tx, done_rx) = watch::channel(false);
        self.lock().insert(
            name.to_string(),
            Tracked {
                stop_requested: stop_requested.clone(),
                stop_timeout,
                done: done_rx,
            },
        );
        let events = self.events.clone();
        let started = Started {
            pid,
            unit: Some(unit_name(name)),
        };
        let name = name.to_string();
        let mut changes = unit.receive_active_state_changed().await;
        tokio::spawn(async move {
            // The state may have changed before the stream existed: look once, then follow.
            let mut state = unit.active_state().await.unwrap_or_default();
            while !matches!(state.as_str(), "inactive" | "failed") {
                match changes.next().await {
                    Some(c) => state = c.get().await.unwrap_or_default(),
                    None => break,
                }
            }
            let (code, signal, unknown) = exit_status(
                service.exec_main_code().await,
                service.exec_main_status().await,
            );
            if let Some(why) = &unknown {
                tracing::warn!(unit = %unit_name(&name), reason = %why, "rank unit ended with an unknown status");
            }
            let exit = Exit {
                code,
                signal,
                unknown,
                stop_requested: stop_requested.load(std::sync::atomic::Ordering::SeqCst),
                log_tail: journal_tail(&unit_name(&name)).await,
            };
            tracing::info!(unit = %unit_name(&name), state = %state, status = %exit.describe(), "rank unit stopped");
            let _ = done_tx.send(true);
            let _ = events.send(RunEvent { name, exit });
        });
        Ok(started)
    }

    /// The rank's working directory, owned by the rank user so the engine can write there.
    fn prepare_workdir(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create working directory {}", dir.display()))?;
        if let Some(name) = &self.user {
            let user = nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .with_context(|| format!("rank user `{name}` does not exist (cluster.rank_user); the packages create it with sysusers"))?;
            nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
                .with_context(|| format!("cannot give {} to {name}", dir.display()))?;
        }
        Ok(())
    }
}

async fn wait_job(removed: &mut JobRemovedStream, job: &OwnedObjectPath) -> Result<String> {
    let wait = async {
        while let Some(sig) = removed.next().await {
            let args = sig.args()?;
            if args.job.as_str() == job.as_str() {
                return Ok::<String, anyhow::Error>(args.result.clone());
            }
        }
        bail!("the D-Bus signal stream ended")
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .context("systemd job did not finish within 60 s")?
}

/// The unit's last journal lines (engines explain their failures on stderr).
async fn journal_tail(unit: &str) -> Vec<String> {
    journal(unit, &["-n", "40"], Duration::from_secs(5)).await
}

/// The unit's journal messages (`journalctl -u UNIT -o cat` plus `args`); nothing on failure.
async fn journal(unit: &str, args: &[&str], timeout: Duration) -> Vec<String> {
    let out = tokio::time::timeout(
        timeout,
        tokio::process::Command::new("journalctl")
            .args(["-u", unit, "-o", "cat", "--no-pager", "-q"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match out {
        Ok(Ok(o)) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// `a(iayu)` entries for IPAddressAllow: family, address bytes, prefix length.
fn ip_entries(addrs: &[IpAddr]) -> Vec<(i32, Vec<u8>, u32)> {
    let mut v: Vec<(i32, Vec<u8>, u32)> = vec![
        (libc_af(false), vec![127, 0, 0, 0], 8),
        (
            libc_af(true),
            std::net::Ipv6Addr::LOCALHOST.octets().to_vec(),
            128,
        ),
    ];
    for a in addrs {
        match a {
            IpAddr::V4(v4) => v.push((libc_af(false), v4.octets().to_vec(), 32)),
            IpAddr::V6(v6) => v.push((libc_af(true), v6.octets().to_vec(), 128)),
        }
    }
    v
}

fn libc_af(v6: bool) -> i32 {
    if v6 {
        10 // AF_INET6
    } else {
        2 // AF_INET
    }
}

/// The transient unit's properties for `cmd`.
pub fn unit_properties<'a>(
    cmd: &'a CommandSpec,
    description: String,
    user: Option<&'a str>,
) -> Vec<(&'static str, Value<'a>)> {
    let program = cmd.program.display().to_string();
    let mut argv = vec![program.clone()];
    argv.extend(cmd.args.iter().cloned());
    let exec: Vec<(String, Vec<String>, bool)> = vec![(program, argv, false)];
    let env: Vec<String> = cmd.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut props: Vec<(&'static str, Value<'a>)> = vec![
        ("Description", Value::from(description)),
        // exec: the start job fails when the binary cannot be executed, instead of succeeding
        // and exiting a moment later.
        ("Type", Value::from("exec")),
        ("ExecStart", Value::from(exec)),
        (
            "WorkingDirectory",
            Value::from(cmd.cwd.display().to_string()),
        ),
        ("Environment", Value::from(env)),
        ("KillSignal", Value::from(15i32)),
        ("KillMode", Value::from("control-group")),
        (
            "TimeoutStopUSec",
            Value::from(u64::try_from(cmd.stop_timeout.as_micros()).unwrap_or(u64::MAX)),
        ),
        // Engines mlock weights when asked to; the default 8 MiB limit would make that fail.
        ("LimitMEMLOCK", Value::from(u64::MAX)),
        ("LimitMEMLOCKSoft", Value::from(u64::MAX)),
        // An engine looping on an error must not flood the journal: journald's default
        // (10,000 lines per 30 s) lets a prima rank on its way to an assertion log thousands
        // (one logged 4,613). Each generation is its own unit, so every generation gets this
        // budget; journald then logs how many lines it suppressed. journald scales the burst
        // up with free disk space, so it is a bound, not an exact count; and lines it drops
        // are missing from journal_tail's failure report too, which is the price of the cap.
        (
            "LogRateLimitIntervalUSec",
            Value::from(u64::try_from(LOG_RATE_LIMIT_INTERVAL.as_micros()).unwrap_or(u64::MAX)),
        ),
        (
            "LogRateLimitBurst",
            Value::from(u32::try_from(ENGINE_LOG_LINES).unwrap_or(u32::MAX)),
        ),
    ];
    if let Some(u) = user {
        props.push(("User", Value::from(u)));
    }
    if let Some(paths) = &cmd.writable {
        // The whole file system read-only but for these paths, and a private /tmp.
        props.push(("ProtectSystem", Value::from("strict")));
        props.push(("PrivateTmp", Value::from(true)));
        if !paths.is_empty() {
            let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            props.push(("ReadWritePaths", Value::from(paths)));
        }
    }
    if !cmd.allowed_peers.is_empty() {
        props.push((
            "IPAddressDeny",
            Value::from(vec![
                (libc_af(false), vec![0u8, 0, 0, 0], 0u32),
                (libc_af(true), vec![0u8; 16], 0u32),
            ]),
        ));
        props.push((
            "IPAddressAllow",
            Value::from(ip_entries(&cmd.allowed_peers)),
        ));
    }
    props
}

#[async_trait]
impl Runner for SystemdRunner {
    async fn start(&self, name: &str, cmd: &CommandSpec) -> Result<Started> {
        let unit = unit_name(name);
        self.prepare_workdir(&cmd.cwd)?;
        // ReadWritePaths= of a missing path fails the unit; the rank user must own it.
        for dir in cmd.writable.iter().flatten() {
            self.prepare_workdir(dir)?;
        }
        // A failed unit of the same name (an earlier attempt) would block the new one.
        let _ = self.manager.reset_failed_unit(&unit).await;
        let props = unit_properties(cmd, format!("llm-cluster {name}"), self.user.as_deref());
        let mut removed = self.manager.receive_job_removed().await?;
        let job = self
            .manager
            .start_transient_unit(&unit, "fail", props, vec![])
            .await
            .with_context(|| format!("systemd refused to start {unit}"))?;
        let result = wait_job(&mut removed, &job).await?;
        if result != "done" {
            let tail = journal_tail(&unit).await;
            let _ = self.manager.reset_failed_unit(&unit).await;
            bail!(
                "starting {unit} ({}) ended with job result `{result}`{}",
                cmd.program.display(),
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", tail.join(" | "))
                }
            );
        }
        let path = self.manager.get_unit(&unit).await?;
        let started = self.monitor(name, path, Some(cmd.stop_timeout)).await?;
        tracing::info!(unit = %unit, pid = ?started.pid, command = %cmd.display(), "rank unit started");
        Ok(started)
    }

    async fn stop(&self, name: &str) -> Result<()> {
        let unit = unit_name(name);
        let tracked = {
            let map = self.lock();
            map.get(name).map(|t| {
                t.stop_requested
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                (t.stop_timeout, t.done.clone())
            })
        };
        match self.manager.stop_unit(&unit, "replace").await {
            Ok(_) => {}
            Err(zbus::Error::MethodError(n, _, _))
                if n.as_str() == "org.freedesktop.systemd1.NoSuchUnit" => {}
            Err(e) => return Err(e).with_context(|| format!("cannot stop {unit}")),
        }
        if let Some((grace, mut done)) = tracked {
            // systemd sends SIGKILL itself after TimeoutStopUSec; wait a little longer than that.
            let _ =
                tokio::time::timeout(grace + Duration::from_secs(5), done.wait_for(|d| *d)).await;
        }
        let _ = self.manager.reset_failed_unit(&unit).await;
        self.lock().remove(name);
        Ok(())
    }

    async fn running(&self, prefix: &str) -> Result<Vec<String>> {
        let pattern = format!("{prefix}*.service");
        let units = self
            .manager
            .list_units_by_patterns(
                vec!["active", "activating", "reloading"],
                vec![pattern.as_str()],
            )
            .await?;
        let mut names: Vec<String> = units
            .into_iter()
            .map(|u| u.0.trim_end_matches(".service").to_string())
            .collect();
        names.sort_by_key(|n| std::cmp::Reverse(crate::proto::generation_of(n).unwrap_or(0)));
        Ok(names)
    }

    async fn adopt(&self, name: &str) -> Result<Started> {
        let path = self.manager.get_unit(&unit_name(name)).await?;
        let started = self.monitor(name, path, None).await?;
        tracing::info!(unit = %unit_name(name), pid = ?started.pid, "adopted running rank unit");
        Ok(started)
    }

    fn stops_with_agent(&self) -> bool {
        false
    }

    fn cpu_usec(&self, pid: u32) -> Result<u64, String> {
        super::cgroup_cpu_usec(pid)
    }

    fn memory_bytes(&self, pid: u32) -> Result<u64, String> {
        super::cgroup_memory_bytes(pid)
    }

    async fn output_lines(&self, name: &str, containing: &[&str]) -> Vec<String> {
        let mut lines = journal(&unit_name(name), &[], Duration::from_secs(10)).await;
        lines.retain(|l| containing.iter().any(|c| l.contains(c)));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn properties_carry_the_command_user_limits_and_fence() {
        let cmd = CommandSpec {
            program: PathBuf::from("/usr/bin/ggml-rpc-server"),
            args: vec!["-H".into(), "10.0.0.2".into()],
            env: vec![("A".into(), "1".into())],
            cwd: PathBuf::from("/var/lib/llm-cluster/rank1"),
            allowed_peers: vec!["10.0.0.1".parse().expect("ip")],
            stop_timeout: Duration::from_secs(2),
            keep_lines: vec![],
            writable: Some(vec![PathBuf::from("/var/lib/llm-cluster/rpc-cache/rank1")]),
        };
        let props = unit_properties(&cmd, "d".into(), Some("llm-cluster"));
        let get = |k: &str| {
            props
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
                .unwrap_or_default()
        };
        assert!(
            get("ExecStart").contains("/usr/bin/ggml-rpc-server")
                && get("ExecStart").contains("10.0.0.2"),
            "{}",
            get("ExecStart")
        );
        assert_eq!(get("User"), "\"llm-cluster\"");
        assert_eq!(get("TimeoutStopUSec"), "uint64 2000000");
        // D-Bus types matter: systemd rejects a transient property of the wrong signature.
        let value = |k: &str| props.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(
            value("LogRateLimitIntervalUSec"),
            Some(Value::U64(30_000_000))
        );
        assert_eq!(
            value("LogRateLimitBurst"),
            Some(Value::U32(ENGINE_LOG_LINES as u32))
        );
        assert!(
            get("IPAddressAllow").contains("[10, 0, 0, 1]")
                || get("IPAddressAllow").contains("0x0a"),
            "{}",
            get("IPAddressAllow")
        );
        assert!(!get("IPAddressDeny").is_empty());
        assert_eq!(value("ProtectSystem"), Some(Value::from("strict")));
        assert_eq!(value("PrivateTmp"), Some(Value::Bool(true)));
        assert_eq!(
            value("ReadWritePaths"),
            Some(Value::from(vec![
                "/var/lib/llm-cluster/rpc-cache/rank1".to_string()
            ]))
        );
        let mut open = cmd.clone();
        open.allowed_peers.clear();
        open.writable = None;
        let props = unit_properties(&open, "d".into(), None);
        assert!(props.iter().all(|(n, _)| !matches!(
            *n,
            "IPAddressDeny" | "User" | "ProtectSystem" | "ReadWritePaths"
        )));
        // Writing nothing: read-only everywhere, no ReadWritePaths at all.
        open.writable = Some(vec![]);
        let props = unit_properties(&open, "d".into(), None);
        assert!(props.iter().any(|(n, _)| *n == "ProtectSystem"));
        assert!(props.iter().all(|(n, _)| *n != "ReadWritePaths"));
    }

    #[test]
    fn an_unreadable_exit_status_is_unknown_not_signal_0() {
        let gone = || zbus::Error::Failure("unit unloaded".into());
        assert_eq!(exit_status(Ok(CLD_EXITED), Ok(0)), (Some(0), None, None));
        assert_eq!(exit_status(Ok(CLD_KILLED), Ok(9)), (None, Some(9), None));
        assert_eq!(exit_status(Ok(CLD_DUMPED), Ok(11)), (None, Some(11), None));
        let (code, signal, why) = exit_status(Err(gone()), Err(gone()));
        assert_eq!((code, signal), (None, None));
        assert!(why.is_some_and(|w| w.contains("unit unloaded")));
        let (code, signal, why) = exit_status(Ok(0), Ok(0));
        assert_eq!((code, signal), (None, None));
        assert!(why.is_some_and(|w| w.contains("ExecMainCode=0")));
    }
}
