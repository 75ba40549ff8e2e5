//! Ring planning: from the config (and a remembered placement) to one [`RankSpec`] per ring
//! member. Pure, so it is tested directly.
//!
//! A [`RankSpec`] (defined with the rest of the wire protocol in `proto`) is what the coordinator
//! sends a node agent.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::config::{Config, EngineKind, Model};
use crate::proto::{Placement, PortSpec, RankSpec};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RingPlan {
    pub generation: u64,
    pub engine: EngineKind,
    /// In ring order; `spec.node` names the [[node]] that runs each.
    pub ranks: Vec<RankSpec>,
    /// Nodes of the config without a place in this ring (a remembered placement gave them no
    /// layers); their ranks are stopped.
    pub idle: Vec<u32>,
}

impl RingPlan {
    /// The spec the node of config rank `node` runs, if it has a place in the ring.
    pub fn for_node(&self, node: u32) -> Option<&RankSpec> {
        self.ranks.iter().find(|s| s.node == node)
    }
}

/// Plans generation `generation` of the ring running `model`. Layer windows come from the config or, for
/// prima without configured windows, from `remembered` (what Halda chose when the ring last
/// served); a node the remembered placement gave no layers is left out of the ring, the others
/// take consecutive ring ranks.
pub fn plan(
    config: &Config,
    model: &Model,
    generation: u64,
    remembered: Option<&Placement>,
) -> Result<RingPlan, String> {
    let remembered = remembered
        .filter(|_| config.cluster.engine == EngineKind::Prima && model.layer_windows.is_none());
    if let Some(p) = remembered {
        if p.windows.len() != config.world() || p.windows.first().is_none_or(|w| *w == 0) {
            return Err(format!(
                "the remembered placement ({:?}) does not fit this ring of {} nodes",
                p.windows,
                config.world()
            ));
        }
    }
    let members: Vec<&crate::config::Node> = config
        .nodes
        .iter()
        .filter(|n| remembered.is_none_or(|p| p.windows[n.rank as usize] > 0))
        .collect();
    let idle: Vec<u32> = config
        .nodes
        .iter()
        .filter(|n| !members.iter().any(|m| m.rank == n.rank))
        .map(|n| n.rank)
        .collect();
    let world = members.len() as u32;
    let windows: Option<Vec<u32>> = match remembered {
        Some(p) => Some(p.windows.iter().copied().filter(|w| *w > 0).collect()),
        None => model.layer_windows.clone(),
    };
    let ports = PortSpec {
        data: config.ports.data,
        signal: config.ports.signal,
        rpc: config.ports.rpc,
        server: config.ports.server,
    };
    let shift = config.ports.relay_shift;
    if shift > 0 && u32::from(shift) < world {
        return Err(format!(
            "ports.relay_shift {shift} must be at least the ring's {world} ranks, or the moved \
             ports would meet the ranks' own"
        ));
    }
    // Each moved port is checked once here, so the specs below cannot overflow.
    let moved = |base: u16, times: u32| -> Result<u16, String> {
        u16::try_from(u32::from(base) + u32::from(shift) * times + world)
            .map(|_| base + shift * times as u16)
            .map_err(|_| format!("ports.relay_shift {shift}: port {base} moved past 65535"))
    };
    let head = config.head().address;
    let peers: Vec<IpAddr> = members.iter().map(|n| n.address).collect();
    let ranks = members
        .iter()
        .enumerate()
        .map(|(ring_rank, node)| {
            let ring_rank = ring_rank as u32;
            let next = members[((ring_rank + 1) % world) as usize].address;
            let is_head = ring_rank == 0;
            let rpc_workers = if is_head && config.cluster.engine == EngineKind::LlamaRpc {
                members[1..]
                    .iter()
                    .map(|w| {
                        let port = moved(rpc_port(config.ports.rpc, w.rank), 1)?;
                        Ok(SocketAddr::new(w.address, port))
                    })
                    .collect::<Result<_, String>>()?
            } else {
                Vec::new()
            };
            // prima adds the rank to its bases both where a rank listens and where it dials,
            // so moving a rank's bases by relay_shift × its ring rank moves only what it dials.
            let ports = match config.cluster.engine {
                EngineKind::Prima => PortSpec {
                    data: moved(ports.data, ring_rank)?,
                    signal: moved(ports.signal, ring_rank)?,
                    ..ports
                },
                EngineKind::LlamaRpc => ports,
            };
            let gpu_layers = node.gpu_layers.or_else(|| {
                remembered
                    .and_then(|p| p.gpu_layers.as_ref())
                    .and_then(|g| g.get(node.rank as usize).copied())
                    .filter(|g| *g > 0)
            });
            Ok(RankSpec {
                generation,
                engine: config.cluster.engine,
                node: node.rank,
                rank: ring_rank,
                world,
                address: node.address,
                master: head,
                next,
                ports,
                model_path: config.model_path(node.rank, model),
                model_name: model.name.clone(),
                ctx_size: model.ctx_size,
                layer_windows: if is_head { windows.clone() } else { None },
                tensor_split: if is_head {
                    model.tensor_split.clone()
                } else {
                    None
                },
                prefetch: model.prefetch,
                threads: node.threads,
                gpu_mem: node.gpu_mem,
                gpu_layers,
                rpc_workers,
                peers: peers.clone(),
                slots: is_head.then_some(model.slots),
                cache_idle_slots: (is_head && config.cluster.engine == EngineKind::LlamaRpc)
                    .then_some(model.cache_idle_slots),
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(RingPlan {
        generation,
        engine: config.cluster.engine,
        ranks,
        idle,
    })
}

/// Whether this config places layers with Halda (prima without configured windows), so the
/// ring's membership and windows are chosen at run time rather than read from the config.
pub fn halda_places(config: &Config) -> bool {
    config.cluster.engine == EngineKind::Prima && config.model().layer_windows.is_none()
}

/// The rpc server of rank `rank` listens on `base + rank`, so ranks sharing an address never clash.
pub fn rpc_port(base: u16, rank: u32) -> u16 {
    base.saturating_add(rank as u16)
}

/// The connections rank `spec.rank`'s engine will open to other ranks, as (rank, address):
/// llama.cpp's head dials every rpc worker; a prima rank dials the next rank's data port, and
/// workers also rank 0's. Checked before a ring starts, so a cut link is named instead of
/// starting a ring that would hang on it.
pub fn link_targets(spec: &RankSpec) -> Vec<(u32, SocketAddr)> {
    match spec.engine {
        EngineKind::LlamaRpc => spec
            .rpc_workers
            .iter()
            .enumerate()
            .map(|(i, a)| (i as u32 + 1, *a))
            .collect(),
        EngineKind::Prima => {
            let next = (spec.rank + 1) % spec.world.max(1);
            let mut v = vec![(
                next,
                SocketAddr::new(spec.next, spec.ports.data.saturating_add(next as u16)),
            )];
            if spec.rank != 0 && next != 0 {
                v.push((0, SocketAddr::new(spec.master, spec.ports.data)));
            }
            v
        }
    }
}

/// One connection between two ranks that a relay can carry: the dialing rank `from` connects
/// to `listen`, where the relay listens, and the relay connects on to `target`, where rank
/// `to` listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayLink {
    pub from: u32,
    pub to: u32,
    /// `rpc` (llama.cpp head to a worker), `data` or `signal` (prima's ring and its STOP).
    pub kind: &'static str,
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

/// The links a plan made with `ports.relay_shift` needs relays on: every address a rank dials
/// (as [`link_targets`] lists them, plus prima's signal link used at shutdown) paired with
/// where its peer really listens. Empty without a shift, where ranks dial peers directly.
pub fn relay_links(plan: &RingPlan) -> Vec<RelayLink> {
    let mut links: Vec<RelayLink> = Vec::new();
    for spec in &plan.ranks {
        let mut dialed: Vec<(u32, &'static str, SocketAddr)> = link_targets(spec)
            .into_iter()
            .map(|(to, a)| {
                let kind = match spec.engine {
                    EngineKind::LlamaRpc => "rpc",
                    EngineKind::Prima => "data",
                };
                (to, kind, a)
            })
            .collect();
        if spec.engine == EngineKind::Prima {
            let next = (spec.rank + 1) % spec.world.max(1);
            let port = spec.ports.signal.saturating_add(next as u16);
            dialed.push((next, "signal", SocketAddr::new(spec.next, port)));
        }
        for (to, kind, listen) in dialed {
            let Some(peer) = plan.ranks.iter().find(|s| s.rank == to) else {
                continue;
            };
            let port = match kind {
                "rpc" => rpc_port(peer.ports.rpc, peer.rank),
                "data" => peer.ports.data.saturating_add(peer.rank as u16),
                _ => peer.ports.signal.saturating_add(peer.rank as u16),
            };
            let target = SocketAddr::new(peer.address, port);
            if listen != target && !links.iter().any(|l| l.listen == listen) {
                links.push(RelayLink {
                    from: spec.rank,
                    to,
                    kind,
                    listen,
                    target,
                });
            }
        }
    }
    links
}

/// Ports a rank listens on once it is up, for fencing and readiness checks.
pub fn listen_ports(spec: &RankSpec) -> Vec<u16> {
    match spec.engine {
        EngineKind::Prima => vec![
            spec.ports.data.saturating_add(spec.rank as u16),
            spec.ports.signal.saturating_add(spec.rank as u16),
        ],
        EngineKind::LlamaRpc if spec.rank > 0 => vec![rpc_port(spec.ports.rpc, spec.rank)],
        EngineKind::LlamaRpc => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(engine: &str, extra_model: &str, nodes: &[(&str, u16)]) -> Config {
        let mut text = format!(
            "[cluster]\nname = \"t\"\nengine = \"{engine}\"\n[model]\npath = \"/m.gguf\"\n{extra_model}\n"
        );
        for (i, (addr, port)) in nodes.iter().enumerate() {
            text.push_str(&format!(
                "[[node]]\nrank = {i}\naddress = \"{addr}\"\nagent_port = {port}\n"
            ));
        }
        Config::parse(&text, Path::new("t.toml")).expect("valid config")
    }

    #[test]
    fn ring_next_wraps_to_master() {
        let c = config(
            "prima",
            "",
            &[("10.0.0.1", 7700), ("10.0.0.2", 7700), ("10.0.0.3", 7700)],
        );
        let p = plan(&c, c.model(), 4, None).expect("plan");
        let nexts: Vec<String> = p.ranks.iter().map(|r| r.next.to_string()).collect();
        assert_eq!(nexts, ["10.0.0.2", "10.0.0.3", "10.0.0.1"]);
        assert!(p
            .ranks
            .iter()
            .all(|r| r.master.to_string() == "10.0.0.1" && r.generation == 4));
        assert!(p.ranks.iter().all(|r| r.world == 3));
    }

    #[test]
    fn windows_only_on_head() {
        let c = config(
            "prima",
            "layer_windows = [10, 10, 10]",
            &[("10.0.0.1", 7700), ("10.0.0.2", 7700), ("10.0.0.3", 7700)],
        );
        let p = plan(&c, c.model(), 1, None).expect("plan");
        assert_eq!(p.ranks[0].layer_windows, Some(vec![10, 10, 10]));
        assert_eq!(p.ranks[1].layer_windows, None);
        let remembered = Placement {
            windows: vec![5, 20, 5],
            gpu_layers: None,
        };
        let p = plan(&c, c.model(), 1, Some(&remembered)).expect("plan");
        assert_eq!(
            p.ranks[0].layer_windows,
            Some(vec![10, 10, 10]),
            "configured windows win over remembered ones"
        );
    }

    #[test]
    fn a_remembered_placement_sets_the_windows_and_leaves_out_nodes_without_layers() {
        let c = config(
            "prima",
            "",
            &[("10.0.0.1", 7700), ("10.0.0.2", 7700), ("10.0.0.3", 7700)],
        );
        let halda = Placement {
            windows: vec![1, 0, 29],
            gpu_layers: Some(vec![0, 0, 4]),
        };
        let p = plan(&c, c.model(), 7, Some(&halda)).expect("plan");
        assert_eq!(p.idle, vec![1]);
        let ring: Vec<(u32, u32, u32, String)> = p
            .ranks
            .iter()
            .map(|s| (s.node, s.rank, s.world, s.next.to_string()))
            .collect();
        assert_eq!(
            ring,
            [(0, 0, 2, "10.0.0.3".into()), (2, 1, 2, "10.0.0.1".into())]
        );
        assert_eq!(p.ranks[0].layer_windows, Some(vec![1, 29]));
        assert_eq!(p.ranks[1].gpu_layers, Some(4));
        assert_eq!(p.for_node(2).map(|s| s.rank), Some(1));
        assert!(p.for_node(1).is_none());
        let bad = Placement {
            windows: vec![0, 15, 15],
            gpu_layers: None,
        };
        assert!(
            plan(&c, c.model(), 7, Some(&bad)).is_err(),
            "rank 0 always has layers"
        );
        let short = Placement {
            windows: vec![15, 15],
            gpu_layers: None,
        };
        assert!(
            plan(&c, c.model(), 7, Some(&short)).is_err(),
            "another node set"
        );
    }

    #[test]
    fn llama_rpc_head_lists_workers_with_per_rank_ports() {
        let c = config(
            "llama-rpc",
            "",
            &[
                ("127.0.0.1", 7701),
                ("127.0.0.1", 7702),
                ("127.0.0.1", 7703),
            ],
        );
        let p = plan(&c, c.model(), 1, None).expect("plan");
        let w: Vec<String> = p.ranks[0]
            .rpc_workers
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(w, ["127.0.0.1:50053", "127.0.0.1:50054"]);
        assert!(p.ranks[1].rpc_workers.is_empty());
        assert_eq!(listen_ports(&p.ranks[2]), vec![50054]);
        assert!(listen_ports(&p.ranks[0]).is_empty());
        let links: Vec<(u32, String)> = link_targets(&p.ranks[0])
            .into_iter()
            .map(|(r, a)| (r, a.to_string()))
            .collect();
        assert_eq!(
            links,
            [(1, "127.0.0.1:50053".into()), (2, "127.0.0.1:50054".into())]
        );
        assert!(link_targets(&p.ranks[1]).is_empty(), "workers dial nobody");
    }

    #[test]
    fn prima_ranks_dial_the_next_rank_and_the_master() {
        let c = config(
            "prima",
            "",
            &[("10.0.0.1", 7700), ("10.0.0.2", 7700), ("10.0.0.3", 7700)],
        );
        let p = plan(&c, c.model(), 1, None).expect("plan");
        let links = |r: usize| -> Vec<(u32, String)> {
            link_targets(&p.ranks[r])
                .into_iter()
                .map(|(r, a)| (r, a.to_string()))
                .collect()
        };
        assert_eq!(links(0), [(1, "10.0.0.2:9001".to_string())]);
        assert_eq!(
            links(1),
            [
                (2, "10.0.0.3:9002".to_string()),
                (0, "10.0.0.1:9000".into())
            ]
        );
        assert_eq!(links(2), [(0, "10.0.0.1:9000".to_string())]);
    }

    /// Every port some rank of `p` listens on, as addresses.
    fn listening(p: &RingPlan) -> Vec<SocketAddr> {
        p.ranks
            .iter()
            .flat_map(|s| {
                listen_ports(s)
                    .into_iter()
                    .map(|port| SocketAddr::new(s.address, port))
            })
            .collect()
    }

    #[test]
    fn without_a_relay_shift_ranks_dial_their_peers_directly() {
        for engine in ["prima", "llama-rpc"] {
            let c = config(
                engine,
                "",
                &[("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)],
            );
            let p = plan(&c, c.model(), 1, None).expect("plan");
            assert!(relay_links(&p).is_empty(), "{engine}");
            let listening = listening(&p);
            for s in &p.ranks {
                for (_, a) in link_targets(s) {
                    assert!(
                        listening.contains(&a),
                        "{engine}: {a} is where a peer listens"
                    );
                }
            }
        }
    }

    #[test]
    fn a_relay_shift_moves_every_dialed_port_off_the_listening_ones_and_relays_map_them_back() {
        let nodes = [
            ("127.0.0.1", 1),
            ("127.0.0.1", 2),
            ("127.0.0.1", 3),
            ("127.0.0.1", 4),
        ];
        for (engine, n, expected) in [
            ("llama-rpc", 4, 3),
            ("prima", 4, 2 * 4 + 2),
            ("prima", 2, 4),
        ] {
            let mut c = config(engine, "", &nodes[..n]);
            c.ports.relay_shift = 100;
            let p = plan(&c, c.model(), 1, None).expect("plan");
            let links = relay_links(&p);
            assert_eq!(links.len(), expected, "{engine} {n}: {links:?}");
            let listening = listening(&p);
            for l in &links {
                assert!(
                    !listening.contains(&l.listen),
                    "{engine}: relay {l:?} meets a rank"
                );
                let peer = &p.ranks[l.to as usize];
                let peer_ports: Vec<u16> = match l.kind {
                    "signal" => vec![peer.ports.signal + peer.rank as u16],
                    _ => listen_ports(peer),
                };
                assert!(peer_ports.contains(&l.target.port()), "{l:?}");
            }
            // Whatever a rank dials before the ring starts is a relay's port.
            for s in &p.ranks {
                for (_, a) in link_targets(s) {
                    assert!(
                        links.iter().any(|l| l.listen == a),
                        "{engine}: {a} has no relay"
                    );
                }
            }
        }
        let mut c = config("prima", "", &nodes[..3]);
        c.ports.relay_shift = 100;
        let p = plan(&c, c.model(), 1, None).expect("plan");
        let l: Vec<(u32, u32, &str, u16, u16)> = relay_links(&p)
            .into_iter()
            .map(|l| (l.from, l.to, l.kind, l.listen.port(), l.target.port()))
            .collect();
        assert_eq!(
            l,
            [
                (0, 1, "data", 9001, 9101),
                (0, 1, "signal", 10001, 10101),
                (1, 2, "data", 9102, 9202),
                (1, 0, "data", 9100, 9000),
                (1, 2, "signal", 10102, 10202),
                (2, 0, "data", 9200, 9000),
                (2, 0, "signal", 10200, 10000),
            ]
        );
        c.ports.relay_shift = 2;
        assert!(
            plan(&c, c.model(), 1, None).is_err(),
            "a shift below the world would collide"
        );
    }

    #[test]
    fn no_config_file_can_turn_the_relay_shift_on() {
        let c = config("prima", "", &[("10.0.0.1", 7700), ("10.0.0.2", 7700)]);
        assert_eq!(c.ports.relay_shift, 0, "off unless `up --local` sets it");
        let text = "[cluster]\nname = \"t\"\nengine = \"prima\"\n[model]\npath = \"/m.gguf\"\n\
                    [ports]\nrelay_shift = 100\n[[node]]\nrank = 0\naddress = \"10.0.0.1\"\n";
        let e = Config::parse(text, Path::new("t.toml")).expect_err("unknown key");
        assert!(e.to_string().contains("relay_shift"), "{e}");
    }
}
