//! Turns the raw file into a [`Config`], collecting every problem with its location.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::Path;

use toml::Spanned;

use super::raw;
use super::*;

/// Most slots accepted: every slot is a sequence the engine keeps state for, and far more than
/// the machines' cores only queues inside the engine, where the gateway cannot be fair.
const MAX_SLOTS: u32 = 256;

/// Maps byte offsets to 1-based line/column.
pub(crate) struct Locator<'a> {
    pub text: &'a str,
}

impl Locator<'_> {
    pub fn at(&self, span: Range<usize>, message: impl Into<String>) -> Problem {
        // Defaults carry an empty span at 0: they have no place in the file.
        if span.start == 0 && span.end == 0 {
            return Problem::general(message);
        }
        let mut start = span.start.min(self.text.len());
        while !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        // Columns count characters, as editors and rustc do, not bytes.
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Problem {
            line: Some(line),
            column: Some(column),
            message: message.into(),
        }
    }
}

/// The file as text, or where its first byte that is not UTF-8 is.
pub(super) fn decode(bytes: &[u8]) -> Result<&str, Problem> {
    std::str::from_utf8(bytes).map_err(|e| {
        let good = e.valid_up_to();
        // The prefix up to the bad byte is valid by definition.
        let text = std::str::from_utf8(&bytes[..good]).unwrap_or_default();
        Locator { text }.at(
            good..good + 1,
            format!(
                "not valid UTF-8 (byte 0x{:02x}): the config must be UTF-8 text",
                bytes[good]
            ),
        )
    })
}

/// A problem that belongs to the file as a whole: placed on line 1 so it still reads as
/// `file:line: message` like every other.
fn at_top(message: impl Into<String>) -> Problem {
    Problem {
        line: Some(1),
        column: None,
        message: message.into(),
    }
}

/// A TOML syntax or shape error, located (other files parsed like the config use it too).
pub(crate) fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
    let message = e.message().trim().to_string();
    match e.span() {
        Some(span) => Locator { text }.at(span, message),
        None => at_top(message),
    }
}

pub(super) fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
    let loc = Locator { text };
    let fail = |problems| ConfigError {
        source: source.to_path_buf(),
        problems,
    };
    let mut file: raw::File = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => return Err(fail(vec![toml_problem(text, &e)])),
    };
    let single = file.model.take();
    let several = std::mem::take(&mut file.models);
    let (cluster, models) = match (file.cluster.take(), single, several.is_empty()) {
        (Some(_), Some(m), false) => {
            return Err(fail(vec![loc.at(
                m.span(),
                "both [model] and [[models]] are given: use one form. Several models are listed \
                 as [[models]] entries, e.g.\n  [[models]]\n  name = \"chat\"\n  path = \"/…/chat.gguf\"\n\n  \
                 [[models]]\n  name = \"coder\"\n  path = \"/…/coder.gguf\"\n(and [cluster] default_model = \"chat\")",
            )]))
        }
        (Some(c), Some(m), true) => (c, vec![m]),
        (Some(c), None, false) => (c, several),
        (c, m, no_list) => {
            let mut problems = Vec::new();
            if c.is_none() {
                problems.push(at_top(
                    "missing the [cluster] table: every config names its cluster and engine \
                     ([cluster] with name = \"…\" and engine = \"prima\" or \"llama-rpc\")",
                ));
            }
            if m.is_none() && no_list {
                problems.push(at_top(
                    "missing the [model] table: every config names its model \
                     ([model] with path = \"/…/model.gguf\", or one [[models]] entry per model)",
                ));
            }
            return Err(fail(problems));
        }
    };
    let mut problems = Vec::new();
    let config = build(file, cluster, models, &loc, source, &mut problems);
    if problems.is_empty() {
        Ok(config)
    } else {
        problems.sort_by_key(|p| (p.line.unwrap_or(0), p.column.unwrap_or(0)));
        Err(fail(problems))
    }
}

