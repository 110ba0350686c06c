"""Every ```python block of README.md and docs/*.md runs as written, and docs/api.md names
every public name.

Each block runs in its own process, as a script (``__name__ == "__main__"``), with the
repository root on sys.path, an empty temporary directory as the working directory and
TRITONORM_BACKEND unset, under a timeout.  The process is forked from a multiprocessing
forkserver that has imported torch and tritonorm and run nothing else (``_PRELOAD``): a
fresh interpreter as a reader would start one, less the 2-3 s of importing torch that was
most of a block's time (96 blocks: 284 worker-seconds as subprocesses, on 2 cores).  The
test id is the block's file and its index among that file's python blocks
(``docs/enorm.md#2`` is the third); a failure shows the block's first line number, its
exit status, its stderr and the end of its stdout.  Blocks fenced as ```text, ```bash or
anything else are not run: use them for listings, signatures and shell commands.

The blocks run in the background, ``WORKERS`` at a time, from the moment the first block
test starts (``_runs``); each test then waits for its own block.  The block tests are
marked ``slow`` (``pytest -m "not slow"`` leaves them out).

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
import multiprocessing
import os
import re
import runpy
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


# What the forkserver imports before it forks a block's process.
_PRELOAD = ["torch", "tritonorm"]


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def _forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


_CONTEXT = _forkserver()


def _exec_script(script: str) -> None:
    """In the block's process: run ``script`` as __main__ from its directory, with fds 1
    and 2 (so every print, C library and child process output) in files beside it."""
    directory = os.path.dirname(script)
    os.chdir(directory)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        with open(os.path.join(directory, name), "wb") as f:
            os.dup2(f.fileno(), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own streams)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    # The docs describe the default backend choice; a forced backend is not what they show.
    os.environ.pop("TRITONORM_BACKEND", None)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, directory)
    sys.argv = [script]
    runpy.run_path(script, run_name="__main__")


def _run(block: Block) -> Result:
    with tempfile.TemporaryDirectory(prefix="tritonorm-docs-") as tmp:
        script = Path(tmp) / f"block_{block.index}.py"
        script.write_text(block.code, encoding="utf-8")
        process = _CONTEXT.Process(target=_exec_script, args=(str(script),))
        process.start()
        process.join(TIMEOUT_S)
        timed_out = process.is_alive()
        if timed_out:
            process.kill()
            process.join()
        stdout, stderr = ((Path(tmp) / name).read_text(errors="replace") if (Path(tmp) / name).exists() else ""
                          for name in ("stdout", "stderr"))
        if timed_out:
            stderr = f"timed out after {TIMEOUT_S} s\n{stderr}"
        return Result(process.exitcode if not timed_out else -1, stdout, stderr)


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
    if result.returncode != 0:
        stdout = result.stdout[-2000:]
        pytest.fail(f"{where} exited with status {result.returncode}\n--- stderr ---\n{result.stderr}"
                    f"\n--- stdout (end) ---\n{stdout}", pytrace=False)


@pytest.mark.parametrize("code, status, stderr", [
    ("import sys\nprint('out')\nsys.exit(3)\n", 3, ""),
    ("import torch\nraise ValueError(f'bad {torch.ones(2).sum().item()}')\n", 1, "ValueError: bad 2.0"),
    ("import os\nos.system('echo from-a-child >&2')\nassert __name__ == '__main__'\n", 0, "from-a-child"),
])
def test_block_runner_reports_status_and_output(code, status, stderr):
    """The runner gives a block's exit status and what it wrote (a child process's output
    too), so a failing block fails its test."""
    result = _run(Block(ROOT / "README.md", 99, 1, code))
    assert result.returncode == status and stderr in result.stderr, result
    assert result.stdout == ("out\n" if status == 3 else "")


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
