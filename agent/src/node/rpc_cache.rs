//! The llama.cpp rpc servers' tensor cache (`ggml-rpc-server -c`), kept bounded and clean.
//!
//! Why: without it every ring start sends every weight to every rpc server again over the LAN
//! (upstream, llama.cpp PR 12620: a 32B model to one rpc server over 1 GbE, 1 min 44 s without
//! the cache, 25 s with it).
//!
//! What upstream does (tools/rpc/rpc-server.cpp and ggml/src/ggml-rpc/ggml-rpc.cpp, as vendored
//! by llama-cpp-python 0.3.36): with `-c` the server keeps its cache in `$LLAMA_CACHE/rpc/`
//! (without LLAMA_CACHE: `$XDG_CACHE_HOME/llama.cpp/rpc`, else `~/.cache/llama.cpp/rpc`). The
//! head decides what may be cached: weight tensors over [`HASH_THRESHOLD`] bytes. For each it
//! first sends the FNV-1a 64 hash of the tensor's bytes; a server holding a file of that name
//! (16 hex digits) loads the tensor from it, otherwise the head sends the data and the server
//! writes it to that file. Upstream never deletes an entry and has no bound, and it writes each
//! entry in place, not through a temporary file: a server stopped during a write leaves a short
//! file that a later load would take as the tensor (the server only checks that it fits).
//!
//! So before each start of an rpc server rank the agent ([`RpcCache::prune`]):
//! 1. verifies every entry it has not seen before by hashing it (a file whose FNV-1a hash is not
//!    its name is a cut-short write, removed) and attributes it to the model of the previous
//!    start when the file was written since then (else to no model: "unknown");
//! 2. removes the entries of models no longer in the config (the attribution is by model name,
//!    kept in an index file outside the directory the rpc server may write);
//! 3. removes entries, unknown ones and other models' first, then least recently used first,
//!    until the cache fits its bound (`model.rpc_cache_max_bytes`);
//! 4. records the model about to start, so the entries this start writes are attributed to it.
//!
//! The decisions are [`plan`], pure; [`RpcCache`] is the thin I/O around it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::proto::{RpcCacheFact, RpcCachePrune};

/// Weight tensors larger than this go through the cache (llama.cpp's `HASH_THRESHOLD`, a
/// constant of the head's code): smaller ones are always sent.
pub const HASH_THRESHOLD: u64 = 10 * 1024 * 1024;

/// The smallest bound accepted: below two entries' worth the cache cannot help.
pub const MIN_MAX_BYTES: u64 = 2 * HASH_THRESHOLD;

/// The bound when the config gives none and this node cannot see the model file to size it
/// (a llama-rpc worker needs no model file).
pub const FALLBACK_MAX_BYTES: u64 = 64 << 30;

/// The bound when `model.rpc_cache_max_bytes` is absent: twice the model file's size where this
/// node can read it (room for the current model and the one before), else
/// [`FALLBACK_MAX_BYTES`].
pub fn default_max_bytes(model_size: Option<u64>) -> u64 {
    model_size
        .map(|s| s.saturating_mul(2).max(MIN_MAX_BYTES))
        .unwrap_or(FALLBACK_MAX_BYTES)
}

/// The variable the rpc server reads its cache location from.
pub const ENV: &str = "LLAMA_CACHE";

/// FNV-1a, 64 bit: the hash llama.cpp names its cache entries by.
pub fn fnv1a64(data: &[u8], mut hash: u64) -> u64 {
    for b in data {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// FNV-1a's start value (`fnv1a64(data, FNV_OFFSET)` hashes `data` alone).
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A file in the cache directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub name: String,
    pub bytes: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
}

/// What the agent knows about the entries, kept between starts (outside the directory the rpc
/// server may write).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub entries: BTreeMap<String, Indexed>,
    /// The model of the last rank started with this cache, and when.
    pub last_start: Option<LastStart>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Indexed {
    /// The model whose start wrote the entry; `None` when that cannot be known (the entry
    /// existed before the agent managed the cache).
    pub model: Option<String>,
    pub bytes: u64,
    /// When a start of the entry's model last could use it, seconds since the epoch.
    pub used: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastStart {
    pub model: String,
    pub at: u64,
}

/// Why an entry is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Not named like an entry (16 lowercase hex digits): nothing the rpc server reads.
    NotAnEntry,
    /// Its content does not hash to its name: a write cut short.
    Corrupt,
    /// Written for a model that is no longer configured.
    ModelRemoved(String),
    /// The cache was over its bound.
    OverBound,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::NotAnEntry => f.write_str("not a cache entry"),
            Reason::Corrupt => f.write_str("content does not match its hash (a cut-short write)"),
            Reason::ModelRemoved(m) => write!(f, "model `{m}` is no longer configured"),
            Reason::OverBound => f.write_str("over the cache's bound, least recently used"),
        }
    }
}

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub remove: Vec<(String, u64, Reason)>,
    /// The index after the removals, with the starting model recorded.
    pub index: Index,
    pub kept_bytes: u64,
}

