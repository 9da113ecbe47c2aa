"""Publishing a build folder: only where this project may write, never deleting what it did not
write, and recoverable after a crash at any point (docs/reliability.md).

Next to the output folder <parent>/<name>:

    .<name>.quota-build-<pid>-<rand>/   the build being written; its marker says "building" and the pid
    .<name>.quota-old-<pid>-<rand>/     the previous build, moved aside for the swap
    .<name>.quota-journal               the swap in progress (written before its first rename)
    <name>/.quota_export                the marker of a published build: its id and every file the
                                        build wrote (bytes, sha256)

    claim(out)    recover an interrupted swap, remove dead builds' temporary folders, check that `out`
                  is absent, empty, or a folder with our marker
    make_tmp(out) the temporary folder (marker first)
    publish(tmp, out)
                  seal the marker (hash every file), then, under a lock on <parent> and with SIGINT /
                  SIGTERM held back: journal, out -> old, tmp -> out, carry every entry of old the
                  previous build did not write (or that changed since) into out, delete the previous
                  build's own files, drop the journal. A rerun finishes or undoes a swap cut short.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path

from quota_export import UserError, __version__
from quota_export.runtime.ort import _sha256 as sha256_file

MARKER = ".quota_export"
_ACTIVE: set[str] = set()  # temporary folders of builds running in this process


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def tree_files(root: Path, skip=()) -> list[str]:
    """Relative (posix) paths of every regular file under root, sorted; `skip` names top-level entries."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        dirs.sort()
        out += [(rel / f).as_posix() for f in files]
    return sorted(out)


def hash_tree(root: Path, skip=()) -> dict[str, dict]:
    return {r: file_entry(root / r) for r in tree_files(root, skip)}


def _names(out: Path) -> tuple[str, str, str]:
    return f".{out.name}.quota-build-", f".{out.name}.quota-old-", f".{out.name}.quota-journal"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder this project wrote, or None (no marker, or not one of ours)."""
    m = folder / MARKER
    if m.is_symlink() or not m.is_file():
        return None
    d = _read_json(m)
    if not isinstance(d, dict) or not isinstance(d.get("build_id"), str):
        return None
    return d


@contextlib.contextmanager
def _locked(parent: Path):
    """An exclusive lock on the parent folder (flock on its descriptor: nothing is left on disk)."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held():
    """SIGINT / SIGTERM wait until the block ends (only the main thread receives them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- the previous build's files


def own_files(folder: Path, marker: dict | None) -> set[str]:
    """Files of `folder` the build that wrote `marker` wrote and nobody changed since (same size
    and sha256, a regular file, not a symlink)."""
    files = (marker or {}).get("files")
    if not isinstance(files, dict):
        return set()
    own = set()
    for rel, want in files.items():
        if not isinstance(rel, str) or not isinstance(want, dict) or rel.startswith("/") or ".." in rel.split("/"):
            continue
        p = folder / rel
        try:
            if not p.resolve().is_relative_to(folder.resolve()):  # through a symlinked folder: not ours
                continue
            if p.is_symlink() or not p.is_file() or p.stat().st_size != want.get("bytes"):
                continue
            if sha256_file(p) == want.get("sha256"):
                own.add(rel)
        except OSError:
            continue
    return own


def foreign_entries(folder: Path, own: set[str]) -> list[str]:
    """Entries of `folder` (relative paths, outermost) that are not the previous build's own files:
    a user's files and folders, report/, files changed since the build."""
    with_own = {Path(r).parent.as_posix() for r in own}
    with_own = {p for r in with_own for p in [r, *[x.as_posix() for x in Path(r).parents]]} - {"."}
    out = []

    def walk(rel: str):
        for e in sorted(os.scandir(folder / rel), key=lambda e: e.name):
            r = f"{rel}/{e.name}" if rel else e.name
            if r == MARKER or (r in own and e.is_file(follow_symlinks=False)):
                continue
            if e.is_dir(follow_symlinks=False) and r in with_own:
                walk(r)
            else:
                out.append(r)

    walk("")
    return out


def _collisions(foreign: list[str], new: Path) -> list[str]:
    bad = []
    for r in foreign:
        parts = Path(r).parts
        if os.path.lexists(new / r) or any(
            os.path.lexists(new.joinpath(*parts[:i])) and not (new.joinpath(*parts[:i])).is_dir()
            for i in range(1, len(parts))
        ):
            bad.append(r)
    return bad


def _carry(old: Path, new: Path, foreign: list[str]) -> None:
    for r in foreign:
        (new / r).parent.mkdir(parents=True, exist_ok=True)
        os.rename(old / r, new / r)


def _delete_own(old: Path, own: set[str]) -> None:
    for r in own:
        with contextlib.suppress(FileNotFoundError):
            (old / r).unlink()
    for dirpath, _dirs, _files in sorted(os.walk(old), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)  # only empty ones: anything left is not ours to delete
    with contextlib.suppress(OSError):
        (old / MARKER).unlink()
        os.rmdir(old)


def _finish(old: Path, new: Path) -> None:
    """Second half of a swap: carry the user's entries of old into new, delete old's own files."""
    if not old.exists():
        return
    marker = read_marker(old)
    own = own_files(old, marker)
    _carry(old, new, [r for r in foreign_entries(old, own) if not _collisions([r], new)])
    _delete_own(old, own)


# ---------------------------------------------------------------- recovery and checks


def _recover(out: Path) -> list[str]:
    """Finish or undo a swap cut short, remove temporary folders of builds no longer running.
    Returns what was done, one phrase each (the caller logs them). Caller holds the lock."""
    parent = out.parent
    pre_build, pre_old, journal_name = _names(out)
    done = []
    journal = parent / journal_name
    if journal.exists():
        j = _read_json(journal)
        if not isinstance(j, dict) or not all(isinstance(j.get(k), str) and "/" not in j[k] and j[k].startswith(pre)
                                              for k, pre in (("new", pre_build), ("old", pre_old))):
            raise UserError(f"{journal}: unreadable journal of an interrupted publish; check {out} and remove it")
        new, old = parent / j["new"], parent / j["old"]
        if not os.path.lexists(out) and old.is_dir():
            os.replace(old, out)  # cut between the two renames: the previous build goes back
            done.append(f"restored the previous build of {out} (a publish was interrupted)")
        elif out.is_dir() and (read_marker(out) or {}).get("build_id") == j.get("new_id"):
            _finish(old, out)
            done.append(f"finished publishing {out} (a publish was interrupted)")
        if new.is_dir() and read_marker(new) is not None:
            shutil.rmtree(new, ignore_errors=True)
        journal.unlink()
    for e in parent.iterdir() if parent.is_dir() else ():
        if e.name.startswith(journal_name + ".") and e.is_file() and e.name.rsplit(".", 1)[1].isdigit() \
                and not _alive(int(e.name.rsplit(".", 1)[1])):
            e.unlink()  # a journal cut short while being written: no swap had started
            continue
        if not e.name.startswith(pre_build) or not e.is_dir() or e.is_symlink() or str(e) in _ACTIVE:
            continue
        m = read_marker(e)
        if m is None or not isinstance(m.get("pid"), int):
            continue
        if m["pid"] == os.getpid() or not _alive(m["pid"]):
            shutil.rmtree(e, ignore_errors=True)
            done.append(f"removed {e.name}, left by an interrupted build")
    return done


def _check_out(out: Path) -> None:
    if out.is_symlink():
        raise UserError(f"{out}: output path is a symbolic link (give the folder itself)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path exists and is a file (choose another --out)")
    if out.is_dir() and any(out.iterdir()) and read_marker(out) is None:
        # never write into a folder this project did not create: --out . must not touch the CWD
        raise UserError(f"{out}: output folder exists and is not a previous build (no {MARKER} marker: `build` "
                        "did not create it); choose another --out or empty it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{out}: cannot create the output folder ({parent} is a file)")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{out}: cannot create the output folder ({parent} is not writable)")
            break


def claim(out: Path, say=None) -> None:
    """Before a build: recover what an interrupted build left next to `out`, and check that `out`
    may be written (absent, empty, or a previous build of this project)."""
    _check_out(out)
    if out.parent.is_dir():
        with _locked(out.parent), _signals_held():
            for line in _recover(out):
                (say or (lambda _m: None))(f"      {line}")
        _check_out(out)


def make_tmp(out: Path) -> tuple[Path, list[Path]]:
    """A hidden temporary folder next to `out` (same file system, so the final rename is atomic),
    marked as ours with this process's id, and the parent folders created for it (removed again if
    the build fails)."""
    created = [p for p in reversed(out.parents) if not p.exists()]
    pre_build, _, _ = _names(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f"{pre_build}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        _ACTIVE.add(str(tmp))
        (tmp / MARKER).write_text(json.dumps({"build_id": uuid.uuid4().hex, "pid": os.getpid(),
                                              "state": "building"}) + "\n")
    except OSError as e:
        remove_empty(created)
        raise UserError(f"{out}: cannot create the output folder ({e.strerror})") from None
    return tmp, created


def discard(tmp: Path) -> None:
    """Remove a temporary build folder of this process (a failed or finished build)."""
    _ACTIVE.discard(str(tmp))
    if tmp.is_dir() and read_marker(tmp) is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            d.rmdir()


def publish(tmp: Path, out: Path) -> None:
    """Move the finished build `tmp` to `out` (see the module docstring). Raises UserError, with
    nothing changed at `out`, if the previous build's folder holds an entry the new build would
    overwrite that the previous build did not write."""
    marker = read_marker(tmp)
    files = hash_tree(tmp, skip=(MARKER,))
    sealed = {"quota_export": __version__, "build_id": marker["build_id"], "pid": os.getpid(), "files": files}
    (tmp / MARKER).write_text(json.dumps(sealed, indent=1) + "\n")
    pre_build, pre_old, journal_name = _names(out)
    with _locked(out.parent), _signals_held():
        _recover(out)
        _check_out(out)
        old_marker = read_marker(out) if out.is_dir() else None
        if old_marker is not None:
            own = own_files(out, old_marker)
            bad = _collisions(foreign_entries(out, own), tmp)
            if bad:
                raise UserError(f"{out / bad[0]}: not written by the previous build (or changed since) and the new "
                                "build writes it too; move it away and build again")
        old = out.parent / f"{pre_old}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        journal = out.parent / journal_name
        j = {"out": out.name, "new": tmp.name, "old": old.name, "new_id": sealed["build_id"],
             "old_id": (old_marker or {}).get("build_id")}
        part = journal.with_name(journal.name + f".{os.getpid()}")
        part.write_text(json.dumps(j) + "\n")
        os.replace(part, journal)
        if out.exists():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists():
                os.replace(old, out)
            journal.unlink()
            raise
        _ACTIVE.discard(str(tmp))
        _finish(old, out)
        journal.unlink()
