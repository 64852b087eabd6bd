"""Every ```bash and ```python block of README.md runs as written, on the CPU, in a temporary
directory (one test per block, found afresh each run: a block added to the README is tested
without a change here).

How a block runs:

- ``python``: the block, as a file, in a fresh interpreter whose working directory is a new
  temporary directory; the package is found through ``PYTHONPATH`` (as after ``pip install``).
- ``bash``: the block as a ``bash -e`` script there, with ``tierstore`` on ``PATH`` (the console
  script ``pip install`` would create: ``python -m tierstore``). A ``pip install ...`` (alone,
  or before ``&&``) is dropped and the rest of the line runs: the checkout is what is tested.
- On the CPU always (``CUDA_VISIBLE_DEVICES`` empty), sizes scaled only through documented
  settings: ``TIERSTORE_RUN_ARGS`` (``tierstore run --help``) makes the main job small, and the
  test suite's own command (``python -m pytest``) only collects the suite
  (``PYTEST_ADDOPTS=--collect-only``), since running it here would run this test again.

Opting a block out is explicit and visible, never silent: an HTML comment on the line before
the block, ``<!-- readme-test: skip REASON -->`` (the test is reported as skipped with the
reason) or ``<!-- readme-test: gpu -->`` (runs only where CUDA and CuPy are usable, then on the
GPU); ``<!-- readme-test: continues -->`` runs a python block after the python block before it,
in one interpreter (an example told in parts). Blocks known to be broken, listed in
:data:`KNOWN_DEFECTS` by their exact text, are skipped with the defect named: the entry stops
matching, and the block runs, as soon as its text changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 300  # a block that hangs fails rather than stalling the suite
# The main job scaled down to seconds (every option is `tierstore run`'s own).
RUN_ARGS = "--rows 20000 --dim 8 --bags 64 --pooling 8 --steps 3 --cache 1,20"

# Blocks that do not run as written today: the sha256 of the block's text (first 12 hex
# digits) -> the defect. Each is reported as a skip naming it; fix the block, and its entry
# no longer matches.
KNOWN_DEFECTS: dict[str, str] = {}

_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, 1-based
    marker: str  # the readme-test marker before it, or ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"README.md:{self.line}:{self.lang}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced ``bash`` and ``python`` blocks of a markdown text, with their markers."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = _MARKER.match(lines[k]) if k >= 0 else None
        if m.group(1) in ("bash", "python"):
            body = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(m.group(1), body, i + 1, marker.group(1) if marker else ""))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def without_pip_install(script: str) -> str:
    """The bash script with each ``pip install ...`` dropped (the command after its ``&&``
    kept): the checkout under test is already importable."""
    out = []
    for line in script.splitlines():
        stripped = line.strip()
        if stripped.startswith("pip install"):
            _, sep, rest = stripped.partition("&&")
            line = rest.strip() if sep else ""
        out.append(line)
    return "\n".join(out) + "\n"


def _environment(tmp_path: Path) -> dict[str, str]:
    shims = tmp_path / ".bin"
    shims.mkdir()
    tool = shims / "tierstore"  # what `pip install` puts on PATH
    tool.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tierstore "$@"\n')
    tool.chmod(0o755)
    python = shims / "python"  # `python` in a block is this interpreter
    python.symlink_to(sys.executable)
    env = dict(os.environ)
    env.update(
        PATH=f"{shims}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        CUDA_VISIBLE_DEVICES="",
        TIERSTORE_RUN_ARGS=RUN_ARGS,
        PYTEST_ADDOPTS=f"--collect-only -p no:cacheprovider --rootdir={ROOT} {ROOT / 'tests'}",
        MPLBACKEND="Agg",
    )
    return env


def _with_earlier_parts(block: Block) -> str:
    """The block's code, after the python blocks it continues (``continues`` markers)."""
    code = block.text
    while "continues" in block.marker:
        earlier = [b for b in BLOCKS if b.lang == "python" and b.line < block.line]
        assert earlier, f"{block.name}: `continues` but no python block before it"
        block = earlier[-1]
        code = block.text + code
    return code


def _gpu_usable() -> bool:
    try:
        import cupy  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_the_readme_has_blocks_and_known_defects_are_current():
    assert any(b.lang == "bash" for b in BLOCKS) and any(b.lang == "python" for b in BLOCKS)
    digests = {b.digest for b in BLOCKS}
    stale = [d for d in KNOWN_DEFECTS if d not in digests]
    # an entry whose block changed is dead weight (the block now runs, or fails, on its own)
    assert not stale, f"KNOWN_DEFECTS entries {stale} match no README block any more: remove them"


def test_marker_and_pip_parsing():
    text = (
        "x\n<!-- readme-test: skip needs a cluster -->\n\n```bash\nls\n```\n"
        "```python\nprint(1)\n```\n```text\nno\n```\n"
    )
    got = readme_blocks(text)
    assert [(b.lang, b.text, b.line, b.marker) for b in got] == [
        ("bash", "ls\n", 4, "skip needs a cluster"),
        ("python", "print(1)\n", 7, ""),
    ]
    assert without_pip_install('pip install ".[x]" && tierstore run\npip install y\nls') == (
        "tierstore run\n\nls\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path):
    if block.digest in KNOWN_DEFECTS:
        pytest.skip(f"{block.name} (block {block.digest}): {KNOWN_DEFECTS[block.digest]}")
    markers = [m.strip() for m in block.marker.split(",") if m.strip()]
    for marker in markers:
        if marker.startswith("skip"):
            pytest.skip(f"{block.name}: {marker}")
    env = _environment(tmp_path)
    if "gpu" in markers:
        if not _gpu_usable():
            pytest.skip(f"{block.name}: needs CUDA and CuPy")
        env.pop("CUDA_VISIBLE_DEVICES")
    work = tmp_path / "work"
    work.mkdir()
    if block.lang == "python":
        code = _with_earlier_parts(block)
        script = work / "block.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    else:
        script = work / "block.sh"
        script.write_text(without_pip_install(block.text))
        cmd = ["bash", "-e", str(script)]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, (
        f"{block.name} failed with status {done.returncode}\n--- block\n{block.text}"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )
