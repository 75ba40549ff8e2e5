//! `llm-agent notify-upgrade`: what the pacman hook runs after an engine or llm-agent package
//! changed. It reaches every node agent of this machine (`llm-agent@rankN` units) through
//! systemd, never through the control API, so neither the hook nor a person needs the control
//! token: systemd's own access control (root) guards it.
//!
//! An agent whose binary was replaced (the llm-agent package itself was upgraded) is restarted:
//! only a new process runs the new version, and the ranks outlive it (their own units), its
//! successor adopts them and the head's clients queue on the kept API socket meanwhile. Every
//! other agent gets SIGUSR1: its facts are read anew on each request, so announcing a change is
//! enough for the coordinator to look at once. `--restart-ring` adds SIGUSR2, the head
//! coordinator's manual restart on the new build (`supervision.restart_on_upgrade = false`).

use std::process::Command;

use anyhow::{bail, Context, Result};

/// What to do with one local agent unit. Pure.
#[derive(Debug, PartialEq, Eq)]
pub enum Notify {
    /// Its process runs a binary that is gone from disk: restart the unit.
    Restart,
    /// Tell it that packages changed (and, for the manual ring restart, SIGUSR2 too).
    Signal,
    /// Not running: nothing to tell; it reads its facts when it starts.
    Skip,
}

/// `exe`: the target of `/proc/PID/exe` of the unit's main process, `None` without one. The
/// kernel appends " (deleted)" once the file the process was started from was replaced.
pub fn decide(exe: Option<&str>) -> Notify {
    match exe {
        None => Notify::Skip,
        Some(e) if e.ends_with(" (deleted)") => Notify::Restart,
        Some(_) => Notify::Signal,
    }
}

/// The `llm-agent@…` unit names in `systemctl list-units --plain --no-legend` output.
pub fn agent_units(list_units: &str) -> Vec<String> {
    list_units
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|u| u.starts_with("llm-agent@") && u.ends_with(".service"))
        .map(str::to_string)
        .collect()
}

fn systemctl(args: &[&str]) -> Result<String> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .with_context(|| format!("cannot run systemctl {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Notifies every running `llm-agent@` unit of this machine; prints one line per unit.
pub fn notify(restart_ring: bool) -> Result<()> {
    if !std::path::Path::new("/run/systemd/system").is_dir() {
        println!(
            "notify-upgrade: systemd is not running here; signal a local agent yourself (kill -USR1 PID)"
        );
        return Ok(());
    }
    let units = agent_units(&systemctl(&[
        "list-units",
        "--type=service",
        "--state=running",
        "--plain",
        "--no-legend",
        "llm-agent@*",
    ])?);
    if units.is_empty() {
        println!("notify-upgrade: no llm-agent@ unit runs on this machine; nothing to tell");
        return Ok(());
    }
    let mut failed = Vec::new();
    for unit in &units {
        let pid = systemctl(&["show", "--property=MainPID", "--value", unit])?;
        let pid = pid.trim();
        let exe = match pid {
            "" | "0" => None,
            p => std::fs::read_link(format!("/proc/{p}/exe"))
                .ok()
                .map(|l| l.to_string_lossy().into_owned()),
        };
        let result = match decide(exe.as_deref()) {
            Notify::Skip => {
                println!("{unit}: not running");
                continue;
            }
            Notify::Restart => systemctl(&["restart", unit]).map(|_| {
                println!("{unit}: its llm-agent binary was replaced; restarted (its rank runs on)")
            }),
            Notify::Signal => {
                let mut r = systemctl(&["kill", "--kill-whom=main", "--signal=SIGUSR1", unit])
                    .map(|_| println!("{unit}: told to read its facts anew"));
                if restart_ring && r.is_ok() {
                    r = systemctl(&["kill", "--kill-whom=main", "--signal=SIGUSR2", unit]).map(
                        |_| {
                            println!(
                                "{unit}: asked to restart the ring on the new build (head only)"
                            )
                        },
                    );
                }
                r
            }
        };
        if let Err(e) = result {
            eprintln!("{unit}: {e:#}");
            failed.push(unit.clone());
        }
    }
    if !failed.is_empty() {
        bail!("could not notify {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_binary_means_restart_a_current_one_a_signal() {
        assert_eq!(decide(None), Notify::Skip);
        assert_eq!(decide(Some("/usr/bin/llm-agent")), Notify::Signal);
        assert_eq!(
            decide(Some("/usr/bin/llm-agent (deleted)")),
            Notify::Restart
        );
    }

    #[test]
    fn only_agent_units_are_picked_from_list_units() {
        let out = "llm-agent@rank0.service loaded active running llm-cluster node agent rank0\n\
                   llm-agent@rank2.service loaded active running llm-cluster node agent rank2\n\
                   llm-rank-rank0-g3.service loaded active running prima rank\n";
        assert_eq!(
            agent_units(out),
            vec!["llm-agent@rank0.service", "llm-agent@rank2.service"]
        );
        assert!(agent_units("").is_empty());
    }
}
