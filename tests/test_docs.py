"""Every ```python block of README.md and docs/*.md runs as written, and docs/api.md names
every public name.

Each block runs in its own subprocess (a fresh interpreter, as a reader would paste it), with
the repository root on PYTHONPATH and an empty temporary directory as the working directory,
under a timeout.  The test id is the block's file and its index among that file's python
blocks (``docs/enorm.md#2`` is the third); a failure shows the block's first line number,
its stderr and the end of its stdout.  Blocks fenced as ```text, ```bash or anything else
are not run: use them for listings, signatures and shell commands.

The blocks run in the background, ``WORKERS`` at a time, from the moment the first block
test starts (``_runs``); each test then waits for its own block.  Most of a block's time is
the interpreter importing torch (2-3 s), so the 25 blocks take about 1.5 minutes on 2 CPU
cores (89 s for this file): the block tests are marked ``slow`` (``pytest -m "not slow"``
leaves them out).

Under pytest-xdist every worker collects every test but runs only those the scheduler
hands it, which it does not know ahead, so ``_runs`` would start every block in each
worker.  There each block test runs its own block when it comes instead (the other workers
give the overlap).  With ``--dist loadgroup``, where it works, the block tests are one
``xdist_group`` on one worker (their node ids end in ``@docs``), and that worker runs them
ahead as above.  (pytest 9.2 with pytest-xdist 3.8 ignores the groups: pytest-xdist issue
1386.)
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

import tritonorm
import tritonorm.functional

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
API_PAGE = ROOT / "docs" / "api.md"
TIMEOUT_S = 300  # per block; the slowest (a CPU torch.compile) takes well under a minute
WORKERS = max(2, min(8, (os.cpu_count() or 2) // 2))  # blocks run at once

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)[^`]*$")


class Block(NamedTuple):
    path: Path
    index: int  # among the file's python blocks
    line: int  # 1-based line of the opening fence
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}#{self.index}"


def python_blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` whose info string is ``python`` (or ``py``), dedented by
    the fence's indentation (blocks inside list items)."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match["fence"], i
        i += 1
        body = []
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence (or the end of the file)
        if match["info"].lower() in ("python", "py", "python3"):
            code = textwrap.dedent("\n".join(body)) + "\n"
            blocks.append(Block(path, sum(b.path == path for b in blocks), start + 1, code))
    return blocks


BLOCKS = [block for path in DOC_FILES for block in python_blocks(path)]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    # The docs describe the default backend choice; a forced backend is not what they show.
    env.pop("TRITONORM_BACKEND", None)
    return env


def _run(block: Block) -> subprocess.CompletedProcess | str:
    with tempfile.TemporaryDirectory(prefix="tritonorm-docs-") as tmp:
        script = Path(tmp) / f"block_{block.index}.py"
        script.write_text(block.code, encoding="utf-8")
        try:
            return subprocess.run([sys.executable, str(script)], cwd=tmp, env=_environment(),
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            return f"timed out after {TIMEOUT_S} s\n--- stderr ---\n{err.stderr or ''}"


@pytest.fixture(scope="module")
def _runs(request):
    """Start the selected blocks in the background (WORKERS at a time), in the order the
    tests will ask for them, and hand out the futures."""
    selected = {item.callspec.params["block"].id for item in request.session.items
                if hasattr(item, "callspec") and isinstance(item.callspec.params.get("block"), Block)}
    if _xdist_spreads_blocks(request):
        selected = set()  # this worker gets only some of them, and does not know which
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures: dict[str, Future] = {block.id: pool.submit(_run, block)
                                      for block in BLOCKS if block.id in selected}
        yield futures
        for future in futures.values():
            future.cancel()


def _xdist_spreads_blocks(request) -> bool:
    """Whether this is a pytest-xdist worker that may get only some of the block tests:
    any but one that groups them (``--dist loadgroup`` suffixes a grouped test's node id
    with ``@`` and the group, when the grouping works)."""
    return (hasattr(request.config, "workerinput")
            and not any(item.nodeid.endswith("@docs") for item in request.session.items))


def test_docs_have_python_blocks():
    assert BLOCKS, "no ```python block found in README.md or docs/*.md"
    assert len({block.id for block in BLOCKS}) == len(BLOCKS)


@pytest.mark.slow
@pytest.mark.xdist_group("docs")  # one worker runs them all, with a working --dist loadgroup
@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_python_block_runs(block: Block, _runs):
    future = _runs.get(block.id)
    result = future.result() if future is not None else _run(block)
    where = f"{block.path.relative_to(ROOT).as_posix()}, python block {block.index} (line {block.line})"
    if isinstance(result, str):
        pytest.fail(f"{where} {result}", pytrace=False)
    if result.returncode != 0:
        stdout = result.stdout[-2000:]
        pytest.fail(f"{where} exited with status {result.returncode}\n--- stderr ---\n{result.stderr}"
                    f"\n--- stdout (end) ---\n{stdout}", pytrace=False)


# ---- docs/api.md -------------------------------------------------------------------------

def test_all_lists_every_submodule_name():
    """tritonorm.__all__ and tritonorm.nn.__all__ are literal lists (the form type checkers
    follow through ``import *``): they hold exactly the nn submodules' names."""
    import importlib

    import tritonorm.nn

    layers = [name for module in ("lp_batchnorm", "mean_only_batchnorm", "equinorm", "bounded_weight_norm")
              for name in importlib.import_module(f"tritonorm.nn.{module}").__all__]
    assert sorted(tritonorm.nn.__all__) == sorted(layers)
    assert set(layers) <= set(tritonorm.__all__) and len(set(tritonorm.__all__)) == len(tritonorm.__all__)
    assert all(hasattr(tritonorm, name) for name in tritonorm.__all__)


