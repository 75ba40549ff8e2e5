"""Readers for the repo's packaging files, so the package tests take their expected values from
the files that define them (PKGBUILD, .SRCINFO, the unit, sysusers/tmpfiles/sysctl files) instead
of restating them.
"""

import posixpath
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path


def srcinfo(path):
    """A .SRCINFO as {package name: {key: [values]}}: each package's keys over the pkgbase's
    (a key set in a package section replaces the pkgbase's values, as makepkg does); the pkgbase
    itself under "pkgbase"."""
    base, sections, current = {}, {}, None
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.strip().partition(" = ")
        if not sep:
            raise ValueError(f"{path}:{n}: not 'key = value': {line!r}")
        if key == "pkgbase":
            current = base
        elif key == "pkgname":
            current = sections.setdefault(value, {})
            continue
        if current is None:
            raise ValueError(f"{path}:{n}: {key} before pkgbase")
        current.setdefault(key, []).append(value)
    merged = {name: {**base, **own} for name, own in sections.items()}
    merged["pkgbase"] = base
    return merged


def conf_lines(text):
    """(line number, line) of a systemd-style config file, comments and blank lines left out."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith(("#", ";"))]


def sysctl_entries(text):
    """(line number, key, value) of a sysctl.d file; a line that is not `key = value` raises."""
    out = []
    for n, line in conf_lines(text):
        m = re.fullmatch(r"-?([a-z0-9_.]+)\s*=\s*(.*\S)", line)
        if not m:
            raise ValueError(f"line {n} is not 'key = value': {line!r}")
        out.append((n, m.group(1), " ".join(m.group(2).split())))
    return out


@dataclass
class TmpfilesDir:
    path: str
    mode: int
    user: str
    group: str


def tmpfiles_dirs(text):
    """The `d` lines of a tmpfiles.d file."""
    dirs = []
    for _, line in conf_lines(text):
        f = line.split()
        if f[0] == "d":
            dirs.append(TmpfilesDir(f[1], int(f[2], 8), f[3], f[4]))
    return dirs


def sysusers_users(text):
    """{name: home} of the `u` lines of a sysusers.d file (Home directory "-" is None)."""
    users = {}
    for _, line in conf_lines(text):
        f = re.findall(r'"[^"]*"|\S+', line)
        if f[0] == "u":
            home = f[4] if len(f) > 4 else "-"
            users[f[1]] = None if home == "-" else home
    return users


def unit_settings(text):
    """{(section, key): [values]} of a systemd unit file."""
    out, section = {}, None
    for n, line in conf_lines(text):
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        if not sep or section is None:
            raise ValueError(f"line {n} is not 'Key=value' in a section: {line!r}")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


# --- what a PKGBUILD's package function installs -------------------------------------------------

# Runs package_NAME of a PKGBUILD with `install` recorded instead of run (arguments separated by
# \x1f, calls by \x1e). Other commands that would put files in $pkgdir fail loudly: the file
# list below only models `install`.
_DRY_RUN = r"""
set -euo pipefail
source "$1"
pkgdir=/PKGDIR srcdir=/SRCDIR
install() { printf '%s\x1f' "$@"; printf '\x1e'; }
cd() { :; }
for c in cp ln mkdir chmod chown mv touch tar; do
  eval "$c() { echo \"package_$2 runs $c; tests/packages/pkgfiles.py models only install\" >&2; return 1; }"
done
"package_$2"
"""


@dataclass
class Planned:
    """What package() puts at one path: a file from `src` (relative to the source tree; under
    target/ for build outputs) with `mode`, or a directory (src None)."""
    mode: int
    src: str | None


def _install_call(args):
    """(mode, make parents, directory mode, target dir, positionals) of one `install` call."""
    mode, parents, dirs, target, pos = 0o755, False, False, None, []
    it = iter(args)
    for a in it:
        if not a.startswith("-") or a == "-":
            pos.append(a)
            continue
        flags = a[1:]
        while flags:
            c, flags = flags[0], flags[1:]
            if c == "D":
                parents = True
            elif c == "d":
                dirs = True
            elif c in "mt":
                value = flags or next(it)
                flags = ""
                if c == "m":
                    mode = int(value, 8)
                else:
                    target = value
            else:
                raise ValueError(f"install option -{c} is not modelled (install {' '.join(args)})")
    return mode, parents, dirs, target, pos


def planned_install(pkgbuild, pkgname):
    """{path in the package: Planned} for every file and directory package_PKGNAME installs."""
    res = subprocess.run(["bash", "-c", _DRY_RUN, "dry-run", str(pkgbuild), pkgname],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"dry run of package_{pkgname} in {pkgbuild} failed:\n{res.stderr}")
    plan = {}

    def rel(p):
        p = posixpath.normpath(p)
        if not p.startswith("/PKGDIR/"):
            raise ValueError(f"package_{pkgname} installs outside $pkgdir: {p}")
        return p[len("/PKGDIR/"):]

    def add_dir(path, mode=0o755):
        while path and path != ".":
            if path not in plan:
                plan[path] = Planned(mode, None)
            path, mode = posixpath.dirname(path), 0o755

    for call in filter(None, res.stdout.split("\x1e")):
        args = call.split("\x1f")[:-1]
        mode, parents, dirs, target, pos = _install_call(args)
        if dirs:
            for d in pos:
                add_dir(rel(d))
                plan[rel(d)] = Planned(mode, None)
            continue
        if target is not None:
            dests = [(s, posixpath.join(rel(target), posixpath.basename(s))) for s in pos]
        elif len(pos) == 2:
            dest = rel(pos[1])
            if dest in plan and plan[dest].src is None:
                dest = posixpath.join(dest, posixpath.basename(pos[0]))
            dests = [(pos[0], dest)]
        else:
            raise ValueError(f"install call not modelled: install {' '.join(args)}")
        for src, dest in dests:
            if parents:
                add_dir(posixpath.dirname(dest))
            plan[dest] = Planned(mode, posixpath.normpath(src))
    return plan


# makepkg's zipman (OPTIONS in scripts/build-packages.sh) gzips man and info pages in these
# directories (makepkg.conf's MAN_DIRS).
_MAN_DIRS = re.compile(r"^(usr(/local)?(/share)?|opt/[^/]+)/(man|info)/")


def after_makepkg(plan):
    """The plan with makepkg's own changes to file names applied (zipman)."""
    out = {}
    for path, p in plan.items():
        if p.src is not None and _MAN_DIRS.match(path) and not path.endswith((".gz", ".bz2")):
            path += ".gz"
        out[path] = p
    return out