fn build(
    file: raw::File,
    cluster: Spanned<raw::ClusterSection>,
    models_raw: Vec<Spanned<raw::ModelSection>>,
    loc: &Locator,
    source: &Path,
    problems: &mut Vec<Problem>,
) -> Config {
    let cluster_span = cluster.span();
    let cluster = cluster.into_inner();
    let engine = cluster.engine;
    if cluster.name.get_ref().trim().is_empty() {
        problems.push(loc.at(cluster.name.span(), "cluster name must not be empty"));
    }
    if !cluster.state_dir.get_ref().is_absolute() {
        problems.push(loc.at(
            cluster.state_dir.span(),
            "state_dir must be an absolute path (ranks run with it as their working directory)",
        ));
    }

    // --- nodes -------------------------------------------------------------------------
    let mut nodes: Vec<Node> = Vec::new();
    let mut node_lines: Vec<Range<usize>> = Vec::new();
    let mut seen: BTreeMap<i64, Range<usize>> = BTreeMap::new();
    if file.nodes.is_empty() {
        problems.push(loc.at(
            cluster_span,
            "no [[node]] entries: list at least one machine (rank 0 is the head node)",
        ));
    }
    let mut model_dir_span: Option<Range<usize>> = None;
    for spanned in file.nodes {
        let span = spanned.span();
        let n = spanned.into_inner();
        let rank = *n.rank.get_ref();
        if let Some(first) = seen.get(&rank) {
            let first = loc.at(first.clone(), "");
            problems.push(loc.at(
                n.rank.span(),
                format!(
                    "rank {rank} is used twice (first at line {})",
                    first.line.unwrap_or(0)
                ),
            ));
            continue;
        }
        seen.insert(rank, n.rank.span());
        if rank < 0 {
            problems.push(loc.at(
                n.rank.span(),
                format!("rank {rank} is negative: ranks are 0..N-1"),
            ));
            continue;
        }
        let address: IpAddr = match n.address.get_ref().parse() {
            Ok(a) => a,
            Err(_) => {
                problems.push(loc.at(
                    n.address.span(),
                    format!(
                        "address `{}` is not an IP address: expected e.g. \"192.168.1.20\" \
                         (the ring and its firewall rules work on addresses, not host names)",
                        n.address.get_ref()
                    ),
                ));
                continue;
            }
        };
        if address.is_unspecified() {
            problems.push(loc.at(
                n.address.span(),
                "address 0.0.0.0 cannot be dialled by the other ranks: give the node's own address",
            ));
        }
        if *n.agent_port.get_ref() == 0 {
            problems.push(loc.at(
                n.agent_port.span(),
                "agent_port must be between 1 and 65535",
            ));
        }
        let gpu_mem = *n.gpu_mem.get_ref();
        if !(gpu_mem.is_finite() && gpu_mem >= 0.0) {
            problems.push(loc.at(
                n.gpu_mem.span(),
                "gpu_mem is GiB of GPU memory: expected a number >= 0 (0 = CPU only)",
            ));
        }
        if let Some(t) = &n.threads {
            if *t.get_ref() == 0 {
                problems.push(loc.at(
                    t.span(),
                    "threads must be at least 1 (omit it to let the engine decide)",
                ));
            }
        }
        if let Some(d) = &n.model_dir {
            model_dir_span.get_or_insert(d.span());
            if !d.get_ref().is_absolute() {
                problems.push(loc.at(
                    d.span(),
                    format!(
                        "model_dir `{}` is relative: expected an absolute directory (e.g. \"/var/lib/llm-cluster/models\")",
                        d.get_ref().display()
                    ),
                ));
            }
        }
        nodes.push(Node {
            rank: rank as u32,
            address,
            agent_port: *n.agent_port.get_ref(),
            gpu_mem,
            gpu_layers: n.gpu_layers,
            threads: n.threads.map(|t| t.into_inner()),
            engine_dir: n.engine_dir,
            model_dir: n.model_dir.map(Spanned::into_inner),
        });
        node_lines.push(span);
    }
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| nodes[i].rank);
    let nodes: Vec<Node> = order.iter().map(|&i| nodes[i].clone()).collect();
    let node_spans: Vec<Range<usize>> = order.iter().map(|&i| node_lines[i].clone()).collect();
    let world = seen.len();
    let missing: Vec<String> = (0..world as i64)
        .filter(|r| !seen.contains_key(r))
        .map(|r| r.to_string())
        .collect();
    if !missing.is_empty() {
        let message = format!(
            "ranks must be 0..{} without gaps ({} nodes); missing: {}",
            world.saturating_sub(1),
            world,
            missing.join(", ")
        );
        // A gap means some rank lies outside 0..world: point at the first such rank.
        let beyond = seen
            .range(world as i64..)
            .next()
            .or_else(|| seen.range(..0).next());
        problems.push(match beyond {
            Some((_, span)) => loc.at(span.clone(), message),
            None => Problem::general(message),
        });
    }

    // --- models ------------------------------------------------------------------------
    let head_has_gpu = nodes.first().is_some_and(|n| n.gpu_mem > 0.0);
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut models: Vec<Model> = Vec::new();
    for m in models_raw {
        let line = loc.at(m.span(), "").line.unwrap_or(0);
        let name_span = m.get_ref().name.as_ref().map(Spanned::span);
        let alias_spans: Vec<Range<usize>> =
            m.get_ref().aliases.iter().map(Spanned::span).collect();
        let model = build_model(m.into_inner(), engine, world, head_has_gpu, loc, problems);
        let mut claim = |n: &str, span: Range<usize>, problems: &mut Vec<Problem>| {
            if n.trim().is_empty() {
                problems.push(loc.at(span, "a model name or alias must not be empty"));
            } else if let Some(first) = names.get(n) {
                problems.push(loc.at(
                    span,
                    format!(
                        "model name `{n}` is used twice (first by the model at line {first}): \
                         every name and alias must name one model"
                    ),
                ));
            } else {
                names.insert(n.to_string(), line);
            }
        };
        claim(&model.name, name_span.unwrap_or(0..0), problems);
        for (alias, span) in model.aliases.iter().zip(alias_spans) {
            claim(alias, span, problems);
        }
        models.push(model);
    }
    // A node's model_dir holds every model by its file name: two models with one file name
    // would be one file there.
    if let Some(dir_span) = model_dir_span {
        let mut by_file: BTreeMap<std::ffi::OsString, &Model> = BTreeMap::new();
        for m in &models {
            let file = m
                .path
                .file_name()
                .map(|f| f.to_os_string())
                .unwrap_or_default();
            match by_file.get(&file) {
                Some(first) if first.path != m.path => problems.push(loc.at(
                    dir_span.clone(),
                    format!(
                        "models `{}` and `{}` have the same file name {}: a node's model_dir \
                         keeps every model under its file name, so give them different file names",
                        first.name,
                        m.name,
                        file.to_string_lossy()
                    ),
                )),
                Some(_) => {}
                None => {
                    by_file.insert(file, m);
                }
            }
        }
    }
    let default_model = match &cluster.default_model {
        Some(d) => match models.iter().position(|m| m.answers_to(d.get_ref())) {
            Some(i) => i,
            None => {
                let known: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
                problems.push(loc.at(
                    d.span(),
                    format!(
                        "default_model `{}` is not a configured model (configured: {})",
                        d.get_ref(),
                        known.join(", ")
                    ),
                ));
                0
            }
        },
        None => 0,
    };
    if let Some(i) = cluster.idle_unload_s.as_ref().filter(|i| *i.get_ref() == 0) {
        problems.push(loc.at(
            i.span(),
            "idle_unload_s must be at least 1 (omit it to keep the ring running when idle)",
        ));
    }
    // The gateway admits what every model's engine decodes at once, and reads bodies as large
    // as the largest context allows.
    let slots = models.iter().map(|m| m.slots).min().unwrap_or(1);
    let ctx_size = models.iter().map(|m| m.ctx_size).max().unwrap_or(1);

    // --- api, ports ----------------------------------------------------------------------
    let listen = *file.api.listen.get_ref();
    let api = &file.api;
    for (value, what, omitted) in [
        (&api.max_in_flight, "max_in_flight", "the engine's slots"),
        (&api.requests_per_minute, "requests_per_minute", "no limit"),
        (&api.tokens_per_minute, "tokens_per_minute", "no limit"),
    ] {
        if let Some(v) = value.as_ref().filter(|v| *v.get_ref() == 0) {
            problems.push(loc.at(
                v.span(),
                format!("{what} must be at least 1 (omit it for {omitted})"),
            ));
        }
    }
    if let Some(m) = &api.metrics_listen {
        let (m_addr, l) = (*m.get_ref(), listen);
        let overlap =
            m_addr.ip() == l.ip() || m_addr.ip().is_unspecified() || l.ip().is_unspecified();
        if overlap && m_addr.port() == l.port() {
            problems.push(loc.at(
                m.span(),
                format!("api.metrics_listen ({m_addr}) uses the port of api.listen ({l}): give the metrics their own port, or leave metrics_listen out to scrape /metrics on the API port with a key"),
            ));
        }
    }
    if *api.queue_timeout_s.get_ref() == 0 {
        problems.push(loc.at(
            api.queue_timeout_s.span(),
            "queue_timeout_s must be at least 1 (set queue_size = 0 for no queue)",
        ));
    }
    let a = &file.api;
    for (name, v) in [
        ("header_timeout_s", &a.header_timeout_s),
        ("body_timeout_s", &a.body_timeout_s),
        ("idle_timeout_s", &a.idle_timeout_s),
        ("max_connections", &a.max_connections),
        ("max_connections_per_client", &a.max_connections_per_client),
    ] {
        if *v.get_ref() == 0 {
            problems.push(loc.at(v.span(), format!("api.{name} must be at least 1")));
        }
    }
    let max_body_bytes = match &a.max_body_bytes {
        Some(b) if *b.get_ref() < 1024 => {
            problems.push(loc.at(
                b.span(),
                "api.max_body_bytes must be at least 1024 (a chat request is a few hundred bytes)",
            ));
            *b.get_ref()
        }
        Some(b) => *b.get_ref(),
        None => crate::coordinator::gateway::request::Rules::default_max_body(ctx_size),
    };
    let ports = Ports {
        data: *file.ports.data.get_ref(),
        signal: *file.ports.signal.get_ref(),
        rpc: *file.ports.rpc.get_ref(),
        server: *file.ports.server.get_ref(),
        relay_shift: 0,
    };
    let w = world as u32;
    for (name, p, span, span_needed) in [
        (
            "data",
            &file.ports.data,
            file.ports.data.span(),
            engine == EngineKind::Prima,
        ),
        (
            "signal",
            &file.ports.signal,
            file.ports.signal.span(),
            engine == EngineKind::Prima,
        ),
        (
            "rpc",
            &file.ports.rpc,
            file.ports.rpc.span(),
            engine == EngineKind::LlamaRpc,
        ),
        ("server", &file.ports.server, file.ports.server.span(), true),
    ] {
        let base = u32::from(*p.get_ref());
        if span_needed && (base == 0 || base + w > 65536) {
            problems.push(loc.at(
                span,
                format!("ports.{name} = {base} leaves no room for {w} ranks (base + rank must stay <= 65535)"),
            ));
        }
    }

    let tls = file.tls.map(|t| tls_section(t, loc, problems));
    if let Some(m) = file
        .delivery
        .max_mbit
        .as_ref()
        .filter(|m| *m.get_ref() == 0)
    {
        problems.push(loc.at(
            m.span(),
            "delivery.max_mbit must be at least 1 (omit it for no cap)",
        ));
    }
    let delivery = Delivery {
        enabled: file.delivery.enabled,
        max_mbit: file.delivery.max_mbit.map(Spanned::into_inner),
    };
    let config = Config {
        source: source.to_path_buf(),
        cluster: Cluster {
            name: cluster.name.into_inner(),
            engine,
            token_file: cluster.token_file,
            state_dir: cluster.state_dir.into_inner(),
            rank_user: cluster.rank_user,
        },
        models,
        loaded: default_model,
        switching: Switching {
            default_model,
            min_residency_s: *cluster.min_residency_s.get_ref(),
            idle_unload_s: cluster.idle_unload_s.map(Spanned::into_inner),
            switch_grace_s: *cluster.switch_grace_s.get_ref(),
        },
        api: Api {
            listen,
            max_in_flight: file
                .api
                .max_in_flight
                .map_or(slots, |m| m.into_inner().max(1)),
            queue_size: file.api.queue_size.into_inner(),
            queue_timeout_s: file.api.queue_timeout_s.into_inner(),
            requests_per_minute: file.api.requests_per_minute.map(Spanned::into_inner),
            tokens_per_minute: file.api.tokens_per_minute.map(Spanned::into_inner),
            header_timeout_s: *file.api.header_timeout_s.get_ref(),
            body_timeout_s: *file.api.body_timeout_s.get_ref(),
            idle_timeout_s: *file.api.idle_timeout_s.get_ref(),
            max_connections: usize::try_from(*file.api.max_connections.get_ref())
                .unwrap_or(usize::MAX),
            max_connections_per_client: usize::try_from(
                *file.api.max_connections_per_client.get_ref(),
            )
            .unwrap_or(usize::MAX),
            max_body_bytes,
            metrics_listen: file.api.metrics_listen.map(Spanned::into_inner),
            api_keys_file: file.api.api_keys_file,
        },
        ports,
        binaries: Binaries {
            prima_server: file.binaries.prima_server,
            prima_worker: file.binaries.prima_worker,
            llama_server: file.binaries.llama_server,
            rpc_server: file.binaries.rpc_server,
        },
        supervision: Supervision {
            ready_timeout_s: file.supervision.ready_timeout_s,
            backoff_initial_ms: file.supervision.backoff_initial_ms,
            backoff_max_ms: file
                .supervision
                .backoff_max_ms
                .max(file.supervision.backoff_initial_ms),
            node_timeout_s: file.supervision.node_timeout_s,
            stall_timeout_s: file.supervision.stall_timeout_s,
            probe_interval_s: file.supervision.probe_interval_s,
            restart_on_upgrade: file.supervision.restart_on_upgrade,
        },
        nodes,
        tls,
        delivery,
    };
    if missing.is_empty() {
        check_ports(&config, loc, &node_spans, problems);
    }
    config
}

