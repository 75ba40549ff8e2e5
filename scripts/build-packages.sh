#!/usr/bin/env bash
# Builds the Arch packages llm-agent and llm-cluster for real with makepkg from this checkout, on
# Debian 12 or Arch. The checks of what it builds are tests/packages (pytest), which call this.
#
#   scripts/build-packages.sh [--worktree] [--out DIR]
#       build from HEAD (--worktree: the working tree, uncommitted and untracked-but-not-ignored
#       files included), cargo test included; copy the packages into DIR (default: the cache's
#       out/) and print their paths, one a line, on stdout
#   scripts/build-packages.sh --srcinfo DIR    print `makepkg --printsrcinfo` of DIR/PKGBUILD
#   scripts/build-packages.sh --provision      only install the tools and create the build user
#
# Everything but the package paths (and the .SRCINFO) goes to stderr. makepkg refuses to run as
# root: as root the script installs missing tools with apt-get and runs makepkg as $BUILD_USER
# (default pkgbuilder, created if missing); as a normal user the tools must be installed already.
# Rust: cargo/rustc from PATH (e.g. rustup's). The cache, outside the checkout so re-runs only
# rebuild what changed (cargo home, makepkg's build dir with cargo's target/, a hard-link copy of
# the toolchain when the build user cannot run it, last-build.log): ~$BUILD_USER/.cache/llm-cluster/packages.
# Exit status: 0 done; 1 the build failed; 2 usage; 77 this machine cannot build (reason on stderr).
set -euo pipefail

START=$SECONDS
ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[build-packages] %s\n' "$*" >&2; }
die() {
  log "error: ${*:2}"
  exit "$1"
}

MODE=build WORKTREE=0 OUT='' SRCINFO_DIR=''
while (($#)); do
  case $1 in
    --worktree) WORKTREE=1 ;;
    --out) OUT=${2:?--out needs a directory} && shift ;;
    --srcinfo) MODE=srcinfo SRCINFO_DIR=${2:?--srcinfo needs a directory} && shift ;;
    --provision) MODE=provision ;;
    *) die 2 "unknown argument '$1' (see the comment at the top of $0)" ;;
  esac
  shift
done
IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