/// Whether `name` is an entry's name as llama.cpp writes it (`%016" PRIx64`).
pub fn is_entry_name(name: &str) -> bool {
    name.len() == 16
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The entries whose content must be hashed before they can be trusted: those the index does
/// not know (or knows with another size).
pub fn to_verify<'a>(files: &'a [File], index: &Index) -> Vec<&'a File> {
    files
        .iter()
        .filter(|f| is_entry_name(&f.name))
        .filter(|f| {
            index
                .entries
                .get(&f.name)
                .is_none_or(|e| e.bytes != f.bytes)
        })
        .collect()
}

/// Decides what to remove before `current` starts. `corrupt`: the names among [`to_verify`]'s
/// whose content did not match; `configured`: every model name in the config.
pub fn plan(
    files: &[File],
    index: &Index,
    corrupt: &BTreeSet<String>,
    current: &str,
    configured: &[&str],
    max_bytes: u64,
    now: u64,
) -> Plan {
    let mut remove = Vec::new();
    let mut kept: Vec<(String, Indexed)> = Vec::new();
    for f in files {
        if !is_entry_name(&f.name) {
            remove.push((f.name.clone(), f.bytes, Reason::NotAnEntry));
            continue;
        }
        if corrupt.contains(&f.name) {
            remove.push((f.name.clone(), f.bytes, Reason::Corrupt));
            continue;
        }
        let entry = match index.entries.get(&f.name).filter(|e| e.bytes == f.bytes) {
            Some(e) => e.clone(),
            None => Indexed {
                // Written since the last start (mtime has whole seconds): that start's model.
                model: index
                    .last_start
                    .as_ref()
                    .filter(|l| f.mtime >= l.at)
                    .map(|l| l.model.clone()),
                bytes: f.bytes,
                used: f.mtime,
            },
        };
        match &entry.model {
            Some(m) if !configured.contains(&m.as_str()) => {
                remove.push((f.name.clone(), f.bytes, Reason::ModelRemoved(m.clone())))
            }
            _ => kept.push((f.name.clone(), entry)),
        }
    }
    // Evict the entries the starting model cannot use first, then the least recently used.
    kept.sort_by(|(an, a), (bn, b)| {
        let mine = |e: &Indexed| e.model.as_deref() == Some(current);
        (mine(a), a.used, an).cmp(&(mine(b), b.used, bn))
    });
    let mut total: u64 = kept.iter().map(|(_, e)| e.bytes).sum();
    let mut cut = 0;
    while total > max_bytes && cut < kept.len() {
        let (name, e) = &kept[cut];
        total -= e.bytes;
        remove.push((name.clone(), e.bytes, Reason::OverBound));
        cut += 1;
    }
    let entries = kept
        .drain(cut..)
        .map(|(name, mut e)| {
            if e.model.as_deref() == Some(current) {
                e.used = now;
            }
            (name, e)
        })
        .collect();
    Plan {
        remove,
        index: Index {
            entries,
            last_start: Some(LastStart {
                model: current.to_string(),
                at: now,
            }),
        },
        kept_bytes: total,
    }
}

/// One rpc server rank's cache on this node.
#[derive(Debug, Clone)]
pub struct RpcCache {
    /// What `LLAMA_CACHE` points at: the directory the rpc server may write.
    pub root: PathBuf,
    /// The agent's index, beside `root` and not inside it.
    pub index_file: PathBuf,
    pub max_bytes: u64,
}

