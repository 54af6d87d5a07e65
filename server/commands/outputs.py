"""Checks on a command's --out file, made before its long work starts so that a path that cannot
be written fails in a second, not after the whole corpus has been traced or trained on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def prepare_out(out: Path, inputs: list[Path]) -> None:
    """Refuse an `out` that is a folder or one of the `inputs` (it would be overwritten), and
    create its parent folder."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of a file to write")
    if any(out.resolve() == path.resolve() for path in inputs):
        raise ValueError(f"--out {out} is one of the inputs, which it would overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the folder of --out {out}: {exc}") from exc
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out} cannot be written (permission denied)")
    try:  # os.access says yes to root anywhere, even on a read-only or virtual file system
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise ValueError(f"--out {out} cannot be written: {exc.strerror or exc}") from exc
