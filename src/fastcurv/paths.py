"""Output paths: ``~`` expanded (:func:`expand_path`), files and folders checked before any work
(:func:`prepare_file`, :func:`prepare_folder`), related file names (:func:`sibling_path`), and a
file replaced whole, atomically (:func:`replace_atomically`). Used by the results files
(:mod:`fastcurv.results_file`), training checkpoints, studies, audits, the CLI and distributed jobs.
"""
from __future__ import annotations

import os
from pathlib import Path


def expand_path(path) -> str:
    """``path`` (a str or os.PathLike) with a leading ``~`` or ``~user`` expanded. A ValueError when
    that user, or the home folder, is unknown: ``Path.expanduser`` raises a bare RuntimeError there,
    and ``os.path.expanduser`` leaves the ``~`` in, which would make a folder named ``~user``."""
    path = os.fspath(path)
    if not str(path).startswith("~"):
        return path
    try:
        return str(Path(path).expanduser())
    except RuntimeError:
        user = str(path)[1:].split("/", 1)[0].split(os.sep, 1)[0]
        who = f"no user {user!r} on this system" if user else "no home folder is known ($HOME unset)"
        raise ValueError(f"cannot expand '~' in {str(path)!r}: {who}") from None


def prepare_file(path, what: str = "output") -> Path:
    """Check, before any work, that a file can be written at ``path`` (``~`` expanded: a path from a
    config file never went through a shell) and return it: a folder there, or a parent that is a
    file or not writable, raises a ValueError naming ``what``; missing parent folders are created."""
    p = Path(expand_path(path))
    if p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; give a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{what} {str(path)!r}: its folder {str(p.parent)!r} cannot be created (a file is in the "
                         "way)") from None
    if not os.access(p.parent, os.W_OK):
        raise ValueError(f"{what} {str(path)!r}: the folder {str(p.parent)!r} is not writable")
    return p


def prepare_folder(path, what: str = "out") -> Path:
    """Check, before any work, that ``path`` (``~`` expanded) is or can be made a writable folder
    (created with its parents) and return it; a file there raises a ValueError naming ``what``."""
    p = Path(expand_path(path))
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file, not a folder; give a folder path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{what} {str(path)!r} cannot be created as a folder (a file is in the way)") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} is not writable")
    return p


def sibling_path(output, tag: str) -> str:
    """``output`` with ``.tag`` before its extension: ``"run.jsonl"`` -> ``"run.<tag>.jsonl"``
    (the results file of a related job, e.g. the audit's reparameterized models)."""
    p = Path(output)
    return str(p.with_name(f"{p.stem}.{tag}{p.suffix}"))


def replace_atomically(path, write) -> None:
    """Replace ``path`` by what ``write(f)`` writes to a binary file ``f``, atomically: through a hidden
    temporary file ``.<name>.tmp<pid>`` in the same folder (no
    :func:`~fastcurv.results_file.part_files` name), fsync and ``os.replace``. The temporary file is
    removed when the write fails (a full disk, an interrupt) and the error goes on; only a killed
    process leaves one behind."""
    folder, name = os.path.split(os.fspath(path))
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: no partial file stays
            os.remove(tmp)