impl RpcCache {
    /// The cache of node `rank` under the state dir: `<state_dir>/rpc-cache/rank<N>/`, its index
    /// `<state_dir>/rpc-cache/rank<N>.index.json`.
    pub fn new(state_dir: &Path, rank: u32, max_bytes: u64) -> RpcCache {
        let base = state_dir.join("rpc-cache");
        RpcCache {
            root: base.join(format!("rank{rank}")),
            index_file: base.join(format!("rank{rank}.index.json")),
            max_bytes,
        }
    }

    /// Where the rpc server keeps its entries (`$LLAMA_CACHE/rpc`).
    pub fn entries_dir(&self) -> PathBuf {
        self.root.join("rpc")
    }

    fn files(&self) -> Result<Vec<File>> {
        let dir = self.entries_dir();
        let read = match std::fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        let mut files = Vec::new();
        for ent in read {
            let ent = ent.with_context(|| format!("cannot list {}", dir.display()))?;
            let meta = match ent.metadata() {
                Ok(m) if m.is_file() => m,
                _ => continue, // gone meanwhile, or not a regular file: never ours to delete
            };
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            files.push(File {
                name: ent.file_name().to_string_lossy().into_owned(),
                bytes: meta.len(),
                mtime,
            });
        }
        Ok(files)
    }

