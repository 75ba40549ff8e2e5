//! Checks a rank spec against the plan this node derives from its own config.
//!
//! Every node has the same `cluster.toml`, so a node can compute its own part in the ring — its
//! address, peers, ring neighbours, ports, model — with the same pure [`crate::plan::plan`] the
//! coordinator uses. A `PUT /v1/rank` that differs is refused, field by field, instead of run:
//! a token holder must not be able to bind an rpc server to 0.0.0.0, drop the unit's network
//! fence with an empty `peers`, point the engine at another file, or push the generation to
//! where the next one wraps. What the coordinator legitimately chooses (the generation; with
//! prima's Halda, which nodes are in the ring and their layer windows) is checked against what
//! is derivable instead of compared. Pure, so every rogue field is unit-tested.

use std::fmt;
use std::net::IpAddr;

use crate::config::Config;
use crate::proto::{plausible_generation, Placement, RankSpec, MAX_GENERATION};

/// One field of a spec that is not what this node plans.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// The spec's (JSON) field name.
    pub field: &'static str,
    pub expected: String,
    pub received: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {}, received {}",
            self.field, self.expected, self.received
        )
    }
}

/// Every problem of one spec, as [`verify`] found them.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub mismatches: Vec<Mismatch>,
}

impl Refusal {
    /// The fields named, for logs.
    pub fn fields(&self) -> Vec<&'static str> {
        self.mismatches.iter().map(|m| m.field).collect()
    }

    fn one(field: &'static str, expected: impl fmt::Display, received: impl fmt::Display) -> Self {
        Refusal {
            mismatches: vec![Mismatch {
                field,
                expected: expected.to_string(),
                received: received.to_string(),
            }],
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.mismatches.iter().map(|m| m.to_string()).collect();
        write!(f, "{}", parts.join("; "))
    }
}

/// Checks `spec` against the plan of node `node` in `config`. `model_layers` is the model's
/// layer count when this node could read it (checked against explicit windows Halda chose).
pub fn verify(
    config: &Config,
    node: u32,
    spec: &RankSpec,
    model_layers: Option<u32>,
) -> Result<(), Refusal> {
    if spec.node != node {
        return Err(Refusal::one("node", node, spec.node));
    }
    if spec.engine != config.cluster.engine {
        return Err(Refusal::one("engine", config.cluster.engine, spec.engine));
    }
    // Any configured model may be the one the ring runs (the coordinator switches between
    // them): plan for the one the spec names; a path no model has is planned for the loaded
    // model, so the mismatch names what was expected.
    let spec_model = spec_model(config, spec);
    let config = &config.with_loaded(spec_model);
    let mut wrong = Vec::new();
    if !plausible_generation(spec.generation) {
        wrong.push(Mismatch {
            field: "generation",
            expected: format!("1..={MAX_GENERATION}"),
            received: spec.generation.to_string(),
        });
    }
    let halda = crate::plan::halda_places(config);
    let placement = if halda {
        match members_of(config, spec) {
            Ok(m) => Some(Placement {
                windows: config
                    .nodes
                    .iter()
                    .map(|n| u32::from(m.contains(&n.rank)))
                    .collect(),
                gpu_layers: None,
            }),
            Err(m) => {
                wrong.push(m);
                return Err(Refusal { mismatches: wrong });
            }
        }
    } else {
        None
    };
    let plan = crate::plan::plan(config, config.model(), spec.generation, placement.as_ref())
        .map_err(|e| Refusal::one("peers", format!("a ring this config can plan ({e})"), "-"))?;
    let Some(mut expected) = plan.for_node(node).cloned() else {
        return Err(Refusal::one("node", "a node of the ring", node));
    };
    if halda {
        // Halda's choices: windows on the head (one per member, none empty, all the model's
        // layers) and this node's GPU layers, unless the config fixes them.
        if expected.is_head() {
            if let Some(w) = &spec.layer_windows {
                let sum: u64 = w.iter().map(|&x| u64::from(x)).sum();
                let fits = w.len() == expected.world as usize
                    && w.iter().all(|&x| x > 0)
                    && model_layers.is_none_or(|l| sum == u64::from(l));
                if !fits {
                    wrong.push(Mismatch {
                        field: "layer_windows",
                        expected: format!(
                            "{} non-empty windows{}",
                            expected.world,
                            model_layers
                                .map(|l| format!(" covering the model's {l} layers"))
                                .unwrap_or_default()
                        ),
                        received: format!("{w:?}"),
                    });
                }
            } else if expected.world as usize != config.world() {
                wrong.push(Mismatch {
                    field: "layer_windows",
                    expected: "windows for a ring that leaves nodes out".into(),
                    received: "none".into(),
                });
            }
            expected.layer_windows = spec.layer_windows.clone();
        }
        let configured = config.node(node).and_then(|n| n.gpu_layers);
        if configured.is_none() {
            if let (Some(g), Some(l)) = (spec.gpu_layers, model_layers) {
                if g > l {
                    wrong.push(Mismatch {
                        field: "gpu_layers",
                        expected: format!("at most the model's {l} layers"),
                        received: g.to_string(),
                    });
                }
            }
            expected.gpu_layers = spec.gpu_layers;
        }
    }
    expected.generation = spec.generation;
    wrong.extend(compare(&expected, spec));
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(Refusal { mismatches: wrong })
    }
}

