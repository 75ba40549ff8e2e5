//! Decides from every node's facts (and links) whether a ring may start. Pure.

use crate::config::Config;
use crate::proto::{
    HashState, InstalledPackage, LinkReport, NodeFacts, Placement, RankPhase, RankStatus,
    TransferState, AGENT_VERSION, PROTOCOL_VERSION,
};

use super::state::NodeCheck;

/// Why a node's facts are not at hand.
#[derive(Debug, Clone, PartialEq)]
pub enum FactsError {
    /// The agent did not answer (or answered an error): the node may come back by itself.
    Unreachable(String),
    /// The agent answered with facts this coordinator cannot read: another agent version.
    Unreadable {
        agent_version: Option<String>,
        protocol_version: Option<u32>,
        error: String,
    },
}

impl std::fmt::Display for FactsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FactsError::Unreachable(e) => write!(f, "unreachable: {e}"),
            FactsError::Unreadable { error, .. } => write!(f, "unreadable facts: {error}"),
        }
    }
}

/// What one node's agent said about itself, or why nothing usable came back.
pub type NodeReport = Result<NodeFacts, FactsError>;

/// Why a node running `agent`/`protocol` cannot join this coordinator's ring, if it cannot.
fn version_mismatch(agent: Option<&str>, protocol: Option<u32>) -> Option<String> {
    if agent == Some(AGENT_VERSION) && protocol == Some(PROTOCOL_VERSION) {
        return None;
    }
    Some(format!(
        "runs llm-agent {} (protocol {}) but this coordinator runs llm-agent {AGENT_VERSION} (protocol {PROTOCOL_VERSION}): install the same llm-agent on every node",
        agent.unwrap_or("of an unknown version"),
        protocol.map_or("unknown".to_string(), |p| p.to_string()),
    ))
}

