//! Network tuning for ring traffic: every token crosses the ring, and each hop is a burst of
//! activations over TCP. The wanted values are the packaged `sysctl.d/99-llm-net.conf`
//! (compiled in, so the agent and the package never disagree). At start the agent checks every
//! key, applies what is not in effect, and reports per key what happened — a key it cannot set
//! is a line in the report, never a crash.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

pub mod cli;
pub mod measure;

use crate::proto::{KeyReport, KeyState};

/// The packaged sysctl file.
pub const SYSCTL_CONF: &str = include_str!("../../../sysctl.d/99-llm-net.conf");

/// `key = value` lines of a sysctl.d file.
pub fn parse_conf(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().trim_start_matches('-').to_string(), normalize(v)))
        .collect()
}

/// Buffer sizes are floors: a machine already tuned higher is left alone, and applying takes the
/// larger value per component instead of shrinking anything.
const AT_LEAST: &[&str] = &[
    "net.core.rmem_max",
    "net.core.wmem_max",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
];

/// The value to write for `key`: `wanted`, or per component the larger of current and wanted.
fn target(key: &str, current: &str, wanted: &str) -> String {
    if !AT_LEAST.contains(&key) {
        return wanted.to_string();
    }
    let cur: Vec<u64> = current.split(' ').filter_map(|x| x.parse().ok()).collect();
    let want: Vec<u64> = wanted.split(' ').filter_map(|x| x.parse().ok()).collect();
    if cur.len() != want.len() {
        return wanted.to_string();
    }
    cur.iter()
        .zip(&want)
        .map(|(c, w)| (*c).max(*w).to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn normalize(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where sysctls live; tests point this at a directory of plain files.
pub struct Sysctl {
    root: PathBuf,
}

impl Default for Sysctl {
    fn default() -> Self {
        Sysctl {
            root: PathBuf::from("/proc/sys"),
        }
    }
}

impl Sysctl {
    pub fn at(root: &Path) -> Sysctl {
        Sysctl {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key.replace('.', "/"))
    }

    pub fn read(&self, key: &str) -> std::io::Result<String> {
        std::fs::read_to_string(self.path(key)).map(|s| normalize(&s))
    }

    pub(super) fn write(&self, key: &str, value: &str) -> std::io::Result<()> {
        std::fs::write(self.path(key), value)
    }

    /// Checks (and with `apply`, sets) every wanted key.
    pub fn tune(&self, wanted: &[(String, String)], apply: bool) -> Vec<KeyReport> {
        wanted
            .iter()
            .map(|(k, v)| self.tune_key(k, v, apply))
            .collect()
    }

    fn tune_key(&self, key: &str, wanted: &str, apply: bool) -> KeyReport {
        let report = |before: Option<String>, after: Option<String>, state| KeyReport {
            key: key.to_string(),
            wanted: wanted.to_string(),
            before,
            after,
            state,
        };
        let before = match self.read(key) {
            Ok(v) => v,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return report(None, None, KeyState::NotSettable {
                    reason: "absent in this network namespace (the kernel keeps it host-wide or does not have it)".into(),
                })
            }
            Err(e) => return report(None, None, KeyState::NotSettable { reason: format!("cannot read it: {e}") }),
        };
        let target = target(key, &before, wanted);
        if before == target {
            return report(Some(before.clone()), Some(before), KeyState::AlreadySet);
        }
        if !apply {
            return report(Some(before.clone()), Some(before), KeyState::Differs);
        }
        if key == "net.ipv4.tcp_congestion_control" {
            self.ensure_congestion_module(wanted);
        }
        let result = self.write(key, &target);
        let after = self.read(key).ok();
        match result {
            Ok(()) if after.as_deref() == Some(target.as_str()) => {
                report(Some(before), after, KeyState::Applied)
            }
            Ok(()) => report(
                Some(before),
                after,
                KeyState::NotSettable {
                    reason: "the kernel accepted the write but kept another value".into(),
                },
            ),
            Err(e) => {
                let state = explain(key, wanted, &e, &self.root);
                report(Some(before), after, state)
            }
        }
    }

    /// bbr is a module on most kernels; load it before selecting it (modules-load.d covers boot).
    fn ensure_congestion_module(&self, algo: &str) {
        let available = self
            .read("net.ipv4.tcp_available_congestion_control")
            .unwrap_or_default();
        if available.split(' ').any(|a| a == algo) || self.root != Path::new("/proc/sys") {
            return;
        }
        match std::process::Command::new("modprobe")
            .arg(format!("tcp_{algo}"))
            .output()
        {
            Ok(o) if o.status.success() => {
                tracing::info!(module = %format!("tcp_{algo}"), "kernel module loaded")
            }
            Ok(o) => {
                tracing::warn!(module = %format!("tcp_{algo}"), error = %String::from_utf8_lossy(&o.stderr).trim(), "cannot load kernel module")
            }
            Err(e) => {
                tracing::warn!(module = %format!("tcp_{algo}"), error = %e, "cannot run modprobe")
            }
        }
    }
}

/// Turns a failed write into a reason a person can act on.
fn explain(key: &str, wanted: &str, e: &std::io::Error, root: &Path) -> KeyState {
    let code = e.raw_os_error().unwrap_or(0);
    const EPERM: i32 = 1;
    const ENOENT: i32 = 2;
    const EACCES: i32 = 13;
    const EINVAL: i32 = 22;
    const EROFS: i32 = 30;
    match (key, code) {
        ("net.ipv4.tcp_congestion_control", ENOENT) => KeyState::Unsupported {
            reason: format!("congestion control `{wanted}` is not available in this kernel (module tcp_{wanted} missing)"),
        },
        ("net.ipv4.tcp_congestion_control", EPERM) => {
            let allowed = Sysctl::at(root).read("net.ipv4.tcp_allowed_congestion_control").unwrap_or_default();
            KeyState::NotSettable {
                reason: format!("not permitted in this network namespace: only the host's tcp_allowed_congestion_control ({allowed}) may be chosen here"),
            }
        }
        ("net.core.default_qdisc", ENOENT | EINVAL) => KeyState::Unsupported {
            reason: format!("qdisc `{wanted}` is not built into this kernel"),
        },
        (_, EACCES | EROFS | EPERM) => KeyState::NotSettable {
            reason: "read-only here: a host-wide key that only the machine's initial network namespace can set".into(),
        },
        _ => KeyState::NotSettable { reason: format!("write failed: {e}") },
    }
}

/// Logs the report, one line per key with structured fields.
pub fn log_report(report: &[KeyReport]) {
    for r in report {
        let state = r.state.as_str();
        let reason = match &r.state {
            KeyState::NotSettable { reason } | KeyState::Unsupported { reason } => reason.as_str(),
            _ => "",
        };
        tracing::info!(key = %r.key, wanted = %r.wanted, before = r.before.as_deref().unwrap_or("-"), after = r.after.as_deref().unwrap_or("-"), state = %state, reason, "network tuning");
    }
}

/// The report as a table for people.
pub fn render(report: &[KeyReport]) -> String {
    let mut out = String::new();
    for r in report {
        let (state, reason) = match &r.state {
            KeyState::AlreadySet => ("already set", String::new()),
            KeyState::Applied => (
                "applied",
                format!(" (was {})", r.before.as_deref().unwrap_or("?")),
            ),
            KeyState::Differs => (
                "differs",
                format!(" (now {})", r.before.as_deref().unwrap_or("?")),
            ),
            KeyState::NotSettable { reason } => ("not settable here", format!(": {reason}")),
            KeyState::Unsupported { reason } => ("unsupported", format!(": {reason}")),
        };
        out.push_str(&format!("{:<34} {:<24} {state}{reason}\n", r.key, r.wanted));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packaged file is the one place the values live (the Ansible role applies them through
    /// `tune --apply --json`, its test reads the file): check its shape here, not its numbers.
    #[test]
    fn the_packaged_file_parses_and_every_floor_is_numeric() {
        let wanted = parse_conf(SYSCTL_CONF);
        let settings = SYSCTL_CONF
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count();
        assert_eq!(
            wanted.len(),
            settings,
            "every setting line is `key = value`"
        );
        let mut keys: Vec<&str> = wanted.iter().map(|(k, _)| k.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), wanted.len(), "a key is set twice");
        for floor in AT_LEAST {
            let (_, v) = wanted
                .iter()
                .find(|(k, _)| k == floor)
                .unwrap_or_else(|| panic!("floor key {floor} is not in the packaged file"));
            assert!(
                v.split(' ').all(|x| x.parse::<u64>().is_ok()),
                "{floor} = {v}: a floor is numbers"
            );
        }
    }

    /// Each field of a numeric value multiplied by `num / den`.
    fn scaled(v: &str, num: u64, den: u64) -> String {
        v.split(' ')
            .map(|x| (x.parse::<u64>().expect("numeric") * num / den).to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Unit test over plain files standing in for /proc/sys (a narrow mock: the real kernel
    /// behaviour is covered by the systemd-host tests). The wanted values are the packaged ones.
    #[test]
    fn reports_already_set_applied_differs_and_absent() {
        let all = parse_conf(SYSCTL_CONF);
        let want = |k: &str| {
            all.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{k} is not in the packaged file"))
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |k: &str, v: &str| {
            let p = dir.path().join(k.replace('.', "/"));
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            // As the kernel prints them: tab-separated, newline-terminated.
            std::fs::write(p, format!("{}\n", v.replace(' ', "\t"))).expect("write");
        };
        let scaling = "net.ipv4.tcp_window_scaling";
        let rmem = "net.ipv4.tcp_rmem";
        put(scaling, &want(scaling));
        // Every field below the floor but the middle one, which is above it.
        let w = want(rmem);
        let f: Vec<&str> = w.split(' ').collect();
        let current = format!(
            "{} {} {}",
            scaled(f[0], 1, 2),
            scaled(f[1], 3, 2),
            scaled(f[2], 1, 2)
        );
        put(rmem, &current);
        let expected = format!("{} {} {}", f[0], scaled(f[1], 3, 2), f[2]);
        let wanted: Vec<(String, String)> = [scaling, rmem, "net.core.default_qdisc"]
            .iter()
            .map(|k| (k.to_string(), want(k)))
            .collect();
        let s = Sysctl::at(dir.path());
        let check = s.tune(&wanted, false);
        assert_eq!(check[0].state, KeyState::AlreadySet);
        assert_eq!(check[1].state, KeyState::Differs);
        assert!(
            matches!(&check[2].state, KeyState::NotSettable { reason } if reason.contains("absent"))
        );
        let applied = s.tune(&wanted, true);
        assert_eq!(applied[1].state, KeyState::Applied);
        assert_eq!(applied[1].before.as_deref(), Some(current.as_str()));
        assert_eq!(
            s.read(rmem).expect("read"),
            expected,
            "the larger field stays, the others are raised to the floor"
        );
        // A host already tuned above the floor keeps its values.
        let rmem_max = "net.core.rmem_max";
        put(rmem_max, &scaled(&want(rmem_max), 2, 1));
        let higher = s.tune(&[(rmem_max.to_string(), want(rmem_max))], true);
        assert_eq!(higher[0].state, KeyState::AlreadySet);
        let table = render(&applied);
        assert!(
            table.contains(&format!("applied (was {current})")),
            "{table}"
        );
    }
}
