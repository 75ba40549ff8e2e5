"""The committed .SRCINFO files: up to date with their PKGBUILD, and the packaging policy on
them (relative backup entries, pinned sources, the prima.cpp variants, the agent's version)."""

import difflib
import re
import tomllib

import pytest

import pkgfiles
from conftest import AGENT_SRCINFO, BUILD_SCRIPT, CANNOT_RUN, REPO, run

DIRS = sorted(p.parent for p in REPO.glob("pkgbuilds/*/PKGBUILD"))
IDS = [d.name for d in DIRS]
PRIMA = sorted(d.name for d in DIRS if d.name.startswith("prima-cpp"))


def info(name):
    """The pkgbase section of pkgbuilds/NAME/.SRCINFO."""
    return pkgfiles.srcinfo(REPO / "pkgbuilds" / name / ".SRCINFO")["pkgbase"]


@pytest.mark.parametrize("pkgdir", DIRS, ids=IDS)
def test_srcinfo_is_up_to_date(tools, pkgdir):
    tools.need("makepkg")
    res = run(["bash", BUILD_SCRIPT, "--srcinfo", pkgdir])
    if res.returncode == CANNOT_RUN:
        pytest.skip(res.stderr.strip())
    assert res.returncode == 0, res.stderr
    rel = pkgdir.relative_to(REPO)
    regen = f"regenerate it: (cd {rel} && makepkg --printsrcinfo > .SRCINFO)"
    committed = pkgdir / ".SRCINFO"
    assert committed.is_file(), f"{rel}/.SRCINFO is missing; {regen}"
    diff = "".join(difflib.unified_diff(committed.read_text().splitlines(True),
                                        res.stdout.splitlines(True),
                                        f"{rel}/.SRCINFO", "makepkg --printsrcinfo"))
    assert not diff, f"{rel}/.SRCINFO is stale; {regen}\n{diff}"


@pytest.mark.parametrize("pkgdir", DIRS, ids=IDS)
def test_backup_entries_are_relative(pkgdir):
    for name, keys in pkgfiles.srcinfo(pkgdir / ".SRCINFO").items():
        absolute = [b for b in keys.get("backup", []) if b.startswith("/")]
        assert not absolute, f"{name}: backup entries must not start with /: {absolute}"


@pytest.mark.parametrize("pkgdir", DIRS, ids=IDS)
def test_sources_pinned(pkgdir):
    """A git source is pinned by a full commit hash or a version tag (and may use SKIP: git
    verifies it); anything else needs a real sha256."""
    base = pkgfiles.srcinfo(pkgdir / ".SRCINFO")["pkgbase"]
    sources, sums = base.get("source", []), base.get("sha256sums", [])
    assert len(sources) == len(sums), f"{len(sources)} sources but {len(sums)} sha256sums"
    for src, digest in zip(sources, sums):
        if "git+" in src:
            assert re.search(r"#(commit=[0-9a-f]{40}|tag=v?[0-9][0-9A-Za-z.]*)$", src), \
                f"git source not pinned to a full commit hash or a version tag: {src}"
        else:
            assert re.fullmatch(r"[0-9a-f]{64}", digest), f"source without a sha256: {src}"


def test_prima_variants_pin_the_same_commit():
    commits = {v: re.findall(r"#commit=([0-9a-f]+)", " ".join(info(v)["source"])) for v in PRIMA}
    assert len(commits) == 3 and len({tuple(c) for c in commits.values()}) == 1, commits


@pytest.mark.parametrize("variant", [v for v in PRIMA if v != "prima-cpp"])
def test_prima_variant_replaces_the_cpu_build(variant):
    """A GPU variant installs in place of prima-cpp: it provides and conflicts with it and needs
    at least what the CPU build needs."""
    keys = info(variant)
    assert "prima-cpp" in keys.get("provides", []), keys.get("provides")
    assert "prima-cpp" in keys.get("conflicts", []), keys.get("conflicts")
    missing = set(info("prima-cpp")["depends"]) - set(keys["depends"])
    assert not missing, f"{variant} lacks depends of prima-cpp: {sorted(missing)}"


def test_prima_depends_on_the_highs_package_here():
    highs = pkgfiles.srcinfo(REPO / "pkgbuilds" / "highs" / ".SRCINFO")
    names = {n for n in highs if n != "pkgbase"}
    assert names & set(info("prima-cpp")["depends"]), (names, info("prima-cpp")["depends"])


def test_agent_pkgver_is_the_crate_version():
    crate = tomllib.loads((REPO / "agent" / "Cargo.toml").read_text())["package"]["version"]
    if isinstance(crate, dict):  # version.workspace = true
        crate = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    assert AGENT_SRCINFO["pkgbase"]["pkgver"] == [crate]