/// `facts[r]` is rank r's report. Returns the verdict and warnings that do not block (e.g. an
/// engine version that could not be read).
pub fn check_nodes(config: &Config, facts: &[NodeReport]) -> (NodeCheck, Vec<String>) {
    let mut waiting = Vec::new();
    let mut refused = Vec::new();
    // Refusals only because nodes run different builds (engine, package, agent): what a rolling
    // upgrade looks like halfway, which a serving ring rides out (see [`upgrade_step`]).
    let mut mixed = Vec::new();
    let mut warnings = Vec::new();
    let who = |r: usize| {
        let n = &config.nodes[r];
        format!("rank {r} ({})", n.agent_addr())
    };
    for (r, f) in facts.iter().enumerate() {
        let f = match f {
            Ok(f) => f,
            Err(FactsError::Unreachable(e)) => {
                waiting.push(format!("{} unreachable: {e}", who(r)));
                continue;
            }
            Err(FactsError::Unreadable {
                agent_version,
                protocol_version,
                error,
            }) => {
                match version_mismatch(agent_version.as_deref(), *protocol_version) {
                    Some(why) => mixed.push(format!("{} {why}", who(r))),
                    None => refused.push(format!("{}: its facts cannot be read: {error}", who(r))),
                }
                continue;
            }
        };
        if let Some(why) = version_mismatch(Some(&f.agent_version), Some(f.protocol_version)) {
            mixed.push(format!("{} {why}", who(r)));
        }
        match f.rank_binary() {
            Some(b) if b.path.is_none() => {
                let aliases = crate::engine::binary_aliases(&b.name);
                refused.push(format!(
                    "{}: engine binary `{}`{} not found ({}){}",
                    who(r),
                    b.name,
                    if aliases.is_empty() {
                        String::new()
                    } else {
                        format!(" (nor {})", aliases.join(", "))
                    },
                    match &config.nodes[r].engine_dir {
                        Some(d) => format!("looked in engine_dir {}", d.display()),
                        None => "looked on PATH; set engine_dir for this node".into(),
                    },
                    if !aliases.is_empty() && f.engine == crate::config::EngineKind::LlamaRpc {
                        "; Arch's official llama-cpp packages ship no rpc server: install an AUR \
                         llama.cpp build (llama.cpp, llama.cpp-vulkan, -cuda, -hip) on every node"
                    } else {
                        ""
                    }
                ))
            }
            _ => {}
        }
        let path = config.model_path(r as u32, config.model());
        let m = f.model_at(&path);
        let transfer = m.transfer.as_ref();
        match (&m.hash, transfer.map(|t| t.state)) {
            (_, Some(TransferState::Running))
                if matches!(m.hash, HashState::Missing) || m.matches_expected == Some(false) =>
            {
                waiting.push(format!(
                    "{} is {}",
                    who(r),
                    transfer.map(super::delivery::describe).unwrap_or_default()
                ))
            }
            (HashState::Missing, _) => refused.push(format!(
                "{}: model file {} not found{}",
                who(r),
                m.path.display(),
                delivery_note(config, transfer)
            )),
            (HashState::Hashing, _) => {
                waiting.push(format!("{} is still hashing its model", who(r)))
            }
            (HashState::Error { message }, _) => refused.push(format!("{}: {message}", who(r))),
            (HashState::Done { sha256 }, _) => {
                if m.matches_expected == Some(false) {
                    refused.push(format!(
                        "{}: model {} has sha256 {sha256}, but the config expects {}{}",
                        who(r),
                        m.path.display(),
                        m.expected_sha256.as_deref().unwrap_or("?"),
                        delivery_note(config, transfer)
                    ));
                }
            }
            (HashState::NotRequired, _) => {}
        }
        if f.engine_version.is_none() {
            warnings.push(format!(
                "{}: engine version unknown (server binary missing or silent)",
                who(r)
            ));
        }
        if let Some(t) = &f.tls {
            let soon = [
                crate::tls::expiry_warning("its certificate", &t.cert),
                crate::tls::expiry_warning("the cluster CA certificate", &t.ca),
            ];
            warnings.extend(
                soon.into_iter()
                    .flatten()
                    .map(|w| format!("{}: {w}", who(r))),
            );
        }
    }
    let ok: Vec<(usize, &NodeFacts)> = facts
        .iter()
        .enumerate()
        .filter_map(|(r, f)| f.as_ref().ok().map(|f| (r, f)))
        .collect();
    // Every pair of known engine versions must agree.
    if let Some((r0, v0)) = ok
        .iter()
        .find_map(|(r, f)| f.engine_version.as_ref().map(|v| (*r, v)))
    {
        for (r, f) in &ok {
            if let Some(v) = &f.engine_version {
                if v != v0 {
                    mixed.push(format!(
                        "{} runs engine version `{v}` but {} runs `{v0}`: install the same engine build on every node",
                        who(*r),
                        who(r0)
                    ));
                }
            }
        }
    }
    // On Arch, the engine package's version is the build's identity (GPU variants of one version
    // may differ in name: prima-cpp-cuda on one node, prima-cpp on another); two packagings of
    // one engine (Arch's llama-cpp, the AUR's llama.cpp) are different builds.
    let packages: Vec<(usize, &InstalledPackage)> = ok
        .iter()
        .filter_map(|(r, f)| f.engine_package.as_ref().map(|p| (*r, p)))
        .collect();
    if let Some((r0, p0)) = packages.first() {
        let family0 = crate::pacman::engine_family(&p0.name);
        for (r, p) in &packages[1..] {
            let family = crate::pacman::engine_family(&p.name);
            if family != family0 {
                refused.push(format!(
                    "{} runs the engine from package {} ({}) but {} from {} ({}): install the same engine package on every node (GPU variants may differ)",
                    who(*r),
                    p.name,
                    crate::pacman::family_origin(family),
                    who(*r0),
                    p0.name,
                    crate::pacman::family_origin(family0)
                ));
            } else if p.version != p0.version {
                mixed.push(format!(
                    "{} has engine package {} {} but {} has {} {}: install the same version on every node",
                    who(*r),
                    p.name,
                    p.version,
                    who(*r0),
                    p0.name,
                    p0.version
                ));
            }
        }
    }
    // Every node that reads the model must read the same bytes. A copy being replaced (its
    // delivery runs) is waited for above, not compared.
    let hashes: Vec<(usize, &str)> = ok
        .iter()
        .filter_map(|(r, f)| {
            let m = f.model_at(&config.model_path(*r as u32, config.model()));
            let replacing = m
                .transfer
                .as_ref()
                .is_some_and(|t| t.state == TransferState::Running);
            match &m.hash {
                HashState::Done { sha256 } if !replacing => Some((*r, sha256.as_str())),
                _ => None,
            }
        })
        .collect();
    if let Some((r0, h0)) = hashes.first() {
        for (r, h) in &hashes[1..] {
            if h != h0 {
                refused.push(format!(
                    "{} has a different model file (sha256 {h}) than {} (sha256 {h0})",
                    who(*r),
                    who(*r0)
                ));
            }
        }
    }
    let verdict = if !refused.is_empty() {
        refused.extend(mixed);
        NodeCheck::Refused(format!(
            "refusing to start the ring: {}",
            refused.join("; ")
        ))
    } else if !mixed.is_empty() {
        NodeCheck::Mixed(format!("refusing to start the ring: {}", mixed.join("; ")))
    } else if !waiting.is_empty() {
        NodeCheck::Waiting(format!("waiting for nodes: {}", waiting.join("; ")))
    } else {
        NodeCheck::Ready
    };
    (verdict, warnings)
}

