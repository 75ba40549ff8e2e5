#!/usr/bin/env bash
# The release step of the llm-agent package: makes the source tarball a release publishes and
# writes its sha256 into pkgbuilds/llm-agent/PKGBUILD (and .SRCINFO), so the package builds only
# from exactly those bytes (a `#tag=` git source with SKIP follows a tag wherever it is moved).
#
#   scripts/release-tarball.sh [--ref REF] [--out DIR]
#       REF (default HEAD): the commit to release; the version is the PKGBUILD's pkgver.
#       Writes DIR/llm-cluster-VERSION.tar.gz (default: the current directory), prints its path
#       and sha256, and updates sha256sums in the PKGBUILD and its .SRCINFO.
#
# The archive is reproducible (`git archive | gzip -n`: same files, same bytes) and leaves out
# the two files that carry its checksum (export-ignore in .gitattributes), so committing the
# checksum does not change what it is the checksum of. The steps of a release are in
# pkgbuilds/README.md ("Releasing llm-agent").
# Exit status: 0 done; 1 a step failed; 2 usage.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PKGBUILD="$ROOT_DIR/pkgbuilds/llm-agent/PKGBUILD"
SRCINFO="$ROOT_DIR/pkgbuilds/llm-agent/.SRCINFO"
die() {
  printf '[release-tarball] error: %s\n' "${*:2}" >&2
  exit "$1"
}

REF=HEAD OUT=.
while (($#)); do
  case $1 in
    --ref) REF=${2:?--ref needs a commit} && shift ;;
    --out) OUT=${2:?--out needs a directory} && shift ;;
    *) die 2 "unknown argument '$1' (see the comment at the top of $0)" ;;
  esac
  shift
done

VERSION=$(sed -n 's/^pkgver=//p' "$PKGBUILD")
[[ $VERSION =~ ^[0-9][0-9A-Za-z.]*$ ]] || die 1 "$PKGBUILD: no usable pkgver= line"
mkdir -p "$OUT"
TARBALL="$(cd "$OUT" && pwd)/llm-cluster-$VERSION.tar.gz"
# The tree, not the commit (whose id git would write into the archive), dated by the last commit
# that changed anything but the export-ignored files: the commit that writes the checksum in
# makes the same bytes as the one it was computed from.
MTIME=$(git -C "$ROOT_DIR" log -1 --format=%ct "$REF" -- . ':!pkgbuilds/llm-agent/PKGBUILD' ':!pkgbuilds/llm-agent/.SRCINFO')
[[ -n $MTIME ]] || die 1 "no commit in $REF"
git -C "$ROOT_DIR" archive --format=tar --prefix="llm-cluster-$VERSION/" --mtime="@$MTIME" "$REF^{tree}" |
  gzip -n -9 >"$TARBALL" || die 1 "git archive of $REF failed"
SUM=$(sha256sum "$TARBALL" | cut -d' ' -f1)
[[ $(grep -c '^sha256sums=' "$PKGBUILD") -eq 1 ]] || die 1 "$PKGBUILD: expected exactly one sha256sums= line"
sed -i "s/^sha256sums=.*/sha256sums=('$SUM')/" "$PKGBUILD"
sed -i "s/^\tsha256sums = .*/\tsha256sums = $SUM/" "$SRCINFO"
printf '%s\n%s\n' "$TARBALL" "$SUM"
