//! What `llm-agent tune` reports and keeps: the per-key report as a table or as JSON (the
//! Ansible role reads it instead of re-implementing the tuning), and with `--persist` the values
//! in effect written to /etc/sysctl.d so that boot restores what this host settled on.
//!
//! Why persist under /etc and not rely on the packaged /usr/lib/sysctl.d/99-llm-net.conf alone:
//! systemd-sysctl applies that file's fixed values at boot, which would lower a buffer size this
//! host had tuned higher (buffer sizes are floors), and would try keys that cannot be set here
//! (host-wide keys inside a container). A file of the same name under /etc replaces the packaged
//! one (sysctl.d(5)) and holds exactly the keys in effect, with their values.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{KeyReport, KeyState};

/// The packaged file's name under /etc, so it replaces /usr/lib/sysctl.d/99-llm-net.conf.
pub const PERSIST_PATH: &str = "/etc/sysctl.d/99-llm-net.conf";

/// Whether a key ended up with the wanted value (or, for a floor, at least it).
pub fn in_effect(state: &KeyState) -> bool {
    matches!(state, KeyState::AlreadySet | KeyState::Applied)
}

/// The persisted file for `report`: every key in effect with the value now in effect.
pub fn persisted_text(report: &[KeyReport]) -> String {
    let mut s = String::from(
        "# Written by `llm-agent tune --apply --persist`: the llm-cluster network tuning in effect on\n\
         # this host (keys this host cannot set are left out; buffer sizes keep larger values found\n\
         # here). Replaces the packaged /usr/lib/sysctl.d/99-llm-net.conf, which explains each key.\n",
    );
    for r in report.iter().filter(|r| in_effect(&r.state)) {
        if let Some(v) = &r.after {
            s.push_str(&format!("{} = {v}\n", r.key));
        }
    }
    s
}

/// Writes the persisted file when its content differs; returns whether it wrote. The write is
/// a rename of a complete file, so systemd-sysctl never reads half of one.
pub fn persist(report: &[KeyReport], path: &Path) -> Result<bool> {
    let text = persisted_text(report);
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    let dir = path
        .parent()
        .with_context(|| format!("{}: no parent directory", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("conf.tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(true)
}

#[derive(Debug, Serialize)]
pub struct Persisted {
    pub path: PathBuf,
    /// False when the file already held these values.
    pub written: bool,
}

/// `tune --json`: the per-key report and what the run changed.
#[derive(Debug, Serialize)]
pub struct Summary<'a> {
    pub keys: &'a [KeyReport],
    /// Every key is in effect (the exit status is then 0).
    pub in_effect: bool,
    /// A key was applied or the persisted file was written: what Ansible reports as changed.
    pub changed: bool,
    pub persisted: Option<Persisted>,
}

impl<'a> Summary<'a> {
    pub fn new(keys: &'a [KeyReport], persisted: Option<Persisted>) -> Summary<'a> {
        Summary {
            keys,
            in_effect: keys.iter().all(|r| in_effect(&r.state)),
            changed: keys.iter().any(|r| r.state == KeyState::Applied)
                || persisted.as_ref().is_some_and(|p| p.written),
            persisted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str, after: &str, state: KeyState) -> KeyReport {
        KeyReport {
            key: k.into(),
            wanted: after.into(),
            before: Some(after.into()),
            after: Some(after.into()),
            state,
        }
    }

    #[test]
    fn persists_only_keys_in_effect_and_rewrites_only_on_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sysctl.d/99-llm-net.conf");
        let report = vec![
            key(
                "net.ipv4.tcp_rmem",
                "4096 131072 33554432",
                KeyState::AlreadySet,
            ),
            key("net.ipv4.tcp_congestion_control", "bbr", KeyState::Applied),
            key(
                "net.core.rmem_max",
                "212992",
                KeyState::NotSettable {
                    reason: "read-only".into(),
                },
            ),
        ];
        assert!(persist(&report, &path).expect("first write"));
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.contains("\nnet.ipv4.tcp_rmem = 4096 131072 33554432\n"),
            "{text}"
        );
        assert!(
            text.contains("\nnet.ipv4.tcp_congestion_control = bbr\n"),
            "{text}"
        );
        assert!(!text.contains("rmem_max"), "{text}");
        assert!(
            !persist(&report, &path).expect("second write"),
            "unchanged: not rewritten"
        );
        let s = Summary::new(
            &report,
            Some(Persisted {
                path: path.clone(),
                written: false,
            }),
        );
        assert!(!s.in_effect);
        assert!(s.changed, "a key was applied");
        let settled = &report[..1];
        let s = Summary::new(settled, None);
        assert!(s.in_effect && !s.changed);
    }
}
