#!/usr/bin/env bash
# Checks the Arch Linux packaging in pkgbuilds/ (CI entry point; runs on Debian 12 or Arch):
#   - bash -n and shellcheck on this script, shellcheck on every PKGBUILD;
#   - every committed .SRCINFO equals `makepkg --printsrcinfo`; static policy checks on them;
#   - builds llm-agent + llm-cluster for real with makepkg from the current checkout (its HEAD
#     commit; CHECK_WORKTREE=1: the working tree, uncommitted edits included), cargo test included;
#   - checks the packages: exact file lists, modes and owners, .PKGINFO (version, depends, backup),
#     the binary, completions and man page, the systemd unit (systemd-analyze verify), the
#     sysusers/tmpfiles files (applied to a scratch root), the sysctl and modules-load files.
# It never changes this machine's sysctls, users or units. prima.cpp and HiGHS are not built.
#
# As root it installs what it needs with apt-get and builds as an unprivileged user
# ($BUILD_USER, created if missing); as a normal user the tools must already be installed.
# Rust: cargo/rustc from PATH (e.g. rustup's). Cache (cargo registry, cargo target dir, a
# read-only hard-link copy of the toolchain when the build user cannot reach it):
# ~$BUILD_USER/.cache/llm-cluster/packages.
# Environment: BUILD_USER (pkgbuilder), CHECK_WORKTREE=1 (build the working tree, not HEAD),
# KEEP_WORK=1 (keep the scratch directory).
# Output ends with "N passed, M failed"; the exit status is 0 only when nothing failed.
set -euo pipefail

START=$SECONDS
ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT_DIR/scripts/check-packages.sh"
PASSED=0
FAILED=0
FAILURES=()

log() { printf '[check-packages] %s\n' "$*"; }
section() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - START)); }
pass() {
  PASSED=$((PASSED + 1))
  printf '  ok    %s\n' "$*"
}
fail() {
  FAILED=$((FAILED + 1))
  FAILURES+=("$*")
  printf '  FAIL  %s\n' "$*"
}
note() { printf '        %s\n' "$*"; }
die() {
  printf '[check-packages] error: %s\n' "$*" >&2
  exit 2
}
# check DESCRIPTION COMMAND...: pass when the command succeeds; its output is shown on failure.
check() {
  local desc=$1 out
  shift
  if out=$("$@" 2>&1); then
    pass "$desc"
  else
    fail "$desc"
    [[ -z $out ]] || printf '%s\n' "$out" | sed 's/^/        | /' | head -n 40
  fi
}
finish() {
  local elapsed=$((SECONDS - START))
  printf '\n'
  if ((FAILED)); then
    log "failures:"
    printf '  - %s\n' "${FAILURES[@]}"
  fi
  log "total time: $((elapsed / 60))m$((elapsed % 60))s"
  printf '%d passed, %d failed\n' "$PASSED" "$FAILED"
  ((FAILED == 0))
}

# --- tools -----------------------------------------------------------------------------------
section "tools"
IS_ROOT=0
[[ $(id -u) -eq 0 ]] && IS_ROOT=1

