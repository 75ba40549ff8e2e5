//! Which Arch package installed the engine, read from pacman's local database with the ALPM
//! project's pure-Rust `alpm-db` crate. Linking libalpm instead would tie the agent to one
//! libalpm soname, which changes with every pacman major release and would stop the daemon
//! from loading after such an upgrade.
//!
//! On Arch the package version is the engine's real identity: prima.cpp builds from a tarball
//! report `version: 0 (unknown)`, so the coordinator compares package versions across nodes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use crate::proto::InstalledPackage;
use alpm_db::desc::DbDescFile;

/// pacman's configuration; paru and pacman both read `DBPath` and `RootDir` from it.
pub const PACMAN_CONF: &str = "/etc/pacman.conf";

/// Where pacman keeps what it installed, as pacman.conf's `[options]` say.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    /// `RootDir`: the file lists in the database are relative to it.
    pub root: PathBuf,
    /// `DBPath`; the local database is its `local/` directory.
    pub db_path: PathBuf,
}

impl Default for Layout {
    fn default() -> Layout {
        Layout::from_conf("")
    }
}

impl Layout {
    /// pacman's rules: `#` starts a comment anywhere on a line, only `[options]` holds these
    /// keys, and a `RootDir` without a `DBPath` moves the database under the root
    /// (`<RootDir>/var/lib/pacman/`). `Include`d files are not followed: pacman's own
    /// `[options]` keys live in pacman.conf itself.
    pub fn from_conf(text: &str) -> Layout {
        let (mut root, mut db_path) = (None, None);
        let mut in_options = false;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                in_options = section.trim() == "options";
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            if !in_options || value.is_empty() {
                continue;
            }
            match key.trim() {
                "RootDir" => root = Some(PathBuf::from(value)),
                "DBPath" => db_path = Some(PathBuf::from(value)),
                _ => {}
            }
        }
        let root = root.unwrap_or_else(|| PathBuf::from("/"));
        let db_path = db_path.unwrap_or_else(|| root.join("var/lib/pacman"));
        Layout { root, db_path }
    }

    /// This machine's layout; pacman's defaults when pacman.conf is absent (not Arch).
    pub fn system() -> Layout {
        match std::fs::read_to_string(PACMAN_CONF) {
            Ok(text) => Layout::from_conf(&text),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::debug!(file = PACMAN_CONF, error = %e, "cannot read pacman.conf; using pacman's default paths");
                }
                Layout::default()
            }
        }
    }

    pub fn local_db(&self) -> PathBuf {
        self.db_path.join("local")
    }
}

/// Package name suffixes that name a build's GPU backend, not another engine: Arch's official
/// `llama-cpp-vulkan`/`llama-cpp-rocm` (on `ggml-vulkan`/`ggml-rocm`), the AUR's
/// `llama.cpp-cuda`/`llama.cpp-hip`/`llama.cpp-vulkan`, this project's `prima-cpp-cuda`/`-rocm`.
const VARIANT_SUFFIXES: &[&str] = &[
    "-cuda", "-rocm", "-hip", "-vulkan", "-opencl", "-sycl", "-cpu",
];

/// The engine a package builds, its GPU variant aside: nodes may run different variants of one
/// engine build (prima-cpp-cuda on one, prima-cpp on another), never two engines' builds.
/// `-git` and `-bin` builds are builds of their own and keep their names.
pub fn engine_family(package: &str) -> &str {
    VARIANT_SUFFIXES
        .iter()
        .find_map(|v| package.strip_suffix(v))
        .filter(|base| !base.is_empty())
        .unwrap_or(package)
}

/// Where a family's packages come from, for messages.
pub fn family_origin(family: &str) -> &'static str {
    match family {
        "llama-cpp" => "Arch's official llama.cpp (llama-cpp, llama-cpp-vulkan, llama-cpp-rocm)",
        "llama.cpp" => "the AUR's llama.cpp (llama.cpp, llama.cpp-vulkan, -cuda, -hip)",
        "prima-cpp" => "prima.cpp (prima-cpp, prima-cpp-cuda, prima-cpp-rocm)",
        "ggml" => "Arch's official ggml (ggml, ggml-cpu, ggml-vulkan, ggml-rocm)",
        _ => "another package",
    }
}

/// Answers per (layout, binary), valid while the local database directory keeps its mtime:
/// pacman creates and removes one directory per package in it on every install, upgrade and
/// removal, and the coordinator asks for facts every second while nodes wait.
type OwnerCache = HashMap<(Layout, PathBuf), (SystemTime, Option<InstalledPackage>)>;