    fn load_index(&self) -> Index {
        match std::fs::read(&self.index_file) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(file = %self.index_file.display(), error = %e, "unreadable rpc cache index; entries are verified again");
                Index::default()
            }),
            Err(_) => Index::default(),
        }
    }

    fn save_index(&self, index: &Index) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(index)?;
        if let Some(dir) = self.index_file.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = self.index_file.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.index_file)
            .with_context(|| format!("cannot write {}", self.index_file.display()))
    }

    /// Whether the file's content hashes to its name.
    fn verify(&self, name: &str) -> Result<bool> {
        let path = self.entries_dir().join(name);
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut hash = FNV_OFFSET;
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                break;
            }
            hash = fnv1a64(&buf[..n], hash);
        }
        Ok(format!("{hash:016x}") == name)
    }

    /// Cleans and bounds the cache before a rank of `current` starts (blocking I/O: run it off
    /// the async runtime). Must not run while an rpc server writes this cache.
    pub fn prune(&self, current: &str, configured: &[&str], now: u64) -> Result<RpcCachePrune> {
        let started = std::time::Instant::now();
        let files = self.files()?;
        let index = self.load_index();
        let new = to_verify(&files, &index);
        let verified = new.len() as u64;
        // FNV-1a is serial within a file (about 1 GB/s): hash files on several cores, since a
        // worker's share of a large model is tens of GB the first time it is seen.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let chunk = new.len().div_ceil(workers).max(1);
        let results: Vec<Result<Vec<(String, bool)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = new
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|f| Ok((f.name.clone(), self.verify(&f.name)?)))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("hashing an rpc cache entry panicked"))
                    })
                })
                .collect()
        });
        let mut corrupt = BTreeSet::new();
        for r in results {
            for (name, ok) in r? {
                if !ok {
                    corrupt.insert(name);
                }
            }
        }
        let plan = plan(
            &files,
            &index,
            &corrupt,
            current,
            configured,
            self.max_bytes,
            now,
        );
        let mut removed_bytes = 0;
        for (name, bytes, reason) in &plan.remove {
            let path = self.entries_dir().join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => removed_bytes += bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", path.display()))
                }
            }
            tracing::info!(entry = %name, bytes, reason = %reason, "rpc cache: removed");
        }
        self.save_index(&plan.index)?;
        Ok(RpcCachePrune {
            at_unix: now,
            verified_entries: verified,
            removed_entries: plan.remove.len() as u64,
            removed_bytes,
            corrupt_entries: corrupt.len() as u64,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// The cache as it is now, for the node's facts.
    pub fn fact(&self, last_prune: Option<RpcCachePrune>) -> RpcCacheFact {
        let (bytes, entries, error) = match self.files() {
            Ok(files) => {
                let entries: Vec<&File> = files.iter().filter(|f| is_entry_name(&f.name)).collect();
                (
                    entries.iter().map(|f| f.bytes).sum(),
                    entries.len() as u64,
                    None,
                )
            }
            Err(e) => (0, 0, Some(format!("{e:#}"))),
        };
        RpcCacheFact {
            dir: self.entries_dir(),
            bytes,
            entries,
            max_bytes: self.max_bytes,
            error,
            last_prune,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn file(name: &str, mib: u64, mtime: u64) -> File {
        File {
            name: name.into(),
            bytes: mib * MIB,
            mtime,
        }
    }

    fn indexed(model: Option<&str>, mib: u64, used: u64) -> Indexed {
        Indexed {
            model: model.map(str::to_string),
            bytes: mib * MIB,
            used,
        }
    }

    fn names(p: &Plan) -> Vec<(&str, &Reason)> {
        p.remove.iter().map(|(n, _, r)| (n.as_str(), r)).collect()
    }

    const A: &str = "00000000000000aa";
    const B: &str = "00000000000000bb";
    const C: &str = "00000000000000cc";

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        assert_eq!(fnv1a64(b"", FNV_OFFSET), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a", FNV_OFFSET), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar", FNV_OFFSET), 0x85944171f73967e8);
        // Streaming in pieces gives the same hash as one call.
        assert_eq!(
            fnv1a64(b"bar", fnv1a64(b"foo", FNV_OFFSET)),
            fnv1a64(b"foobar", FNV_OFFSET)
        );
    }

    #[test]
    fn entry_names_are_sixteen_lowercase_hex_digits() {
        assert!(is_entry_name("0123456789abcdef"));
        assert!(!is_entry_name("0123456789ABCDEF"));
        assert!(!is_entry_name("0123456789abcde"));
        assert!(!is_entry_name("index.json"));
    }

    #[test]
    fn new_entries_belong_to_the_last_started_model_and_are_verified_once() {
        let files = vec![file(A, 20, 100), file(B, 20, 50)];
        let index = Index {
            entries: BTreeMap::new(),
            last_start: Some(LastStart {
                model: "smol".into(),
                at: 90,
            }),
        };
        let v: Vec<&str> = to_verify(&files, &index)
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(v, vec![A, B]);
        let p = plan(
            &files,
            &index,
            &BTreeSet::new(),
            "smol",
            &["smol"],
            u64::MAX,
            200,
        );
        assert!(p.remove.is_empty());
        // A was written after smol's start; B before the agent knew the cache: unknown.
        assert_eq!(p.index.entries[A], indexed(Some("smol"), 20, 200));
        assert_eq!(p.index.entries[B], indexed(None, 20, 50));
        assert_eq!(
            p.index.last_start,
            Some(LastStart {
                model: "smol".into(),
                at: 200
            })
        );
        // Next time nothing needs hashing again.
        assert!(to_verify(&files, &p.index).is_empty());
        // A known name with another size is hashed again.
        let grown = vec![file(A, 21, 300)];
        assert_eq!(to_verify(&grown, &p.index).len(), 1);
    }

    #[test]
    fn corrupt_and_foreign_files_are_removed() {
        let files = vec![file(A, 20, 100), file("stray.tmp", 1, 100)];
        let corrupt: BTreeSet<String> = [A.to_string()].into();
        let p = plan(
            &files,
            &Index::default(),
            &corrupt,
            "smol",
            &["smol"],
            u64::MAX,
            200,
        );
        assert_eq!(
            names(&p),
            vec![(A, &Reason::Corrupt), ("stray.tmp", &Reason::NotAnEntry)]
        );
        assert!(p.index.entries.is_empty());
        assert_eq!(p.kept_bytes, 0);
    }

    #[test]
    fn a_model_removed_from_the_config_loses_its_entries_at_the_next_start() {
        let files = vec![file(A, 20, 10), file(B, 20, 10), file(C, 20, 10)];
        let index = Index {
            entries: [
                (A.to_string(), indexed(Some("old"), 20, 10)),
                (B.to_string(), indexed(Some("smol"), 20, 10)),
                (C.to_string(), indexed(None, 20, 10)),
            ]
            .into(),
            last_start: None,
        };
        let p = plan(
            &files,
            &index,
            &BTreeSet::new(),
            "smol",
            &["smol", "coder"],
            u64::MAX,
            200,
        );
        assert_eq!(names(&p), vec![(A, &Reason::ModelRemoved("old".into()))]);
        // Unknown entries cannot be attributed: only the bound removes them.
        assert!(p.index.entries.contains_key(C));
        assert_eq!(p.kept_bytes, 40 * MIB);
    }

    #[test]
    fn the_bound_evicts_other_models_then_the_least_recently_used() {
        let files = vec![
            file(A, 20, 10),
            file(B, 20, 10),
            file(C, 20, 10),
            file("00000000000000dd", 20, 10),
        ];
        let index = Index {
            entries: [
                (A.to_string(), indexed(Some("smol"), 20, 50)),
                (B.to_string(), indexed(Some("smol"), 20, 40)),
                (C.to_string(), indexed(Some("coder"), 20, 90)),
                ("00000000000000dd".to_string(), indexed(None, 20, 95)),
            ]
            .into(),
            last_start: None,
        };
        let p = plan(
            &files,
            &index,
            &BTreeSet::new(),
            "smol",
            &["smol", "coder"],
            40 * MIB,
            200,
        );
        // coder's entry and the unknown one go first although used more recently, then none of
        // smol's is needed.
        assert_eq!(
            names(&p),
            vec![
                (C, &Reason::OverBound),
                ("00000000000000dd", &Reason::OverBound)
            ]
        );
        assert_eq!(p.kept_bytes, 40 * MIB);
        assert_eq!(
            p.index.entries[A].used, 200,
            "smol's entries are in use now"
        );
        // A bound below the starting model's own entries cuts its oldest too.
        let p = plan(
            &files,
            &index,
            &BTreeSet::new(),
            "smol",
            &["smol", "coder"],
            25 * MIB,
            200,
        );
        assert_eq!(p.remove.len(), 3);
        assert_eq!(p.remove[2].0, B, "smol's least recently used");
        assert_eq!(p.kept_bytes, 20 * MIB);
        assert!(p.kept_bytes <= 25 * MIB);
    }

    #[test]
    fn prune_on_disk_removes_a_cut_short_entry_and_keeps_a_whole_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = RpcCache::new(dir.path(), 1, u64::MAX);
        // The first start of smol finds nothing; what its rpc server writes is then smol's.
        let r = cache.prune("smol", &["smol"], 1000).expect("prune");
        assert_eq!((r.verified_entries, r.removed_entries), (0, 0));
        std::fs::create_dir_all(cache.entries_dir()).expect("mkdir");
        let data = vec![7u8; 3000];
        let good = format!("{:016x}", fnv1a64(&data, FNV_OFFSET));
        std::fs::write(cache.entries_dir().join(&good), &data).expect("write");
        // The same name with a write cut short.
        let short = format!("{:016x}", fnv1a64(&[1u8; 100], FNV_OFFSET));
        std::fs::write(cache.entries_dir().join(&short), [1u8; 60]).expect("write");
        let r = cache.prune("smol", &["smol"], 1001).expect("prune");
        assert_eq!(
            (r.verified_entries, r.corrupt_entries, r.removed_entries),
            (2, 1, 1)
        );
        assert!(cache.entries_dir().join(&good).exists());
        assert!(!cache.entries_dir().join(&short).exists());
        let fact = cache.fact(Some(r));
        assert_eq!((fact.bytes, fact.entries), (3000, 1));
        // The second prune hashes nothing: the index knows the entry.
        let r = cache.prune("smol", &["smol"], 1002).expect("prune");
        assert_eq!((r.verified_entries, r.removed_entries), (0, 0));
        // The model leaves the config: its entry goes at the next start.
        std::fs::write(cache.entries_dir().join(&short), [1u8; 100]).expect("write");
        let r = cache.prune("coder", &["coder"], 1003).expect("prune");
        assert_eq!(
            r.removed_entries, 2,
            "smol's entry and the one written during its start"
        );
        assert!(cache.fact(None).entries == 0);
    }

    #[test]
    fn the_default_bound_is_twice_the_model_or_a_fixed_fallback() {
        assert_eq!(default_max_bytes(Some(100 * MIB)), 200 * MIB);
        assert_eq!(default_max_bytes(Some(1)), MIN_MAX_BYTES);
        assert_eq!(default_max_bytes(None), FALLBACK_MAX_BYTES);
    }
}
