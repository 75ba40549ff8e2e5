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
        .flat_map(|m| std::iter::once(m.name.clone()).chain(m.aliases.iter().cloned()))
        .collect()
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
    format!(
        "model {} is not on this machine, so it was not checked (the config is shared across \
         nodes; {needed_by}){unchecked}",
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
