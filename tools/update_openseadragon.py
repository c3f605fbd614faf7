"""Vendor OpenSeadragon from the npm registry into the review app (``make vendor-viewer``).

    python tools/update_openseadragon.py VERSION      # e.g. 6.1.1: download, verify, replace
    python tools/update_openseadragon.py --check      # verify the vendored files against manifest.json

``npm view`` gives the registry's integrity hash (sha512) of ``openseadragon@VERSION``; ``npm pack``
downloads the tarball, whose sha512 must equal it. From the tarball only the minified build, the
button images and the licence are taken (by name: nothing in the archive chooses a path here) into
``pipeline/review/static/vendor/openseadragon/``, replacing what was there, and ``manifest.json``
records the version, the integrity, the sha256 of each file and the CSP hash of the one style
element OpenSeadragon injects. Nothing is loaded from a CDN at run time: the app works offline.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.review.assets import VENDOR_DIR, injected_style_hashes, sha256_file, verify_vendored  # noqa: E402

PACKAGE = "openseadragon"
#: tarball member -> vendored file (relative to VENDOR_DIR); images are added by pattern below
TAKE = {
    "package/build/openseadragon/openseadragon.min.js": "openseadragon.min.js",
    "package/LICENSE.txt": "LICENSE.txt",
}
IMAGES = "package/build/openseadragon/images/"


def npm(*args: str) -> str:
    try:
        return subprocess.run(["npm", *args], check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise SystemExit("error: npm not found (apt-get install npm)") from None
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"error: npm {' '.join(args)}: {exc.stderr.strip().splitlines()[-1:]}") from None


def update(version: str, dest: Path = VENDOR_DIR) -> dict:
    spec = f"{PACKAGE}@{version}"
    meta = json.loads(npm("view", spec, "version", "dist.integrity", "license", "--json"))
    if not isinstance(meta, dict) or meta.get("version") != version:
        raise SystemExit(f"error: {spec}: the registry has no such single version ({meta!r:.200})")
    integrity = meta["dist.integrity"]
    algo, _, want = integrity.partition("-")
    if algo != "sha512":
        raise SystemExit(f"error: {spec}: unexpected integrity {integrity!r}")
    with tempfile.TemporaryDirectory() as tmp:
        packed = json.loads(npm("pack", spec, "--pack-destination", tmp, "--json"))
        tgz = Path(tmp) / packed[0]["filename"]
        got = base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode("ascii")
        if got != want:
            raise SystemExit(f"error: {tgz.name}: sha512 {got} is not the registry's {want}")
        new = Path(tmp) / "new"
        (new / "images").mkdir(parents=True)
        with tarfile.open(tgz, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if name in TAKE:
                    target = new / TAKE[name]
                elif name.startswith(IMAGES) and name.endswith(".png") and "/" not in name[len(IMAGES) :]:
                    target = new / "images" / name[len(IMAGES) :]
                else:
                    continue
                if not member.isfile():
                    raise SystemExit(f"error: {name} in the tarball is not a plain file")
                src = tar.extractfile(member)
                assert src is not None
                target.write_bytes(src.read())
        missing = [v for v in TAKE.values() if not (new / v).is_file()]
        if missing or not any((new / "images").iterdir()):
            raise SystemExit(f"error: {spec}: the tarball lacks {missing or 'images'} (layout changed?)")
        files = {p.relative_to(new).as_posix(): sha256_file(p) for p in sorted(new.rglob("*")) if p.is_file()}
        manifest = {
            "package": PACKAGE,
            "version": version,
            "license": meta.get("license"),
            "integrity": integrity,
            "source": f"npm registry, {PACKAGE}-{version}.tgz (npm pack {spec})",
            "update": "python tools/update_openseadragon.py VERSION  (make vendor-viewer OSD_VERSION=VERSION)",
            "files": files,
            "csp_style_hashes": injected_style_hashes((new / "openseadragon.min.js").read_text(encoding="utf-8")),
        }
        (new / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(new, dest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("version", nargs="?", help="OpenSeadragon version on the npm registry, e.g. 6.1.1")
    ap.add_argument("--check", action="store_true", help="only verify the vendored files against manifest.json")
    args = ap.parse_args(argv)
    if args.check or not args.version:
        problems = verify_vendored()
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        if not problems:
            print(f"ok: {VENDOR_DIR.relative_to(REPO)} matches its manifest")
        return 1 if problems else 0
    m = update(args.version)
    print(f"vendored {PACKAGE} {m['version']} ({len(m['files'])} files, {m['integrity'][:20]}...) into {VENDOR_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