/// One model entry, checked against the engine and the ring's shape.
fn build_model(
    m: raw::ModelSection,
    engine: EngineKind,
    world: usize,
    head_has_gpu: bool,
    loc: &Locator,
    problems: &mut Vec<Problem>,
) -> Model {
    if !m.path.get_ref().is_absolute() {
        problems.push(loc.at(
            m.path.span(),
            "model path must be absolute (every node resolves it on its own disk)",
        ));
    }
    let sha256 = m.sha256.map(|s| {
        let v = s.get_ref().to_ascii_lowercase();
        if v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
            problems.push(loc.at(s.span(), "sha256 must be 64 hexadecimal characters"));
        }
        v
    });
    if *m.ctx_size.get_ref() == 0 {
        problems.push(loc.at(m.ctx_size.span(), "ctx_size must be at least 1"));
    }
    let layer_windows = m.layer_windows.map(|w| {
        if engine != EngineKind::Prima {
            problems.push(loc.at(
                w.span(),
                "layer_windows apply to engine = \"prima\" only (llama-rpc uses tensor_split)",
            ));
        } else if w.get_ref().len() != world {
            problems.push(loc.at(
                w.span(),
                format!(
                    "layer_windows has {} entries but the cluster has {world} nodes: give one window per rank",
                    w.get_ref().len()
                ),
            ));
        } else if w.get_ref().contains(&0) {
            problems.push(loc.at(
                w.span(),
                "every layer window must be at least 1 (drop the node instead of giving it 0 layers)",
            ));
        }
        w.into_inner()
    });
    let tensor_split = m.tensor_split.map(|t| {
        let devices = world.saturating_sub(1) + usize::from(head_has_gpu);
        if engine != EngineKind::LlamaRpc {
            problems.push(loc.at(
                t.span(),
                "tensor_split applies to engine = \"llama-rpc\" only (prima uses layer_windows)",
            ));
        } else if t.get_ref().len() != devices {
            problems.push(loc.at(
                t.span(),
                format!(
                    "tensor_split has {} entries but llama-server will see {devices} devices \
                     (one per worker rank{}): give one proportion per device",
                    t.get_ref().len(),
                    if head_has_gpu {
                        ", then rank 0's own GPU"
                    } else {
                        "; rank 0 has gpu_mem = 0"
                    }
                ),
            ));
        } else if t.get_ref().iter().any(|v| !v.is_finite() || *v < 0.0)
            || t.get_ref().iter().all(|v| *v == 0.0)
        {
            problems.push(loc.at(
                t.span(),
                "tensor_split proportions must be >= 0 and not all 0",
            ));
        }
        t.into_inner()
    });
    let prefetch = match m.prefetch {
        Some(p) if engine != EngineKind::Prima => {
            problems.push(loc.at(p.span(), "prefetch applies to engine = \"prima\" only"));
            false
        }
        Some(p) => p.into_inner(),
        None => false,
    };
    let remember_placement = match m.remember_placement {
        Some(p) if engine != EngineKind::Prima => {
            problems.push(loc.at(
                p.span(),
                "remember_placement applies to engine = \"prima\" only",
            ));
            false
        }
        Some(p) => p.into_inner(),
        None => true,
    };
    let cache_idle_slots = match m.cache_idle_slots {
        Some(c) if engine != EngineKind::LlamaRpc => {
            problems.push(loc.at(
                c.span(),
                "cache_idle_slots applies to engine = \"llama-rpc\" only",
            ));
            false
        }
        Some(c) => c.into_inner(),
        None => false,
    };
    let slots = match m.slots {
        Some(s) if !(1..=MAX_SLOTS).contains(s.get_ref()) => {
            problems.push(loc.at(
                s.span(),
                format!(
                    "slots must be between 1 and {MAX_SLOTS} (requests the engine decodes at once)"
                ),
            ));
            engine.default_slots()
        }
        Some(s) => s.into_inner(),
        None => engine.default_slots(),
    };
    let rpc_cache = match m.rpc_cache {
        Some(c) if engine != EngineKind::LlamaRpc && *c.get_ref() => {
            problems.push(loc.at(
                c.span(),
                "rpc_cache applies to engine = \"llama-rpc\" only (the rpc servers' tensor cache)",
            ));
            false
        }
        Some(c) => c.into_inner(),
        None => engine == EngineKind::LlamaRpc,
    };
    let rpc_cache_max_bytes = m.rpc_cache_max_bytes.map(|b| {
        if engine != EngineKind::LlamaRpc || !rpc_cache {
            problems.push(loc.at(
                b.span(),
                "rpc_cache_max_bytes applies only with engine = \"llama-rpc\" and rpc_cache = true",
            ));
        } else if *b.get_ref() < crate::node::rpc_cache::MIN_MAX_BYTES {
            problems.push(loc.at(
                b.span(),
                format!(
                    "rpc_cache_max_bytes must be at least {} (one cached tensor is over 10 MiB); \
                     set rpc_cache = false for no cache",
                    crate::node::rpc_cache::MIN_MAX_BYTES
                ),
            ));
        }
        b.into_inner()
    });
    let path = m.path.into_inner();
    let name = m.name.map(Spanned::into_inner).unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });

    Model {
        path,
        name,
        aliases: m.aliases.into_iter().map(Spanned::into_inner).collect(),
        sha256,
        ctx_size: m.ctx_size.into_inner(),
        layer_windows,
        tensor_split,
        prefetch,
        remember_placement,
        slots,
        rpc_cache,
        rpc_cache_max_bytes,
        cache_idle_slots,
    }
}