/// What a refusal of a missing or wrong model file adds about its delivery.
fn delivery_note(config: &Config, transfer: Option<&crate::proto::TransferFact>) -> String {
    match transfer {
        Some(t) if t.state == TransferState::Failed => format!(
            "; its delivery from rank {} failed: {} (asked again every {} s)",
            t.from_rank,
            t.error.as_deref().unwrap_or("no reason given"),
            super::delivery::RETRY_AFTER_S
        ),
        _ if config.delivery.enabled => {
            "; no node has a verified copy to deliver: put the file on one node (the head)".into()
        }
        _ => "; [delivery] is off: copy the file there".into(),
    }
}

/// Why the ring cannot start yet for want of a link between ranks, naming each broken one, as
/// "rank 1 (10.0.0.2) cannot reach rank 2 (10.0.0.3:9002): timed out".
pub fn broken_links(config: &Config, reports: &[Result<LinkReport, String>]) -> Option<String> {
    let mut broken = Vec::new();
    for (r, report) in reports.iter().enumerate() {
        let from = format!("rank {r} ({})", config.nodes[r].address);
        match report {
            Ok(rep) => broken.extend(rep.links.iter().filter(|l| !l.reachable).map(|l| {
                format!(
                    "{from} cannot reach rank {} ({}): {}",
                    l.to_rank, l.addr, l.detail
                )
            })),
            Err(e) => broken.push(format!("{from} could not check its links: {e}")),
        }
    }
    (!broken.is_empty()).then(|| format!("waiting for links between ranks: {}", broken.join("; ")))
}

/// The generation every rank is running, when the whole ring runs exactly what the config plans
/// for it — a ring a previous coordinator started that a new one may take over. A changed config
/// (other nodes, model, ports) never matches, so it gets a fresh ring. With prima's Halda, the
/// ring may run Halda's own placement or the remembered one: either is adopted.
pub fn running_generation(
    config: &Config,
    statuses: &[Option<RankStatus>],
    remembered: Option<&Placement>,
) -> Option<u64> {
    let first = statuses.first()?.as_ref()?;
    let generation = first.generation;
    // Only a generation a coordinator can have issued is adopted (a node's absurd one is not).
    if !crate::proto::plausible_generation(generation) || statuses.len() != config.world() {
        return None;
    }
    let runs = |plan: crate::plan::RingPlan| {
        config.nodes.iter().zip(statuses).all(|(n, st)| {
            let st = st.as_ref();
            match plan.for_node(n.rank) {
                Some(want) => st.is_some_and(|st| {
                    st.phase == RankPhase::Running
                        && st.generation == generation
                        && st.spec.as_ref() == Some(want)
                }),
                None => st.is_some_and(|st| st.phase != RankPhase::Running),
            }
        })
    };
    let planned = [remembered, None];
    planned
        .iter()
        .filter_map(|p| crate::plan::plan(config, config.model(), generation, *p).ok())
        .any(runs)
        .then_some(generation)
}

/// What one node would run a rank with: its engine build and package version, its agent and
/// protocol. Two nodes with equal builds may share a ring; a ring keeps the build it started on
/// until it is restarted, whatever is installed meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub engine: Option<String>,
    /// The engine package's version (its name may differ: GPU variants of one version).
    pub package: Option<String>,
    pub agent: Option<String>,
    pub protocol: Option<u32>,
}

impl Build {
    /// A node's build, from its report; `None` when the node did not answer.
    pub fn of(report: &NodeReport) -> Option<Build> {
        match report {
            Ok(f) => Some(Build {
                engine: f.engine_version.clone(),
                package: f.engine_package.as_ref().map(|p| p.version.clone()),
                agent: Some(f.agent_version.clone()),
                protocol: Some(f.protocol_version),
            }),
            Err(FactsError::Unreadable {
                agent_version,
                protocol_version,
                ..
            }) => Some(Build {
                engine: None,
                package: None,
                agent: agent_version.clone(),
                protocol: *protocol_version,
            }),
            Err(FactsError::Unreachable(_)) => None,
        }
    }
}

impl Build {
    /// Whether two nodes' builds may share a ring: what both know agrees (an engine version
    /// one node could not read is no disagreement, as in [`check_nodes`]).
    pub fn agrees(&self, other: &Build) -> bool {
        fn same<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
        }
        same(&self.engine, &other.engine)
            && same(&self.package, &other.package)
            && same(&self.agent, &other.agent)
            && same(&self.protocol, &other.protocol)
    }

    /// Fills what this build does not know from `other`.
    fn merged(mut self, other: &Build) -> Build {
        self.engine = self.engine.or_else(|| other.engine.clone());
        self.package = self.package.or_else(|| other.package.clone());
        self.agent = self.agent.or_else(|| other.agent.clone());
        self.protocol = self.protocol.or(other.protocol);
        self
    }
}

