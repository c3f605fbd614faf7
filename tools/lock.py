"""Write ``requirements.lock``: every dependency of ``.[test,onnx]`` at an exact version with its sha256.

    python tools/lock.py [--out requirements.lock] [--python .venv/bin/python]

pip's own resolver decides (``pip install --dry-run --ignore-installed --report``, installing
nothing), so the lock holds what ``pip install -e '.[test,onnx]'`` would install on this kind of
machine today, plus ``pip`` and ``setuptools`` (the install runs ``pip install --no-deps
--no-build-isolation -e .`` after the lock, so the build backend is locked too). One hash per
package: the file pip chose for this platform (Linux x86_64, CPython 3.11), so the lock is for
that platform; elsewhere ``pip install -e '.[test,onnx]'`` still works from the ranges in
pyproject.toml. Install with ``pip install --require-hashes -r requirements.lock``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECT = "nme-pathology"
EXTRAS = ".[test,onnx]"
ALSO = ("pip", "setuptools")


def resolve(python: str) -> list[dict]:
    """pip's install report for the project with its extras plus :data:`ALSO` (nothing is installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--report", str(report), EXTRAS, *ALSO]
        subprocess.run(cmd, cwd=REPO, check=True)
        return json.loads(report.read_text(encoding="utf-8"))["install"]


def lock_lines(items: list[dict]) -> list[str]:
    """``name==version --hash=sha256:...`` per resolved distribution (the project itself left out), sorted."""
    lines = []
    for item in items:
        meta = item["metadata"]
        name, version = meta["name"], meta["version"]
        if name.lower() == PROJECT:
            continue
        sha = ((item.get("download_info") or {}).get("archive_info") or {}).get("hashes", {}).get("sha256")
        if not sha:
            raise SystemExit(f"error: {name} {version}: pip reported no sha256 (not from an index or file?)")
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha}")
    return sorted(lines, key=str.lower)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "requirements.lock")
    ap.add_argument("--python", default=sys.executable, help="interpreter whose pip resolves (default: this one)")
    args = ap.parse_args(argv)
    lines = lock_lines(resolve(args.python))
    header = [
        "# Exact versions and sha256 hashes of everything `pip install -e '.[test,onnx]'` installs,",
        f"# resolved by pip for {platform.system()} {platform.machine()}, CPython "
        f"{platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]}.",
        "# Refresh: make lock (python tools/lock.py). Install: make install, i.e.",
        "#   pip install --require-hashes -r requirements.lock && pip install --no-deps --no-build-isolation -e .",
        "",
    ]
    args.out.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({len(lines)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
