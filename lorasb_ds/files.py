"""Atomic writes: a file is written under a temporary name beside its place, then renamed over it, so a
reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file


def atomic_write_text(text: str, path: str) -> None:
    """``text`` (UTF-8) to ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors ``save_file`` of ``tensors`` (made contiguous) with ``metadata`` to ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)
    give_default_mode(tmp)
    os.replace(tmp, path)


def give_default_mode(*paths: str) -> None:
    """Each file of ``paths`` (a folder: each file in it) gets the mode ``open`` would have given it,
    0666 less the umask, as the run's other files have: safetensors writes its files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names] if os.path.isdir(path) else [path]
        for file in files:
            os.chmod(file, 0o666 & ~umask)
