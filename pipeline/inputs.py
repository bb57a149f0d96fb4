"""Input paths resolved into files: folders walked, globs matched, symbolic-link loops cut.

    files = resolve_inputs(["corpus/", "extra/**/*.parquet"], should_stop=lambda: stop.level > 0)

A folder contributes every `*.parquet` below it (names starting with '_' or '.' are skipped, as
pyarrow does); a glob its matches (Python's glob rules: `**` spans folders, wildcards do not match a
leading '.'); a file itself. Symbolic links are followed, but a folder reached twice (a loop, or two
links to one place) is walked once, so a looping tree cannot hang planning. A link that leads nowhere
or loops on itself is still listed: planning reports it as a file that cannot be opened, alone.
`should_stop()` is asked between folders; when it says yes, `Stopped` is raised.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import InputError, Stopped


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def _glob_root(pattern: str) -> str:
    root = []
    for part in Path(pattern).parts:
        if _has_magic(part):
            break
        root.append(part)
    return str(Path(*root)) if root else "."


def _walk(
    root: str, should_stop: Callable[[], bool] | None, skip_private: bool
) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk following links, each real folder once; `dirnames` may be pruned in place."""
    seen: set[tuple[int, int]] = set()
    try:
        st = os.stat(root)
        seen.add((st.st_dev, st.st_ino))
    except OSError:
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if should_stop and should_stop():
            raise Stopped()
        keep = []
        for d in sorted(dirnames):
            if skip_private and d.startswith(("_", ".")):
                continue
            try:
                st = os.stat(os.path.join(dirpath, d))
            except OSError:  # a link into a loop or to nothing: no files below it
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                keep.append(d)
        dirnames[:] = keep
        # os.walk lists a link to a folder among `dirnames` only when it resolves to one
        yield dirpath, dirnames, sorted(filenames)


class _Pattern:
    """A glob pattern's components after its fixed root, matched one path component at a time."""

    def __init__(self, parts: tuple[str, ...]):
        self.parts = parts
        self.regs = [None if p == "**" else re.compile(fnmatch.translate(p)) for p in parts]

    def _close(self, states: set[int]) -> set[int]:
        out, todo = set(states), list(states)
        while todo:  # `**` may match no folder at all
            i = todo.pop()
            if i < len(self.parts) and self.parts[i] == "**" and i + 1 not in out:
                out.add(i + 1)
                todo.append(i + 1)
        return out

    def start(self) -> set[int]:
        return self._close({0})

    def step(self, states: set[int], name: str, is_dir: bool) -> set[int]:
        nxt = set()
        for i in states:
            if i >= len(self.parts):
                continue
            part, reg = self.parts[i], self.regs[i]
            if reg is None:  # `**`: any visible folder, staying in the same state
                if name.startswith("."):
                    continue
                if is_dir:
                    nxt.add(i)
                elif i == len(self.parts) - 1:  # a last `**` matches the files too
                    nxt.add(i + 1)
            elif (not name.startswith(".") or part.startswith(".")) and reg.match(name):
                nxt.add(i + 1)
        return self._close(nxt)

    def done(self, states: set[int]) -> bool:
        return len(self.parts) in states


def glob_files(pattern: str, should_stop: Callable[[], bool] | None) -> list[str]:
    root = _glob_root(pattern)
    pat = _Pattern(Path(pattern).parts[len(Path(root).parts) if root != "." else 0 :])
    states = {root: pat.start()}
    matches = []
    for dirpath, dirnames, filenames in _walk(root, should_stop, skip_private=False):
        here = states.pop(dirpath)
        dirnames[:] = [d for d in dirnames if pat.step(here, d, True) - {len(pat.parts)}]
        for d in dirnames:
            states[os.path.join(dirpath, d)] = pat.step(here, d, True)
        for f in filenames:
            if pat.done(pat.step(here, f, False)):
                matches.append(os.path.join(dirpath, f))
    return matches


def resolve_inputs(
    paths: tuple[str, ...] | list[str], should_stop: Callable[[], bool] | None = None
) -> dict[str, str]:
    """{key: path} of every Parquet file named by `paths`, sorted by key.

    A file's key is its real path (links resolved): one key per file, however it is reached
    (two input roots, a link to a folder), and two files never share one, whatever `--input`
    names on a given night. The key names the file in the run folder's plan, in `source_file`,
    and in the ids of files without an id column (`<key>:<row>`).
    """
    found: dict[str, str] = {}

    def add(path: str) -> None:
        key = os.path.realpath(path)
        found[key] = key

    for spec in paths:
        if _has_magic(spec):
            matches = glob_files(spec, should_stop)
            if not matches:
                raise InputError(f"input pattern {spec!r} matches no file; check the path")
            for m in matches:
                add(m)
        elif os.path.isdir(spec):
            files = [
                os.path.join(dirpath, f)
                for dirpath, _, filenames in _walk(spec, should_stop, skip_private=True)
                for f in filenames
                if f.endswith(".parquet") and not f.startswith(("_", "."))
            ]
            if not files:
                raise InputError(
                    f"input folder {spec} holds no *.parquet file (Batch-API request files, "
                    "*.jsonl, are named one by one or by a glob such as 'requests/*.jsonl')"
                )
            for f in files:
                add(f)
        elif os.path.lexists(spec) and not os.path.isdir(spec):
            add(spec)  # a file, or a link that leads nowhere (planning says so)
        else:
            raise InputError(
                f"input {spec} does not exist; pass a Parquet file, a folder or a glob"
            )
    return dict(sorted(found.items()))


def walked_by(output: str, paths: tuple[str, ...] | list[str]) -> str | None:
    """The input (a folder, or a glob) that could name files inside `output`, or None.

    A run folder inside its own input would be read as input by the next run."""
    out = Path(os.path.realpath(output))
    for spec in paths:
        if _has_magic(spec):
            root = Path(os.path.realpath(_glob_root(spec)))
            if out != root and root not in out.parents:
                continue
            # could the pattern match a file somewhere below the output folder?
            pat = _Pattern(Path(spec).parts[len(Path(_glob_root(spec)).parts) :])
            states = pat.start()
            for part in out.relative_to(root).parts:
                states = pat.step(states, part, True)
            if states - {len(pat.parts)}:
                return spec
        elif os.path.isdir(spec):
            root = Path(os.path.realpath(spec))
            if out == root or root in out.parents:
                if not any(p.startswith(("_", ".")) for p in out.relative_to(root).parts):
                    return spec
    return None
