//! llama.cpp RPC adapter.
//!
//! Ranks >= 1 run the rpc server bound to the node's own address (it has no authentication, so
//! never 0.0.0.0); rank 0 runs llama-server on loopback with `--rpc` listing the workers in rank
//! order. `-ngl 99` is what sends layers to the rpc devices at all.
//!
//! Slots (`-np`) come from `model.slots`, so the gateway knows how many requests the engine
//! decodes at once and queues the rest fairly itself. `--kv-unified` keeps what llama-server
//! does with its automatic slot count (4 slots sharing one KV cache of ctx_size, so a single
//! request may still use the whole context); an explicit `-np` alone would give each slot
//! ctx_size / slots.

use super::{CommandSpec, LocalEngine};
use crate::plan::rpc_port;
use crate::proto::RankSpec;

pub fn command(spec: &RankSpec, local: &LocalEngine) -> CommandSpec {
    let (server, worker) = local.names(spec.engine);
    let mut args: Vec<String> = Vec::new();
    let program = if spec.is_head() {
        args.extend([
            "-m".into(),
            spec.model_path.display().to_string(),
            "-c".into(),
            spec.ctx_size.to_string(),
        ]);
        if !spec.rpc_workers.is_empty() {
            let workers: Vec<String> = spec.rpc_workers.iter().map(|a| a.to_string()).collect();
            args.extend(["--rpc".into(), workers.join(",")]);
        }
        let ngl = if spec.rpc_workers.is_empty() && spec.gpu_mem <= 0.0 {
            0
        } else {
            spec.gpu_layers.unwrap_or(99)
        };
        args.extend(["-ngl".into(), ngl.to_string()]);
        if let Some(split) = &spec.tensor_split {
            let s: Vec<String> = split.iter().map(|v| v.to_string()).collect();
            args.extend(["--tensor-split".into(), s.join(",")]);
        }
        if let Some(t) = spec.threads {
            args.extend(["-t".into(), t.to_string()]);
        }
        if let Some(n) = spec.slots {
            args.extend(["-np".into(), n.to_string(), "--kv-unified".into()]);
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
        local.resolve(server)
    } else {
        args.extend([
            "-H".into(),
            spec.address.to_string(),
            "-p".into(),
            rpc_port(spec.ports.rpc, spec.rank).to_string(),
        ]);
        if let Some(t) = spec.threads {
            args.extend(["-t".into(), t.to_string()]);
        }
        local.resolve(worker)
    };
    // The rpc server writes nothing but its tensor cache (`-c`, kept under LLAMA_CACHE), so
    // under systemd it may write that directory alone. llama-server keeps no fence here.
    let (env, writable) = match (spec.is_head(), &local.rpc_cache) {
        (true, _) => (Vec::new(), None),
        (false, Some(dir)) => {
            args.push("-c".into());
            (
                vec![(
                    crate::node::rpc_cache::ENV.to_string(),
                    dir.display().to_string(),
                )],
                Some(vec![dir.clone()]),
            )
        }
        (false, None) => (Vec::new(), Some(Vec::new())),
    };
    CommandSpec {
        program,
        args,
        env,
        cwd: local.workdir.clone(),
        allowed_peers: super::allowed_peers(spec),
        stop_timeout: crate::proto::STOP_GRACE,
        keep_lines: Vec::new(),
        writable,
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
            engine_dir: None,
            workdir: PathBuf::from("/w"),
            rpc_cache: None,
        }
    }

    fn spec(rank: u32) -> RankSpec {
        RankSpec {
            generation: 1,
            engine: EngineKind::LlamaRpc,
            node: rank,
            rank,
            world: 3,
            address: format!("10.0.0.{}", rank + 1).parse().expect("ip"),
            master: "10.0.0.1".parse().expect("ip"),
            next: "10.0.0.1".parse().expect("ip"),
            ports: PortSpec {
                data: 9000,
                signal: 10000,
                rpc: 50052,
                server: 18080,
            },
            model_path: PathBuf::from("/models/m.gguf"),
            model_name: "smol".into(),
            ctx_size: 2048,
            layer_windows: None,
            tensor_split: (rank == 0).then(|| vec![1.0, 3.0]),
            prefetch: false,
            threads: Some(2),
            gpu_mem: 0.0,
            gpu_layers: None,
            rpc_workers: if rank == 0 {
                vec![
                    "10.0.0.2:50053".parse().expect("addr"),
                    "10.0.0.3:50054".parse().expect("addr"),
                ]
            } else {
                vec![]
            },
            peers: vec![],
            slots: (rank == 0).then_some(4),
        }
    }

    #[test]
    fn head_runs_llama_server_over_the_workers() {
        let c = command(&spec(0), &local());
        assert_eq!(c.program, PathBuf::from("llama-server"));
        assert_eq!(
            c.args.join(" "),
            "-m /models/m.gguf -c 2048 --rpc 10.0.0.2:50053,10.0.0.3:50054 -ngl 99 \
             --tensor-split 1,3 -t 2 -np 4 --kv-unified --host 127.0.0.1 --port 18080 --alias smol --metrics"
        );
    }

    #[test]
    fn worker_binds_its_own_address_on_base_plus_rank() {
        let c = command(&spec(2), &local());
        assert_eq!(c.program, PathBuf::from("ggml-rpc-server"));
        assert_eq!(c.args.join(" "), "-H 10.0.0.3 -p 50054 -t 2");
        assert_eq!(
            c.writable,
            Some(vec![]),
            "without a cache it may write nothing"
        );
        assert!(c.env.is_empty());
    }

    #[test]
    fn worker_with_a_cache_writes_it_and_nothing_else() {
        let mut l = local();
        l.rpc_cache = Some(PathBuf::from("/s/rpc-cache/rank2"));
        let c = command(&spec(2), &l);
        assert_eq!(c.args.join(" "), "-H 10.0.0.3 -p 50054 -t 2 -c");
        assert_eq!(
            c.env,
            vec![("LLAMA_CACHE".to_string(), "/s/rpc-cache/rank2".to_string())]
        );
        assert_eq!(c.writable, Some(vec![PathBuf::from("/s/rpc-cache/rank2")]));
        // The head never gets the rpc server's cache flag (its `-c` is the context size).
        let head = command(&spec(0), &l);
        assert!(head.env.is_empty() && head.writable.is_none());
        assert_eq!(head.args.iter().filter(|a| *a == "-c").count(), 1);
    }

    #[test]
    fn single_cpu_node_offloads_nothing() {
        let mut s = spec(0);
        s.rpc_workers.clear();
        s.tensor_split = None;
        s.world = 1;
        let c = command(&s, &local());
        assert!(c.args.join(" ").contains("-ngl 0"), "{:?}", c.args);
        assert!(!c.args.contains(&"--rpc".to_string()));
    }
}
