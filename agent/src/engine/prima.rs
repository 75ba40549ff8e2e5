//! prima.cpp adapter.
//!
//! Rank 0 runs the server binary (ring flags plus HTTP on a loopback-only port: only the
//! coordinator talks to it); ranks >= 1 run the worker binary with the ring flags alone, since
//! workers take the context size and layer windows from rank 0. Ports are passed as bases: prima
//! adds the rank itself. `--rank` is always spelled long: in llama-cli `-r` is --reverse-prompt.

use super::{CommandSpec, LocalEngine};
use crate::proto::{Placement, RankSpec};

/// What a rank prints before exiting 0 when Halda assigned it no layers.
pub const NO_LAYER_MESSAGE: &str = "No layer is assigned to me";

/// The lines of rank 0's output that say where Halda put the layers (common.cpp of bdf9d8e7):
/// an "Allocation Strategy" block per solver round, listing each remaining device's window and
/// GPU layers in rank order, and a "Remove device … (rank R) …" line per device it drops.
pub const PLACEMENT_MARKERS: &[&str] = &[
    "Allocation Strategy (by HiGHS)",
    "N Layer Window",
    "N GPU Layers",
    "Remove device",
];

/// The final placement in rank 0's output, per rank of a ring of `world`: the last allocation
/// block for the devices that remain, 0 for the ranks removed. None unless the output is whole.
pub fn parse_placement(lines: &[String], world: u32) -> Option<Placement> {
    let value = |l: &str| {
        l.rsplit_once(':')
            .and_then(|(_, v)| v.trim().parse::<u32>().ok())
    };
    let (mut windows, mut gpus, mut removed) = (Vec::new(), Vec::new(), Vec::new());
    let mut seen_block = false;
    for l in lines {
        if l.contains(PLACEMENT_MARKERS[0]) {
            seen_block = true;
            windows.clear();
            gpus.clear();
        } else if l.contains(PLACEMENT_MARKERS[1]) {
            windows.push(value(l)?);
        } else if l.contains(PLACEMENT_MARKERS[2]) {
            gpus.push(value(l)?);
        } else if l.contains(PLACEMENT_MARKERS[3]) {
            let rank = l
                .split("(rank ")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .and_then(|r| r.trim().parse::<u32>().ok())?;
            removed.push(rank);
        }
    }
    let kept: Vec<u32> = (0..world).filter(|r| !removed.contains(r)).collect();
    if !seen_block || windows.len() != kept.len() || gpus.len() != kept.len() || !kept.contains(&0)
    {
        return None;
    }
    let mut w = vec![0; world as usize];
    let mut g = vec![0; world as usize];
    for ((r, win), gpu) in kept.iter().zip(&windows).zip(&gpus) {
        w[*r as usize] = *win;
        g[*r as usize] = *gpu;
    }
    Some(Placement {
        windows: w,
        gpu_layers: Some(g),
    })
}

/// Failures of prima.cpp that its output names but does not explain: (what it prints, what
/// that means and what to do), for the rank's last error.
const KNOWN_FAILURES: [(&str, &str); 3] = [
    // Upstream main inside a container: the profiler sees /.dockerenv, reads cgroup v2
    // memory.max, finds none and takes the RAM to be 0 bytes (total, or available a line
    // later). Fixed on branch tao_dev, commit 32e10881, which the prima-cpp packages apply.
    (
        "Failed to parse total physical memory",
        CONTAINER_MEMORY_EXPLANATION,
    ),
    (
        "Failed to parse available physical memory",
        CONTAINER_MEMORY_EXPLANATION,
    ),
    // The profiler knows a fixed list of weight types (not Q4_1, for one).
    (
        "Unrecognized weight type in PROFILER_",
        "prima.cpp's profiler does not support this model's weight type (e.g. Q4_1; Q4_K, Q6_K \
         and Q8_0 work); give explicit layer_windows, which skip profiling, or use another \
         quantisation",
    ),
];

/// What the container abort means and what to do about it.
pub const CONTAINER_MEMORY_EXPLANATION: &str = "prima.cpp's profiler could not read the memory \
     limit inside a container; install a prima-cpp package with the container fix (upstream \
     commit 32e10881) or give explicit layer_windows";

