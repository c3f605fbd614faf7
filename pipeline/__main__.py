"""``python -m pipeline <command>``: ``doctor`` checks the installation."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m pipeline doctor\n\n  doctor   check Python, torch/torchvision, OpenSlide, albumentations, CPU/GPU, bf16")
        return 0 if args else 2
    if args[0] == "doctor":
        from pipeline.doctor import main as doctor

        return doctor(args[1:])
    print(f"error: unknown command {args[0]!r}; try: python -m pipeline doctor", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
