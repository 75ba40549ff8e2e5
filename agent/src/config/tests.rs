use super::*;
use std::path::Path;

const GOOD: &str = r#"
[cluster]
name = "homelab"
engine = "prima"

[model]
path = "/models/m.gguf"
layer_windows = [10, 10, 10]

[[node]]
rank = 0
address = "192.168.1.10"

[[node]]
rank = 2
address = "192.168.1.12"
threads = 8

[[node]]
rank = 1
address = "192.168.1.11"
gpu_mem = 10
"#;

fn problems(text: &str) -> Vec<String> {
    match Config::parse(text, Path::new("c.toml")) {
        Ok(_) => vec![],
        Err(e) => e.to_string().lines().map(str::to_string).collect(),
    }
}

#[test]
fn good_config_is_sorted_by_rank_with_defaults() {
    let c = Config::parse(GOOD, Path::new("c.toml")).expect("valid");
    let ranks: Vec<u32> = c.nodes.iter().map(|n| n.rank).collect();
    assert_eq!(ranks, [0, 1, 2]);
    assert_eq!(c.nodes[1].gpu_mem, 10.0);
    assert_eq!(c.nodes[2].threads, Some(8));
    assert_eq!(c.ports.data, 9000);
    assert_eq!(c.api.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.model().name, "m");
    assert_eq!(c.binaries.prima_server, "prima-server");
    assert_eq!(c.cluster.token_file, Path::new("/etc/llm-cluster/token"));
}

#[test]
fn unknown_key_names_line_and_column() {
    let text = GOOD.replace("threads = 8", "thread = 8");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("c.toml:17:1: unknown field `thread`"),
        "{}",
        p[0]
    );
    assert!(p[0].contains("expected one of"), "{}", p[0]);
}

#[test]
fn syntax_error_is_located() {
    let p = problems("[cluster]\nname = \"x\nengine = \"prima\"\n");
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("c.toml:2:"), "{}", p[0]);
}

#[test]
fn wrong_type_is_located_and_explained() {
    let p = problems(&GOOD.replace("gpu_mem = 10", "gpu_mem = \"lots\""));
    assert!(p[0].starts_with("c.toml:22:"), "{:?}", p);
    assert!(p[0].contains("invalid type"), "{:?}", p);
}

#[test]
fn all_semantic_problems_are_reported_at_once() {
    let text = r#"
[cluster]
name = "x"
engine = "prima"
[model]
path = "relative.gguf"
layer_windows = [10, 0]
tensor_split = [1.0]
[[node]]
rank = 0
address = "pi.local"
[[node]]
rank = 0
address = "10.0.0.2"
[[node]]
rank = 3
address = "10.0.0.3"
"#;
    let p = problems(text);
    let all = p.join("\n");
    assert!(
        all.contains("c.toml:6:8: model path must be absolute"),
        "{all}"
    );
    // Two distinct ranks (0 and 3), so two windows are the right count; the 0 is what is wrong.
    assert!(
        all.contains("c.toml:7:17: every layer window must be at least 1"),
        "{all}"
    );
    assert!(
        all.contains("c.toml:8:16: tensor_split applies to engine = \"llama-rpc\" only"),
        "{all}"
    );
    assert!(
        all.contains("c.toml:11:11: address `pi.local` is not an IP address"),
        "{all}"
    );
    assert!(
        all.contains("c.toml:13:8: rank 0 is used twice (first at line 10)"),
        "{all}"
    );
    assert!(all.contains("missing: 1"), "{all}");
    assert_eq!(p.len(), 6, "one problem per mistake: {all}");
}

#[test]
fn windows_must_match_world_and_be_positive() {
    let p = problems(&GOOD.replace("[10, 10, 10]", "[15, 15]"));
    assert!(
        p.iter()
            .any(|l| l
                .contains("c.toml:8:17: layer_windows has 2 entries but the cluster has 3 nodes")),
        "{p:?}"
    );
    let p = problems(&GOOD.replace("[10, 10, 10]", "[10, 0, 20]"));
    assert!(p.iter().any(|l| l.contains("at least 1")), "{p:?}");
}

#[test]
fn port_collisions_on_a_shared_address() {
    let text = r#"
[cluster]
name = "x"
engine = "prima"
[model]
path = "/m.gguf"
[[node]]
rank = 0
address = "127.0.0.1"
agent_port = 7700
[[node]]
rank = 1
address = "127.0.0.1"
agent_port = 9000
"#;
    let p = problems(text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("c.toml:11:1: port 9000 on 127.0.0.1 is used twice: prima data port of rank 0 and agent_port of rank 1"), "{p:?}");
}