def _public_names() -> list[tuple[str, object]]:
    names = [(f"tritonorm.{n}", getattr(tritonorm, n)) for n in tritonorm.__all__]
    names += [(f"tritonorm.functional.{n}", getattr(tritonorm.functional, n))
              for n in tritonorm.functional.__all__]
    convert = getattr(tritonorm, "convert", None)
    if convert is not None and "tritonorm.convert" not in dict(names):
        names.append(("tritonorm.convert", convert))
    return names


def _plain_signature(obj) -> str | None:
    """``obj``'s signature without annotations, as api.md writes it; None for a module or
    a constant (``tritonorm.ACTIVATIONS``)."""
    if inspect.ismodule(obj) or not callable(obj):
        return None
    sig = inspect.signature(obj)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("qualname,obj", _public_names(), ids=[n for n, _ in _public_names()])
def test_api_page_documents_name(qualname: str, obj):
    """api.md names every public name, and gives its current signature (compared without
    whitespace, so the page may wrap it)."""
    page = API_PAGE.read_text(encoding="utf-8")
    short = qualname.rsplit(".", 1)[1]
    assert re.search(rf"\b{re.escape(short)}\b", page), f"docs/api.md does not mention {qualname}"
    sig = _plain_signature(obj)
    if sig is not None:
        assert _squeeze(qualname + sig) in _squeeze(page), (
            f"docs/api.md does not give {qualname}'s current signature: {qualname}{sig}")


def test_api_page_documents_enorm_methods():
    page = _squeeze(API_PAGE.read_text(encoding="utf-8"))
    for name in ("from_model", "step", "attach", "state_dict", "load_state_dict"):
        sig = _plain_signature(getattr(tritonorm.ENorm, name))
        sig = re.sub(r"^\(self,?\s*", "(", sig)
        assert _squeeze(f"ENorm.{name}{sig}") in page or _squeeze(f"enorm.{name}{sig}") in page, (
            f"docs/api.md does not give ENorm.{name}{sig}")


def test_docs_link_to_existing_files():
    """Relative links in docs/*.md and README.md point at files that exist."""
    missing = []
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            if not (path.parent / target).exists():
                missing.append(f"{path.relative_to(ROOT).as_posix()} -> {target}")
    assert not missing, "broken links: " + ", ".join(missing)


def _cli_parsers() -> dict:
    """{subcommand: its argparse parser}, built as ``tritonorm.cli.main`` builds them; empty
    when the command line is not there."""
    import argparse

    try:
        from tritonorm import cli
    except ImportError:
        return {}
    subparsers = argparse.ArgumentParser(prog="tritonorm").add_subparsers(dest="command")
    for command in cli.COMMANDS:
        command.add_parser(subparsers)
    return dict(subparsers.choices)


@pytest.mark.parametrize("command", sorted(_cli_parsers()) or [None])
def test_api_page_documents_cli(command):
    """api.md's "Command line" section gives every subcommand and each of its options."""
    if command is None:
        pytest.skip("tritonorm.cli is not there")
    page = API_PAGE.read_text(encoding="utf-8")
    section = page[page.index("## Command line"):]
    assert f"tritonorm {command}" in section, f"docs/api.md does not document `tritonorm {command}`"
    parser = _cli_parsers()[command]
    flags = [max(a.option_strings, key=len) for a in parser._actions
             if a.option_strings and "--help" not in a.option_strings]
    missing = [f for f in flags if not re.search(rf"{re.escape(f)}\b", section)]
    assert not missing, f"docs/api.md does not give these options of `tritonorm {command}`: {missing}"