/// `[tls]` with its defaults filled in; every path must be absolute (the agent runs from `/`
/// under systemd, so a relative path would name a file nobody meant).
fn tls_section(t: Spanned<raw::TlsSection>, loc: &Locator, problems: &mut Vec<Problem>) -> Tls {
    let t = t.into_inner();
    let mut absolute = |field: &str, p: &Spanned<PathBuf>| {
        if !p.get_ref().is_absolute() {
            problems.push(loc.at(
                p.span(),
                format!(
                    "tls.{field} must be an absolute path (got {})",
                    p.get_ref().display()
                ),
            ));
        }
        p.get_ref().clone()
    };
    let dir = t
        .dir
        .as_ref()
        .map(|d| absolute("dir", d))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PKI_DIR));
    let defaults = Tls::in_dir(&dir);
    let ca = t.ca.as_ref().map(|p| absolute("ca", p));
    let cert = t.cert.as_ref().map(|p| absolute("cert", p));
    let key = t.key.as_ref().map(|p| absolute("key", p));
    if let Some(ca) = &t.ca {
        if ca.get_ref().to_string_lossy().contains("{rank}") {
            problems.push(loc.at(
                ca.span(),
                "tls.ca is the same CA for every node: `{rank}` is only for tls.cert and tls.key",
            ));
        }
    }
    Tls {
        ca: ca.unwrap_or(defaults.ca),
        cert: cert.unwrap_or(defaults.cert),
        key: key.unwrap_or(defaults.key),
        dir,
    }
}