#[test]
fn same_agent_port_on_different_addresses_is_fine() {
    assert!(problems(GOOD).is_empty());
}

#[test]
fn tensor_split_counts_devices_llama_server_sees() {
    let base = r#"
[cluster]
name = "x"
engine = "llama-rpc"
[model]
path = "/m.gguf"
tensor_split = SPLIT
[[node]]
rank = 0
address = "10.0.0.1"
GPU
[[node]]
rank = 1
address = "10.0.0.2"
[[node]]
rank = 2
address = "10.0.0.3"
"#;
    assert!(problems(&base.replace("SPLIT", "[1, 1]").replace("GPU", "")).is_empty());
    assert!(problems(
        &base
            .replace("SPLIT", "[1, 1, 2]")
            .replace("GPU", "gpu_mem = 12")
    )
    .is_empty());
    let p = problems(&base.replace("SPLIT", "[1, 1, 2]").replace("GPU", ""));
    assert!(
        p[0].contains("tensor_split has 3 entries but llama-server will see 2 devices"),
        "{p:?}"
    );
    let p = problems(&base.replace("SPLIT", "[0, 0]").replace("GPU", ""));
    assert!(p[0].contains("not all 0"), "{p:?}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let e = Config::load(Path::new("/nonexistent/cluster.toml")).expect_err("missing");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/cluster.toml: cannot read the file"),
        "{e}"
    );
}

#[test]
fn the_shipped_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/cluster.example.toml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.world() >= 2);
}

#[test]
fn layer_total_rule() {
    assert!(check_layer_total(&[10, 10, 10], 30).is_ok());
    assert!(check_layer_total(&[5, 5, 5], 30).is_ok());
    assert!(check_layer_total(&[16, 16], 30).is_err());
}

fn load_bytes(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, bytes).expect("write config");
    let e = Config::load(&path).expect_err("must be refused");
    e.to_string()
        .strip_prefix(&*dir.path().to_string_lossy())
        .map(|rest| format!("DIR{rest}"))
        .unwrap_or_else(|| e.to_string())
}

#[test]
fn invalid_utf8_names_line_and_column_of_the_first_bad_byte() {
    let e = load_bytes(b"[cluster]\nname = \"ab\xffc\"\nengine = \"prima\"\n");
    assert!(e.starts_with("DIR/c.toml:2:11: not valid UTF-8"), "{e}");
    assert!(e.contains("0xff"), "{e}");
}

#[test]
fn columns_count_characters_not_bytes() {
    // `é` is two bytes; the bad byte is the 11th character (12th byte) of line 2.
    let e = load_bytes(b"[cluster]\nname = \"a\xc3\xa9\xff\"\n");
    assert!(e.starts_with("DIR/c.toml:2:11: not valid UTF-8"), "{e}");
}

#[test]
fn missing_cluster_table_is_located() {
    let p = problems("[model]\npath = \"/m.gguf\"\n[[node]]\nrank = 0\naddress = \"10.0.0.1\"\n");
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("c.toml:1: missing the [cluster] table"),
        "{p:?}"
    );
}

#[test]
fn missing_model_table_is_located() {
    let p = problems(
        "[cluster]\nname = \"x\"\nengine = \"prima\"\n[[node]]\nrank = 0\naddress = \"10.0.0.1\"\n",
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("c.toml:1: missing the [model] table"),
        "{p:?}"
    );
}

#[test]
fn an_empty_file_names_both_missing_tables() {
    let p = problems("");
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("c.toml:1: missing the [cluster] table"),
        "{p:?}"
    );
    assert!(
        p[1].starts_with("c.toml:1: missing the [model] table"),
        "{p:?}"
    );
}

#[test]
fn a_section_of_the_wrong_type_says_what_was_expected() {
    let p = problems("cluster = 3\n[model]\npath = \"/m.gguf\"\n");
    assert!(p[0].contains("expected a [cluster] table"), "{p:?}");
}

