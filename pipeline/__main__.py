"""``python -m pipeline <command>``: ``doctor`` checks the installation; ``schema result`` prints
the JSON Schema of ``result.json``."""

from __future__ import annotations

import json
import sys

USAGE = """usage: python -m pipeline doctor | schema result

  doctor          check Python, torch/torchvision, OpenSlide, albumentations, CPU/GPU, bf16
  schema result   print the JSON Schema of a slide's result.json (pipeline.result.SlideResult)"""

SCHEMAS = ("result",)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    if args[0] == "doctor":
        from pipeline.doctor import main as doctor

        return doctor(args[1:])
    if args[0] == "schema":
        if len(args) != 2 or args[1] not in SCHEMAS:
            print(
                f"error: schema takes one of: {', '.join(SCHEMAS)} (e.g. python -m pipeline schema result)",
                file=sys.stderr,
            )
            return 2
        from pipeline.result import result_json_schema

        sys.stdout.write(json.dumps(result_json_schema(), indent=2, ensure_ascii=False) + "\n")
        return 0
    print(f"error: unknown command {args[0]!r}; try: python -m pipeline doctor | schema result", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
