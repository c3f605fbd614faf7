"""An untrained model bundle with another backbone, for throughput measurements only.

    python benchmarks/speed_bundle.py --backbone resnet18 --out runs/speed-resnet18
    python benchmarks/throughput.py --model runs/speed-resnet18 --backend torch-bf16

The bundle copies the demo bundle's contract (input µm/px, tile size, classes, thresholds,
aggregator, calibration, bands) and its slide aggregator (which reads tile probabilities, not
embeddings, so it fits any backbone), with the patch classifier's weights drawn at random
(seeded). Its results mean nothing: it exists to measure how the pipeline keeps a costlier CNN
fed (the throughput targets were set with ResNet18 figures), and it is labelled so wherever it
appears. No agreement record is made (there is nothing to agree on): pass ``--backend``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401 - sets NO_ALBUMENTATIONS_UPDATE

LABEL = "untrained random weights: for speed measurements only, not for any use"

log = logging.getLogger("speed_bundle")


def make_speed_bundle(backbone: str, out: Path, source: Path = REPO / "models" / "demo_bundle", seed: int = 0) -> str:
    """Write the untrained ``backbone`` bundle to ``out``; returns its sha256 (:func:`models.bundle.save_bundle`)."""
    import torch

    from models.bundle import ArchitectureSpec, load_bundle, save_bundle
    from models.patch import PatchClassifier

    src = load_bundle(source)
    contract = src.contract
    torch.manual_seed(seed)
    model = PatchClassifier(backbone, contract.architecture.classes, contract.architecture.dropout).eval()
    speed = contract.model_copy(
        update={
            "name": f"speed-{backbone}",
            "version": "0",
            "label": LABEL,
            "architecture": ArchitectureSpec.of(model),
            "weights_sha256": None,
        }
    )
    return save_bundle(out, model, speed, extra_tensors=src.extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True, help="e.g. resnet18, resnet50, efficientnet_b0 (models.backbones)")
    ap.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    digest = make_speed_bundle(args.backbone, args.out, seed=args.seed)
    print(f"{args.out}: {args.backbone}, {LABEL} (sha256 {digest[:16]})")
    return 0


if __name__ == "__main__":
    from pipeline.core.cli import run_cli

    run_cli(main)