# command -> Debian package
declare -A NEED=(
  [makepkg]=makepkg
  [pacman]=pacman-package-manager
  [bsdtar]=libarchive-tools
  [fakeroot]=fakeroot
  [shellcheck]=shellcheck
  [systemd-analyze]=systemd
  [git]=git
  [zstd]=zstd
  [gzip]=gzip
  [cc]=build-essential
  [file]=file
)
missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
if ((${#missing[@]})); then
  if ((IS_ROOT)) && command -v apt-get >/dev/null 2>&1; then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    die "missing tools; install the packages: ${missing[*]}"
  fi
fi
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
  die "cargo/rustc not on PATH (install Rust, e.g. with rustup, and re-run)"
fi
RUST_SYSROOT=$(rustc --print sysroot)
RUST_VERSION=$(rustc --version)
log "makepkg $(makepkg --version | sed -n 's/^makepkg (pacman) //p'), $RUST_VERSION, $(shellcheck --version | sed -n 's/^version: /shellcheck /p'), $(systemd-analyze --version | head -n 1)"

# --- build user, cache, scratch ---------------------------------------------------------------
if ((IS_ROOT)); then
  BUILD_USER=${BUILD_USER:-pkgbuilder}
  if ! id -u "$BUILD_USER" >/dev/null 2>&1; then
    log "creating build user $BUILD_USER (makepkg refuses to run as root)"
    useradd --create-home --user-group --shell /bin/bash "$BUILD_USER"
  fi
  BUILD_HOME=$(getent passwd "$BUILD_USER" | cut -d: -f6)
else
  BUILD_USER=$(id -un)
  BUILD_HOME=$HOME
fi
CACHE="$BUILD_HOME/.cache/llm-cluster/packages"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-packages.XXXXXX")
cleanup() {
  if [[ ${KEEP_WORK:-0} == 1 ]]; then log "scratch kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
chmod 0755 "$WORK"
if ((IS_ROOT)); then
  runuser -u "$BUILD_USER" -- mkdir -p "$CACHE"
  chown "$BUILD_USER:" "$WORK"
else
  mkdir -p "$CACHE"
fi

# The toolchain must be usable by the build user: use it in place when it can run it (e.g. a
# world-readable /usr/local/rustup), else a hard-link copy (no extra space on the same
# filesystem; read-only, owned by root) of the sysroot in the cache.
RUST_BIN="$RUST_SYSROOT/bin"
if ((IS_ROOT)) && ! runuser -u "$BUILD_USER" -- "$RUST_SYSROOT/bin/cargo" --version >/dev/null 2>&1; then
  key=$(printf '%s' "$RUST_VERSION" | sha256sum | cut -c1-12)
  mirror="$CACHE/rust-$key"
  if [[ ! -x $mirror/bin/cargo ]]; then
    log "making the Rust toolchain readable for $BUILD_USER: $mirror"
    rm -rf "$mirror.tmp"
    cp -al "$RUST_SYSROOT" "$mirror.tmp" 2>/dev/null || {
      rm -rf "$mirror.tmp"
      cp -a "$RUST_SYSROOT" "$mirror.tmp"
    }
    rm -rf "$mirror"
    mv "$mirror.tmp" "$mirror"
  fi
  RUST_BIN="$mirror/bin"
fi
BUILD_PATH="$RUST_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# as_build CMD...: run as the build user in a clean environment.
as_build() {
  local env=(
    HOME="$BUILD_HOME" USER="$BUILD_USER" LOGNAME="$BUILD_USER" PATH="$BUILD_PATH"
    LANG=C.UTF-8 CARGO_HOME="$CACHE/cargo-home" CARGO_TERM_COLOR=never
  )
  if ((IS_ROOT)); then
    runuser -u "$BUILD_USER" -- env -i "${env[@]}" "$@"
  else
    env -i "${env[@]}" "$@"
  fi
}
check "cargo runs as the build user ($BUILD_USER)" as_build cargo --version

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
PACKAGER="llm-cluster check-packages.sh <https://github.com/llm-cluster/llm-cluster>"
EOF
as_build mkdir -p "$WORK/packages" "$WORK/sources" "$WORK/logs"

# --- lint ------------------------------------------------------------------------------------
section "lint"
check "bash -n scripts/check-packages.sh" bash -n "$SELF"
check "shellcheck scripts/check-packages.sh" shellcheck "$SELF"

mapfile -t PKGBUILDS < <(cd "$ROOT_DIR" && find pkgbuilds -mindepth 2 -maxdepth 2 -name PKGBUILD | sort)
((${#PKGBUILDS[@]})) || die "no PKGBUILD under $ROOT_DIR/pkgbuilds"
# SC2034: variables makepkg reads; SC2154: srcdir/pkgdir, set by makepkg; SC2164: makepkg
# aborts on any failing command, so `cd dir` needs no `|| exit`.
for pb in "${PKGBUILDS[@]}"; do
  check "bash -n $pb" bash -n "$ROOT_DIR/$pb"
  check "shellcheck $pb" shellcheck --shell=bash --exclude=SC2034,SC2154,SC2164 "$ROOT_DIR/$pb"
done

# --- .SRCINFO --------------------------------------------------------------------------------
section ".SRCINFO"
for pb in "${PKGBUILDS[@]}"; do
  dir=$(dirname "$pb")
  name=$(basename "$dir")
  tmp="$WORK/srcinfo/$name"
  as_build mkdir -p "$tmp"
  cp "$ROOT_DIR/$pb" "$tmp/PKGBUILD"
  chmod a+r "$tmp/PKGBUILD"
  if ! (cd "$tmp" && as_build makepkg --printsrcinfo >"$tmp/.SRCINFO.new" 2>"$tmp/err"); then
    fail "$dir: makepkg --printsrcinfo failed"
    sed 's/^/        | /' "$tmp/err"
  elif [[ ! -f $ROOT_DIR/$dir/.SRCINFO ]]; then
    fail "$dir/.SRCINFO is missing; generate it: (cd $dir && makepkg --printsrcinfo > .SRCINFO)"
  elif diff -u "$ROOT_DIR/$dir/.SRCINFO" "$tmp/.SRCINFO.new" >"$tmp/diff"; then
    pass "$dir/.SRCINFO is up to date"
  else
    fail "$dir/.SRCINFO is stale; regenerate it: (cd $dir && makepkg --printsrcinfo > .SRCINFO)"
    sed 's/^/        | /' "$tmp/diff" | head -n 40
  fi
done

# srcinfo_values FILE KEY: the values of KEY (all sections) in a .SRCINFO.
srcinfo_values() { sed -n "s/^[[:space:]]*$2 = //p" "$1"; }

section "policy"
for pb in "${PKGBUILDS[@]}"; do
  dir=$(dirname "$pb")
  si="$ROOT_DIR/$dir/.SRCINFO"
  [[ -f $si ]] || continue
  if srcinfo_values "$si" backup | grep -q '^/'; then
    fail "$dir: backup entries must not start with /"
  else
    pass "$dir: backup entries are relative"
  fi
  # A git source is pinned by commit or tag and may use SKIP; anything else needs a real sha256.
  mapfile -t srcs < <(srcinfo_values "$si" source)
  mapfile -t sums < <(srcinfo_values "$si" sha256sums)
  ok=1
  if ((${#srcs[@]} != ${#sums[@]})); then
    ok=0
    note "${#srcs[@]} sources but ${#sums[@]} sha256sums"
  fi
  for i in "${!srcs[@]}"; do
    s=${srcs[$i]} sum=${sums[$i]:-}
    if [[ $s == *git+* ]]; then
      [[ $s =~ \#(commit=[0-9a-f]{40}|tag=v?[0-9][0-9A-Za-z.]*)$ ]] || {
        ok=0
        note "git source not pinned to a full commit hash or a version tag: $s"
      }
    elif [[ ! $sum =~ ^[0-9a-f]{64}$ ]]; then
      ok=0
      note "source without a sha256: $s"
    fi
  done
  if ((ok)); then pass "$dir: sources pinned, checksums present"; else fail "$dir: source pinning"; fi
done

# The prima.cpp variants: same pinned commit, one provider name, mutual conflicts.
prima_commits=()
for v in prima-cpp prima-cpp-cuda prima-cpp-rocm; do
  si="$ROOT_DIR/pkgbuilds/$v/.SRCINFO"
  if [[ ! -f $si ]]; then
    fail "pkgbuilds/$v/.SRCINFO exists"
    continue
  fi
  prima_commits+=("$(srcinfo_values "$si" source | sed -n 's/.*#commit=//p')")
  deps=$(srcinfo_values "$si" depends | tr '\n' ' ')
  ok=1
  for d in zeromq highs fio gcc-libs glibc; do
    [[ " $deps" == *" $d "* ]] || {
      ok=0
      note "$v does not depend on $d"
    }
  done
  if [[ $v != prima-cpp ]]; then
    srcinfo_values "$si" provides | grep -qx prima-cpp || {
      ok=0
      note "$v does not provide prima-cpp"
    }
    srcinfo_values "$si" conflicts | grep -qx prima-cpp || {
      ok=0
      note "$v does not conflict with prima-cpp"
    }
  fi
  if ((ok)); then pass "$v: depends, provides and conflicts"; else fail "$v: depends, provides and conflicts"; fi
done
if [[ ${#prima_commits[@]} -eq 3 && ${prima_commits[0]} == "${prima_commits[1]}" && ${prima_commits[0]} == "${prima_commits[2]}" ]]; then
  pass "prima-cpp variants pin the same commit (${prima_commits[0]:0:12})"
else
  fail "prima-cpp variants pin different commits: ${prima_commits[*]}"
fi

AGENT_SI="$ROOT_DIR/pkgbuilds/llm-agent/.SRCINFO"
CARGO_VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT_DIR/agent/Cargo.toml" | head -n 1)
PKGVER=$(srcinfo_values "$AGENT_SI" pkgver | head -n 1)
PKGREL=$(srcinfo_values "$AGENT_SI" pkgrel | head -n 1)
if [[ -n $PKGVER && $PKGVER == "$CARGO_VERSION" ]]; then
  pass "llm-agent pkgver $PKGVER equals agent/Cargo.toml's version"
else
  fail "llm-agent pkgver '$PKGVER' differs from agent/Cargo.toml's version '$CARGO_VERSION'"
fi

# --- build llm-agent + llm-cluster -----------------------------------------------------------
section "build llm-agent and llm-cluster with makepkg"
BUILD="$WORK/build-llm-agent"
as_build mkdir -p "$BUILD"
git_() { git -c safe.directory="$ROOT_DIR" -C "$ROOT_DIR" "$@"; }
if [[ ${CHECK_WORKTREE:-0} == 1 ]]; then
  # Tracked and untracked-but-not-ignored files as they are now.
  git_ ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      [[ -e $ROOT_DIR/$f || -L $ROOT_DIR/$f ]] && printf '%s\0' "$f"
    done |
    tar -C "$ROOT_DIR" --null -T - --transform 's,^,llm-cluster/,S' -czf "$BUILD/llm-cluster-checkout.tar.gz"
  log "source: working tree of $(git_ describe --always --dirty --abbrev=12)"
else
  git_ archive --format=tar.gz --prefix=llm-cluster/ -o "$BUILD/llm-cluster-checkout.tar.gz" HEAD
  log "source: HEAD $(git_ describe --always --abbrev=12) (git archive; CHECK_WORKTREE=1 builds uncommitted edits too)"
  git_ diff --quiet HEAD -- pkgbuilds packaging sysctl.d modules-load.d config agent Cargo.toml Cargo.lock ||
    note "warning: the working tree differs from HEAD in files the package uses; they are not in this build"
fi
# The tree that is packaged, to compare the package's files with.
TREE="$WORK/checkout"
mkdir -p "$TREE"
tar -xzf "$BUILD/llm-cluster-checkout.tar.gz" -C "$TREE"
TREE="$TREE/llm-cluster"
# Its PKGBUILD fetches the release tag; this copy takes the checkout's tarball instead.
if [[ $(grep -c '^source=' "$TREE/pkgbuilds/llm-agent/PKGBUILD") -ne 1 ]]; then
  die "pkgbuilds/llm-agent/PKGBUILD: expected exactly one source= line"
fi
sed 's|^source=.*$|source=("llm-cluster-checkout.tar.gz")|' \
  "$TREE/pkgbuilds/llm-agent/PKGBUILD" >"$BUILD/PKGBUILD"
chmod a+r "$BUILD/PKGBUILD" "$BUILD/llm-cluster-checkout.tar.gz"
# Sources are re-extracted every time; only cargo's target/ survives between runs.
SRC_TREE="$CACHE/build/llm-agent/src/llm-cluster"
if [[ -d $SRC_TREE ]]; then
  as_build find "$SRC_TREE" -mindepth 1 -maxdepth 1 ! -name target -exec rm -rf {} +
fi

build_start=$SECONDS
if (cd "$BUILD" && as_build nice -n 10 makepkg --config "$WORK/makepkg.conf" --nodeps --force \
  --noconfirm --noprogressbar >"$WORK/build.log" 2>&1); then
  pass "makepkg built llm-agent and llm-cluster, cargo test passed ($((SECONDS - build_start))s)"
  BUILT=1
else
  fail "makepkg failed ($((SECONDS - build_start))s); last lines of the log:"
  tail -n 60 "$WORK/build.log" | sed 's/^/        | /'
  BUILT=0
fi
grep -E '^test result:' "$WORK/build.log" | sed 's/^/        cargo /' || true

# --- package contents ------------------------------------------------------------------------
if ((BUILT)); then
  section "package contents"
  ARCH=$(uname -m)
  AGENT_PKG="$WORK/packages/llm-agent-$PKGVER-$PKGREL-$ARCH.pkg.tar.zst"
  META_PKG="$WORK/packages/llm-cluster-$PKGVER-$PKGREL-any.pkg.tar.zst"
  check "llm-agent package file exists ($(basename "$AGENT_PKG"))" test -s "$AGENT_PKG"
  check "llm-cluster package file exists ($(basename "$META_PKG"))" test -s "$META_PKG"
  check "packages are zstd-compressed tar archives" zstd -tq "$AGENT_PKG" "$META_PKG"

  # listing PKG: "mode owner:group path" for every entry, metadata files excluded.
  listing() {
    bsdtar -tvf "$1" | awk '{ p = $9; for (i = 10; i <= NF; i++) p = p " " $i;
      if (p !~ /^\.(PKGINFO|BUILDINFO|MTREE|INSTALL|CHANGELOG)$/) print $1, $3 ":" $4, p }'
  }
  pkginfo() { bsdtar -xOf "$1" .PKGINFO; }

  # llm-agent: exactly these files with these modes; directories 0755 except /etc/llm-cluster.
  declare -A WANT=(
    [usr/bin/llm-agent]=-rwxr-xr-x
    [usr/lib/systemd/system/llm-agent@.service]=-rw-r--r--
    [usr/lib/sysusers.d/llm-cluster.conf]=-rw-r--r--
    [usr/lib/tmpfiles.d/llm-cluster.conf]=-rw-r--r--
    [usr/lib/sysctl.d/99-llm-net.conf]=-rw-r--r--
    [usr/lib/modules-load.d/llm-cluster.conf]=-rw-r--r--
    [etc/llm-cluster/cluster.toml]=-rw-r--r--
    [usr/share/bash-completion/completions/llm-agent]=-rw-r--r--
    [usr/share/zsh/site-functions/_llm-agent]=-rw-r--r--
    [usr/share/fish/vendor_completions.d/llm-agent.fish]=-rw-r--r--
    [usr/share/man/man1/llm-agent.1.gz]=-rw-r--r--
    [usr/share/doc/llm-agent/README.md]=-rw-r--r--
    [usr/share/doc/llm-agent/cluster.example.toml]=-rw-r--r--
    [usr/share/doc/llm-agent/PACKAGES.md]=-rw-r--r--
    [usr/share/licenses/llm-agent/LICENSE]=-rw-r--r--
  )
  listing "$AGENT_PKG" >"$WORK/agent.list"
  bad=()
  declare -A SEEN=()
  while read -r mode owner path; do
    [[ $owner == root:root ]] || bad+=("$path is owned by $owner")
    if [[ $path == */ ]]; then
      want=drwxr-xr-x
      [[ $path == etc/llm-cluster/ ]] && want=drwxr-x---
      [[ $mode == "$want" ]] || bad+=("$path has mode $mode, expected $want")
    elif [[ -n ${WANT[$path]:-} ]]; then
      SEEN[$path]=1
      [[ $mode == "${WANT[$path]}" ]] || bad+=("$path has mode $mode, expected ${WANT[$path]}")
    else
      bad+=("unexpected file $path")
    fi
  done <"$WORK/agent.list"
  for path in "${!WANT[@]}"; do
    [[ -n ${SEEN[$path]:-} ]] || bad+=("missing $path")
  done
  if ((${#bad[@]})); then
    fail "llm-agent file list, modes and owners"
    printf '        %s\n' "${bad[@]}"
  else
    pass "llm-agent file list, modes and owners (${#WANT[@]} files, all root:root)"
  fi
  if [[ ! -e $TREE/LICENSE ]]; then
    note "warning: the checkout has no LICENSE file, so the package ships none (MIT needs the copyright notice)"
  fi

  if [[ -z $(listing "$META_PKG") ]]; then
    pass "llm-cluster is a meta package (no files)"
  else
    fail "llm-cluster contains files: $(listing "$META_PKG" | tr '\n' ' ')"
  fi

  # .PKGINFO
  pkginfo "$AGENT_PKG" >"$WORK/agent.pkginfo"
  pkginfo "$META_PKG" >"$WORK/meta.pkginfo"
  pi() { sed -n "s/^$2 = //p" "$1"; }
  check "llm-agent .PKGINFO: pkgname, pkgver $PKGVER-$PKGREL, arch $ARCH" \
    test "$(pi "$WORK/agent.pkginfo" pkgname) $(pi "$WORK/agent.pkginfo" pkgver) $(pi "$WORK/agent.pkginfo" arch)" == "llm-agent $PKGVER-$PKGREL $ARCH"
  check "llm-agent .PKGINFO: depends gcc-libs glibc systemd" \
    test "$(pi "$WORK/agent.pkginfo" depend | sort | tr '\n' ' ')" == "gcc-libs glibc systemd "
  check "llm-cluster .PKGINFO: arch any, depends llm-agent=$PKGVER-$PKGREL prima-cpp fio" \
    test "$(pi "$WORK/meta.pkginfo" arch) $(pi "$WORK/meta.pkginfo" depend | sort | tr '\n' ' ')" == "any fio llm-agent=$PKGVER-$PKGREL prima-cpp "
  mapfile -t BACKUP < <(pi "$WORK/agent.pkginfo" backup)
  if [[ ${BACKUP[*]} == etc/llm-cluster/cluster.toml ]]; then
    pass "llm-agent .PKGINFO: backup = etc/llm-cluster/cluster.toml"
  else
    fail "llm-agent .PKGINFO: backup is '${BACKUP[*]}', expected etc/llm-cluster/cluster.toml"
  fi
  for b in "${BACKUP[@]}"; do
    if [[ $b != /* ]] && grep -qxF -- "-rw-r--r-- root:root $b" "$WORK/agent.list"; then
      pass "backup entry $b is a file in the package"
    else
      fail "backup entry $b is not a (relative) file path in the package"
    fi
  done

  # Extract and look inside.
  X="$WORK/root-agent"
  mkdir -p "$X"
  bsdtar -xpf "$AGENT_PKG" -C "$X"
  for f in usr/lib/systemd/system/llm-agent@.service:packaging/systemd/llm-agent@.service \
    usr/lib/sysusers.d/llm-cluster.conf:packaging/sysusers.d/llm-cluster.conf \
    usr/lib/tmpfiles.d/llm-cluster.conf:packaging/tmpfiles.d/llm-cluster.conf \
    usr/lib/sysctl.d/99-llm-net.conf:sysctl.d/99-llm-net.conf \
    usr/lib/modules-load.d/llm-cluster.conf:modules-load.d/llm-cluster.conf \
    etc/llm-cluster/cluster.toml:config/cluster.example.toml; do
    check "/${f%%:*} is ${f#*:}" cmp "$X/${f%%:*}" "$TREE/${f#*:}"
  done

  BIN="$X/usr/bin/llm-agent"
  check "llm-agent is a stripped ELF executable" bash -c "file -b '$BIN' | grep -q 'ELF.*executable.*stripped' && ! file -b '$BIN' | grep -q 'not stripped'"
  check "llm-agent --version prints $PKGVER" bash -c "'$BIN' --version | grep -qx 'llm-agent $PKGVER'"
  libs=$(ldd "$BIN" 2>/dev/null | awk '{ print $1 }' | sed 's|.*/||' | sort | tr '\n' ' ')
  extra=$(tr ' ' '\n' <<<"$libs" | grep -vE '^(linux-vdso\.so\.1|ld-linux[-a-z0-9_.]*\.so\.[0-9]+|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|)$' || true)
  if [[ -z $extra ]]; then
    pass "llm-agent links only glibc and libgcc_s (depends gcc-libs glibc): $libs"
  else
    fail "llm-agent links libraries its depends= does not cover: $extra"
  fi
  check "the packaged config passes llm-agent check-config" "$BIN" check-config "$X/etc/llm-cluster/cluster.toml"
  for sh in bash zsh fish; do
    case $sh in
      bash) f=usr/share/bash-completion/completions/llm-agent ;;
      zsh) f=usr/share/zsh/site-functions/_llm-agent ;;
      fish) f=usr/share/fish/vendor_completions.d/llm-agent.fish ;;
    esac
    check "$sh completion is what 'llm-agent completions $sh' prints" \
      bash -c "test -s '$X/$f' && '$BIN' completions $sh | cmp - '$X/$f'"
  done
  check "man page: gzip, roff, what 'llm-agent manpage' prints" \
    bash -c "gzip -t '$X/usr/share/man/man1/llm-agent.1.gz' && zcat '$X/usr/share/man/man1/llm-agent.1.gz' | grep -q '^\.TH llm-agent 1' && '$BIN' manpage | cmp - <(zcat '$X/usr/share/man/man1/llm-agent.1.gz')"

  # systemd unit: verify in a scratch root holding the host's unit files plus the package.
  section "systemd unit, sysusers, tmpfiles, sysctl, modules-load"
  U="$WORK/root-units"
  mkdir -p "$U/usr/lib/systemd/system" "$U/etc"
  for d in /usr/lib/systemd/system /lib/systemd/system; do
    if [[ -d $d ]]; then
      cp -a "$d/." "$U/usr/lib/systemd/system/"
      break
    fi
  done
  cp -a "$X/." "$U/"
  verify_out=$(cd "$WORK" && systemd-analyze verify --root="$U" --man=no llm-agent@rank0.service 2>&1) && rc=0 || rc=$?
  if ((rc == 0)) && [[ -z $verify_out ]]; then
    pass "systemd-analyze verify llm-agent@rank0.service: no errors, no warnings"
  else
    fail "systemd-analyze verify llm-agent@rank0.service (exit $rc)"
    printf '%s\n' "$verify_out" | sed 's/^/        | /'
  fi
  exposure=$(cd "$WORK" && systemd-analyze security --offline=true --root="$U" llm-agent@rank0.service 2>/dev/null |
    sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p') || true
  if [[ -n $exposure ]] && awk -v e="$exposure" 'BEGIN { exit !(e <= 5.0) }'; then
    pass "systemd-analyze security: exposure $exposure (<= 5.0)"
  elif [[ -n $exposure ]]; then
    fail "systemd-analyze security: exposure $exposure, more than 5.0 (hardening lost?)"
  else
    note "systemd-analyze security --offline is not available here; skipped"
  fi
  unit="$X/usr/lib/systemd/system/llm-agent@.service"
  for want in 'ExecStart=/usr/bin/llm-agent run --config /etc/llm-cluster/cluster.toml --node %i' \
    'Restart=on-failure' 'Wants=network-online.target' 'After=network-online.target' \
    'WantedBy=multi-user.target' 'ReadWritePaths=/var/lib/llm-cluster' 'ProtectSystem=strict' \
    'Environment=RUST_LOG=info'; do
    check "unit has $want" grep -qxF -- "$want" "$unit"
  done

  # sysusers + tmpfiles, applied to a scratch root only.
  S="$WORK/root-sys"
  mkdir -p "$S/etc" "$S/usr/lib/sysusers.d" "$S/usr/lib/tmpfiles.d"
  cp "$X/usr/lib/sysusers.d/llm-cluster.conf" "$S/usr/lib/sysusers.d/"
  cp "$X/usr/lib/tmpfiles.d/llm-cluster.conf" "$S/usr/lib/tmpfiles.d/"
  if ((IS_ROOT)); then
    check "systemd-sysusers applies sysusers.d/llm-cluster.conf (scratch root)" systemd-sysusers --root="$S"
    entry=$(grep '^llm-cluster:' "$S/etc/passwd" || true)
    IFS=: read -r _ _ uid gid _ home _ <<<"$entry"
    if [[ -n $entry && $home == /var/lib/llm-cluster && $uid -lt 1000 ]]; then
      pass "system user llm-cluster (uid $uid), home /var/lib/llm-cluster"
    else
      fail "sysusers: unexpected passwd entry '$entry'"
    fi
    check "systemd-tmpfiles --create applies tmpfiles.d/llm-cluster.conf (scratch root)" systemd-tmpfiles --create --root="$S"
    for d in "var/lib/llm-cluster 750" "var/lib/llm-cluster/models 755"; do
      read -r dpath dmode <<<"$d"
      check "/$dpath: directory, mode $dmode, owned by llm-cluster" \
        test "$(stat -c '%F %a %u:%g' "$S/$dpath" 2>&1)" == "directory $dmode $uid:$gid"
    done
  else
    check "systemd-sysusers parses sysusers.d/llm-cluster.conf" systemd-sysusers --root="$S" --dry-run
    note "not root: tmpfiles not applied"
  fi

  # sysctl: parse, keys exist under /proc/sys, values as designed. Nothing is applied.
  SYSCTL="$X/usr/lib/sysctl.d/99-llm-net.conf"
  declare -A WANT_SYSCTL=(
    [net.core.rmem_max]=16777216
    [net.core.wmem_max]=16777216
    [net.ipv4.tcp_rmem]="4096 87380 16777216"
    [net.ipv4.tcp_wmem]="4096 65536 16777216"
    [net.ipv4.tcp_window_scaling]=1
    [net.core.default_qdisc]=fq
    [net.ipv4.tcp_congestion_control]=bbr
  )
  bad=()
  declare -A GOT=()
  n=0
  re_skip='^[[:space:]]*([#;].*)?$'
  re_kv='^-?([a-z0-9_.]+)[[:space:]]*=[[:space:]]*(.*[^[:space:]])[[:space:]]*$'
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    [[ $line =~ $re_skip ]] && continue
    if [[ $line =~ $re_kv ]]; then
      key=${BASH_REMATCH[1]} val=${BASH_REMATCH[2]}
      GOT[$key]=$val
      [[ -e /proc/sys/${key//.//} ]] || bad+=("line $n: /proc/sys/${key//.//} does not exist on this kernel")
    else
      bad+=("line $n is not 'key = value': $line")
    fi
  done <"$SYSCTL"
  for key in "${!WANT_SYSCTL[@]}"; do
    [[ ${GOT[$key]:-} == "${WANT_SYSCTL[$key]}" ]] || bad+=("$key is '${GOT[$key]:-}', expected '${WANT_SYSCTL[$key]}'")
  done
  for key in "${!GOT[@]}"; do
    [[ -n ${WANT_SYSCTL[$key]:-} ]] || bad+=("unexpected key $key")
  done
  if ((${#bad[@]})); then
    fail "sysctl.d/99-llm-net.conf"
    printf '        %s\n' "${bad[@]}"
  else
    pass "sysctl.d/99-llm-net.conf: ${#GOT[@]} keys, all 'key = value', all present under /proc/sys (not applied)"
  fi
  if grep -qw bbr /proc/sys/net/ipv4/tcp_available_congestion_control 2>/dev/null; then
    note "this kernel has bbr loaded"
  elif modinfo tcp_bbr >/dev/null 2>&1; then
    note "tcp_bbr is available as a module on this kernel"
  else
    note "tcp_bbr is neither loaded nor visible to modinfo here (normal in a container)"
  fi
  check "modules-load.d/llm-cluster.conf lists tcp_bbr, one module name a line" \
    bash -c "grep -vE '^[[:space:]]*([#;].*)?$' '$X/usr/lib/modules-load.d/llm-cluster.conf' | grep -qx tcp_bbr && ! grep -vE '^[[:space:]]*([#;].*)?$' '$X/usr/lib/modules-load.d/llm-cluster.conf' | grep -qvE '^[a-z0-9_-]+$'"

  # --- summary -------------------------------------------------------------------------------
  section "packages"
  for p in "$AGENT_PKG" "$META_PKG"; do
    info=$(pkginfo "$p")
    printf '%s %s (%s): %s compressed, %s installed\n' \
      "$(sed -n 's/^pkgname = //p' <<<"$info")" "$(sed -n 's/^pkgver = //p' <<<"$info")" \
      "$(sed -n 's/^arch = //p' <<<"$info")" "$(du -h "$p" | cut -f1)" \
      "$(numfmt --to=iec "$(sed -n 's/^size = //p' <<<"$info")")"
    listing "$p" | sed 's/^/  /'
  done
  rm -f "$CACHE/last-build.log"
  cp "$WORK/build.log" "$CACHE/last-build.log"
  ((IS_ROOT == 0)) || chown "$BUILD_USER:" "$CACHE/last-build.log"
  log "build log: $CACHE/last-build.log"
fi

finish