impl std::fmt::Display for Build {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.package, &self.engine) {
            (Some(p), _) => write!(f, "engine package {p}")?,
            (None, Some(e)) => write!(f, "engine `{e}`")?,
            (None, None) => write!(f, "an unknown engine build")?,
        }
        write!(
            f,
            " with llm-agent {} (protocol {})",
            self.agent.as_deref().unwrap_or("?"),
            self.protocol.map_or("?".to_string(), |p| p.to_string())
        )
    }
}

/// What a serving ring does about its nodes' builds, decided by [`upgrade_step`].
#[derive(Debug, Clone, PartialEq)]
pub enum UpgradeStep {
    /// Every node has the build the ring runs (or nothing is known that says otherwise).
    Current,
    /// Nodes differ, or agree on a build the ring cannot start on yet: the ring serves on.
    Pending(String),
    /// Every node has the same new build, but restarts on upgrade are manual.
    Ready(String),
    /// Every node has the same new build: restart the ring once.
    Restart(String),
}

/// Compares the build the ring runs (`ring`; `None` when unknown, e.g. a ring adopted halfway
/// through an upgrade) with every node's (`builds[r]`, `None` for a node that did not answer).
/// `startable`: the node check found nothing else wrong, so a new ring would start. Pure.
pub fn upgrade_step(
    ring: Option<&Build>,
    builds: &[Option<Build>],
    startable: bool,
    automatic: bool,
) -> UpgradeStep {
    let known: Vec<&Build> = builds.iter().flatten().collect();
    let on_ring = |b: &Build| ring.is_some_and(|r| r.agrees(b));
    if known.is_empty() || known.iter().all(|b| on_ring(b)) {
        return UpgradeStep::Current;
    }
    // The build most nodes moved to: the one the upgrade is heading for; when what the ring
    // runs is unknown (adopted by a coordinator just upgraded), the one with this agent.
    let mut counts: Vec<(&Build, usize)> = Vec::new();
    for b in known.iter().filter(|b| !on_ring(b)) {
        match counts.iter_mut().find(|(c, _)| c.agrees(b)) {
            Some((_, n)) => *n += 1,
            None => counts.push((b, 1)),
        }
    }
    let own = |b: &Build| ring.is_none() && b.agent.as_deref() == Some(AGENT_VERSION);
    let Some((target, _)) = counts.iter().max_by_key(|(b, n)| (own(b), *n)).copied() else {
        return UpgradeStep::Current;
    };
    // A node whose engine version is unknown counts for the target too.
    let on_target = known.iter().filter(|b| target.agrees(b)).count();
    let world = builds.len();
    let running = match ring {
        Some(r) => format!("{r}"),
        None => "the build it was started with".to_string(),
    };
    if on_target < world {
        let unreachable = builds.iter().filter(|b| b.is_none()).count();
        let unanswered = if unreachable > 0 {
            format!(" ({unreachable} not answering)")
        } else {
            String::new()
        };
        return UpgradeStep::Pending(format!(
            "upgrade pending: {on_target}/{world} nodes on {target}{unanswered}; the ring serves on {running} until every node has it"
        ));
    }
    if !startable {
        return UpgradeStep::Pending(format!(
            "upgrade pending: {world}/{world} nodes on {target}, but a new ring could not start yet, so the ring serves on {running}"
        ));
    }
    if automatic {
        UpgradeStep::Restart(format!(
            "upgrade complete: {world}/{world} nodes on {target}; restarting the ring once on it"
        ))
    } else {
        UpgradeStep::Ready(format!(
            "upgrade ready: {world}/{world} nodes on {target}; the ring still runs {running} (supervision.restart_on_upgrade = false): run `llm-agent notify-upgrade --restart-ring` on the head node to restart it"
        ))
    }
}

/// The one build every node has, if they all answered and agree, with everything any of them
/// knows about it.
pub fn common_build(builds: &[Option<Build>]) -> Option<Build> {
    let known: Vec<&Build> = builds.iter().map(Option::as_ref).collect::<Option<_>>()?;
    let first = known.first()?;
    if !known.iter().all(|b| known.iter().all(|o| b.agrees(o))) {
        return None;
    }
    Some(known[1..].iter().fold((*first).clone(), |m, b| m.merged(b)))
}

/// Facts for tests elsewhere in the coordinator (a consistent prima node), to vary.
#[cfg(test)]
pub mod tests_support {
    use crate::config::EngineKind;
    use crate::proto::{
        BinaryFact, HashState, ModelFact, NodeFacts, AGENT_VERSION, PROTOCOL_VERSION,
    };
    use std::path::PathBuf;

