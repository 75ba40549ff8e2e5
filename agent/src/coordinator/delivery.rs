//! Which node should fetch which model file from where. Pure: the facts in, the fetch requests
//! out; `actions::look_at_nodes` sends them, the nodes do the copying (`node::deliver`).
//!
//! Every configured model is looked at, not only the loaded one, so a switch finds its file
//! already in place. A node gets a file when it reads the model (every prima rank; rank 0 of a
//! llama.cpp RPC ring) and its copy is missing or does not match the configured sha256. The
//! source is a node with a verified copy, the head first (where people put files). Without a
//! configured sha256 there is no telling which of two different copies is right, so then only
//! missing files are delivered and differing ones stay refused by the node check.

use crate::config::Config;
use crate::proto::{FetchRequest, HashState, ModelFact, NodeFacts, TransferState};

use super::check::NodeReport;

/// A failed delivery is asked for again after this long (it resumes from its partial file), not
/// at every check: a full disk would otherwise be retried every second.
pub const RETRY_AFTER_S: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub rank: u32,
    pub request: FetchRequest,
}

/// Model `index`'s file on a node: its entry in the config's order, or, from an agent that
/// reports one model, that one for the loaded model.
pub fn model_fact(f: &NodeFacts, index: usize, loaded: usize) -> Option<&ModelFact> {
    match f.models.get(index) {
        Some(m) => Some(m),
        None if f.models.is_empty() && index == loaded => Some(&f.model),
        None => None,
    }
}

fn verified(m: &ModelFact) -> Option<&str> {
    match &m.hash {
        HashState::Done { sha256 } if m.matches_expected != Some(false) => Some(sha256),
        _ => None,
    }
}

/// What to ask for now (`now_unix`: the coordinator's clock, for [`RETRY_AFTER_S`]).
pub fn plan(config: &Config, facts: &[NodeReport], now_unix: u64) -> Vec<Delivery> {
    if !config.delivery.enabled {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (i, model) in config.models.iter().enumerate() {
        let of = |r: usize| -> Option<&ModelFact> {
            facts
                .get(r)?
                .as_ref()
                .ok()
                .and_then(|f| model_fact(f, i, config.loaded))
        };
        let good: Vec<(u32, &str)> = (0..facts.len())
            .filter_map(|r| of(r).and_then(verified).map(|h| (r as u32, h)))
            .collect();
        // Without a configured hash, copies that differ leave the right one unknown.
        if model.sha256.is_none() && good.windows(2).any(|w| w[0].1 != w[1].1) {
            continue;
        }
        let source = good.first().map(|(r, _)| *r).or_else(|| {
            // A node that does not read the model (an rpc worker) but has the file: it hashes
            // its copy when asked, and the receiver checks the bytes all the same.
            (0..facts.len())
                .filter(|&r| !config.reads_model(r as u32))
                .find(|&r| of(r).is_some_and(|m| m.size.is_some()))
                .map(|r| r as u32)
        });
        let Some(source) = source else { continue };
        for r in 0..facts.len() {
            let rank = r as u32;
            if rank == source || !config.reads_model(rank) {
                continue;
            }
            let Some(m) = of(r) else { continue };
            let lacking = matches!(m.hash, HashState::Missing) || m.matches_expected == Some(false);
            if !lacking {
                continue;
            }
            let busy = m.transfer.as_ref().is_some_and(|t| match t.state {
                TransferState::Running => true,
                TransferState::Failed => {
                    now_unix < t.finished_unix.unwrap_or(0).saturating_add(RETRY_AFTER_S)
                }
                TransferState::Done => false,
            });
            if busy {
                continue;
            }
            out.push(Delivery {
                rank,
                request: FetchRequest {
                    model: model.name.clone(),
                    from_rank: source,
                },
            });
        }
    }
    out
}

/// A delivery of model `index` still running on some node, described; a switch to that model
/// waits for it, so the loaded model serves on instead of the ring standing stopped for the
/// length of a transfer.
pub fn pending<'a>(
    facts: impl IntoIterator<Item = &'a NodeFacts>,
    index: usize,
    loaded: usize,
) -> Option<String> {
    facts.into_iter().find_map(|f| {
        let m = model_fact(f, index, loaded)?;
        let t = m
            .transfer
            .as_ref()
            .filter(|t| t.state == TransferState::Running)?;
        let lacking = matches!(m.hash, HashState::Missing) || m.matches_expected == Some(false);
        lacking.then(|| format!("rank {} is {}", f.rank, describe(t)))
    })
}