/// The installed package that owns `binary` (an absolute path), if pacman installed it.
/// Blocking (reads the file list of every package on a miss): call it off the async workers.
pub fn owner_of(layout: &Layout, binary: &Path) -> Option<InstalledPackage> {
    static CACHE: OnceLock<Mutex<OwnerCache>> = OnceLock::new();
    let db = layout.local_db();
    let mtime = std::fs::metadata(&db).and_then(|m| m.modified()).ok()?;
    let key = (layout.clone(), binary.to_path_buf());
    let cache = CACHE.get_or_init(Default::default);
    if let Some((t, answer)) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        if *t == mtime {
            return answer.clone();
        }
    }
    let answer = scan(&db, &layout.root, binary);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, (mtime, answer.clone()));
    answer
}

/// Reads every package's file list in `db` for `binary` (relative to `root` there).
fn scan(db: &Path, root: &Path, binary: &Path) -> Option<InstalledPackage> {
    let wanted = binary.strip_prefix(root).ok()?.to_str()?;
    for entry in std::fs::read_dir(db).ok()?.flatten() {
        let dir = entry.path();
        let Ok(files) = std::fs::read_to_string(dir.join("files")) else {
            continue;
        };
        if !files.lines().any(|l| l == wanted) {
            continue;
        }
        let desc = std::fs::read_to_string(dir.join("desc")).ok()?;
        return match DbDescFile::from_str(&desc) {
            Ok(DbDescFile::V1(d)) => Some(InstalledPackage {
                name: d.name.to_string(),
                version: d.version.to_string(),
            }),
            Ok(DbDescFile::V2(d)) => Some(InstalledPackage {
                name: d.name.to_string(),
                version: d.version.to_string(),
            }),
            Err(e) => {
                tracing::warn!(file = %dir.join("desc").display(), error = %e, "unreadable pacman database entry");
                None
            }
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_variants_are_one_engine_and_official_and_aur_builds_are_two() {
        for (name, family) in [
            ("prima-cpp", "prima-cpp"),
            ("prima-cpp-cuda", "prima-cpp"),
            ("prima-cpp-rocm", "prima-cpp"),
            ("llama-cpp", "llama-cpp"),
            ("llama-cpp-vulkan", "llama-cpp"),
            ("llama-cpp-rocm", "llama-cpp"),
            ("llama-cpp-cuda", "llama-cpp"),
            ("llama.cpp", "llama.cpp"),
            ("llama.cpp-vulkan", "llama.cpp"),
            ("llama.cpp-cuda", "llama.cpp"),
            ("llama.cpp-hip", "llama.cpp"),
            ("ggml-vulkan", "ggml"),
            ("ggml-cpu", "ggml"),
            ("llama.cpp-vulkan-git", "llama.cpp-vulkan-git"),
            ("llama.cpp-bin", "llama.cpp-bin"),
            ("-cuda", "-cuda"),
        ] {
            assert_eq!(engine_family(name), family, "{name}");
        }
        assert_ne!(engine_family("llama-cpp"), engine_family("llama.cpp"));
        assert!(family_origin("llama-cpp").contains("official"));
        assert!(family_origin("llama.cpp").contains("AUR"));
    }

    fn package(db: &Path, name: &str, version: &str, files: &[&str]) {
        let dir = db.join(format!("{name}-{version}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let desc = format!(
            "%NAME%\n{name}\n\n%VERSION%\n{version}\n\n%BASE%\n{name}\n\n%DESC%\nengine\n\n\
             %URL%\nhttps://example.org/\n\n%ARCH%\nx86_64\n\n%BUILDDATE%\n1733737242\n\n\
             %INSTALLDATE%\n1733737243\n\n%PACKAGER%\nFoobar McFooface <foobar@mcfooface.org>\n\n\
             %SIZE%\n123\n\n%VALIDATION%\npgp\n\n"
        );
        std::fs::write(dir.join("desc"), desc).expect("desc");
        let mut list = String::from("%FILES%\n");
        for f in files {
            list.push_str(f);
            list.push('\n');
        }
        std::fs::write(dir.join("files"), list).expect("files");
    }

    /// A layout whose local database is `<dir>/local`, as pacman lays it out under `DBPath`.
    fn layout(dir: &Path) -> Layout {
        Layout {
            root: PathBuf::from("/"),
            db_path: dir.to_path_buf(),
        }
    }

    /// A database laid out as pacman writes it (desc in the alpm-db-desc v1 format).
    #[test]
    fn finds_the_package_that_owns_a_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("local");
        package(
            &db,
            "zeromq",
            "4.3.5-2",
            &["usr/", "usr/lib/", "usr/lib/libzmq.so.5"],
        );
        package(
            &db,
            "prima-cpp-cuda",
            "0.0.0.r20250717.bdf9d8e-1",
            &[
                "usr/",
                "usr/bin/",
                "usr/bin/prima-cli",
                "usr/bin/prima-server",
            ],
        );
        let l = layout(dir.path());
        assert_eq!(
            owner_of(&l, Path::new("/usr/bin/prima-server")),
            Some(InstalledPackage {
                name: "prima-cpp-cuda".into(),
                version: "0.0.0.r20250717.bdf9d8e-1".into()
            })
        );
        assert_eq!(owner_of(&l, Path::new("/opt/prima/prima-server")), None);
        assert_eq!(
            owner_of(&layout(Path::new("/nonexistent")), Path::new("/usr/bin/x")),
            None
        );
    }

    /// The file lists are relative to `RootDir`.
    #[test]
    fn file_lists_are_relative_to_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        package(
            &dir.path().join("local"),
            "llama-cpp",
            "1-1",
            &["usr/bin/rpc-server"],
        );
        let l = Layout {
            root: PathBuf::from("/chroot"),
            db_path: dir.path().to_path_buf(),
        };
        assert_eq!(
            owner_of(&l, Path::new("/chroot/usr/bin/rpc-server")).map(|p| p.name),
            Some("llama-cpp".into())
        );
        assert_eq!(owner_of(&l, Path::new("/usr/bin/rpc-server")), None);
    }

    /// The answer is kept while the local database's mtime stays: a package added without
    /// the mtime changing is not seen; once the mtime moves (as pacman's own writes move it)
    /// the database is read again.
    #[test]
    fn a_second_lookup_does_not_rescan_until_the_database_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("local");
        package(&db, "zeromq", "4.3.5-2", &["usr/lib/libzmq.so.5"]);
        let l = layout(dir.path());
        let bin = Path::new("/usr/bin/llama-server");
        assert_eq!(owner_of(&l, bin), None);

        let set_mtime = |t: SystemTime| {
            std::fs::File::open(&db)
                .and_then(|d| d.set_modified(t))
                .expect("set the database's mtime");
        };
        let before = std::fs::metadata(&db)
            .and_then(|m| m.modified())
            .expect("mtime");
        package(&db, "llama-cpp", "1-1", &["usr/bin/llama-server"]);
        set_mtime(before);
        assert_eq!(
            owner_of(&l, bin),
            None,
            "cached: the database was not read again"
        );

        set_mtime(before + std::time::Duration::from_secs(1));
        assert_eq!(
            owner_of(&l, bin).map(|p| p.version),
            Some("1-1".into()),
            "a new mtime invalidates the cached answer"
        );
    }

    #[test]
    fn pacman_conf_options() {
        assert_eq!(
            Layout::from_conf(""),
            Layout {
                root: "/".into(),
                db_path: "/var/lib/pacman".into()
            }
        );
        assert_eq!(
            Layout::default().local_db(),
            Path::new("/var/lib/pacman/local")
        );
        let conf = "\
# /etc/pacman.conf
#DBPath      = /commented/out/
[options]
HoldPkg     = pacman glibc
  DBPath    = /srv/pacman/db/   # where the databases live
Color
CheckSpace
[core]
Include = /etc/pacman.d/mirrorlist
DBPath = /a/repo/section/does/not/count
";
        let l = Layout::from_conf(conf);
        assert_eq!(l.db_path, Path::new("/srv/pacman/db/"));
        assert_eq!(l.local_db(), Path::new("/srv/pacman/db/local"));
        assert_eq!(l.root, Path::new("/"));

        let l = Layout::from_conf("[options]\nRootDir = /mnt\n[extra]\nRootDir = /nope\n");
        assert_eq!(l.root, Path::new("/mnt"));
        assert_eq!(
            l.db_path,
            Path::new("/mnt/var/lib/pacman"),
            "DBPath follows RootDir"
        );

        let l = Layout::from_conf("[options]\nRootDir=/mnt\nDBPath=/db\n");
        assert_eq!(
            (l.root.as_path(), l.db_path.as_path()),
            (Path::new("/mnt"), Path::new("/db"))
        );
        assert_eq!(
            Layout::from_conf("DBPath = /before/any/section\n"),
            Layout::default(),
            "keys outside [options] are not pacman's options"
        );
    }
}