/// The config ranks of the ring `spec` describes: `spec.peers` must be the addresses of
/// configured nodes in config order, starting with rank 0 (the head is always in the ring) and
/// with this node at `spec.rank`. Addresses may repeat (a ring on one host), so the match is
/// the earliest one on each side of this node.
fn members_of(config: &Config, spec: &RankSpec) -> Result<Vec<u32>, Mismatch> {
    let addrs: Vec<IpAddr> = config.nodes.iter().map(|n| n.address).collect();
    let wrong = || Mismatch {
        field: "peers",
        expected: format!(
            "addresses of configured nodes in config order {addrs:?}, starting with rank 0's, \
             this node's at position {}",
            spec.rank
        ),
        received: format!("{:?}", spec.peers),
    };
    let me = spec.node as usize;
    let at = spec.rank as usize;
    if spec.peers.is_empty()
        || at >= spec.peers.len()
        || spec.peers.get(at) != addrs.get(me)
        || (me == 0) != (at == 0)
    {
        return Err(wrong());
    }
    let mut members = Vec::with_capacity(spec.peers.len());
    // Before this node: config ranks 0..me; after it: me+1.. (earliest matches).
    let mut next = 0;
    for (i, peer) in spec.peers.iter().enumerate() {
        if i == at {
            members.push(spec.node);
            next = me + 1;
            continue;
        }
        let limit = if i < at { me } else { addrs.len() };
        let found = (next..limit).find(|&r| addrs[r] == *peer);
        match found {
            Some(r) if i != 0 || r == 0 => {
                members.push(r as u32);
                next = r + 1;
            }
            _ => return Err(wrong()),
        }
    }
    Ok(members)
}

/// The index of the configured model a spec runs: the one with its path (and name, when two
/// share a file), else the loaded one.
pub fn spec_model(config: &Config, spec: &RankSpec) -> usize {
    let by_path = |m: &&crate::config::Model| config.model_path(spec.node, m) == spec.model_path;
    config
        .models
        .iter()
        .position(|m| by_path(&m) && m.name == spec.model_name)
        .or_else(|| config.models.iter().position(|m| by_path(&m)))
        .unwrap_or(config.loaded)
}

