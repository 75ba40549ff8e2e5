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
