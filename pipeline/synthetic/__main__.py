"""``python -m pipeline.synthetic``: write a synthetic slide dataset (see :mod:`pipeline.synthetic.dataset`).

Bad input (``--n 0``, negative or non-integer values, unknown classes, a non-empty output
folder without ``--overwrite``) gives one ``error: ...`` line on stderr and exit status 2
(usage) or 1 (runtime), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipeline.core.errors import PipelineError
from pipeline.synthetic.catalog import DIAGNOSES
from pipeline.synthetic.dataset import DEFAULT_SIZE_UM, generate_dataset


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {v}")
    return v


def _mpp(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected µm/px such as 0.5 or 0.25,0.5, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {part!r}")
        out.append(v)
    return out


def _size(text: str) -> tuple[float, float]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        w, h = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in µm such as 4000x3000, got {text!r}") from None
    if not (w > 0 and h > 0):
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m pipeline.synthetic",
        description="Write synthetic H&E skin-biopsy slides (pyramidal TIFF), QuPath GeoJSON annotations "
        "of the NME patterns and labels.csv.",
    )
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--n", required=True, type=_positive_int, help="number of slides")
    p.add_argument("--seed", required=True, type=_seed, help="dataset seed (same seed, same bytes)")
    p.add_argument(
        "--mpp", type=_mpp, default=[0.5], help="level-0 µm/px, or a comma list to mix scanners (default 0.5)"
    )
    p.add_argument(
        "--classes",
        nargs="+",
        default=None,
        metavar="CLASS",
        help="diagnoses to draw, space- or comma-separated: " + ", ".join(DIAGNOSES),
    )
    p.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="WxH",
        help=f"glass area per slide in µm (default {DEFAULT_SIZE_UM[0]:.0f}x{DEFAULT_SIZE_UM[1]:.0f})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier synthetic dataset in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    classes = None
    if args.classes is not None:
        classes = [c for item in args.classes for c in item.split(",") if c.strip()]

    def progress(row: dict, seconds: float) -> None:
        if not args.quiet:
            flags = "".join(k[0].upper() if row[k] else "-" for k in ("pallor", "necrolysis", "parakeratosis"))
            print(f"{row['slide_id']}  {row['diagnosis']:<19} {flags}  {row['site']:<15} {seconds:5.1f} s", flush=True)

    try:
        rows = generate_dataset(
            args.out,
            args.n,
            args.seed,
            mpp=args.mpp if len(args.mpp) > 1 else args.mpp[0],
            classes=classes,
            size_um=args.size,
            overwrite=args.overwrite,
            progress=progress,
        )
    except PipelineError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except OSError as exc:
        sys.stderr.write(f"error: {exc.filename or args.out}: {exc.strerror or exc}\n")
        return 1
    if not args.quiet:
        print(f"wrote {len(rows)} slide(s), annotations and labels.csv to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
