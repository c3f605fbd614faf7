"""``python -m pipeline.clinical.rules RESULT_JSON [--clinical FILE] [--rules YAML] [--fhir OUT.json]``.

Prints the recommendation JSON for one slide result on stdout; optionally writes the FHIR R4
bundle. Bad input: one line ``error: ...`` on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.core.cli import run_cli, setup_logging
from pipeline.core.errors import DataError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.clinical.rules",
        description="Clinical decision support for one slide result: proposed orders, differential, flags "
        "(a clinician confirms every order).",
    )
    ap.add_argument("result", metavar="RESULT_JSON", help="per-slide result.json written by batch inference")
    ap.add_argument("--clinical", metavar="FILE", help="clinical context: CSV (slide_id/patient_id column) or JSON")
    ap.add_argument("--rules", metavar="YAML", help="ruleset (default: configs/rules.yaml)")
    ap.add_argument("--fhir", metavar="OUT.json", help="also write the FHIR R4 bundle here")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return ap


def read_result(path: str | Path) -> dict:
    """Read a result.json; DataError on a missing file, invalid JSON or a non-object."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: result file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: invalid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (PipelineError is handled by run_cli)."""
    args = _parser().parse_args(argv)
    setup_logging(quiet=not args.verbose, verbose=args.verbose)
    from pipeline.clinical.rules import load_clinical, load_ruleset, parse_result, recommend
    from pipeline.core.io import atomic_write_json

    ruleset = load_ruleset(args.rules)
    result = read_result(args.result)
    parsed = parse_result(result, str(args.result))  # field errors name the file first
    context = None
    if args.clinical:
        table = load_clinical(args.clinical, slide_ids={parsed.slide_id})
        context = table.lookup(parsed.slide_id, parsed.patient_id)
    rec = recommend(parsed, context, ruleset)
    if args.fhir:
        from pipeline.clinical.fhir import build_bundle

        atomic_write_json(args.fhir, build_bundle(parsed, rec))
    sys.stdout.write(json.dumps(rec, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