/// Says what a failed rank's output means where prima is known to fail that way, so the
/// operator reads the cause and the remedy rather than an assertion from deep inside prima.
pub fn explain_failure(log_tail: &[String]) -> Option<&'static str> {
    KNOWN_FAILURES
        .iter()
        .find(|(message, _)| log_tail.iter().any(|l| l.contains(message)))
        .map(|(_, why)| *why)
}

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
            // Its Prometheus metrics, which the head's /metrics re-exports (llm_engine_*).
            "--metrics".into(),
        ]);
    }
    CommandSpec {
        program,
        args,
        env: Vec::new(),
        cwd: local.workdir.clone(),
        allowed_peers: super::allowed_peers(spec),
        stop_timeout: crate::proto::STOP_GRACE,
        keep_lines: if spec.is_head() {
            PLACEMENT_MARKERS.iter().map(|m| m.to_string()).collect()
        } else {
            Vec::new()
        },
        writable: None,
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
            rpc_cache: None,
        }
    }

    fn spec(rank: u32) -> RankSpec {
        RankSpec {
            generation: 1,
            engine: EngineKind::Prima,
            node: rank,
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
             -np 2 --host 127.0.0.1 --port 18080 --alias m --metrics"
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
    fn the_container_memory_abort_is_explained() {
        // As a rank of upstream main printed it in a container (GGML_ASSERT shows the
        // expression, the message's "\n" included), followed by gdb's backtrace.
        let tail: Vec<String> = [
            "start profiling this device, this may take some seconds ...",
            r#"src/llama.cpp:3637: GGML_ASSERT(dev_info->memory.total_physical > 0 && "Failed to parse total physical memory\n") failed"#,
            "#5  0x000056028c1c56d3 in llama_init_from_gpt_params (params=...) at common/common.cpp:1768",
            "[Inferior 1 (process 29585) detached]",
        ]
        .map(String::from)
        .to_vec();
        let why = explain_failure(&tail).expect("explained");
        assert!(
            why.contains("could not read the memory limit inside a container")
                && why.contains("32e10881")
                && why.contains("layer_windows"),
            "{why}"
        );
        let available = vec![r#"GGML_ASSERT(dev_info->memory.available_physical > 0 && "Failed to parse available physical memory\n") failed"#.to_string()];
        assert_eq!(
            explain_failure(&available),
            Some(CONTAINER_MEMORY_EXPLANATION)
        );
        assert_eq!(
            explain_failure(&["GGML_ASSERT(n_layers > 0) failed".to_string()]),
            None
        );
        assert_eq!(explain_failure(&[]), None);
    }

    #[test]
    fn an_unsupported_weight_type_for_the_profiler_is_explained() {
        let tail = vec![
            "terminate called after throwing an instance of 'std::runtime_error'".to_string(),
            "  what():  Unrecognized weight type in PROFILER_LAYER_BACKEND".to_string(),
        ];
        let why = explain_failure(&tail).expect("explained");
        assert!(
            why.contains("weight type") && why.contains("layer_windows"),
            "{why}"
        );
    }

    #[test]
    fn no_windows_leaves_scheduling_to_halda() {
        let mut s = spec(0);
        s.layer_windows = None;
        assert!(!command(&s, &local()).args.contains(&"-lw".to_string()));
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn halda_placement_is_read_from_the_last_allocation_block() {
        // Shaped like prima's output: round one over three devices, rank 1 removed, round two.
        let out = lines(
            "----- Allocation Strategy (by HiGHS) -----\n  - N Layer Window : 1\n  - N GPU Layers   : 0\n\
             \x20 - N Layer Window : 1\n  - N GPU Layers   : 0\n  - N Layer Window : 28\n  - N GPU Layers   : 0\n\
             Remove device node1 (rank 1) with only 1 layer assigned.\n\
             ----- Allocation Strategy (by HiGHS) -----\n  - N Layer Window : 1\n  - N GPU Layers   : 0\n\
             \x20 - N Layer Window : 29\n  - N GPU Layers   : 2\n",
        );
        let p = parse_placement(&out, 3).expect("placement");
        assert_eq!(p.windows, vec![1, 0, 29]);
        assert_eq!(p.gpu_layers, Some(vec![0, 0, 2]));
        // Cut short (the second block is incomplete): nothing, rather than a wrong placement.
        assert_eq!(parse_placement(&out[..out.len() - 1], 3), None);
        assert_eq!(parse_placement(&[], 3), None);
    }
}
