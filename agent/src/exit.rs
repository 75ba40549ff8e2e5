//! Exit statuses, said once (ripgrep style), so scripts, systemd and Ansible can tell "fix the
//! command line or the config" from "something failed while running" without parsing messages.
//! `--help` and the man page are rendered from [`TABLE`]; README.md repeats it for readers.

use std::process::ExitCode;

use crate::config::ConfigError;

/// Something failed while running: an I/O error, a peer that does not answer, a rank that cannot
/// start. Running the same command again may succeed.
pub const FAILURE: u8 = 1;
/// The command line or the config is wrong; running it again unchanged will fail the same way.
/// clap uses the same status for its own usage errors.
pub const USAGE: u8 = 2;
/// `tune` ran, but some keys are not in effect. Its own status, not 1, so that a caller (the
/// Ansible role) can accept "not settable in this container" and still fail on a real error.
pub const NOT_IN_EFFECT: u8 = 3;
/// `status`: the coordinator answered, and the ring does not serve. The same "ran, but not in
/// the wanted state" status as [`NOT_IN_EFFECT`].
pub const NOT_SERVING: u8 = 3;

/// Every status the program exits with, and what it means.
pub const TABLE: &[(u8, &str)] = &[
    (
        0,
        "success (tune: every key is in effect; status: the ring serves)",
    ),
    (
        FAILURE,
        "a runtime failure (I/O, network, a rank or a measurement that failed; status: the \
         coordinator cannot be reached)",
    ),
    (
        USAGE,
        "a usage or config error: bad arguments, or a config file that does not load or validate \
         (run, up, check-config, pki; status: also an API that wants a key)",
    ),
    (
        NOT_IN_EFFECT,
        "tune: some keys are not in effect (they differ, or cannot be set here); status: the \
         ring does not serve (starting, restarting, refused)",
    ),
];

/// The `Exit status:` section of `--help`.
pub fn help() -> String {
    let mut s = String::from("Exit status:\n");
    for (code, meaning) in TABLE {
        s.push_str(&format!("  {code}  {meaning}\n"));
    }
    s
}

/// The `EXIT STATUS` section of the man page.
pub fn man_section() -> roff::Roff {
    let mut r = roff::Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in TABLE {
        r.control("TP", [] as [&str; 0]);
        r.text([roff::bold(code.to_string())]);
        r.text([roff::roman(*meaning)]);
    }
    r
}

/// A usage error found only after parsing (e.g. a `--node` the config does not list).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The status for an error that ended a command: [`USAGE`] when a config or usage error is
/// anywhere in its chain, else [`FAILURE`].
pub fn of_error(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<ConfigError>() || c.is::<Usage>()) {
        USAGE
    } else {
        FAILURE
    }
}

/// Prints an error that ended a command and returns its status.
pub fn report(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    ExitCode::from(of_error(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_usage_errors_are_2_anywhere_in_the_chain_others_1() {
        let config = ConfigError {
            source: "c.toml".into(),
            problems: vec![crate::config::Problem::general("bad")],
        };
        let wrapped = anyhow::Error::new(config).context("loading");
        assert_eq!(of_error(&wrapped), USAGE);
        let usage = anyhow::Error::new(Usage("--node 9".into()));
        assert_eq!(of_error(&usage), USAGE);
        let io = anyhow::Error::new(std::io::Error::other("disk")).context("writing");
        assert_eq!(of_error(&io), FAILURE);
    }

    #[test]
    fn help_lists_every_status() {
        let h = help();
        for (code, _) in TABLE {
            assert!(h.contains(&format!("  {code}  ")), "{h}");
        }
        let man = man_section().render();
        assert!(man.contains(".SH \"EXIT STATUS\""), "{man}");
    }
}
