//! Which Arch package installed the engine, read from pacman's local database with the ALPM
//! project's pure-Rust `alpm-db` crate. Linking libalpm instead would tie the agent to one
//! libalpm soname, which changes with every pacman major release and would stop the daemon
//! from loading after such an upgrade.
//!
//! On Arch the package version is the engine's real identity: prima.cpp builds from a tarball
//! report `version: 0 (unknown)`, so the coordinator compares package versions across nodes.

use std::path::Path;
use std::str::FromStr;

use crate::proto::InstalledPackage;
use alpm_db::desc::DbDescFile;

/// pacman's local database.
pub const LOCAL_DB: &str = "/var/lib/pacman/local";

/// The installed package that owns `binary` (an absolute path), if pacman installed it.
pub fn owner_of(db: &Path, binary: &Path) -> Option<InstalledPackage> {
    let wanted = binary.strip_prefix("/").ok()?.to_str()?;
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

    /// A database laid out as pacman writes it (desc in the alpm-db-desc v1 format).
    #[test]
    fn finds_the_package_that_owns_a_binary() {
        let db = tempfile::tempdir().expect("tempdir");
        package(
            db.path(),
            "zeromq",
            "4.3.5-2",
            &["usr/", "usr/lib/", "usr/lib/libzmq.so.5"],
        );
        package(
            db.path(),
            "prima-cpp-cuda",
            "0.0.0.r20250717.bdf9d8e-1",
            &[
                "usr/",
                "usr/bin/",
                "usr/bin/prima-cli",
                "usr/bin/prima-server",
            ],
        );
        assert_eq!(
            owner_of(db.path(), Path::new("/usr/bin/prima-server")),
            Some(InstalledPackage {
                name: "prima-cpp-cuda".into(),
                version: "0.0.0.r20250717.bdf9d8e-1".into()
            })
        );
        assert_eq!(
            owner_of(db.path(), Path::new("/opt/prima/prima-server")),
            None
        );
        assert_eq!(
            owner_of(Path::new("/nonexistent"), Path::new("/usr/bin/x")),
            None
        );
    }
}