# --- tools: for makepkg, and for the checks in tests/packages (shellcheck, systemd-analyze) -----
declare -A NEED=(
  [makepkg]=makepkg [pacman]=pacman-package-manager [bsdtar]=libarchive-tools
  [fakeroot]=fakeroot [shellcheck]=shellcheck [systemd-analyze]=systemd [git]=git [zstd]=zstd
  [gzip]=gzip [cc]=build-essential [file]=file
)
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
if ((${#missing[@]})); then
  if ((!IS_ROOT)) || ! command -v apt-get >/dev/null 2>&1; then
    die 77 "missing tools; install the packages ${missing[*]} (or run as root on Debian)"
  fi
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die 1 "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    die 1 "apt-get install ${missing[*]} failed"
fi

# --- build user, cache, scratch ----------------------------------------------------------------
if ((IS_ROOT)); then
  BUILD_USER=${BUILD_USER:-pkgbuilder}
  if ! id -u "$BUILD_USER" >/dev/null 2>&1; then
    log "creating the build user $BUILD_USER (makepkg refuses to run as root)"
    useradd --create-home --user-group --shell /bin/bash "$BUILD_USER"
  fi
  BUILD_HOME=$(getent passwd "$BUILD_USER" | cut -d: -f6)
else
  BUILD_USER=$(id -un) BUILD_HOME=$HOME
fi
CACHE="$BUILD_HOME/.cache/llm-cluster/packages"
[[ $MODE == provision ]] && exit 0

WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-packages.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK"
if ((IS_ROOT)); then
  runuser -u "$BUILD_USER" -- mkdir -p "$CACHE"
  chown "$BUILD_USER:" "$WORK"
else
  mkdir -p "$CACHE"
fi

BUILD_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# as_build CMD...: run as the build user in a clean environment.
as_build() {
  local env=(HOME="$BUILD_HOME" USER="$BUILD_USER" LOGNAME="$BUILD_USER" PATH="$BUILD_PATH"
    LANG=C.UTF-8 CARGO_HOME="$CACHE/cargo-home" CARGO_TERM_COLOR=never)
  if ((IS_ROOT)); then
    runuser -u "$BUILD_USER" -- env -i "${env[@]}" "$@"
  else
    env -i "${env[@]}" "$@"
  fi
}

if [[ $MODE == srcinfo ]]; then
  [[ -f $SRCINFO_DIR/PKGBUILD ]] || die 2 "$SRCINFO_DIR/PKGBUILD: no such file"
  cp "$SRCINFO_DIR/PKGBUILD" "$WORK/PKGBUILD"
  chmod a+r "$WORK/PKGBUILD"
  (cd "$WORK" && as_build makepkg --printsrcinfo) || die 1 "makepkg --printsrcinfo failed for $SRCINFO_DIR/PKGBUILD"
  exit 0
fi

# --- Rust, readable by the build user ------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
  die 77 "cargo/rustc not on PATH (install Rust, e.g. with rustup, and re-run)"
fi
RUST_SYSROOT=$(rustc --print sysroot)
RUST_VERSION=$(rustc --version)
# In place when the build user can run it (e.g. a world-readable /usr/local/rustup), else a
# hard-link copy in the cache (no extra space on the same filesystem; read-only, owned by root).
RUST_BIN="$RUST_SYSROOT/bin"
if ((IS_ROOT)) && ! runuser -u "$BUILD_USER" -- "$RUST_BIN/cargo" --version >/dev/null 2>&1; then
  mirror="$CACHE/rust-$(printf '%s' "$RUST_VERSION" | sha256sum | cut -c1-12)"
  if [[ ! -x $mirror/bin/cargo ]]; then
    log "making the Rust toolchain runnable for $BUILD_USER: $mirror"
    rm -rf "$mirror.tmp"
    cp -al "$RUST_SYSROOT" "$mirror.tmp" 2>/dev/null || { rm -rf "$mirror.tmp" && cp -a "$RUST_SYSROOT" "$mirror.tmp"; }
    rm -rf "$mirror"
    mv "$mirror.tmp" "$mirror"
  fi
  RUST_BIN="$mirror/bin"
fi
BUILD_PATH="$RUST_BIN:$BUILD_PATH"
as_build cargo --version >/dev/null || die 1 "cargo does not run as the build user $BUILD_USER"
log "makepkg $(makepkg --version | sed -n 's/^makepkg (pacman) //p'), $RUST_VERSION, build user $BUILD_USER"

# makepkg.conf: Debian's, with Arch Linux's x86_64 defaults for what matters here (package
# format, flags, options); check() runs (BUILDENV check).
cat >"$WORK/makepkg.conf" <<EOF
source /etc/makepkg.conf
CARCH="$(uname -m)"
CFLAGS="-march=x86-64 -mtune=generic -O2 -pipe -fno-plt -fexceptions -Wp,-D_FORTIFY_SOURCE=3 -Wformat -Werror=format-security -fstack-clash-protection -fcf-protection -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer"
[[ \$CARCH == x86_64 ]] || CFLAGS="-O2 -pipe -fno-plt -fexceptions -Wp,-D_FORTIFY_SOURCE=3 -Wformat -Werror=format-security -fstack-clash-protection"
CXXFLAGS="\$CFLAGS -Wp,-D_GLIBCXX_ASSERTIONS"
LDFLAGS="-Wl,-O1 -Wl,--sort-common -Wl,--as-needed -Wl,-z,relro -Wl,-z,now"
MAKEFLAGS="-j$(nproc)"
BUILDENV=(!distcc color !ccache check !sign)
OPTIONS=(strip docs !libtool !staticlibs emptydirs zipman purge !debug lto)
PKGEXT='.pkg.tar.zst'
SRCEXT='.src.tar.gz'
BUILDDIR="$CACHE/build"
PKGDEST="$WORK/packages"
SRCDEST="$WORK/sources"
LOGDEST="$WORK/logs"
PACKAGER="llm-cluster build-packages.sh <https://github.com/llm-cluster/llm-cluster>"
EOF

# One build at a time per cache: a second waits (makepkg's build dir is shared).
exec 9>>"$CACHE/lock"
((IS_ROOT == 0)) || chown "$BUILD_USER:" "$CACHE/lock"
flock 9 || die 1 "cannot lock $CACHE/lock"

# --- the source: this checkout as a tarball, in place of the PKGBUILD's release tarball -----------
# Made the way scripts/release-tarball.sh makes a release (prefix llm-cluster-VERSION/); the
# PKGBUILD is built with this tarball and its real sha256 in place of the release's, so makepkg
# verifies the checksum exactly as it does for a release.
BUILD="$WORK/build"
as_build mkdir -p "$BUILD" "$WORK/packages" "$WORK/sources" "$WORK/logs"
git_() { git -c safe.directory="$ROOT_DIR" -C "$ROOT_DIR" "$@"; }
# The PKGBUILD is export-ignored (it carries the release tarball's checksum): read it from the
# tree that is built.
if ((WORKTREE)); then
  cp "$ROOT_DIR/pkgbuilds/llm-agent/PKGBUILD" "$WORK/PKGBUILD.in"
else
  git_ show HEAD:pkgbuilds/llm-agent/PKGBUILD >"$WORK/PKGBUILD.in"
fi
VERSION=$(sed -n 's/^pkgver=//p' "$WORK/PKGBUILD.in")
[[ -n $VERSION ]] || die 1 "pkgbuilds/llm-agent/PKGBUILD: no pkgver= line"
TARBALL="$BUILD/llm-cluster-$VERSION.tar.gz"
if ((WORKTREE)); then
  git_ ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -e $ROOT_DIR/$f || -L $ROOT_DIR/$f ]] && printf '%s\0' "$f"; done |
    tar -C "$ROOT_DIR" --null -T - --transform "s,^,llm-cluster-$VERSION/,S" -czf "$TARBALL"
  log "source: the working tree of $(git_ describe --always --dirty --abbrev=12)"
else
  git_ archive --format=tar --prefix="llm-cluster-$VERSION/" HEAD | gzip -n >"$TARBALL"
  log "source: HEAD $(git_ describe --always --abbrev=12) (--worktree builds uncommitted edits too)"
  git_ diff --quiet HEAD -- pkgbuilds packaging sysctl.d modules-load.d config agent Cargo.toml Cargo.lock ||
    log "warning: the working tree differs from HEAD in files the package uses; they are not in this build"
fi
for key in source sha256sums; do
  [[ $(grep -c "^$key=" "$WORK/PKGBUILD.in") -eq 1 ]] || die 1 "pkgbuilds/llm-agent/PKGBUILD: expected exactly one $key= line"
done
SUM=$(sha256sum "$TARBALL" | cut -d' ' -f1)
sed -e "s|^source=.*\$|source=(\"llm-cluster-$VERSION.tar.gz\")|" -e "s|^sha256sums=.*\$|sha256sums=('$SUM')|" \
  "$WORK/PKGBUILD.in" >"$BUILD/PKGBUILD"
chmod a+r "$BUILD/PKGBUILD" "$TARBALL"
log "source tarball sha256 $SUM (checked by makepkg)"
# Sources are re-extracted every time; only cargo's target/ survives between runs.
SRC_TREE="$CACHE/build/llm-agent/src/llm-cluster-$VERSION"
# cargo's target/ of an earlier build (another version, or the unversioned tree of the git
# source) is copied along as hard links, so a new version does not rebuild every dependency.
if [[ ! -d $SRC_TREE/target ]]; then
  for old in "$CACHE"/build/llm-agent/src/llm-cluster*/target; do
    [[ -d $old ]] || continue
    as_build mkdir -p "$SRC_TREE" && as_build cp -al "$old" "$SRC_TREE/target" && break
  done
fi
[[ ! -d $SRC_TREE ]] || as_build find "$SRC_TREE" -mindepth 1 -maxdepth 1 ! -name target -exec rm -rf {} +

# --- build ----------------------------------------------------------------------------------------
BUILD_LOG="$CACHE/last-build.log"
log "makepkg: building llm-agent and llm-cluster, cargo test included (log: $BUILD_LOG)"
build_start=$SECONDS
rc=0
(cd "$BUILD" && as_build nice -n 10 makepkg --config "$WORK/makepkg.conf" --nodeps --force \
  --noconfirm --noprogressbar) >"$BUILD_LOG" 2>&1 || rc=$?
((IS_ROOT == 0)) || chown "$BUILD_USER:" "$BUILD_LOG"
grep -E '^test result:' "$BUILD_LOG" | sed 's/^/[build-packages] cargo /' >&2 || true
if ((rc)); then
  tail -n 60 "$BUILD_LOG" | sed 's/^/[build-packages] | /' >&2
  die 1 "makepkg failed (exit $rc after $((SECONDS - build_start))s); the whole log: $BUILD_LOG"
fi
log "makepkg done in $((SECONDS - build_start))s"

shopt -s nullglob
built=("$WORK"/packages/*.pkg.tar.zst)
((${#built[@]})) || die 1 "makepkg succeeded but left no package in $WORK/packages"
if [[ -z $OUT ]]; then
  # The cache's out/ belongs to the build user, so a later run as that user can replace it.
  OUT="$CACHE/out"
  as_build mkdir -p "$OUT"
  as_build find "$OUT" -maxdepth 1 -name '*.pkg.tar.*' -delete
  as_build cp "${built[@]}" "$OUT/"
else
  mkdir -p "$OUT"
  cp "${built[@]}" "$OUT/"
fi
for p in "${built[@]}"; do printf '%s\n' "$OUT/$(basename "$p")"; done
log "total time $((SECONDS - START))s"