#[test]
fn a_gap_in_the_ranks_points_at_the_rank_beyond_it() {
    let p = problems(&GOOD.replace("rank = 2", "rank = 3"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("c.toml:15:8: ranks must be 0..2 without gaps (3 nodes); missing: 2"),
        "{p:?}"
    );
}

#[test]
fn admission_defaults_follow_the_engines_slots() {
    let c = Config::parse(GOOD, Path::new("c.toml")).expect("valid");
    assert_eq!(
        (c.model().slots, c.api.max_in_flight),
        (1, 1),
        "prima: one slot"
    );
    assert_eq!((c.api.queue_size, c.api.queue_timeout_s), (64, 30));
    assert_eq!(c.api.requests_per_minute, None);
    let rpc = "[cluster]\nname = \"l\"\nengine = \"llama-rpc\"\n[model]\npath = \"/m.gguf\"\n\
               [[node]]\nrank = 0\naddress = \"10.0.0.1\"\n";
    let c = Config::parse(rpc, Path::new("c.toml")).expect("valid");
    assert_eq!(
        (c.model().slots, c.api.max_in_flight),
        (4, 4),
        "llama-server's own default"
    );
    let text = rpc.replace(
        "[[node]]",
        "slots = 2\n[api]\nmax_in_flight = 3\nqueue_size = 0\nrequests_per_minute = 600\n[[node]]",
    );
    let c = Config::parse(&text, Path::new("c.toml")).expect("valid");
    assert_eq!(
        (c.model().slots, c.api.max_in_flight, c.api.queue_size),
        (2, 3, 0)
    );
    assert_eq!(c.api.requests_per_minute, Some(600));
}

#[test]
fn idle_slots_are_not_cached_unless_asked_and_only_on_llama_rpc() {
    let rpc = "[cluster]\nname = \"l\"\nengine = \"llama-rpc\"\n[model]\npath = \"/m.gguf\"\n\
               [[node]]\nrank = 0\naddress = \"10.0.0.1\"\n";
    let c = Config::parse(rpc, Path::new("c.toml")).expect("valid");
    assert!(!c.model().cache_idle_slots);
    let asked = rpc.replace("[[node]]", "cache_idle_slots = true\n[[node]]");
    let c = Config::parse(&asked, Path::new("c.toml")).expect("valid");
    assert!(c.model().cache_idle_slots);
    let p = problems(&GOOD.replace(
        "layer_windows = [10, 10, 10]",
        "layer_windows = [10, 10, 10]\ncache_idle_slots = true",
    ));
    assert!(
        p.iter().any(|l| l
            .starts_with("c.toml:9:20: cache_idle_slots applies to engine = \"llama-rpc\" only")),
        "{p:?}"
    );
}

#[test]
fn admission_settings_of_zero_are_located() {
    let text = GOOD.replace(
        "layer_windows = [10, 10, 10]",
        "layer_windows = [10, 10, 10]\nslots = 0\n[api]\nmax_in_flight = 0\nqueue_timeout_s = 0\ntokens_per_minute = 0",
    );
    let p = problems(&text);
    for want in [
        "c.toml:9:9: slots must be between 1 and 256",
        "c.toml:11:17: max_in_flight must be at least 1 (omit it for the engine's slots)",
        "c.toml:12:19: queue_timeout_s must be at least 1",
        "c.toml:13:21: tokens_per_minute must be at least 1 (omit it for no limit)",
    ] {
        assert!(
            p.iter().any(|l| l.starts_with(want)),
            "missing {want:?} in {p:#?}"
        );
    }
}

#[test]
fn api_limits_default_from_the_context_and_zero_is_refused_where_it_is_written() {
    let c = Config::parse(GOOD, Path::new("c.toml")).expect("valid");
    assert_eq!(
        (
            c.api.header_timeout_s,
            c.api.body_timeout_s,
            c.api.idle_timeout_s
        ),
        (10, 30, 60)
    );
    assert_eq!(
        (c.api.max_connections, c.api.max_connections_per_client),
        (4096, 256)
    );
    // ctx_size 4096 by default: 4096 tokens of at most 128 bytes each is below the floor.
    assert_eq!(c.api.max_body_bytes, 1 << 20);
    let big = GOOD.replace(
        "layer_windows",
        "ctx_size = 32768
layer_windows",
    );
    let c = Config::parse(&big, Path::new("c.toml")).expect("valid");
    assert_eq!(c.api.max_body_bytes, 32768 * 128);
    let text = GOOD.replace(
        "[[node]]\nrank = 0",
        "[api]\nheader_timeout_s = 0\nmax_body_bytes = 10\n\n[[node]]\nrank = 0",
    );
    let p = problems(&text);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("c.toml:11:20: api.header_timeout_s must be at least 1"),
        "{}",
        p[0]
    );
    assert!(
        p[1].contains("api.max_body_bytes must be at least 1024"),
        "{}",
        p[1]
    );
    let text = GOOD.replace(
        "[[node]]\nrank = 0",
        "[api]\nmax_body_bytes = 4096\n\n[[node]]\nrank = 0",
    );
    let c = Config::parse(&text, Path::new("c.toml")).expect("valid");
    assert_eq!(c.api.max_body_bytes, 4096);
}