/// What the coordinator last saw of each node's transfer of each model: (rank, model) to
/// (start time, state).
pub type Seen = std::collections::HashMap<(u32, String), (u64, TransferState)>;

/// The transfers to tell as events: one seen running for the first time (started, or resumed),
/// and one seen ending. A transfer first seen already ended (a restarted coordinator) is only
/// recorded.
pub fn changes(seen: &mut Seen, facts: &[NodeReport]) -> Vec<(u32, crate::proto::TransferFact)> {
    let mut out = Vec::new();
    for f in facts.iter().flatten() {
        for t in f.models.iter().filter_map(|m| m.transfer.as_ref()) {
            let key = (f.rank, t.model.clone());
            let now = (t.started_unix, t.state);
            let before = seen.insert(key, now);
            let tell = match before {
                Some(b) if b == now => false,
                None => t.state == TransferState::Running,
                Some(_) => true,
            };
            if tell {
                out.push((f.rank, t.clone()));
            }
        }
    }
    out
}

/// "received model chat from rank 0: 98.4 MB in 8.3 s (11.9 MB/s), sha256 verified".
pub fn received(t: &crate::proto::TransferFact) -> String {
    use crate::node::deliver::human_bytes;
    format!(
        "received model {} from rank {}: {} in {:.1} s ({}/s), sha256 verified",
        t.model,
        t.from_rank,
        human_bytes(t.total_bytes.saturating_sub(t.resumed_from)),
        t.seconds,
        human_bytes(t.bytes_per_s.unwrap_or(0.0) as u64)
    )
}

