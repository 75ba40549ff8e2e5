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

use crate::config::{self, Config};
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
    let (model, notes) = match check_model(&config) {
        Ok(Some(info)) => (
            format!(
                "{} ({}, {} layers)",
                config.model.path.display(),
                info.architecture,
                info.block_count
            ),
            Vec::new(),
        ),
        Ok(None) => (
            config.model.path.display().to_string(),
            vec![absent_note(&config)],
        ),
        Err(e) => {
            eprintln!("{e}");
            eprintln!("1 problem(s) found");
            return ExitCode::from(crate::exit::USAGE);
        }
    };
    let mut notes = notes;
    if let Some(keys) = &config.api.api_keys_file {
        match crate::coordinator::gateway::load_keys(keys, std::slice::from_ref(&config.model.name)) {
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
        "{}: ok — cluster `{}`, engine {}, {} node(s), model {model}",
        path.display(),
        config.cluster.name,
        config.cluster.engine,
        config.world(),
    );
    for n in notes {
        println!("note: {n}");
    }
    ExitCode::SUCCESS
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
fn check_model(config: &Config) -> Result<Option<ModelInfo>, String> {
    let path = &config.model.path;
    if let Err(e) = std::fs::metadata(path) {
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(None);
        }
    }
    let info = gguf::read_info(path).map_err(|e| format!("{e:#}"))?;
    if let Some(windows) = &config.model.layer_windows {
        config::check_layer_total(windows, info.block_count)
            .map_err(|e| format!("{}: {e}", config.source.display()))?;
    }
    Ok(Some(info))
}

fn absent_note(config: &Config) -> String {
    let needed_by = match config.cluster.engine {
        config::EngineKind::Prima => "with prima every node needs the model",
        config::EngineKind::LlamaRpc => "with llama-rpc only rank 0 needs the model",
    };
    let unchecked = if config.model.layer_windows.is_some() {
        "; layer_windows were not checked against its layer count"
    } else {
        ""
    };
    format!(
        "model {} is not on this machine, so it was not checked (the config is shared across \
         nodes; {needed_by}){unchecked}",
        config.model.path.display()
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
        assert_eq!(check_model(&c), Ok(None));
        let note = absent_note(&c);
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
        let e = check_model(&config(&model, None)).expect_err("empty model");
        assert_eq!(e, format!("model {}: is empty (0 bytes)", model.display()));
        let e = check_model(&config(dir.path(), None)).expect_err("directory");
        assert!(e.ends_with(": is a directory, not a GGUF file"), "{e}");
    }
}
