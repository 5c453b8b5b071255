#!/usr/bin/env python3
"""The end-to-end fixture requests on a GPU, compared with diffusers' PNGs.

The same seven fal requests `crates/pixart-cli/tests/cli.rs` checks on the CPU
(`tests/fixtures/goldens/e2e/*`: tiny random-weight models, diffusers 0.42.1's images), run by a
CUDA build of `pixart generate` with `--device cuda`: in f32 (the CPU bound is 2/255 per pixel),
and in bf16 (flash attention with `--features flash-attn`; reported, no bound: bf16 rounds
differently from diffusers' f32 goldens). The first thing to run on a GPU machine: it needs
nothing but the binary, numpy and Pillow, and takes seconds.

    python3 benches/gpu_fixture_parity.py --pixart /tmp/pixart --out /tmp/out/fixture-parity.json

`--device cpu` runs the same on the CPU (tests the script without a GPU). Exits 1 when an f32
image is more than 2/255 away from diffusers' or a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
F32_BOUND = 2  # per pixel, out of 255: the CPU suite's bound


def run_case(binary: str, case: Path, device: str, dtype: str, out: Path) -> dict:
    model = FIXTURES / (case / "model.txt").read_text().strip()
    env = dict(os.environ, PIXART_SAFETY_CHECKER=str(FIXTURES / "tiny-safety-checker"))
    started = time.perf_counter()
    proc = subprocess.run([binary, "generate", "--model", str(model), "--request", str(case / "request.json"),
                           "--device", device, "--dtype", dtype, "--out-dir", str(out), "--quiet"],
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return {"ok": False, "error": proc.stderr.strip()[-2000:], "seconds": seconds}
    images = json.loads(proc.stdout)["images"]
    diffs = []
    for i, image in enumerate(images):
        ours = np.asarray(Image.open(image["url"].removeprefix("file://")).convert("RGB"), dtype=np.int16)
        theirs = np.asarray(Image.open(case / f"image_{i}.png").convert("RGB"), dtype=np.int16)
        if ours.shape != theirs.shape:
            return {"ok": False, "error": f"image {i}: size {ours.shape} vs diffusers' {theirs.shape}", "seconds": seconds}
        diffs.append(int(np.abs(ours - theirs).max()))
    if not diffs:
        return {"ok": False, "error": "no image in the response", "seconds": seconds}
    ok = dtype != "f32" or max(diffs) <= F32_BOUND
    return {"ok": ok, "max_pixel_diff": diffs, "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True, help="the pixart binary (a CUDA build for GPU runs)")
    parser.add_argument("--out", required=True, type=Path, help="the JSON report to write")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dtypes", default="f32,bf16", help="comma-separated: f32, bf16, f16")
    args = parser.parse_args()

    cases = sorted(p for p in (FIXTURES / "goldens" / "e2e").iterdir() if p.is_dir())
    report = {"command": " ".join([sys.executable, *sys.argv]), "device": args.device, "f32_bound": F32_BOUND,
              "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            for case in cases:
                out = Path(tmp) / f"{dtype}-{case.name}"
                try:
                    result = run_case(args.pixart, case, args.device, dtype, out)
                except Exception as error:  # noqa: BLE001 - every case gets a line in the report
                    result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
                report["cases"][f"{dtype}/{case.name}"] = result
                print(f"{dtype:5} {case.name:20} {json.dumps(result)}", flush=True)
    report["ok"] = all(r["ok"] for r in report["cases"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
