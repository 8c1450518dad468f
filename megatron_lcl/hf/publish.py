"""Write a HuggingFace folder the way checkpoints are written: into a temporary folder beside the
target (same file system), renamed into place only when complete.

    with staged_folder("runs/demo/hf", overwrite=False) as tmp:
        model.save_pretrained(os.path.join(tmp, "lm"))        # ... every file of the export

An export killed or failing part-way leaves no folder under the target's name (and an older export
there untouched): only a hidden `.NAME.PID.tmp` sibling, removed by the next export to that target.
An existing target is replaced only with `overwrite`, and only when it is an export (or empty): by an
atomic exchange where the file system has one (Linux `renameat2(RENAME_EXCHANGE)`: readers see the old
folder or the new one, never neither), else by two renames (the old folder moved aside, then the new one
moved in: for an instant the name is absent, never a mix of the two; killed in that instant, the old
export is left as `.NAME.PID.tmp.old`).
"""

import contextlib
import ctypes
import errno
import os
import shutil
from typing import Iterator

from megatron_lcl.checkpoint.run_dir import fsync_dir, fsync_tree

MARKER = "lcl_heads.safetensors"  # every export has it; a folder without it is not ours to replace
TMP_SUFFIX = ".tmp"


class ExportError(Exception):
    """Bad input to an export (its target, its checkpoint's files): one line, exit 2."""


def check_target(target: str, overwrite: bool, flag: str = "--save", marker: str = MARKER) -> None:
    """Raise ExportError when `target` may not be (re)written: it exists and `overwrite` is off, or it
    is something other than an export (a folder holding `marker`) or an empty folder (never replaced:
    e.g. a run directory)."""
    if not os.path.lexists(target) or (os.path.isdir(target) and not os.listdir(target)):
        return
    if not os.path.isdir(target) or not os.path.exists(os.path.join(target, marker)):
        raise ExportError(f"{flag} {target} exists and is not a megatron_lcl export (no {marker}); "
                          "refusing to replace it: choose another folder")
    if not overwrite:
        raise ExportError(f"{flag} {target} already holds an export; --overwrite replaces it (atomically "
                          "where the file system allows), or choose another folder")


@contextlib.contextmanager
def staged_folder(target: str, overwrite: bool = False, marker: str = MARKER) -> Iterator[str]:
    """Yield a fresh temporary folder beside `target`; when the block ends without error, its files are
    flushed to disk and the folder is renamed to `target` (`publish`); when it raises (also on
    KeyboardInterrupt), the temporary folder is removed and `target` left as it was. `marker`: the file
    every export of this kind has (`check_target`)."""
    target = os.path.abspath(target)
    check_target(target, overwrite, marker=marker)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_tmp(parent, name)
    tmp = os.path.join(parent, f".{name}.{os.getpid()}{TMP_SUFFIX}")
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        publish(tmp, target, overwrite, marker)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: str, target: str, overwrite: bool, marker: str = MARKER) -> None:
    """Rename the complete folder `tmp` to `target`, replacing an export there when `overwrite`."""
    check_target(target, overwrite, marker=marker)  # again: the target may have appeared during the export
    if not os.path.lexists(target) or not os.listdir(target):
        os.rename(tmp, target)  # replaces an empty folder atomically (POSIX)
    elif exchange(tmp, target):
        shutil.rmtree(tmp)  # now the old export
    else:
        aside = f"{tmp}.old"
        os.rename(target, aside)
        os.rename(tmp, target)
        shutil.rmtree(aside)
    fsync_dir(os.path.dirname(target))


def exchange(a: str, b: str) -> bool:
    """Swap paths `a` and `b` atomically (Linux renameat2 with RENAME_EXCHANGE); False where the C
    library or the file system does not offer it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. NFS: no exchange there
        return False
    raise OSError(err, os.strerror(err), b)


def remove_stale_tmp(parent: str, name: str) -> None:
    """Remove the `.NAME.*.tmp` folders left beside `NAME` by exports that were killed."""
    prefix = f".{name}."
    for entry in os.listdir(parent):
        if entry.startswith(prefix) and entry.endswith(TMP_SUFFIX):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
