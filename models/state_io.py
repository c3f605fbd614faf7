"""Reading state dicts from local files without unpickling, and checking them against a model.

Two on-disk forms are accepted:

* ``*.safetensors``: read with :func:`safetensors.torch.load_file` (no code execution possible);
* anything else (``.pth``/``.pt``): ``torch.load(path, map_location="cpu", weights_only=True)``;
  torch's restricted unpickler refuses every global other than tensors and plain containers,
  so a file carrying a pickle payload is an error, never executed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def read_state_dict(path: str | Path, error: Callable[[str], Exception]) -> StateDict:
    """Read a flat ``{key: tensor}`` dict from ``path`` onto the CPU.

    A ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper (common in checkpoints) is
    unwrapped, and a ``module.`` prefix on every key (DataParallel) is stripped.

    Args:
        path: local ``.safetensors`` or torch (``.pth``/``.pt``) file.
        error: exception factory used for every failure; the message names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: weights file not found")
    try:
        if p.suffix == ".safetensors":
            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a user-facing file problem
        raise error(f"{p}: cannot read weights safely ({_first_line(exc)})") from None
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise error(f"{p}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise error(f"{p}: not a state dict: entry {bad[0]!r} is not a tensor")
    sd: StateDict = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def state_dict_mismatches(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], limit: int = 3) -> list[str]:
    """Human-readable differences between two state dicts (keys and shapes), at most ``limit`` of each kind.

    Returns an empty list when every expected key is present with the same shape and no
    extra key exists.
    """
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    out: list[str] = []
    if missing:
        out.append(f"missing {len(missing)} key(s) e.g. {', '.join(repr(k) for k in missing[:limit])}")
    if unexpected:
        out.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(repr(k) for k in unexpected[:limit])}")
    if shapes:
        shown = ", ".join(
            f"{k!r} file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}" for k in shapes[:limit]
        )
        out.append(f"{len(shapes)} shape mismatch(es) e.g. {shown}")
    return out
