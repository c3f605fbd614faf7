"""What a checkpoint must hold for a resumed run to end bit-identical to an uninterrupted one.

A resumed run replays the same computation only if every source of randomness continues where it
stopped. The pieces, and who owns each:

* the global generators of Python, NumPy and torch (CPU and CUDA: dropout draws from them):
  :func:`rng_state` / :func:`restore_rng_state`, saved in ``checkpoints/last.pt`` per rank;
* the epoch's tile sample: ``balanced_sample`` is a pure function of its seed, so a resumed
  epoch skips the tiles already trained on (the sampler position is ``step * batch_size``);
* augmentation: every tile's transforms are re-seeded from (epoch seed, position in the epoch)
  (:func:`item_seed`), so the random draws do not depend on which data-loader worker reads the
  tile, nor on where the epoch was resumed;
* data-loader base seeds: each loader gets its own ``torch.Generator`` (:func:`loader_generator`)
  instead of drawing from the global generator at every ``iter()``;
* optimizer, scheduler, AMP grad scaler, the epoch's losses so far, early-stopping state:
  plain state dicts in the checkpoint.

Checkpoints also record the hash of the split they were trained on (:func:`split_sha256`): a
run folder whose split changed never resumes its old checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Version of the resume fields in ``last.pt`` (absent: a checkpoint written before they existed).
RESUME_FORMAT = 2


def rng_state() -> dict[str, Any]:
    """The global random state of this process (Python, NumPy, torch CPU and CUDA).

    Only tensors, ints, floats, lists and tuples: loads with ``torch.load(weights_only=True)``.
    """
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [int(version), list(mt), gauss],
        "numpy": [
            str(np_kind),
            torch.from_numpy(np.asarray(np_keys, np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the global random state saved by :func:`rng_state`."""
    version, mt, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint holds the CUDA random state of %d devices, this machine has %d: "
                "the resumed run will not be bit-identical",
                len(cuda),
                torch.cuda.device_count(),
            )


def item_seed(base: int, position: int) -> int:
    """Seed of the augmentation of the tile at ``position`` of an epoch whose seed is ``base``."""
    seq = np.random.SeedSequence([int(base) % 2**63, int(position)])
    return int(seq.generate_state(1, np.uint32)[0])


def loader_generator(seed: int) -> torch.Generator:
    """A generator for one DataLoader (its workers' base seed), leaving the global one untouched."""
    return torch.Generator().manual_seed(int(seed) % 2**63)


def split_sha256(splits: Mapping[str, Any]) -> str:
    """Hash of a split's slide assignment (train / val / test lists; folds and seed excluded)."""
    blob = json.dumps({k: sorted(splits.get(k, [])) for k in ("train", "val", "test")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_split(path: Path) -> str | None:
    """The split hash recorded in checkpoint ``path`` (None: not recorded, an older checkpoint)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    value = state.get("split_sha256")
    return str(value) if value else None
