//! What a node knows about itself, reported to the coordinator so it can refuse inconsistent
//! rings (different engine builds or model files) before starting anything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::EngineKind;
use crate::engine::{find_binary, LocalEngine};
use crate::proto::{
    BinaryFact, CpuFact, GpuFact, HashState, MemoryFact, ModelFact, NodeFacts, AGENT_VERSION,
    PROTOCOL_VERSION,
};

/// A version of a file: the same (device, inode, size, mtime, ctime) means the same bytes. ctime
/// changes with every write and cannot be set back by hand, unlike mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    fn of(meta: &std::fs::Metadata) -> FileVersion {
        use std::os::unix::fs::MetadataExt;
        FileVersion {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A finished hash as kept in the state dir.
#[derive(Debug, Serialize, Deserialize)]
struct StoredHash {
    path: PathBuf,
    version: FileVersion,
    sha256: String,
}

/// Hashes the model once per version of the file, in the background: a 40 GB file takes
/// minutes and the answer does not change until the file does. Finished hashes are kept in the
/// state dir, so a restarted agent (an upgrade, a watchdog restart) answers at once and a
/// restarted coordinator adopts its running ring without waiting for a re-hash.
type HashCache = HashMap<PathBuf, (FileVersion, HashState)>;

#[derive(Clone)]
pub struct ModelHasher {
    state: Arc<Mutex<HashCache>>,
    /// Counts finished hashes, for whoever waits on one.
    finished: Arc<tokio::sync::watch::Sender<u64>>,
    /// Where finished hashes are kept across restarts.
    store: Option<PathBuf>,
    /// Bytes hashed so far, per file being hashed.
    progress: Arc<Mutex<HashMap<PathBuf, Arc<AtomicU64>>>>,
}

impl Default for ModelHasher {
    fn default() -> Self {
        ModelHasher {
            state: Arc::default(),
            finished: Arc::new(tokio::sync::watch::Sender::new(0)),
            store: None,
            progress: Arc::default(),
        }
    }
}

impl ModelHasher {
    /// A hasher that keeps finished hashes in `store` and starts with the ones found there.
    pub fn with_store(store: PathBuf) -> ModelHasher {
        let mut map = HashCache::new();
        match std::fs::read(&store) {
            Ok(bytes) => match serde_json::from_slice::<Vec<StoredHash>>(&bytes) {
                Ok(entries) => {
                    for e in entries {
                        map.insert(e.path, (e.version, HashState::Done { sha256: e.sha256 }));
                    }
                }
                Err(e) => {
                    tracing::warn!(file = %store.display(), error = %e, "ignoring an unreadable model hash cache")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %store.display(), error = %e, "cannot read the model hash cache")
            }
        }
        ModelHasher {
            state: Arc::new(Mutex::new(map)),
            store: Some(store),
            ..ModelHasher::default()
        }
    }

    fn save(store: &Path, map: &HashCache) {
        let entries: Vec<StoredHash> = map
            .iter()
            .filter_map(|(path, (version, st))| match st {
                HashState::Done { sha256 } => Some(StoredHash {
                    path: path.clone(),
                    version: *version,
                    sha256: sha256.clone(),
                }),
                _ => None,
            })
            .collect();
        let res = serde_json::to_vec_pretty(&entries)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                if let Some(dir) = store.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let tmp = store.with_extension("json.tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(tmp, store)
            });
        if let Err(e) = res {
            tracing::warn!(file = %store.display(), error = %e, "cannot keep the model hash; a restarted agent will hash again");
        }
    }

    /// Changes each time a hash finishes.
    pub fn finished(&self) -> tokio::sync::watch::Receiver<u64> {
        self.finished.subscribe()
    }

    /// Current state for `path`, starting a hash when the file is new or changed.
    pub fn state(&self, path: &Path) -> (Option<u64>, HashState) {
        let Ok(meta) = std::fs::metadata(path) else {
            return (None, HashState::Missing);
        };
        let size = meta.len();
        let version = FileVersion::of(&meta);
        let mut map = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((v, st)) = map.get(path) {
            if *v == version {
                return (Some(size), st.clone());
            }
        }
        map.insert(path.to_path_buf(), (version, HashState::Hashing));
        let counter = Arc::new(AtomicU64::new(0));
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf(), counter.clone());
        let progress = self.progress.clone();
        let state = self.state.clone();
        let finished = self.finished.clone();
        let store = self.store.clone();
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = match sha256_counted(&p, &counter) {
                Ok(h) => HashState::Done { sha256: h },
                Err(e) => HashState::Error {
                    message: format!("cannot read {}: {e}", p.display()),
                },
            };
            tracing::info!(model = %p.display(), seconds = started.elapsed().as_secs_f64(), ?result, "model hashed");
            progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&p);
            let mut map = state.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(p, (version, result));
            if let Some(store) = &store {
                Self::save(store, &map);
            }
            drop(map);
            finished.send_modify(|n| *n += 1);
        });
        (Some(size), HashState::Hashing)
    }

    /// Records `sha256` as the hash of `path` as it is now: a delivered file was hashed as it
    /// arrived, and hashing 40 GB again would keep the ring waiting for nothing.
    pub fn record(&self, path: &Path, sha256: String) {
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let mut map = self.state.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(
            path.to_path_buf(),
            (FileVersion::of(&meta), HashState::Done { sha256 }),
        );
        if let Some(store) = &self.store {
            Self::save(store, &map);
        }
        drop(map);
        self.finished.send_modify(|n| *n += 1);
    }

    /// How many bytes of `path` the running hash has read; none when it is not being hashed.
    pub fn hashed_bytes(&self, path: &Path) -> Option<u64> {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .map(|c| c.load(Ordering::Relaxed))
    }
}

