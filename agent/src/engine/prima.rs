//! prima.cpp adapter.
//!
//! Rank 0 runs the server binary (ring flags plus HTTP on a loopback-only port: only the
//! coordinator talks to it); ranks >= 1 run the worker binary with the ring flags alone, since
//! workers take the context size and layer windows from rank 0. Ports are passed as bases: prima
//! adds the rank itself. `--rank` is always spelled long: in llama-cli `-r` is --reverse-prompt.

use super::{CommandSpec, LocalEngine};
use crate::proto::RankSpec;

/// What a rank prints before exiting 0 when Halda assigned it no layers.
pub const NO_LAYER_MESSAGE: &str = "No layer is assigned to me";

pub fn command(spec: &RankSpec, local: &LocalEngine) -> CommandSpec {
    let (server, worker) = local.names(spec.engine);
    let program = local.resolve(if spec.is_head() { server } else { worker });
    let mut args: Vec<String> = vec!["-m".into(), spec.model_path.display().to_string()];
    if spec.is_head() {
        args.extend(["-c".into(), spec.ctx_size.to_string()]);
    }
    args.extend([
        "--world".into(),
        spec.world.to_string(),
        "--rank".into(),
        spec.rank.to_string(),
        "--master".into(),
        spec.master.to_string(),
        "--next".into(),
        spec.next.to_string(),
        "--data-port".into(),
        spec.ports.data.to_string(),
        "--signal-port".into(),
        spec.ports.signal.to_string(),
    ]);
    if let Some(windows) = &spec.layer_windows {
        let w: Vec<String> = windows.iter().map(u32::to_string).collect();
        args.extend(["-lw".into(), w.join(",")]);
    }
    if spec.prefetch {
        args.push("--prefetch".into());
    }
    if let Some(t) = spec.threads {
        args.extend(["-t".into(), t.to_string()]);
    }
    if spec.gpu_mem > 0.0 {
        args.extend([
            "--gpu-mem".into(),
            format_gib(spec.gpu_mem),
            "-ngl".into(),
            spec.gpu_layers.unwrap_or(99).to_string(),
        ]);
    }
    if spec.is_head() {
        // prima's server divides ctx_size between its slots (no unified KV cache), and only
        // the head runs slots: workers compute whatever sequences rank 0 sends them.
        if let Some(n) = spec.slots {
            args.extend(["-np".into(), n.to_string()]);
        }
        args.extend([
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            spec.ports.server.to_string(),
            "--alias".into(),
            spec.model_name.clone(),
        ]);
    }
    CommandSpec {
        program,
        args,
        env: Vec::new(),
        cwd: local.workdir.clone(),
        allowed_peers: super::allowed_peers(spec),
        stop_timeout: crate::proto::STOP_GRACE,
    }
}

/// prima takes whole or fractional GiB; print integers without a trailing ".0".
fn format_gib(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{}", v as u64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Binaries, EngineKind};
    use crate::proto::{PortSpec, RankSpec};
    use std::path::PathBuf;

    fn local() -> LocalEngine {
        LocalEngine {
            binaries: Binaries {
                prima_server: "prima-server".into(),
                prima_worker: "prima-cli".into(),
                llama_server: "llama-server".into(),
                rpc_server: "ggml-rpc-server".into(),
            },
            engine_dir: Some(PathBuf::from("/opt/prima/bin")),
            workdir: PathBuf::from("/var/lib/llm-cluster/rank"),
        }
    }

    fn spec(rank: u32) -> RankSpec {
        RankSpec {
            generation: 1,
            engine: EngineKind::Prima,
            rank,
            world: 3,
            address: format!("10.0.0.{}", rank + 1).parse().expect("ip"),
            master: "10.0.0.1".parse().expect("ip"),
            next: format!("10.0.0.{}", (rank + 1) % 3 + 1)
                .parse()
                .expect("ip"),
            ports: PortSpec {
                data: 9000,
                signal: 10000,
                rpc: 50052,
                server: 18080,
            },
            model_path: PathBuf::from("/models/m.gguf"),
            model_name: "m".into(),
            ctx_size: 1024,
            layer_windows: (rank == 0).then(|| vec![10, 10, 10]),
            tensor_split: None,
            prefetch: false,
            threads: Some(4),
            gpu_mem: 0.0,
            gpu_layers: None,
            rpc_workers: vec![],
            peers: vec![],
            slots: (rank == 0).then_some(2),
        }
    }

    #[test]
    fn head_runs_server_with_ring_flags_windows_and_loopback_http() {
        let c = command(&spec(0), &local());
        assert_eq!(
            c.program,
            PathBuf::from("prima-server"),
            "not installed here: bare name"
        );
        assert_eq!(
            c.args.join(" "),
            "-m /models/m.gguf -c 1024 --world 3 --rank 0 --master 10.0.0.1 --next 10.0.0.2 \
             --data-port 9000 --signal-port 10000 -lw 10,10,10 -t 4 \
             -np 2 --host 127.0.0.1 --port 18080 --alias m"
        );
        assert_eq!(c.cwd, PathBuf::from("/var/lib/llm-cluster/rank"));
    }

    #[test]
    fn worker_runs_cli_with_ring_flags_only() {
        let c = command(&spec(2), &local());
        assert_eq!(c.program, PathBuf::from("prima-cli"));
        assert_eq!(
            c.args.join(" "),
            "-m /models/m.gguf --world 3 --rank 2 --master 10.0.0.1 --next 10.0.0.1 \
             --data-port 9000 --signal-port 10000 -t 4"
        );
    }

    #[test]
    fn gpu_and_prefetch_flags() {
        let mut s = spec(1);
        s.gpu_mem = 7.5;
        s.prefetch = true;
        s.threads = None;
        let c = command(&s, &local());
        assert!(
            c.args
                .join(" ")
                .ends_with("--prefetch --gpu-mem 7.5 -ngl 99"),
            "{:?}",
            c.args
        );
        s.gpu_mem = 8.0;
        s.gpu_layers = Some(20);
        let c = command(&s, &local());
        assert!(
            c.args.join(" ").ends_with("--gpu-mem 8 -ngl 20"),
            "{:?}",
            c.args
        );
    }

    #[test]
    fn no_windows_leaves_scheduling_to_halda() {
        let mut s = spec(0);
        s.layer_windows = None;
        assert!(!command(&s, &local()).args.contains(&"-lw".to_string()));
    }
}
