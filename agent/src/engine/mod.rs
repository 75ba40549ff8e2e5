//! Engine adapters: one per engine, each a pure function from a [`RankSpec`] to the command a
//! node runs for that rank. Nothing here starts processes; runners do that.

pub mod llama_rpc;
pub mod prima;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Binaries, EngineKind};
use crate::proto::{ExitKind, RankSpec};

/// What a runner needs to start one rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Writable and roomy: prima's profiler writes a 1 GiB fio file here.
    pub cwd: PathBuf,
    /// The only remote addresses this rank may exchange traffic with (loopback is always
    /// allowed). Runners that can fence a process (systemd) enforce it.
    pub allowed_peers: Vec<IpAddr>,
    /// How long the rank gets after SIGTERM before SIGKILL. Carried with the command so every
    /// runner applies the same grace (systemd as the unit's TimeoutStopSec).
    pub stop_timeout: Duration,
    /// Output lines containing one of these are kept whole for the agent to read back (see
    /// [`crate::runner::Runner::output_lines`]): prima's head prints its placement this way.
    pub keep_lines: Vec<String>,
    /// `Some`: the process may write these paths and nothing else of the file system, where
    /// the runner can enforce it (systemd: ProtectSystem=strict, PrivateTmp, ReadWritePaths;
    /// the runner creates them for the rank user). `None`: no file system fence (prima's
    /// profiler writes in `cwd`, llama-server may write slot files there).
    pub writable: Option<Vec<PathBuf>>,
}

impl CommandSpec {
    /// The command as a person would type it, for logs and status.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
                s.push_str(&format!("{a:?}"));
            } else {
                s.push_str(a);
            }
        }
        s
    }
}

/// Where this node finds its engine binaries and runs its ranks.
#[derive(Debug, Clone)]
pub struct LocalEngine {
    pub binaries: Binaries,
    pub engine_dir: Option<PathBuf>,
    pub workdir: PathBuf,
    /// llama-rpc workers with `model.rpc_cache`: the rpc server's cache directory (its
    /// `LLAMA_CACHE`, see [`crate::node::rpc_cache`]).
    pub rpc_cache: Option<PathBuf>,
}

impl LocalEngine {
    /// The binary names a rank of `engine` may run: (server, worker).
    pub fn names(&self, engine: EngineKind) -> (&str, &str) {
        match engine {
            EngineKind::Prima => (&self.binaries.prima_server, &self.binaries.prima_worker),
            EngineKind::LlamaRpc => (&self.binaries.llama_server, &self.binaries.rpc_server),
        }
    }

    /// Finds a binary by name: inside `engine_dir` when configured, else on PATH; a default
    /// name is also looked for under the other names packages install it as
    /// ([`binary_aliases`]).
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        std::iter::once(name)
            .chain(binary_aliases(name).iter().copied())
            .find_map(|n| find_binary(n, self.engine_dir.as_deref()))
    }

    /// Resolves a binary name to a path ([`LocalEngine::find`]). Returns the bare name when
    /// nothing is found so the error names what was looked for.
    pub fn resolve(&self, name: &str) -> PathBuf {
        self.find(name).unwrap_or_else(|| PathBuf::from(name))
    }
}

/// Other names a default engine binary is installed as. llama.cpp's rpc server is
/// `ggml-rpc-server` since upstream renamed it, `rpc-server` in older builds (AUR llama.cpp
/// packages of those versions install it as /usr/bin/rpc-server), `llama-rpc-server` where a
/// distribution renamed it. `llama-server` has that one name everywhere (Arch's official
/// llama-cpp, llama-cpp-vulkan, llama-cpp-rocm and the AUR's llama.cpp* install
/// /usr/bin/llama-server); prima.cpp's packages install prima-server/prima-cli. A name set in
/// the config that is none of these (or a path) is used as given.
pub fn binary_aliases(name: &str) -> &'static [&'static str] {
    match name {
        "ggml-rpc-server" => &["rpc-server", "llama-rpc-server"],
        _ => &[],
    }
}

/// Finds an executable by name in `dir` or, without one, on PATH.
pub fn find_binary(name: &str, dir: Option<&Path>) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    match dir {
        Some(d) => {
            let p = d.join(name);
            is_exec(&p).then_some(p)
        }
        None => std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| is_exec(p))
        }),
    }
}