/// Every field of `got` that differs from `want`, named as in the JSON.
fn compare(want: &RankSpec, got: &RankSpec) -> Vec<Mismatch> {
    let mut out = Vec::new();
    macro_rules! field {
        ($name:ident) => {
            if want.$name != got.$name {
                out.push(Mismatch {
                    field: stringify!($name),
                    expected: format!("{:?}", want.$name),
                    received: format!("{:?}", got.$name),
                });
            }
        };
    }
    field!(rank);
    field!(world);
    field!(address);
    field!(master);
    field!(next);
    field!(ports);
    field!(model_path);
    field!(model_name);
    field!(ctx_size);
    field!(layer_windows);
    field!(tensor_split);
    field!(prefetch);
    field!(threads);
    field!(gpu_layers);
    field!(rpc_workers);
    field!(peers);
    field!(slots);
    if want.gpu_mem.to_bits() != got.gpu_mem.to_bits() {
        out.push(Mismatch {
            field: "gpu_mem",
            expected: want.gpu_mem.to_string(),
            received: got.gpu_mem.to_string(),
        });
    }
    // The unit's network fence follows from peers/master; named too, since it is what a wrong
    // `peers` would open.
    let (fw, fg) = (
        crate::engine::allowed_peers(want),
        crate::engine::allowed_peers(got),
    );
    if fw != fg {
        out.push(Mismatch {
            field: "fence",
            expected: format!("{fw:?}"),
            received: format!("{fg:?}"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;
    use std::path::Path;

    fn config(engine: &str, extra_model: &str, nodes: &[&str]) -> Config {
        let mut text = format!(
            "[cluster]\nname = \"t\"\nengine = \"{engine}\"\n[model]\npath = \"/m.gguf\"\n{extra_model}\n"
        );
        for (i, addr) in nodes.iter().enumerate() {
            text.push_str(&format!(
                "[[node]]\nrank = {i}\naddress = \"{addr}\"\nagent_port = {}\n",
                7700 + i
            ));
        }
        Config::parse(&text, Path::new("t.toml")).expect("valid config")
    }

    fn llama() -> Config {
        config("llama-rpc", "", &["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    }

    fn planned(c: &Config, node: u32) -> RankSpec {
        plan(c, c.model(), 7, None)
            .expect("plan")
            .for_node(node)
            .cloned()
            .expect("a rank")
    }

    /// The fields a refusal names, or none when the spec is accepted.
    fn refused(c: &Config, node: u32, spec: &RankSpec) -> Vec<&'static str> {
        match verify(c, node, spec, Some(30)) {
            Ok(()) => vec![],
            Err(r) => {
                let text = r.to_string();
                for f in r.fields() {
                    assert!(text.contains(f), "{text} names {f}");
                }
                r.fields()
            }
        }
    }

    #[test]
    fn the_planned_spec_of_every_node_is_accepted() {
        let c = llama();
        for n in 0..3 {
            assert_eq!(refused(&c, n, &planned(&c, n)), Vec::<&str>::new());
        }
    }

    #[test]
    fn a_spec_for_any_configured_model_is_accepted_and_another_file_is_not() {
        let text = "[cluster]\nname = \"t\"\nengine = \"llama-rpc\"\n\
                    [[models]]\nname = \"a\"\npath = \"/a.gguf\"\n\
                    [[models]]\nname = \"b\"\npath = \"/b.gguf\"\nctx_size = 1024\n\
                    [[node]]\nrank = 0\naddress = \"10.0.0.1\"\n\
                    [[node]]\nrank = 1\naddress = \"10.0.0.2\"\n";
        let c = Config::parse(text, Path::new("t.toml")).expect("valid config");
        let b = c.with_loaded(1);
        for n in 0..2 {
            assert_eq!(refused(&c, n, &planned(&b, n)), Vec::<&str>::new());
        }
        // The other model's file under this model's name and context is still refused.
        let mixed = RankSpec {
            ctx_size: 4096,
            ..planned(&b, 0)
        };
        assert_eq!(refused(&c, 0, &mixed), vec!["ctx_size"]);
        let other = RankSpec {
            model_path: "/c.gguf".into(),
            ..planned(&b, 0)
        };
        assert!(refused(&c, 0, &other).contains(&"model_path"));
    }

    #[test]
    fn each_rogue_field_is_refused_by_name() {
        let c = llama();
        let worker = planned(&c, 1);
        let head = planned(&c, 0);
        let cases: Vec<(&str, u32, RankSpec)> = vec![
            (
                "address",
                1,
                RankSpec {
                    address: "0.0.0.0".parse().expect("ip"),
                    ..worker.clone()
                },
            ),
            (
                "peers",
                1,
                RankSpec {
                    peers: vec![],
                    ..worker.clone()
                },
            ),
            (
                "master",
                1,
                RankSpec {
                    master: "10.9.9.9".parse().expect("ip"),
                    ..worker.clone()
                },
            ),
            (
                "next",
                1,
                RankSpec {
                    next: "10.9.9.9".parse().expect("ip"),
                    ..worker.clone()
                },
            ),
            (
                "model_path",
                0,
                RankSpec {
                    model_path: "/etc/shadow".into(),
                    ..head.clone()
                },
            ),
            (
                "rpc_workers",
                0,
                RankSpec {
                    rpc_workers: vec!["10.9.9.9:50052".parse().expect("sa")],
                    ..head.clone()
                },
            ),
            (
                "ports",
                1,
                RankSpec {
                    ports: crate::proto::PortSpec {
                        rpc: 22,
                        ..worker.ports
                    },
                    ..worker.clone()
                },
            ),
            (
                "rank",
                1,
                RankSpec {
                    rank: 2,
                    ..worker.clone()
                },
            ),
            (
                "world",
                1,
                RankSpec {
                    world: 9,
                    ..worker.clone()
                },
            ),
            (
                "generation",
                1,
                RankSpec {
                    generation: u64::MAX,
                    ..worker.clone()
                },
            ),
            (
                "generation",
                1,
                RankSpec {
                    generation: 0,
                    ..worker.clone()
                },
            ),
            (
                "node",
                1,
                RankSpec {
                    node: 2,
                    ..worker.clone()
                },
            ),
            (
                "engine",
                1,
                RankSpec {
                    engine: crate::config::EngineKind::Prima,
                    ..worker.clone()
                },
            ),
            (
                "threads",
                1,
                RankSpec {
                    threads: Some(64),
                    ..worker.clone()
                },
            ),
        ];
        for (field, node, spec) in cases {
            let fields = refused(&c, node, &spec);
            assert!(fields.contains(&field), "{field}: refused {fields:?}");
        }
        // An empty `peers` on a worker is what opened the fence: named as such too.
        let head_peers = RankSpec {
            peers: vec![],
            ..head
        };
        assert!(refused(&c, 0, &head_peers).contains(&"fence"));
        let msg = verify(
            &c,
            1,
            &RankSpec {
                address: "0.0.0.0".parse().expect("ip"),
                ..worker
            },
            None,
        )
        .expect_err("refused")
        .to_string();
        assert_eq!(msg, "address: expected 10.0.0.2, received 0.0.0.0");
    }

    #[test]
    fn the_generation_is_the_coordinators_within_bounds() {
        let c = llama();
        for g in [1, 2, 1000, MAX_GENERATION] {
            let s = RankSpec {
                generation: g,
                ..planned(&c, 2)
            };
            assert!(verify(&c, 2, &s, None).is_ok(), "{g}");
        }
        for g in [0, MAX_GENERATION + 1, u64::MAX] {
            let s = RankSpec {
                generation: g,
                ..planned(&c, 2)
            };
            assert_eq!(refused(&c, 2, &s), ["generation"], "{g}");
        }
    }

    /// Sticky placement: the coordinator sends explicit windows and leaves out the nodes Halda
    /// gave no layers; ranks and neighbours follow from that membership.
    #[test]
    fn halda_membership_and_windows_are_checked_not_compared() {
        let c = config("prima", "", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        let remembered = Placement {
            windows: vec![1, 0, 29],
            gpu_layers: Some(vec![0, 0, 4]),
        };
        let p = plan(&c, c.model(), 9, Some(&remembered)).expect("plan");
        let head = p.for_node(0).cloned().expect("head");
        let last = p.for_node(2).cloned().expect("node 2");
        assert_eq!(refused(&c, 0, &head), Vec::<&str>::new());
        assert_eq!(refused(&c, 2, &last), Vec::<&str>::new());
        // A fresh Halda start: the whole ring, no windows.
        let fresh = plan(&c, c.model(), 9, None).expect("plan");
        for n in 0..3 {
            let s = fresh.for_node(n).cloned().expect("rank");
            assert_eq!(refused(&c, n, &s), Vec::<&str>::new(), "node {n}");
        }
        // Windows that do not cover the model, or an empty one, are refused.
        let short = RankSpec {
            layer_windows: Some(vec![1, 20]),
            ..head.clone()
        };
        assert_eq!(refused(&c, 0, &short), ["layer_windows"]);
        let empty = RankSpec {
            layer_windows: Some(vec![0, 30]),
            ..head.clone()
        };
        assert_eq!(refused(&c, 0, &empty), ["layer_windows"]);
        // Membership must be configured nodes in config order; the head always leads.
        let reordered = RankSpec {
            peers: vec![
                "10.0.0.3".parse().expect("ip"),
                "10.0.0.1".parse().expect("ip"),
            ],
            ..last.clone()
        };
        assert!(refused(&c, 2, &reordered).contains(&"peers"));
        let stranger = RankSpec {
            peers: vec![
                "10.0.0.1".parse().expect("ip"),
                "10.9.9.9".parse().expect("ip"),
            ],
            ..head
        };
        assert!(refused(&c, 0, &stranger).contains(&"peers"));
        // Neighbours must follow from the membership.
        let wrong_next = RankSpec {
            next: "10.0.0.2".parse().expect("ip"),
            ..last
        };
        assert_eq!(refused(&c, 2, &wrong_next), ["next"]);
    }

    #[test]
    fn a_ring_on_one_host_matches_repeated_addresses() {
        let c = config("prima", "", &["127.0.0.1", "127.0.0.1", "127.0.0.1"]);
        let remembered = Placement {
            windows: vec![10, 0, 20],
            gpu_layers: None,
        };
        let p = plan(&c, c.model(), 3, Some(&remembered)).expect("plan");
        for s in &p.ranks {
            assert_eq!(
                refused(&c, s.node, s),
                Vec::<&str>::new(),
                "node {}",
                s.node
            );
        }
        let c = llama_local();
        for n in 0..3 {
            assert_eq!(refused(&c, n, &planned(&c, n)), Vec::<&str>::new());
        }
    }

    fn llama_local() -> Config {
        config("llama-rpc", "", &["127.0.0.1", "127.0.0.1", "127.0.0.1"])
    }

    #[test]
    fn configured_windows_leave_nothing_to_choose() {
        let c = config(
            "prima",
            "layer_windows = [10, 10, 10]",
            &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        );
        let head = planned(&c, 0);
        assert_eq!(refused(&c, 0, &head), Vec::<&str>::new());
        let other = RankSpec {
            layer_windows: Some(vec![1, 1, 28]),
            ..head
        };
        assert_eq!(refused(&c, 0, &other), ["layer_windows"]);
    }
}
