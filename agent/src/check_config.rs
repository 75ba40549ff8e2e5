//! `llm-agent check-config`: validates a config file and, on a machine that has it, the model
//! file it names.
//!
//! The config is shared by every node but the model is only on the nodes that load it (prima:
//! all; llama-rpc: rank 0), so a model path that does not exist here is a note, not an error.
//! A model path that exists but is not a readable GGUF (empty, cut off, a zip, a directory) is
//! an error: the engine would fail on it later, with a worse message. The API keys file (on
//! rank 0) is checked the same way: every problem with its place when it is here, a note when
//! it is not.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{self, Config, Model};
use crate::gguf::{self, ModelInfo};

pub fn run(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("{} problem(s) found", e.problems.len());
            return ExitCode::from(crate::exit::USAGE);
        }
    };
    // Every configured model is checked, so a typo in a model the ring switches to later
    // shows now, not at the switch.
    let mut described = Vec::new();
    let mut notes = Vec::new();
    let mut failed = 0;
    for model in &config.models {
        match check_model(&config, model) {
            Ok(Some(info)) => described.push(format!(
                "{} = {} ({}, {} layers)",
                model.name,
                model.path.display(),
                info.architecture,
                info.block_count
            )),
            Ok(None) => {
                described.push(format!("{} = {}", model.name, model.path.display()));
                notes.push(absent_note(&config, model));
            }
            Err(e) => {
                eprintln!("{e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} problem(s) found");
        return ExitCode::from(crate::exit::USAGE);
    }
    let model = described.join(", ");
    if let Some(keys) = &config.api.api_keys_file {
        match crate::coordinator::gateway::load_keys(keys, &model_names(&config)) {
            Ok(_) => {}
            Err(_) if !keys.exists() => notes.push(format!(
                "the API keys file {} is not on this machine (only rank 0 reads it); it was not checked",
                keys.display()
            )),
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{} problem(s) found", e.problems.len());
                return ExitCode::from(crate::exit::USAGE);
            }
        }
    }
    match check_tls(&config) {
        Ok(tls_notes) => notes.extend(tls_notes),
        Err(e) => {
            eprintln!("{e:#}");
            eprintln!("1 problem(s) found");
            return ExitCode::from(crate::exit::USAGE);
        }
    }
    if let Some(w) = crate::tls::plaintext_warning(&config) {
        eprintln!("warning: {w}");
    }
    println!(
        "{}: ok — cluster `{}`, engine {}, {} node(s), {} {model}",
        path.display(),
        config.cluster.name,
        config.cluster.engine,
        config.world(),
        if config.models.len() == 1 {
            "model"
        } else {
            "models"
        },
    );
    for n in notes {
        println!("note: {n}");
    }
    ExitCode::SUCCESS
}

/// Every name the gateway accepts for a configured model (keys may restrict to any of them).
pub fn model_names(config: &Config) -> Vec<String> {
    config
        .models
        .iter()
        .flat_map(|m| m.names().cloned())
        .collect()
}

/// Under `[tls]`, the files of every rank whose certificate is on this machine (a node holds
/// only its own; the machine that issues holds them all): each must parse, chain to the CA,
/// name the node's address and match its key. Notes for what is not here.
fn check_tls(config: &Config) -> anyhow::Result<Vec<String>> {
    let Some(tls) = &config.tls else {
        return Ok(Vec::new());
    };
    let mut notes = Vec::new();
    let mut checked = Vec::new();
    for node in &config.nodes {
        let cert = tls.cert(node.rank);
        if !cert.exists() && !tls.key(node.rank).exists() {
            continue;
        }
        let expiry = crate::tls::check_files(tls, node.rank, node.address)?;
        if let Some(w) =
            crate::tls::expiry_warning(&format!("rank{}'s certificate", node.rank), &expiry)
        {
            notes.push(w);
        }
        checked.push(format!(
            "rank{} ({} days left)",
            node.rank, expiry.days_left
        ));
    }
    if checked.is_empty() {
        if tls.ca.exists() {
            crate::tls::read_certs(&tls.ca, "tls.ca")?;
        }
        notes.push(format!(
            "[tls]: no node certificate is on this machine ({} for rank 0), so none was checked",
            tls.cert(0).display()
        ));
    } else {
        notes.push(format!(
            "[tls]: certificates checked against {}: {}",
            tls.ca.display(),
            checked.join(", ")
        ));
    }
    Ok(notes)
}

