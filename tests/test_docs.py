"""Every code example in docs/ runs as written (one test per page), on the small inputs the pages use.

A page's fenced blocks run in order in one temporary folder (its working directory, also on sys.path and on the
PYTHONPATH of the commands), so a later block can use what an earlier one defined or wrote:

- ```python: executed, the page's blocks in one namespace, like a notebook;
- ```toml: validated as a sweep spec (`SweepSpec`), as tests/test_readme.py does for the README;
- ```bash: run with bash (the `batchscope` on PATH is this checkout's) only under `<!-- docs: run -->`; any other
  bash block must say why it is not run, `<!-- docs: not run: REASON -->` (a GPU, a cluster, your own files);
- ```text and other languages: output or file listings, not run.

An HTML comment (invisible on the site) on the line before a block adjusts it:
`<!-- docs: file NAME -->` writes the block to NAME instead of running it (a module the spec names, a spec a
command reads); `<!-- docs: requires MODULE ... -->` skips the page's remaining blocks unless the modules import
(the optional extras); `<!-- docs: not run: REASON -->` leaves a python or toml block out too.
"""

from __future__ import annotations

import importlib.util
import linecache
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DOCS = Path(__file__).parent.parent / "docs"
SRC = Path(__file__).parent.parent / "src"
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
DIRECTIVE = re.compile(r"<!--\s*docs:\s*(.*?)\s*-->\s*$")
RUN_LANGS = ("python", "toml", "bash", "console", "sh", "shell")


@dataclass
class Block:
    lang: str
    code: str
    line: int
    directive: str  # "" when none


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        d = DIRECTIVE.search(before)
        out.append(Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1, d.group(1) if d else ""))
    return out


PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def test_every_shell_block_runs_or_says_why_not():
    """No example is silently left out: a command either runs here or states the reason it cannot."""
    bad = []
    for page in PAGES:
        for b in blocks(DOCS / page):
            if b.lang in ("console", "sh", "shell"):
                bad.append(f"{page}:{b.line}: use ```bash for commands (```text for output)")
            if b.lang == "bash" and not (b.directive == "run" or b.directive.startswith("not run:")
                                         and len(b.directive) > len("not run:") + 8):
                bad.append(f"{page}:{b.line}: bash block without <!-- docs: run --> or <!-- docs: not run: REASON -->")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang in RUN_LANGS for b in blocks(DOCS / p))])
def test_page_examples_run(page, tmp_path, monkeypatch):
    from batchscope.spec import SweepSpec

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(SRC), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    namespace: dict = {"__name__": "__docs__"}
    for b in blocks(DOCS / page):
        where = f"{page}:{b.line}"
        if b.directive.startswith("not run:"):
            continue
        if b.directive.startswith("requires "):
            for mod in b.directive.split()[1:]:
                if importlib.util.find_spec(mod.split(".")[0]) is None:
                    pytest.skip(f"{where}: needs {mod}")
        if b.directive.startswith("file "):
            (tmp_path / b.directive.split(None, 1)[1]).write_text(b.code, encoding="utf-8")
            if b.lang == "toml":
                SweepSpec.model_validate(tomllib.loads(b.code))
            continue
        t0 = time.perf_counter()
        if b.lang == "python":
            linecache.cache[where] = (len(b.code), None, b.code.splitlines(True), where)  # tracebacks show the line
            exec(compile(b.code, where, "exec"), namespace)
        elif b.lang == "toml":
            SweepSpec.model_validate(tomllib.loads(b.code))
        elif b.lang == "bash" and b.directive == "run":
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", b.code], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, f"{where}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        print(f"{where} ({b.lang}): {time.perf_counter() - t0:.1f} s")
