//! Sticky placement for prima.cpp: where Halda put the layers when the ring last served, kept in
//! the state dir. Halda re-profiles every start (~20 s) and may place differently each time —
//! re-profiling after a failure has dropped every worker, after which rank 0 asserted. So once a
//! Halda ring has served, its placement is passed as explicit windows on the next starts of the
//! same model on the same nodes; `llm-agent forget-placement` (or `remember_placement = false`)
//! makes the next start profile again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, EngineKind};
use crate::proto::{Placement, PlacementSource};

/// The placement file in a state dir.
pub fn file(state_dir: &Path) -> PathBuf {
    state_dir.join("placement.json")
}

/// What a remembered placement was made for: it applies only to the same model file on the same
/// nodes, in the same order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Key {
    model: PathBuf,
    model_size: u64,
    model_mtime: (i64, i64),
    nodes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    key: Key,
    placement: Placement,
}

fn key(config: &Config) -> Option<Key> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(config.model_path(0, config.model())).ok()?;
    Some(Key {
        model: config.model().path.clone(),
        model_size: meta.size(),
        model_mtime: (meta.mtime(), meta.mtime_nsec()),
        nodes: config
            .nodes
            .iter()
            .map(|n| format!("{}:{}", n.address, n.agent_port))
            .collect(),
    })
}

pub use crate::plan::halda_places;

/// Where the next ring's placement comes from, and the remembered placement if that is it.
pub fn source(config: &Config) -> (Option<PlacementSource>, Option<Placement>) {
    if config.cluster.engine != EngineKind::Prima {
        return (None, None);
    }
    if config.model().layer_windows.is_some() {
        return (Some(PlacementSource::Config), None);
    }
    match load(config) {
        Some(p) => (Some(PlacementSource::Remembered), Some(p)),
        None => (Some(PlacementSource::Halda), None),
    }
}

/// The remembered placement for this model and node set, if there is one and it is wanted.
pub fn load(config: &Config) -> Option<Placement> {
    if !halda_places(config) || !config.model().remember_placement {
        return None;
    }
    let path = file(&config.cluster.state_dir);
    let bytes = std::fs::read(&path).ok()?;
    let stored: Stored = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable placement file");
            return None;
        }
    };
    if Some(&stored.key) != key(config).as_ref() {
        tracing::info!(file = %path.display(), "the remembered placement is for another model or node set; Halda will place anew");
        return None;
    }
    Some(stored.placement)
}

/// Keeps `placement` for later starts of this model on these nodes.
pub fn save(config: &Config, placement: &Placement) -> std::io::Result<()> {
    let Some(key) = key(config) else {
        return Err(std::io::Error::other(format!(
            "cannot read the model file {}",
            config.model().path.display()
        )));
    };
    let stored = Stored {
        key,
        placement: placement.clone(),
    };
    let path = file(&config.cluster.state_dir);
    std::fs::create_dir_all(&config.cluster.state_dir)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&stored)?)?;
    std::fs::rename(tmp, path)
}

/// Forgets the remembered placement (the next start profiles again). Returns whether there was one.
pub fn forget(state_dir: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(file(state_dir)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, extra: &str) -> Config {
        let model = dir.join("m.gguf");
        std::fs::write(&model, b"GGUF").expect("model");
        let text = format!(
            "[cluster]\nname=\"t\"\nengine=\"prima\"\nstate_dir=\"{d}/state\"\n[model]\npath=\"{m}\"\n{extra}\n\
             [[node]]\nrank=0\naddress=\"10.0.0.1\"\n[[node]]\nrank=1\naddress=\"10.0.0.2\"\n",
            d = dir.display(),
            m = model.display()
        );
        Config::parse(&text, Path::new("t.toml")).expect("config")
    }

    #[test]
    fn a_saved_placement_is_used_for_the_same_model_and_nodes_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = config(dir.path(), "");
        assert_eq!(source(&c), (Some(PlacementSource::Halda), None));
        let p = Placement {
            windows: vec![10, 20],
            gpu_layers: Some(vec![0, 0]),
        };
        save(&c, &p).expect("save");
        assert_eq!(
            source(&c),
            (Some(PlacementSource::Remembered), Some(p.clone()))
        );
        // The model file changes: the placement no longer applies.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&c.model().path, b"GGUF2").expect("model");
        assert_eq!(load(&c), None);
        save(&c, &p).expect("save");
        assert_eq!(load(&c), Some(p.clone()));
        // Explicit windows win; remembering can be switched off; forgetting removes it.
        let explicit = config(dir.path(), "layer_windows = [15, 15]");
        assert_eq!(source(&explicit), (Some(PlacementSource::Config), None));
        assert_eq!(
            load(&config(dir.path(), "remember_placement = false")),
            None
        );
        assert!(forget(&c.cluster.state_dir).expect("forget"));
        assert!(!forget(&c.cluster.state_dir).expect("forget again"));
    }
}
