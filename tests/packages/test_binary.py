"""The packaged llm-agent binary: a stripped executable of the package's version that links only
what its depends cover, accepts the packaged config, and is the source of the packaged
completions and man page."""

import gzip
import re

import pytest

from conftest import AGENT_SRCINFO, agent_bin, plan_or_fail, run

# Libraries of Arch's glibc and gcc-libs packages (what llm-agent's depends may cover).
LIBS = {
    "glibc": re.compile(r"(linux-vdso|ld-linux[-a-z0-9_.]*|libc|libm|libpthread|libdl|librt)\.so\.\d+"),
    "gcc-libs": re.compile(r"libgcc_s\.so\.1"),
}
# Where bash, zsh and fish look for completions (their packages' conventions).
COMPLETIONS = {
    "bash": "usr/share/bash-completion/completions/llm-agent",
    "zsh": "usr/share/zsh/site-functions/_llm-agent",
    "fish": "usr/share/fish/vendor_completions.d/llm-agent.fish",
}


def binary(build):
    return build.root("llm-agent") / agent_bin()


def test_is_a_stripped_elf_executable(build, tools):
    res = run([tools.need("file"), "-b", binary(build)])
    assert re.search(r"ELF.*executable", res.stdout) and ", stripped" in res.stdout, res.stdout


def test_version_is_the_packages(build):
    res = run([binary(build), "--version"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"llm-agent {AGENT_SRCINFO['pkgbase']['pkgver'][0]}"


def test_links_only_what_depends_covers(build):
    res = run(["ldd", binary(build)])
    assert res.returncode == 0, res.stderr
    libs = [line.split()[0].rsplit("/", 1)[-1] for line in res.stdout.splitlines() if line.strip()]
    depends = AGENT_SRCINFO["llm-agent"]["depends"]
    for lib in libs:
        owners = [pkg for pkg, pattern in LIBS.items() if pattern.fullmatch(lib)]
        assert owners, f"llm-agent links {lib}, which no package in depends= provides"
        assert owners[0] in depends, f"llm-agent links {lib} (package {owners[0]}), not in depends"


def test_packaged_config_passes_check_config(build):
    config = [p for p, e in plan_or_fail("llm-agent").items() if p.startswith("etc/") and e.src]
    assert config, "the package installs no config under /etc"
    for path in config:
        res = run([binary(build), "check-config", build.root("llm-agent") / path])
        assert res.returncode == 0, f"/{path}: {res.stdout}{res.stderr}"


@pytest.mark.parametrize("shell", COMPLETIONS)
def test_completion_is_what_the_cli_prints(build, shell):
    packaged = build.root("llm-agent") / COMPLETIONS[shell]
    assert packaged.is_file() and packaged.stat().st_size > 0, f"no /{COMPLETIONS[shell]}"
    res = run([binary(build), "completions", shell])
    assert res.returncode == 0, res.stderr
    assert packaged.read_text() == res.stdout


def test_man_page_is_what_the_cli_prints(build):
    name = agent_bin().rsplit("/", 1)[-1]
    packaged = build.root("llm-agent") / f"usr/share/man/man1/{name}.1.gz"
    assert packaged.is_file(), f"no man page /usr/share/man/man1/{name}.1.gz"
    text = gzip.decompress(packaged.read_bytes()).decode()
    assert re.search(rf"^\.TH {re.escape(name)} 1", text, re.M), text[:200]
    res = run([binary(build), "manpage"])
    assert res.returncode == 0, res.stderr
    assert text == res.stdout