const TWO_MODELS: &str = r#"
[cluster]
name = "homelab"
engine = "llama-rpc"
default_model = "coder"
min_residency_s = 5
idle_unload_s = 600

[[models]]
name = "chat"
path = "/models/chat.gguf"
aliases = ["gpt-4o"]
ctx_size = 2048
slots = 2

[[models]]
name = "coder"
path = "/models/coder.gguf"
tensor_split = [1]

[[node]]
rank = 0
address = "192.168.1.10"

[[node]]
rank = 1
address = "192.168.1.11"
"#;

#[test]
fn several_models_with_names_aliases_and_a_default() {
    let c = Config::parse(TWO_MODELS, Path::new("c.toml")).expect("valid");
    let names: Vec<&str> = c.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["chat", "coder"]);
    assert_eq!(
        c.model().name,
        "coder",
        "the default model is the one loaded"
    );
    assert_eq!(c.find_model("gpt-4o"), Some(0));
    assert_eq!(c.find_model("coder"), Some(1));
    assert_eq!(c.find_model("other"), None);
    assert_eq!(c.with_loaded(0).model().name, "chat");
    assert_eq!(c.models[1].tensor_split, Some(vec![1.0]));
    assert_eq!(
        (c.switching.min_residency_s, c.switching.idle_unload_s),
        (5, Some(600))
    );
    assert_eq!(c.switching.switch_grace_s, 30);
    // Admission fits the model with the fewest slots; bodies the largest context.
    assert_eq!(c.api.max_in_flight, 2);
}

#[test]
fn the_single_model_form_is_one_model_named_from_its_file() {
    let c = Config::parse(GOOD, Path::new("c.toml")).expect("valid");
    assert_eq!(c.models.len(), 1);
    assert_eq!(c.model().name, "m");
    assert_eq!(c.switching.default_model, 0);
    assert_eq!(c.switching.idle_unload_s, None);
}

#[test]
fn mixing_both_forms_is_refused_with_the_new_form_shown() {
    let text = TWO_MODELS.replace(
        "[[models]]\nname = \"chat\"",
        "[model]\npath = \"/models/x.gguf\"\n\n[[models]]\nname = \"chat\"",
    );
    let p = problems(&text);
    assert!(!p.is_empty());
    let all = p.join("\n");
    assert!(
        all.starts_with("c.toml:9:1: both [model] and [[models]]"),
        "{all}"
    );
    assert!(all.contains("[[models]]\n  name = \"chat\""), "{all}");
}

#[test]
fn every_model_is_validated_where_it_is_written() {
    let text = TWO_MODELS
        .replace("path = \"/models/chat.gguf\"", "path = \"chat.gguf\"")
        .replace(
            "tensor_split = [1]",
            "tensor_split = [1, 2]\nsha256 = \"xyz\"",
        );
    let p = problems(&text);
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(
        p[0].starts_with("c.toml:11:8: model path must be absolute"),
        "{}",
        p[0]
    );
    assert!(
        p[1].starts_with("c.toml:19:16: tensor_split has 2 entries"),
        "{}",
        p[1]
    );
    assert!(
        p[2].starts_with("c.toml:20:10: sha256 must be 64"),
        "{}",
        p[2]
    );
}

#[test]
fn model_names_are_unique_and_the_default_must_exist() {
    let text = TWO_MODELS
        .replace("name = \"coder\"", "name = \"gpt-4o\"")
        .replace("default_model = \"coder\"", "default_model = \"nope\"");
    let p = problems(&text);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("c.toml:5:17: default_model `nope` is not a configured model (configured: chat, gpt-4o)"),
        "{}",
        p[0]
    );
    assert!(
        p[1].starts_with(
            "c.toml:17:8: model name `gpt-4o` is used twice (first by the model at line 9)"
        ),
        "{}",
        p[1]
    );
    let p = problems(&TWO_MODELS.replace("idle_unload_s = 600", "idle_unload_s = 0"));
    assert!(
        p[0].starts_with("c.toml:7:17: idle_unload_s must be at least 1"),
        "{p:?}"
    );
}

