"""Refresh the browser runtime vendored in budget3d/export/web_assets/vendor/ from the npm registry.

    python scripts/vendor_web.py            # the pinned versions below
    python scripts/vendor_web.py --check    # verify the vendored files against VERSIONS.json

Each package is fetched with ``npm pack NAME@VERSION`` (the registry's own tarball, no install
scripts, no dependencies), and only the files the web export loads are copied, with the package's
licence beside them. ``VERSIONS.json`` records name, version, licence (from package.json), the
tarball's integrity string and each file's size and sha256. To move to a newer release, change
``PACKAGES`` below, run this, then the web tests (``pytest tests/test_export_web.py``).

Why these files: onnxruntime-web's wasm-only ESM bundle (the CPU/WASM execution provider, no
WebGL/WebGPU/JSEP; 1.30 ships only the "threaded" wasm binary, which runs single-threaded when
the page is not cross-origin isolated), three.js's ESM build (two files) plus the two addons
used (OrbitControls, and Pass which Spark imports), and Spark's minified ESM build (its sorting
worker and Rust/WASM core are inlined in that one file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[1] / "budget3d" / "export" / "web_assets" / "vendor"

ORT_LICENSE = """MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.

(The onnxruntime-web npm tarball carries no LICENSE file; its package.json says "MIT" and this
is the text of https://github.com/microsoft/onnxruntime/blob/main/LICENSE. The WASM binary also
contains third-party code listed in that repository's ThirdPartyNotices.txt.)
"""

# package -> (version, folder under vendor/, {path in the tarball: path under that folder}, licence file or None)
PACKAGES = {
    "onnxruntime-web": ("1.30.0", "ort", {
        "package/dist/ort.wasm.bundle.min.mjs": "ort.wasm.bundle.min.mjs",
        "package/dist/ort-wasm-simd-threaded.wasm": "ort-wasm-simd-threaded.wasm",
    }, None),
    "three": ("0.187.0", "three", {
        "package/build/three.module.js": "three.module.js",
        "package/build/three.core.js": "three.core.js",
        "package/examples/jsm/controls/OrbitControls.js": "addons/controls/OrbitControls.js",
        "package/examples/jsm/postprocessing/Pass.js": "addons/postprocessing/Pass.js",
    }, "package/LICENSE"),
    "@sparkjsdev/spark": ("2.2.0", "spark", {
        "package/dist/spark.module.min.js": "spark.module.min.js",
    }, "package/LICENSE"),
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def npm_pack(spec: str, dest: Path) -> tuple[Path, dict]:
    out = subprocess.run(["npm", "pack", spec, "--json", "--pack-destination", str(dest)],
                         check=True, capture_output=True, text=True)
    info = json.loads(out.stdout)[0]
    return dest / info["filename"], info


def refresh() -> dict:
    if not shutil.which("npm"):
        sys.exit("npm not found: install Node.js (npm comes with it)")
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, (version, folder, files, licence) in PACKAGES.items():
            tgz, info = npm_pack(f"{name}@{version}", tmp)
            target = VENDOR / folder
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            with tarfile.open(tgz) as tar:
                pkg = json.load(tar.extractfile("package/package.json"))
                for src, dst in files.items():
                    (target / dst).parent.mkdir(parents=True, exist_ok=True)
                    (target / dst).write_bytes(tar.extractfile(src).read())
                if licence:
                    (target / "LICENSE").write_bytes(tar.extractfile(licence).read())
                else:
                    (target / "LICENSE").write_text(ORT_LICENSE)
            record[name] = {
                "version": pkg["version"], "license": pkg.get("license"), "folder": f"vendor/{folder}",
                "integrity": info.get("integrity"),
                "files": {dst: {"bytes": (target / dst).stat().st_size, "sha256": sha256(target / dst)}
                          for dst in files.values()},
            }
            print(f"{name}@{pkg['version']} ({pkg.get('license')}): "
                  f"{sum(f['bytes'] for f in record[name]['files'].values()) / 1e6:.2f} MB in vendor/{folder}")
    (VENDOR / "VERSIONS.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def check() -> int:
    record = json.loads((VENDOR / "VERSIONS.json").read_text())
    bad = 0
    for name, rec in record.items():
        for dst, f in rec["files"].items():
            path = VENDOR.parent / rec["folder"] / dst
            if not path.is_file() or sha256(path) != f["sha256"]:
                print(f"{name}: {path} missing or changed")
                bad += 1
    total = sum(f["bytes"] for rec in record.values() for f in rec["files"].values())
    print(f"{'ok' if not bad else 'MISMATCH'}: {total / 1e6:.2f} MB vendored")
    return 1 if bad else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify the vendored files against VERSIONS.json")
    a = ap.parse_args()
    sys.exit(check() if a.check else (refresh() and 0))