/// Builds the command for one rank with the adapter of its engine.
pub fn command(spec: &RankSpec, local: &LocalEngine) -> CommandSpec {
    match spec.engine {
        EngineKind::Prima => prima::command(spec, local),
        EngineKind::LlamaRpc => llama_rpc::command(spec, local),
    }
}

/// Who may talk to a rank. prima ranks exchange data with their ring neighbours and rank 0, so
/// the whole ring; a llama.cpp rpc server has no authentication and serves only the head, so
/// the head alone; llama.cpp's head dials its workers.
pub fn allowed_peers(spec: &RankSpec) -> Vec<IpAddr> {
    match (spec.engine, spec.is_head()) {
        (EngineKind::LlamaRpc, false) => vec![spec.master],
        _ => spec.peers.clone(),
    }
}

/// Reads an exit in the light of what the engine is known to do.
pub fn classify_exit(
    engine: EngineKind,
    stop_requested: bool,
    code: Option<i32>,
    log_tail: &[String],
) -> ExitKind {
    if stop_requested {
        return ExitKind::Stopped;
    }
    if engine == EngineKind::Prima
        && code == Some(0)
        && log_tail.iter().any(|l| l.contains(prima::NO_LAYER_MESSAGE))
    {
        return ExitKind::DroppedByScheduler;
    }
    ExitKind::Failed
}

/// What a failed rank's output means, where the engine is known to fail that way.
pub fn explain_failure(engine: EngineKind, log_tail: &[String]) -> Option<&'static str> {
    match engine {
        EngineKind::Prima => prima::explain_failure(log_tail),
        EngineKind::LlamaRpc => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Binaries;

    fn local(dir: &Path, rpc_server: &str) -> LocalEngine {
        LocalEngine {
            binaries: Binaries {
                prima_server: "prima-server".into(),
                prima_worker: "prima-cli".into(),
                llama_server: "llama-server".into(),
                rpc_server: rpc_server.into(),
            },
            engine_dir: Some(dir.to_path_buf()),
            workdir: dir.to_path_buf(),
            rpc_cache: None,
        }
    }

    fn exec(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// The rpc server under each name packages install it as is found by the default name;
    /// the upstream name wins when both are there, and an explicit name or path is used as given.
    #[test]
    fn the_rpc_server_is_found_under_every_packaged_name() {
        for installed in ["ggml-rpc-server", "rpc-server", "llama-rpc-server"] {
            let dir = tempfile::tempdir().expect("tempdir");
            exec(&dir.path().join(installed));
            exec(&dir.path().join("llama-server"));
            let l = local(dir.path(), "ggml-rpc-server");
            let (server, worker) = l.names(EngineKind::LlamaRpc);
            assert_eq!(l.resolve(worker), dir.path().join(installed), "{installed}");
            assert_eq!(l.resolve(server), dir.path().join("llama-server"));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        exec(&dir.path().join("rpc-server"));
        exec(&dir.path().join("ggml-rpc-server"));
        let l = local(dir.path(), "ggml-rpc-server");
        assert_eq!(
            l.resolve("ggml-rpc-server"),
            dir.path().join("ggml-rpc-server")
        );
        // Configured explicitly: no other name is tried.
        let l = local(dir.path(), "my-rpc");
        assert_eq!(l.find("my-rpc"), None);
        assert_eq!(l.resolve("my-rpc"), PathBuf::from("my-rpc"));
        let path = dir.path().join("rpc-server");
        let l = local(dir.path(), &path.display().to_string());
        assert_eq!(l.resolve(&path.display().to_string()), path);
        assert!(binary_aliases("llama-server").is_empty());
    }

    #[test]
    fn classify_prima_drop_only_with_status_zero_and_message() {
        let tail = vec!["No layer is assigned to me, exit.".to_string()];
        assert_eq!(
            classify_exit(EngineKind::Prima, false, Some(0), &tail),
            ExitKind::DroppedByScheduler
        );
        assert_eq!(
            classify_exit(EngineKind::Prima, false, Some(1), &tail),
            ExitKind::Failed
        );
        assert_eq!(
            classify_exit(EngineKind::Prima, false, Some(0), &[]),
            ExitKind::Failed
        );
        assert_eq!(
            classify_exit(EngineKind::LlamaRpc, false, Some(0), &tail),
            ExitKind::Failed
        );
        assert_eq!(
            classify_exit(EngineKind::Prima, true, Some(139), &[]),
            ExitKind::Stopped
        );
    }
}