/// "receiving model chat from rank 0: 42 % of 1.2 GB, 11.0 MB/s, 60 s left" for the node check.
pub fn describe(t: &crate::proto::TransferFact) -> String {
    use crate::node::deliver::human_bytes;
    let mut s = format!("receiving model {} from rank {}", t.model, t.from_rank);
    if let Some(p) = t.percent() {
        s.push_str(&format!(": {p} % of {}", human_bytes(t.total_bytes)));
    } else {
        s.push_str(&format!(": {}", t.activity));
    }
    if let Some(r) = t.bytes_per_s {
        s.push_str(&format!(", {}/s", human_bytes(r as u64)));
    }
    if let Some(e) = t.eta_s {
        s.push_str(&format!(", {} s left", e.round()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TransferFact;

    fn config(engine: &str, sha: bool) -> Config {
        let sha = if sha {
            format!("sha256 = \"{}\"\n", "a".repeat(64))
        } else {
            String::new()
        };
        let text = format!(
            "[cluster]\nname = \"t\"\nengine = \"{engine}\"\n\
             [[models]]\nname = \"chat\"\npath = \"/m/chat.gguf\"\n{sha}\
             [[models]]\nname = \"code\"\npath = \"/m/code.gguf\"\n\
             [[node]]\nrank = 0\naddress = \"10.0.0.1\"\n\
             [[node]]\nrank = 1\naddress = \"10.0.0.2\"\n\
             [[node]]\nrank = 2\naddress = \"10.0.0.3\"\n"
        );
        Config::parse(&text, std::path::Path::new("t.toml")).expect("config")
    }

    fn fact(path: &str, hash: HashState, expected: Option<bool>) -> ModelFact {
        ModelFact {
            path: path.into(),
            size: (!matches!(hash, HashState::Missing)).then_some(10),
            hash,
            expected_sha256: None,
            matches_expected: expected,
            hashed_bytes: None,
            transfer: None,
        }
    }

    fn done(h: &str) -> HashState {
        HashState::Done { sha256: h.into() }
    }

    fn node(models: Vec<ModelFact>) -> NodeReport {
        let mut f = crate::coordinator::check::tests_support::facts(0);
        f.model = models[0].clone();
        f.models = models;
        Ok(f)
    }

    fn want(rank: u32, model: &str, from: u32) -> Delivery {
        Delivery {
            rank,
            request: FetchRequest {
                model: model.into(),
                from_rank: from,
            },
        }
    }

    #[test]
    fn every_prima_node_without_a_file_gets_it_from_the_head() {
        let c = config("prima", false);
        let facts = vec![
            node(vec![
                fact("/m/chat.gguf", done("h"), None),
                fact("/m/code.gguf", done("k"), None),
            ]),
            node(vec![
                fact("/m/chat.gguf", HashState::Missing, None),
                fact("/m/code.gguf", done("k"), None),
            ]),
            node(vec![
                fact("/m/chat.gguf", HashState::Missing, None),
                fact("/m/code.gguf", HashState::Missing, None),
            ]),
        ];
        assert_eq!(
            plan(&c, &facts, 0),
            vec![want(1, "chat", 0), want(2, "chat", 0), want(2, "code", 0)]
        );
    }

    #[test]
    fn a_copy_that_fails_the_configured_hash_is_replaced_from_a_good_one() {
        let c = config("prima", true);
        let a = "a".repeat(64);
        let facts = vec![
            node(vec![
                fact("/m/chat.gguf", done("bad"), Some(false)),
                fact("/m/code.gguf", done("k"), None),
            ]),
            node(vec![
                fact("/m/chat.gguf", done(&a), Some(true)),
                fact("/m/code.gguf", done("k"), None),
            ]),
            node(vec![
                fact("/m/chat.gguf", done(&a), Some(true)),
                fact("/m/code.gguf", done("k"), None),
            ]),
        ];
        assert_eq!(plan(&c, &facts, 0), vec![want(0, "chat", 1)]);
    }

    #[test]
    fn without_a_configured_hash_differing_copies_are_left_to_the_check() {
        let c = config("prima", false);
        let facts = vec![
            node(vec![
                fact("/m/chat.gguf", done("h"), None),
                fact("/m/code.gguf", done("k"), None),
            ]),
            node(vec![
                fact("/m/chat.gguf", done("other"), None),
                fact("/m/code.gguf", done("k"), None),
            ]),
            node(vec![
                fact("/m/chat.gguf", HashState::Missing, None),
                fact("/m/code.gguf", done("k"), None),
            ]),
        ];
        assert_eq!(plan(&c, &facts, 0), vec![]);
    }

    #[test]
    fn a_running_transfer_is_left_alone_and_a_failed_one_retried_later() {
        let c = config("prima", false);
        let mut missing = fact("/m/chat.gguf", HashState::Missing, None);
        let t = TransferFact {
            started_unix: 100,
            ..crate::node::deliver::fresh("chat", 0)
        };
        missing.transfer = Some(t.clone());
        let facts = |m: ModelFact| {
            vec![
                node(vec![
                    fact("/m/chat.gguf", done("h"), None),
                    fact("/m/code.gguf", done("k"), None),
                ]),
                node(vec![m, fact("/m/code.gguf", done("k"), None)]),
            ]
        };
        assert_eq!(plan(&c, &facts(missing.clone()), 200), vec![]);
        missing.transfer = Some(TransferFact {
            state: TransferState::Failed,
            finished_unix: Some(200),
            ..t
        });
        assert_eq!(
            plan(&c, &facts(missing.clone()), 200 + RETRY_AFTER_S - 1),
            vec![]
        );
        assert_eq!(
            plan(&c, &facts(missing), 200 + RETRY_AFTER_S),
            vec![want(1, "chat", 0)]
        );
    }

    #[test]
    fn llama_rpc_delivers_to_rank_0_only_even_from_a_worker() {
        let c = config("llama-rpc", false);
        let worker = |hash| {
            vec![
                fact("/m/chat.gguf", hash, None),
                fact("/m/code.gguf", HashState::NotRequired, None),
            ]
        };
        let mut with_file = fact("/m/chat.gguf", HashState::NotRequired, None);
        with_file.size = Some(10);
        let facts = vec![
            node(vec![
                fact("/m/chat.gguf", HashState::Missing, None),
                fact("/m/code.gguf", done("k"), None),
            ]),
            node(worker(HashState::NotRequired)),
            node(vec![
                with_file,
                fact("/m/code.gguf", HashState::NotRequired, None),
            ]),
        ];
        // Rank 1 reports no size for chat (no file): rank 2 has one.
        let mut facts = facts;
        if let Ok(f) = &mut facts[1] {
            f.models[0].size = None;
        }
        assert_eq!(plan(&c, &facts, 0), vec![want(0, "chat", 2)]);
    }

    #[test]
    fn a_transfer_is_told_when_it_starts_and_when_it_ends() {
        let t = |state, started| TransferFact {
            state,
            started_unix: started,
            ..crate::node::deliver::fresh("chat", 0)
        };
        let with = |t: Option<TransferFact>| {
            let mut m = fact("/m/chat.gguf", HashState::Missing, None);
            m.transfer = t;
            let mut f = crate::coordinator::check::tests_support::facts(1);
            f.models = vec![m];
            vec![Ok(f)]
        };
        let mut seen = Seen::new();
        let told = |seen: &mut Seen, t| -> Vec<TransferState> {
            changes(seen, &with(t))
                .into_iter()
                .map(|(_, t)| t.state)
                .collect()
        };
        assert_eq!(told(&mut seen, None), vec![]);
        assert_eq!(
            told(&mut seen, Some(t(TransferState::Running, 5))),
            vec![TransferState::Running]
        );
        assert_eq!(
            told(&mut seen, Some(t(TransferState::Running, 5))),
            vec![],
            "progress alone"
        );
        assert_eq!(
            told(&mut seen, Some(t(TransferState::Failed, 5))),
            vec![TransferState::Failed]
        );
        assert_eq!(
            told(&mut seen, Some(t(TransferState::Running, 9))),
            vec![TransferState::Running],
            "a retry"
        );
        assert_eq!(
            told(&mut seen, Some(t(TransferState::Done, 9))),
            vec![TransferState::Done]
        );
        let mut fresh = Seen::new();
        assert_eq!(
            told(&mut fresh, Some(t(TransferState::Done, 9))),
            vec![],
            "ended before we looked"
        );
    }

    #[test]
    fn a_running_delivery_of_a_model_is_pending_for_its_switch() {
        let mut receiving = fact("/m/code.gguf", HashState::Missing, None);
        receiving.transfer = Some(TransferFact {
            total_bytes: 200,
            done_bytes: 50,
            ..crate::node::deliver::fresh("code", 0)
        });
        let mut f1 = crate::coordinator::check::tests_support::facts(1);
        f1.models = vec![fact("/m/chat.gguf", done("h"), None), receiving];
        let f0 = crate::coordinator::check::tests_support::facts(0);
        let why = pending([&f0, &f1], 1, 0).expect("pending");
        assert!(
            why.starts_with("rank 1 is receiving model code from rank 0: 25 %"),
            "{why}"
        );
        assert_eq!(pending([&f0, &f1], 0, 0), None, "the loaded model is whole");
    }

    #[test]
    fn delivery_off_asks_for_nothing() {
        let mut c = config("prima", false);
        c.delivery.enabled = false;
        let facts = vec![
            node(vec![
                fact("/m/chat.gguf", done("h"), None),
                fact("/m/code.gguf", done("k"), None),
            ]),
            node(vec![
                fact("/m/chat.gguf", HashState::Missing, None),
                fact("/m/code.gguf", done("k"), None),
            ]),
        ];
        assert_eq!(plan(&c, &facts, 0), vec![]);
    }
}