    pub fn facts(rank: u32) -> NodeFacts {
        NodeFacts {
            agent_version: AGENT_VERSION.into(),
            protocol_version: PROTOCOL_VERSION,
            rank,
            hostname: "h".into(),
            engine: EngineKind::Prima,
            binaries: vec![BinaryFact {
                name: "prima-cli".into(),
                path: Some(PathBuf::from("/usr/bin/prima-cli")),
                used_by_this_rank: true,
            }],
            engine_version: Some("b1".into()),
            engine_package: None,
            models: Vec::new(),
            model: ModelFact {
                path: PathBuf::from("/m.gguf"),
                size: Some(1),
                hash: HashState::Done { sha256: "h".into() },
                expected_sha256: None,
                matches_expected: None,
                hashed_bytes: None,
                transfer: None,
            },
            memory: None,
            cpu: None,
            gpus: vec![],
            network: vec![],
            tls: None,
            rpc_cache: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EngineKind;
    use crate::proto::BinaryFact;
    use std::path::{Path, PathBuf};

    fn running_generation_of(c: &Config, statuses: &[Option<RankStatus>]) -> Option<u64> {
        running_generation(c, statuses, None)
    }

    fn config() -> Config {
        let text = "[cluster]\nname=\"t\"\nengine=\"prima\"\n[model]\npath=\"/m.gguf\"\n\
                    [[node]]\nrank=0\naddress=\"10.0.0.1\"\n[[node]]\nrank=1\naddress=\"10.0.0.2\"\n";
        Config::parse(text, Path::new("t")).expect("config")
    }

    fn facts(rank: u32, version: &str, hash: HashState) -> NodeReport {
        let mut f = tests_support::facts(rank);
        f.engine_version = Some(version.into());
        f.model.hash = hash;
        Ok(f)
    }

    fn done(h: &str) -> HashState {
        HashState::Done { sha256: h.into() }
    }

    fn running(config: &Config, generation: u64) -> Vec<Option<RankStatus>> {
        crate::plan::plan(config, config.model(), generation, None)
            .expect("plan")
            .ranks
            .into_iter()
            .map(|spec| {
                Some(RankStatus {
                    instance: 1,
                    version: 3,
                    rank: spec.rank,
                    generation,
                    phase: RankPhase::Running,
                    pid: Some(10),
                    unit: None,
                    listening: true,
                    command: None,
                    exit: None,
                    last_error: None,
                    spec: Some(spec),
                    facts_version: 0,
                })
            })
            .collect()
    }

    #[test]
    fn a_certificate_that_expires_within_30_days_is_a_warning_not_a_refusal() {
        use crate::proto::{CertExpiry, TlsFact};
        let expiry = |path: &str, days: i64| CertExpiry {
            path: PathBuf::from(path),
            not_after: "2027-01-01T00:00:00Z".into(),
            not_after_unix: 0,
            days_left: days,
        };
        let with_tls = |rank, cert_days| {
            let mut f = facts(rank, "v1", done("aa")).expect("facts");
            f.tls = Some(TlsFact {
                cert: expiry("/pki/rank.crt", cert_days),
                ca: expiry("/pki/ca.crt", 3000),
            });
            Ok(f)
        };
        let (check, warnings) = check_nodes(&config(), &[with_tls(0, 400), with_tls(1, 12)]);
        assert_eq!(check, NodeCheck::Ready);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("rank 1 (10.0.0.2:7700): its certificate /pki/rank.crt expires in 12 day(s), on 2027-01-01T00:00:00Z"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_ring_running_the_planned_specs_can_be_adopted() {
        let c = config();
        assert_eq!(running_generation_of(&c, &running(&c, 4)), Some(4));
        let mut mixed = running(&c, 4);
        mixed[1] = running(&c, 3)[1].clone();
        assert_eq!(
            running_generation_of(&c, &mixed),
            None,
            "generations differ"
        );
        let mut stopped = running(&c, 4);
        if let Some(s) = stopped[0].as_mut() {
            s.phase = RankPhase::Exited;
        }
        assert_eq!(running_generation_of(&c, &stopped), None);
        let mut changed = running(&c, 4);
        if let Some(s) = changed[1].as_mut().and_then(|s| s.spec.as_mut()) {
            s.ctx_size = 99;
        }
        assert_eq!(
            running_generation_of(&c, &changed),
            None,
            "the config changed since"
        );
        let mut unreachable = running(&c, 4);
        unreachable[1] = None;
        assert_eq!(running_generation_of(&c, &unreachable), None);
    }

    #[test]
    fn consistent_nodes_are_ready() {
        let f = vec![facts(0, "b1", done("aa")), facts(1, "b1", done("aa"))];
        assert_eq!(check_nodes(&config(), &f).0, NodeCheck::Ready);
    }

    #[test]
    fn different_engine_versions_are_refused_naming_both_nodes() {
        let f = vec![facts(0, "b1", done("aa")), facts(1, "b2", done("aa"))];
        let NodeCheck::Mixed(msg) = check_nodes(&config(), &f).0 else {
            panic!("not refused as mixed builds")
        };
        assert!(
            msg.contains("rank 1 (10.0.0.2:7700) runs engine version `b2`"),
            "{msg}"
        );
        assert!(msg.contains("rank 0 (10.0.0.1:7700) runs `b1`"), "{msg}");
    }

    #[test]
    fn different_engine_package_versions_are_refused_but_variants_are_not() {
        let pkg = |name: &str, version: &str| {
            Some(InstalledPackage {
                name: name.into(),
                version: version.into(),
            })
        };
        let mut a = facts(0, "0 (unknown)", done("aa"));
        let mut b = facts(1, "0 (unknown)", done("aa"));
        if let (Ok(a), Ok(b)) = (&mut a, &mut b) {
            a.engine_package = pkg("prima-cpp-cuda", "0.0.0.r20250717.bdf9d8e-1");
            b.engine_package = pkg("prima-cpp", "0.0.0.r20250717.bdf9d8e-1");
        }
        assert_eq!(
            check_nodes(&config(), &[a.clone(), b.clone()]).0,
            NodeCheck::Ready
        );
        if let Ok(b) = &mut b {
            b.engine_package = pkg("prima-cpp", "0.0.0.r20250801.1234567-1");
        }
        let NodeCheck::Mixed(msg) = check_nodes(&config(), &[a, b]).0 else {
            panic!("not refused as mixed builds")
        };
        assert!(
            msg.contains("engine package prima-cpp 0.0.0.r20250801.1234567-1"),
            "{msg}"
        );
    }

    #[test]
    fn official_llama_cpp_variants_agree_but_an_aur_build_beside_them_is_refused() {
        let pkg = |name: &str| {
            Some(InstalledPackage {
                name: name.into(),
                version: "b9859-1".into(),
            })
        };
        let with = |rank: u32, name: &str| {
            let mut f = facts(rank, "b9859", done("aa"));
            if let Ok(f) = &mut f {
                f.engine_package = pkg(name);
            }
            f
        };
        assert_eq!(
            check_nodes(
                &config(),
                &[with(0, "llama-cpp-vulkan"), with(1, "llama-cpp-rocm")]
            )
            .0,
            NodeCheck::Ready
        );
        let NodeCheck::Refused(msg) = check_nodes(
            &config(),
            &[with(0, "llama-cpp"), with(1, "llama.cpp-vulkan")],
        )
        .0
        else {
            panic!("not refused")
        };
        assert!(
            msg.contains("llama.cpp-vulkan (the AUR's llama.cpp")
                && msg.contains("llama-cpp (Arch's official llama.cpp"),
            "{msg}"
        );
    }

    #[test]
    fn different_model_hashes_are_refused() {
        let f = vec![facts(0, "b1", done("aa")), facts(1, "b1", done("bb"))];
        let NodeCheck::Refused(msg) = check_nodes(&config(), &f).0 else {
            panic!("not refused")
        };
        assert!(msg.contains("different model file"), "{msg}");
    }

    fn transfer(state: TransferState, error: Option<&str>) -> crate::proto::TransferFact {
        crate::proto::TransferFact {
            state,
            total_bytes: 1000,
            done_bytes: 420,
            bytes_per_s: Some(1e6),
            eta_s: Some(0.6),
            error: error.map(str::to_string),
            ..crate::node::deliver::fresh("m", 0)
        }
    }

    #[test]
    fn a_node_receiving_its_model_means_waiting_with_the_progress() {
        let mut wrong = facts(1, "b1", done("bb"));
        if let Ok(f) = &mut wrong {
            f.model.matches_expected = Some(false);
            f.model.transfer = Some(transfer(TransferState::Running, None));
        }
        let mut missing = facts(1, "b1", HashState::Missing);
        if let Ok(f) = &mut missing {
            f.model.transfer = Some(transfer(TransferState::Running, None));
        }
        for f1 in [wrong, missing] {
            let f = vec![facts(0, "b1", done("aa")), f1];
            let NodeCheck::Waiting(msg) = check_nodes(&config(), &f).0 else {
                panic!("not waiting: {:?}", check_nodes(&config(), &f).0)
            };
            assert!(
                msg.contains(
                    "rank 1 (10.0.0.2:7700) is receiving model m from rank 0: 42 % of 1.0 kB"
                ),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_failed_delivery_is_a_refusal_naming_its_error() {
        let mut f1 = facts(1, "b1", HashState::Missing);
        if let Ok(f) = &mut f1 {
            f.model.transfer = Some(transfer(
                TransferState::Failed,
                Some("not enough free space on rank 1"),
            ));
        }
        let f = vec![facts(0, "b1", done("aa")), f1];
        let NodeCheck::Refused(msg) = check_nodes(&config(), &f).0 else {
            panic!("not refused")
        };
        assert!(
            msg.contains(
                "not found; its delivery from rank 0 failed: not enough free space on rank 1"
            ),
            "{msg}"
        );
    }

    #[test]
    fn unreachable_or_hashing_nodes_mean_waiting() {
        let f = vec![
            facts(0, "b1", HashState::Hashing),
            Err(FactsError::Unreachable("connection refused".into())),
        ];
        let NodeCheck::Waiting(msg) = check_nodes(&config(), &f).0 else {
            panic!("not waiting")
        };
        assert!(
            msg.contains("hashing") && msg.contains("connection refused"),
            "{msg}"
        );
    }

    #[test]
    fn missing_binary_or_model_is_refused() {
        let mut f1 = facts(1, "b1", HashState::Missing);
        if let Ok(f) = &mut f1 {
            f.binaries[0].path = None;
        }
        let f = vec![facts(0, "b1", done("aa")), f1];
        let NodeCheck::Refused(msg) = check_nodes(&config(), &f).0 else {
            panic!("not refused")
        };
        assert!(
            msg.contains("`prima-cli` not found") && msg.contains("model file /m.gguf not found"),
            "{msg}"
        );
    }

    /// A llama.cpp worker where only Arch's official llama-cpp is installed has no rpc server:
    /// the refusal names every name looked for and the package that has one.
    #[test]
    fn a_missing_rpc_server_names_its_other_names_and_the_aur_build() {
        let mut worker = facts(1, "b1", HashState::NotRequired);
        if let Ok(f) = &mut worker {
            f.engine = EngineKind::LlamaRpc;
            f.binaries[0] = BinaryFact {
                name: "ggml-rpc-server".into(),
                path: None,
                used_by_this_rank: true,
            };
        }
        let NodeCheck::Refused(msg) =
            check_nodes(&config(), &[facts(0, "b1", done("aa")), worker]).0
        else {
            panic!("not refused")
        };
        assert!(
            msg.contains("`ggml-rpc-server` (nor rpc-server, llama-rpc-server) not found")
                && msg.contains("AUR llama.cpp build"),
            "{msg}"
        );
    }

    #[test]
    fn another_agent_or_protocol_version_is_refused_naming_it() {
        let mut old = facts(1, "b1", done("aa"));
        if let Ok(f) = &mut old {
            f.agent_version = "0.0.9".into();
        }
        let f = vec![facts(0, "b1", done("aa")), old];
        let NodeCheck::Mixed(msg) = check_nodes(&config(), &f).0 else {
            panic!("not refused as mixed builds")
        };
        assert!(
            msg.contains("rank 1 (10.0.0.2:7700) runs llm-agent 0.0.9 (protocol")
                && msg.contains(&format!("this coordinator runs llm-agent {AGENT_VERSION}")),
            "{msg}"
        );
        // An agent whose facts do not even parse is refused by its version, not "unreachable".
        let f = vec![
            facts(0, "b1", done("aa")),
            Err(FactsError::Unreadable {
                agent_version: Some("0.0.1".into()),
                protocol_version: Some(1),
                error: "missing field `protocol_version`".into(),
            }),
        ];
        let NodeCheck::Mixed(msg) = check_nodes(&config(), &f).0 else {
            panic!("not refused as mixed builds")
        };
        assert!(msg.contains("runs llm-agent 0.0.1 (protocol 1)"), "{msg}");
    }

    #[test]
    fn a_build_difference_with_another_fault_is_a_plain_refusal() {
        let f = vec![facts(0, "b1", done("aa")), facts(1, "b2", done("bb"))];
        let NodeCheck::Refused(msg) = check_nodes(&config(), &f).0 else {
            panic!("not refused")
        };
        assert!(
            msg.contains("different model file") && msg.contains("engine version `b2`"),
            "{msg}"
        );
    }

    fn build(engine: &str, agent: &str) -> Option<Build> {
        Some(Build {
            engine: Some(engine.into()),
            package: None,
            agent: Some(agent.into()),
            protocol: Some(1),
        })
    }

    #[test]
    fn upgrade_steps_from_pending_to_restart() {
        let old = build("b1", "0.3.0");
        let new = build("b2", "0.3.0");
        let ring = old.as_ref();
        assert_eq!(
            upgrade_step(ring, &[old.clone(), old.clone(), old.clone()], true, true),
            UpgradeStep::Current
        );
        let UpgradeStep::Pending(why) =
            upgrade_step(ring, &[old.clone(), new.clone(), new.clone()], false, true)
        else {
            panic!("not pending")
        };
        assert!(
            why.starts_with("upgrade pending: 2/3 nodes on engine `b2` with llm-agent 0.3.0"),
            "{why}"
        );
        assert!(why.contains("serves on engine `b1`"), "{why}");
        let all_new = [new.clone(), new.clone(), new.clone()];
        assert!(matches!(
            upgrade_step(ring, &all_new, true, true),
            UpgradeStep::Restart(_)
        ));
        let UpgradeStep::Ready(why) = upgrade_step(ring, &all_new, true, false) else {
            panic!("not ready")
        };
        assert!(why.contains("notify-upgrade --restart-ring"), "{why}");
        assert!(
            matches!(
                upgrade_step(ring, &all_new, false, true),
                UpgradeStep::Pending(_)
            ),
            "a ring that could not start is not stopped"
        );
        // After the restart the ring runs the new build: nothing more to do.
        assert_eq!(
            upgrade_step(new.as_ref(), &all_new, true, true),
            UpgradeStep::Current
        );
    }

    #[test]
    fn an_unknown_engine_version_is_no_disagreement() {
        let old = build("b1", "0.3.0");
        let new = build("b2", "0.3.0");
        let silent = Some(Build {
            engine: None,
            ..new.clone().expect("build")
        });
        let ring = common_build(&[old.clone(), silent.clone()]);
        assert_eq!(ring, old, "what any node knows of the ring's build is kept");
        assert_eq!(
            upgrade_step(ring.as_ref(), &[old.clone(), silent.clone()], true, true),
            UpgradeStep::Current
        );
        assert!(matches!(
            upgrade_step(ring.as_ref(), &[new.clone(), silent], true, true),
            UpgradeStep::Restart(_)
        ));
    }

    #[test]
    fn a_silent_node_holds_an_upgrade_back_but_does_not_start_one() {
        let old = build("b1", "0.3.0");
        let new = build("b2", "0.3.0");
        assert_eq!(
            upgrade_step(old.as_ref(), &[old.clone(), None, old.clone()], true, true),
            UpgradeStep::Current
        );
        let UpgradeStep::Pending(why) =
            upgrade_step(old.as_ref(), &[new.clone(), None, new.clone()], true, true)
        else {
            panic!("not pending")
        };
        assert!(
            why.contains("2/3 nodes") && why.contains("1 not answering"),
            "{why}"
        );
    }

    #[test]
    fn an_agent_upgrade_is_an_upgrade_and_an_unknown_ring_build_restarts_once_consistent() {
        let old = build("b1", "0.3.0");
        let new_agent = build("b1", "0.4.0");
        let UpgradeStep::Pending(why) =
            upgrade_step(old.as_ref(), &[new_agent.clone(), old.clone()], false, true)
        else {
            panic!("not pending")
        };
        assert!(
            why.contains("1/2 nodes on engine `b1` with llm-agent 0.4.0"),
            "{why}"
        );
        let both = [new_agent.clone(), new_agent.clone()];
        assert!(matches!(
            upgrade_step(None, &both, true, true),
            UpgradeStep::Restart(_)
        ));
        assert_eq!(common_build(&both), new_agent);
        assert_eq!(common_build(&[new_agent.clone(), old]), None);
        assert_eq!(common_build(&[new_agent, None]), None);
    }

    #[test]
    fn a_broken_link_is_named_from_both_ends() {
        use crate::proto::LinkCheck;
        let c = config();
        let link = |to_rank, addr: &str, reachable, detail: &str| LinkCheck {
            to_rank,
            addr: addr.parse().expect("addr"),
            reachable,
            detail: detail.into(),
        };
        let ok = vec![
            Ok(LinkReport {
                rank: 0,
                links: vec![link(1, "10.0.0.2:9001", true, "refused")],
            }),
            Ok(LinkReport {
                rank: 1,
                links: vec![link(0, "10.0.0.1:9000", true, "refused")],
            }),
        ];
        assert_eq!(broken_links(&c, &ok), None);
        let cut = vec![
            ok[0].clone(),
            Ok(LinkReport {
                rank: 1,
                links: vec![link(0, "10.0.0.1:9000", false, "timed out after 2 s")],
            }),
        ];
        let why = broken_links(&c, &cut).expect("broken");
        assert!(
            why.contains(
                "rank 1 (10.0.0.2) cannot reach rank 0 (10.0.0.1:9000): timed out after 2 s"
            ),
            "{why}"
        );
    }
}