#[test]
fn tls_is_off_without_the_section_and_defaults_per_rank_with_it() {
    let c = Config::parse(GOOD, Path::new("c.toml")).expect("valid");
    assert_eq!(c.tls, None);
    let c = Config::parse(&format!("{GOOD}\n[tls]\n"), Path::new("c.toml")).expect("valid");
    let tls = c.tls.expect("[tls]");
    assert_eq!(tls.ca, Path::new("/etc/llm-cluster/pki/ca.crt"));
    assert_eq!(tls.cert(2), Path::new("/etc/llm-cluster/pki/rank2.crt"));
    assert_eq!(tls.key(1), Path::new("/etc/llm-cluster/pki/rank1.key"));
    assert_eq!(tls.ca_key(), Path::new("/etc/llm-cluster/pki/ca.key"));
    let c = Config::parse(
        &format!("{GOOD}\n[tls]\ndir = \"/srv/pki\"\ncert = \"/srv/node-{{rank}}.pem\"\n"),
        Path::new("c.toml"),
    )
    .expect("valid");
    let tls = c.tls.expect("[tls]");
    assert_eq!(tls.ca, Path::new("/srv/pki/ca.crt"));
    assert_eq!(tls.cert(1), Path::new("/srv/node-1.pem"));
    assert_eq!(tls.key(1), Path::new("/srv/pki/rank1.key"));
}

#[test]
fn tls_paths_must_be_absolute_and_the_ca_is_one_for_all() {
    let p = problems(&format!(
        "{GOOD}\n[tls]\nkey = \"keys/{{rank}}.key\"\nca = \"/pki/ca-{{rank}}.crt\"\nkeyfile = \"x\"\n"
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("unknown field `keyfile`"), "{p:?}");
    let p = problems(&format!(
        "{GOOD}\n[tls]\nkey = \"keys/{{rank}}.key\"\nca = \"/pki/ca-{{rank}}.crt\"\n"
    ));
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].contains(":25:7: tls.key must be an absolute path (got keys/{rank}.key)"),
        "{p:?}"
    );
    assert!(
        p[1].contains(":26:6: tls.ca is the same CA for every node"),
        "{p:?}"
    );
}

#[test]
fn metrics_listen_is_optional_and_needs_its_own_port() {
    let c = Config::parse(GOOD, Path::new("c.toml")).expect("valid");
    assert_eq!(c.api.metrics_listen, None);
    let with = |m: &str| {
        GOOD.replacen(
            "[model]",
            &format!("[api]\nmetrics_listen = \"{m}\"\n\n[model]"),
            1,
        )
    };
    let c = Config::parse(&with("127.0.0.1:9464"), Path::new("c.toml")).expect("valid");
    assert_eq!(
        c.api.metrics_listen,
        Some("127.0.0.1:9464".parse().expect("addr"))
    );
    let p = problems(&with("127.0.0.1:8080"));
    assert!(
        p.iter().any(|l| l.contains("c.toml:")
            && l.contains("api.metrics_listen (127.0.0.1:8080) uses the port of api.listen")),
        "{p:?}"
    );
}

#[test]
fn the_rpc_cache_is_on_for_llama_rpc_and_checked_where_it_does_not_apply() {
    let rpc = "[cluster]\nname = \"l\"\nengine = \"llama-rpc\"\n[model]\npath = \"/m.gguf\"\n\
               [[node]]\nrank = 0\naddress = \"10.0.0.1\"\n";
    let c = Config::parse(rpc, Path::new("c.toml")).expect("valid");
    assert_eq!(
        (c.model().rpc_cache, c.model().rpc_cache_max_bytes),
        (true, None)
    );
    let c = Config::parse(
        &rpc.replace("[[node]]", "rpc_cache_max_bytes = 1073741824\n[[node]]"),
        Path::new("c.toml"),
    )
    .expect("valid");
    assert_eq!(c.model().rpc_cache_max_bytes, Some(1 << 30));
    let c = Config::parse(
        &rpc.replace("[[node]]", "rpc_cache = false\n[[node]]"),
        Path::new("c.toml"),
    )
    .expect("valid");
    assert!(!c.model().rpc_cache);
    let p = problems(&rpc.replace("[[node]]", "rpc_cache_max_bytes = 1000\n[[node]]"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("c.toml:6:23: rpc_cache_max_bytes must be at least 20971520"),
        "{p:?}"
    );
    let p = problems(&rpc.replace(
        "[[node]]",
        "rpc_cache = false\nrpc_cache_max_bytes = 1073741824\n[[node]]",
    ));
    assert!(
        p[0].starts_with("c.toml:7:23: rpc_cache_max_bytes applies only with"),
        "{p:?}"
    );
    // prima has no rpc servers: off by default, and asking for it is a mistake.
    let c = Config::parse(GOOD, Path::new("c.toml")).expect("valid");
    assert!(!c.model().rpc_cache);
    let p = problems(&GOOD.replace("[model]\n", "[model]\nrpc_cache = true\n"));
    assert!(
        p.iter()
            .any(|p| p.contains("rpc_cache applies to engine = \"llama-rpc\" only")),
        "{p:?}"
    );
}