/// Every listening port the plan will use, per address, must be distinct: local clusters and
/// machines running two ranks share one address.
fn check_ports(
    config: &Config,
    loc: &Locator,
    node_spans: &[Range<usize>],
    problems: &mut Vec<Problem>,
) {
    let mut used: BTreeMap<(IpAddr, u16), String> = BTreeMap::new();
    let mut claim =
        |addr: IpAddr, port: u32, what: String, span: Range<usize>, problems: &mut Vec<Problem>| {
            let Ok(port) = u16::try_from(port) else {
                return;
            };
            if let Some(prev) = used.get(&(addr, port)) {
                problems.push(loc.at(
                    span,
                    format!("port {port} on {addr} is used twice: {prev} and {what}"),
                ));
            } else {
                used.insert((addr, port), what);
            }
        };
    for (node, span) in config.nodes.iter().zip(node_spans) {
        let r = node.rank;
        claim(
            node.address,
            node.agent_port.into(),
            format!("agent_port of rank {r}"),
            span.clone(),
            problems,
        );
        match config.cluster.engine {
            EngineKind::Prima => {
                claim(
                    node.address,
                    u32::from(config.ports.data) + r,
                    format!("prima data port of rank {r}"),
                    span.clone(),
                    problems,
                );
                claim(
                    node.address,
                    u32::from(config.ports.signal) + r,
                    format!("prima signal port of rank {r}"),
                    span.clone(),
                    problems,
                );
            }
            EngineKind::LlamaRpc if r > 0 => {
                claim(
                    node.address,
                    u32::from(config.ports.rpc) + r,
                    format!("rpc server port of rank {r}"),
                    span.clone(),
                    problems,
                );
            }
            EngineKind::LlamaRpc => {}
        }
        if r == 0 {
            claim(
                node.address,
                config.ports.server.into(),
                "rank 0's engine server port (ports.server)".into(),
                span.clone(),
                problems,
            );
            let listen = config.api.listen;
            if listen.ip().is_unspecified() || listen.ip() == node.address {
                claim(
                    node.address,
                    listen.port().into(),
                    "the API listen port".into(),
                    span.clone(),
                    problems,
                );
            }
            // The same port as api.listen is reported with the [api] checks.
            if let Some(m) = config
                .api
                .metrics_listen
                .filter(|m| m.port() != listen.port())
            {
                if m.ip().is_unspecified() || m.ip() == node.address {
                    claim(
                        node.address,
                        m.port().into(),
                        "the metrics listen port (api.metrics_listen)".into(),
                        span.clone(),
                        problems,
                    );
                }
            }
        }
    }
}

/// prima.cpp requires the model's layer count to be a multiple of the sum of the windows.
/// Checked once the GGUF can be read (at `check-config` when the model is present, and when the
/// coordinator plans the ring).
pub fn check_layer_total(windows: &[u32], n_layers: u32) -> Result<(), String> {
    let sum: u32 = windows.iter().sum();
    if sum == 0 || n_layers % sum != 0 {
        return Err(format!(
            "layer_windows sum to {sum}, but the model has {n_layers} layers: prima.cpp needs the \
             layer count to be a multiple of the sum (e.g. windows summing to {n_layers})"
        ));
    }
    Ok(())
}