/// The model's header when the file is here; None when this machine has no such path.
fn check_model(config: &Config, model: &Model) -> Result<Option<ModelInfo>, String> {
    let path = &model.path;
    if let Err(e) = std::fs::metadata(path) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(None);
        }
    }
    let info = gguf::read_info(path).map_err(|e| format!("{e:#}"))?;
    if let Some(windows) = &model.layer_windows {
        config::check_layer_total(windows, info.block_count)
            .map_err(|e| format!("{}: model `{}`: {e}", config.source.display(), model.name))?;
    }
    Ok(Some(info))
}

fn absent_note(config: &Config, model: &Model) -> String {
    let needed_by = match config.cluster.engine {
        config::EngineKind::Prima => "with prima every node needs the model",
        config::EngineKind::LlamaRpc => "with llama-rpc only rank 0 needs the model",
    };
    let unchecked = if model.layer_windows.is_some() {
        "; layer_windows were not checked against its layer count"
    } else {
        ""
    };
    let delivered = if config.delivery.enabled {
        "; a node that lacks it gets it from a node that has it ([delivery])"
    } else {
        ""
    };
    format!(
        "model {} is not on this machine, so it was not checked (the config is shared across \
         nodes; {needed_by}{delivered}){unchecked}",
        model.path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(model: &Path, windows: Option<&str>) -> Config {
        let text = format!(
            "[cluster]\nname = \"lab\"\nengine = \"prima\"\n[model]\npath = \"{}\"\n{}\
             [[node]]\nrank = 0\naddress = \"127.0.0.1\"\n",
            model.display(),
            windows
                .map(|w| format!("layer_windows = {w}\n"))
                .unwrap_or_default()
        );
        Config::parse(&text, Path::new("c.toml")).expect("valid config")
    }

    #[test]
    fn tls_files_are_checked_for_the_ranks_that_are_here() {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            "[cluster]\nname = \"lab\"\nengine = \"prima\"\n[model]\npath = \"/m.gguf\"\n\
             [tls]\ndir = \"{}\"\n[[node]]\nrank = 0\naddress = \"10.0.0.1\"\n\
             [[node]]\nrank = 1\naddress = \"10.0.0.2\"\n",
            dir.path().display()
        );
        let c = Config::parse(&text, Path::new("c.toml")).expect("valid config");
        let tls = c.tls.clone().expect("[tls]");
        let notes = check_tls(&c).expect("nothing here yet");
        assert!(
            notes[0].contains("no node certificate is on this machine"),
            "{notes:?}"
        );
        crate::tls::init_ca(&tls, "lab").expect("init");
        // Rank 1's certificate made for rank 0's address: the SAN does not cover 10.0.0.2.
        crate::tls::issue(&tls, "lab", 1, &["10.0.0.1".into()], 30, false).expect("issue");
        let e = format!("{:#}", check_tls(&c).expect_err("wrong address"));
        assert!(
            e.starts_with(&format!("tls.cert {}", tls.cert(1).display()))
                && e.contains("not valid for name \"10.0.0.2\""),
            "{e}"
        );
        crate::tls::issue(&tls, "lab", 1, &["10.0.0.2".into()], 20, true).expect("reissue");
        let notes = check_tls(&c).expect("valid");
        assert!(notes[0].contains("expires in"), "{notes:?}");
        assert!(notes[1].contains("rank1 ("), "{notes:?}");
        std::fs::remove_file(tls.key(1)).expect("remove key");
        let e = format!("{:#}", check_tls(&c).expect_err("no key"));
        assert!(
            e.contains(&format!("cannot read tls.key {}", tls.key(1).display())),
            "{e}"
        );
    }

    #[test]
    fn a_model_that_is_not_here_is_a_note() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = config(&dir.path().join("elsewhere.gguf"), Some("[30]"));
        assert_eq!(check_model(&c, c.model()), Ok(None));
        let note = absent_note(&c, c.model());
        assert!(note.contains("is not on this machine"), "{note}");
        assert!(
            note.contains("with prima every node needs the model"),
            "{note}"
        );
        assert!(note.contains("layer_windows were not checked"), "{note}");
    }

    #[test]
    fn a_model_that_is_here_but_broken_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"").expect("write");
        let c = config(&model, None);
        let e = check_model(&c, c.model()).expect_err("empty model");
        assert_eq!(e, format!("model {}: is empty (0 bytes)", model.display()));
        let c = config(dir.path(), None);
        let e = check_model(&c, c.model()).expect_err("directory");
        assert!(e.ends_with(": is a directory, not a GGUF file"), "{e}");
    }
}