/// The file's SHA-256, adding the bytes read to `done` as it goes.
fn sha256_counted(path: &Path, done: &AtomicU64) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        done.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(hex::encode(h.finalize()))
}

/// Gathers the facts; `model` is the loaded model's file, made by [`model_fact`].
pub async fn collect(
    rank: u32,
    engine: EngineKind,
    local: &LocalEngine,
    model: ModelFact,
) -> NodeFacts {
    let (server, worker) = local.names(engine);
    let rank_bin = if rank == 0 { server } else { worker };
    let mut binaries = vec![BinaryFact {
        name: rank_bin.to_string(),
        path: local.find(rank_bin),
        used_by_this_rank: true,
    }];
    if rank_bin != server {
        binaries.push(BinaryFact {
            name: server.to_string(),
            path: local.find(server),
            used_by_this_rank: false,
        });
    }
    let server_path = binaries
        .iter()
        .find(|b| b.name == server)
        .and_then(|b| b.path.clone());
    let engine_version = match server_path {
        Some(p) => cached_version(&p).await,
        None => None,
    };
    // Reading pacman's database blocks (a file list per package on a cache miss).
    let engine_package = match binaries[0].path.clone() {
        Some(p) => tokio::task::spawn_blocking(move || {
            crate::pacman::owner_of(&crate::pacman::Layout::system(), &p)
        })
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "looking up the engine's pacman package failed");
            None
        }),
        None => None,
    };
    NodeFacts {
        agent_version: AGENT_VERSION.to_string(),
        protocol_version: PROTOCOL_VERSION,
        engine_package,
        rank,
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        engine,
        binaries,
        engine_version,
        model,
        models: Vec::new(),
        memory: memory(),
        cpu: cpu(),
        gpus: gpus().await,
        network: Vec::new(),
        tls: None,
        rpc_cache: None,
    }
}

/// One model file's state on this node: hashed when this rank reads the file itself.
pub fn model_fact(
    model_path: &Path,
    expected_sha256: Option<&str>,
    needs_model: bool,
    hasher: &ModelHasher,
) -> ModelFact {
    if needs_model {
        let (size, hash) = hasher.state(model_path);
        let matches_expected = match (&hash, expected_sha256) {
            (HashState::Done { sha256 }, Some(e)) => Some(sha256.eq_ignore_ascii_case(e)),
            _ => None,
        };
        let hashed_bytes = match hash {
            HashState::Hashing => hasher.hashed_bytes(model_path),
            _ => None,
        };
        ModelFact {
            path: model_path.to_path_buf(),
            size,
            hash,
            expected_sha256: expected_sha256.map(str::to_string),
            matches_expected,
            hashed_bytes,
            transfer: None,
        }
    } else {
        ModelFact {
            path: model_path.to_path_buf(),
            size: std::fs::metadata(model_path).ok().map(|m| m.len()),
            hash: HashState::NotRequired,
            expected_sha256: expected_sha256.map(str::to_string),
            matches_expected: None,
            hashed_bytes: None,
            transfer: None,
        }
    }
}

/// The engine version per binary path and file identity: the coordinator asks for facts every
/// few seconds, and the answer changes only when the binary does (a package upgrade). The inode
/// is part of the identity because pacman keeps the package's mtimes: an upgrade renames a new
/// file into place, which may carry an older mtime than the one it replaces.
async fn cached_version(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    type Identity = (SystemTime, u64, u64, u64);
    type Cache = Mutex<HashMap<PathBuf, (Identity, Option<String>)>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let meta = std::fs::metadata(path).ok()?;
    let id: Identity = (meta.modified().ok()?, meta.dev(), meta.ino(), meta.len());
    if let Some((t, v)) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(path) {
        if *t == id {
            return v.clone();
        }
    }
    let v = probe_version(path).await;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(path.to_path_buf(), (id, v.clone()));
    v
}

/// Runs `<server> --version` (llama.cpp and prima.cpp both print a `version:` line) with a timeout.
async fn probe_version(path: &Path) -> Option<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(path)
            .arg("--version")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("version:"))
        .map(|l| l.trim_start_matches("version:").trim().to_string())
}

fn memory() -> Option<MemoryFact> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(MemoryFact {
        total_bytes: field("MemTotal:")?,
        available_bytes: field("MemAvailable:")?,
    })
}

fn cpu() -> Option<CpuFact> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let model = text
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Some(CpuFact {
        model,
        logical_cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    })
}

/// NVIDIA through nvidia-smi, AMD through amdgpu's sysfs counters; nothing when neither is there.
async fn gpus() -> Vec<GpuFact> {
    let mut out = Vec::new();
    if let Some(smi) = find_binary("nvidia-smi", None) {
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new(smi)
                .args([
                    "--query-gpu=name,memory.total,memory.free",
                    "--format=csv,noheader,nounits",
                ])
                .kill_on_drop(true)
                .output(),
        )
        .await;
        if let Ok(Ok(o)) = res {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                let f: Vec<&str> = line.split(',').map(str::trim).collect();
                if f.len() == 3 {
                    out.push(GpuFact {
                        name: f[0].to_string(),
                        memory_total_mib: f[1].parse().ok(),
                        memory_free_mib: f[2].parse().ok(),
                    });
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/class/drm") {
        for e in entries.flatten() {
            let card = e.file_name().to_string_lossy().into_owned();
            // cardN only: connectors (card0-DP-1) and render nodes have no VRAM counters.
            if !card.starts_with("card") || card.contains('-') {
                continue;
            }
            let dev = e.path().join("device");
            let read = |f: &str| {
                std::fs::read_to_string(dev.join(f))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
            };
            let Some(total) = read("mem_info_vram_total") else {
                continue;
            };
            out.push(GpuFact {
                name: format!("amdgpu {card}"),
                memory_total_mib: Some(total / (1024 * 1024)),
                memory_free_mib: read("mem_info_vram_used")
                    .map(|u| total.saturating_sub(u) / (1024 * 1024)),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hasher_reports_missing_then_hashing_then_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.gguf");
        let h = ModelHasher::default();
        assert_eq!(h.state(&p).1, HashState::Missing);
        std::fs::write(&p, b"abc").expect("write");
        let (size, first) = h.state(&p);
        assert_eq!(size, Some(3));
        assert_eq!(first, HashState::Hashing);
        let mut last = first;
        for _ in 0..100 {
            last = h.state(&p).1;
            if last != HashState::Hashing {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            last,
            HashState::Done {
                sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into()
            }
        );
    }

    #[test]
    fn hashing_counts_the_bytes_it_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, vec![7u8; 3 << 20]).expect("write");
        let done = AtomicU64::new(0);
        let h = sha256_counted(&p, &done).expect("hash");
        assert_eq!(done.load(Ordering::Relaxed), 3 << 20);
        assert_eq!(h, hex::encode(Sha256::digest(vec![7u8; 3 << 20])));
        assert_eq!(
            ModelHasher::default().hashed_bytes(&p),
            None,
            "not being hashed"
        );
    }

    #[tokio::test]
    async fn a_finished_hash_is_kept_across_restarts_until_the_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.gguf");
        let store = dir.path().join("state/hashes.json");
        std::fs::write(&p, b"abc").expect("write");
        let h = ModelHasher::with_store(store.clone());
        let mut done = h.finished();
        assert_eq!(h.state(&p).1, HashState::Hashing);
        done.changed().await.expect("hashed");
        assert!(matches!(h.state(&p).1, HashState::Done { .. }));
        // A new agent process: the answer is there at once, no hash runs.
        let again = ModelHasher::with_store(store.clone());
        assert!(
            matches!(again.state(&p).1, HashState::Done { .. }),
            "remembered"
        );
        // The file changes (same size): hashed again.
        std::fs::write(&p, b"abd").expect("write");
        let third = ModelHasher::with_store(store);
        assert_eq!(third.state(&p).1, HashState::Hashing);
    }
}
