#!/usr/bin/env python3
"""Resolution-binning goldens, called by make_fixtures.py (or run alone to rewrite only this file).

Writes:
  fixtures/goldens/sizes.json   diffusers' own aspect-ratio tables (ASPECT_RATIO_{256,512,1024,2048}_BIN,
                                as PixArtSigmaPipeline imports them) and, for thousands of requested
                                sizes per table, what PixArtSigmaPipeline.__call__ does with them under
                                use_resolution_binning: the bin of
                                PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table),
                                the size PixArtImageProcessor.resize_and_crop_tensor interpolates the decoded
                                image to, and the shape it returns after the center crop; plus the pixels
                                resize_and_crop_tensor returns for a few small requests on the 256 table

The Rust size rule is checked against these recorded answers, not against a re-derivation of the same
arithmetic, so float truncation in diffusers (int(orig * ratio)) and its crop offsets are covered as
they really behave: when the truncated resize comes out one pixel short of a requested side, the
crop that follows starts at -1 and returns a single row or column on that side.

Layout of sizes.json (one JSON object):
  about, versions, columns     what the file is; torch/diffusers versions; names of a sample's 8 ints
  tables.<base>                one per table, <base> in "256", "512", "1024", "2048":
    name                       diffusers' constant name
    base                       the table's base resolution
    bins                       [key, height, width] per entry, in the dict's order (which decides ties),
                               values exactly as diffusers stores them
    samples                    [w, h, bin_w, bin_h, resized_w, resized_h, out_w, out_h] per request
  pixels                       on the 256 table: input (how the input tensor is filled) and cases, each
                               {request: [w, h], bin: [w, h], resized: [w, h], shape: [c, h, w],
                               values: the output, row-major over C, H, W: float32 values widened to
                               float64 and written as Python's repr, so they read back exactly}

Running it twice gives byte-identical output (fixed seeds, no timestamps).
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import diffusers
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma

# The tables PixArtSigmaPipeline.__call__ picks from (by transformer sample_size 32/64/128/256).
TABLES = {
    256: "ASPECT_RATIO_256_BIN",
    512: "ASPECT_RATIO_512_BIN",
    1024: "ASPECT_RATIO_1024_BIN",
    2048: "ASPECT_RATIO_2048_BIN",
}
COLUMNS = ["w", "h", "bin_w", "bin_h", "resized_w", "resized_h", "out_w", "out_h"]
SEED = 20_480
RANDOM_SAMPLES = 5000
SMALL_SAMPLES = 300
MIN_SIDE, MAX_SIDE = 16, 4096
SMALL_MAX_SIDE = 600

# Small requests on the 256 table whose output pixels are recorded (both sides 16..90; every bin of
# that table is at least 128 px a side, so all of them are resampled). Among them: crops offset
# vertically (16x45) and horizontally (36x16), and 59x16, whose resize comes out one pixel short
# so that diffusers' crop returns a single column. Only the cropped output is stored.
PIXEL_REQUESTS = [
    (16, 16), (17, 16), (16, 17), (59, 16), (16, 45), (24, 20),
    (36, 16), (30, 17), (17, 33), (23, 23), (40, 21), (19, 37),
]


def versions() -> dict:
    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


@contextmanager
def recording_interpolate(calls: list, compute: bool):
    """Replaces torch.nn.functional.interpolate (which resize_and_crop_tensor calls as F.interpolate)
    while active, recording each call's `size=`. Without `compute` the resampling itself is skipped:
    an uninitialised tensor of the requested size is returned, which leaves the crop that follows
    (and so the output's shape) exactly as it is."""
    original = F.interpolate

    def wrapper(input, size=None, *args, **kwargs):
        calls.append(tuple(int(s) for s in size))
        if compute:
            return original(input, size, *args, **kwargs)
        return torch.empty((*input.shape[:2], *size), dtype=input.dtype)

    F.interpolate = wrapper
    try:
        yield
    finally:
        F.interpolate = original


def diffusers_size(table: dict, width: int, height: int, compute: bool = False) -> list[int]:
    """One sample row, through the two calls PixArtSigmaPipeline.__call__ makes."""
    bin_h, bin_w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table)
    # Only the shape of the decoded image matters to the sizes: a broadcast view stands in for it.
    image = torch.zeros(1, 1, 1, 1).expand(1, 1, bin_h, bin_w)
    calls: list = []
    with recording_interpolate(calls, compute):
        out = PixArtImageProcessor.resize_and_crop_tensor(image, width, height)
    assert len(calls) <= 1
    resized_h, resized_w = calls[0] if calls else (bin_h, bin_w)
    return [width, height, bin_w, bin_h, resized_w, resized_h, int(out.shape[3]), int(out.shape[2])]


def requests_for(base: int) -> list[tuple[int, int]]:
    sides = [16, 17, base - 1, base, base + 1, 4095, 4096]
    edges = [(w, h) for w in sides for h in sides]
    rng = random.Random(SEED + base)
    small = [(rng.randint(MIN_SIDE, SMALL_MAX_SIDE), rng.randint(MIN_SIDE, SMALL_MAX_SIDE)) for _ in range(SMALL_SAMPLES)]
    uniform = [(rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)) for _ in range(RANDOM_SAMPLES)]
    return edges + small + uniform


def pixel_input(bin_h: int, bin_w: int) -> torch.Tensor:
    """Flat element i (row-major over C, H, W) is float32(((i * 7919) % 255) / 127.5 - 1.0), computed
    in float64 and rounded to float32 once."""
    i = np.arange(3 * bin_h * bin_w, dtype=np.int64)
    values = (((i * 7919) % 255).astype(np.float64) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(values.reshape(1, 3, bin_h, bin_w))


def pixel_cases(table: dict) -> list[dict]:
    cases = []
    for width, height in PIXEL_REQUESTS:
        bin_h, bin_w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table)
        calls: list = []
        with recording_interpolate(calls, compute=True):
            out = PixArtImageProcessor.resize_and_crop_tensor(pixel_input(bin_h, bin_w), width, height)
        assert len(calls) == 1 and out.dtype == torch.float32
        cases.append({
            "request": [width, height],
            "bin": [bin_w, bin_h],
            "resized": [calls[0][1], calls[0][0]],
            "shape": list(out.shape[1:]),
            "values": [float(v) for v in out.contiguous().reshape(-1).numpy()],
        })
    return cases


def dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def render(doc: dict) -> str:
    """Compact JSON with one bin, sample or pixel case per line (readable diffs, small file)."""
    lines = ["{"]
    lines.append(f'"about":{dumps(doc["about"])},')
    lines.append(f'"versions":{dumps(doc["versions"])},')
    lines.append(f'"columns":{dumps(doc["columns"])},')
    lines.append('"tables":{')
    tables = list(doc["tables"].items())
    for t, (key, table) in enumerate(tables):
        lines.append(f'{dumps(key)}:{{"name":{dumps(table["name"])},"base":{table["base"]},"bins":[')
        lines.append(",\n".join(dumps(b) for b in table["bins"]))
        lines.append('],"samples":[')
        lines.append(",\n".join(dumps(s) for s in table["samples"]))
        lines.append("]}" + ("," if t + 1 < len(tables) else ""))
    lines.append("},")
    pixels = doc["pixels"]
    lines.append(f'"pixels":{{"table":{dumps(pixels["table"])},"input":{dumps(pixels["input"])},"cases":[')
    lines.append(",\n".join(dumps(c) for c in pixels["cases"]))
    lines.append("]}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == doc
    return text


@torch.no_grad()
def write_size_fixtures(goldens: Path) -> None:
    tables = {}
    for base, name in TABLES.items():
        table = getattr(pipeline_pixart_sigma, name)
        samples = [diffusers_size(table, w, h) for w, h in requests_for(base)]
        # The shapes of the skipped resampling are those of the real one: check on the small requests.
        for row in samples[:49 + SMALL_SAMPLES]:
            if row[4] * row[5] <= 1 << 20:
                assert diffusers_size(table, row[0], row[1], compute=True) == row
        tables[str(base)] = {
            "name": name,
            "base": base,
            "bins": [[key, hw[0], hw[1]] for key, hw in table.items()],
            "samples": samples,
        }
    doc = {
        "about": "diffusers PixArtSigmaPipeline resolution binning: bins of each aspect-ratio table and, per "
                 "requested size, PixArtImageProcessor.classify_height_width_bin(height, width, ratios=table) and "
                 "PixArtImageProcessor.resize_and_crop_tensor(image of the bin size, width, height)",
        "versions": versions(),
        "columns": COLUMNS,
        "tables": tables,
        "pixels": {
            "table": "256",
            "input": "shape [1, 3, bin_h, bin_w]; flat element i (row-major over C, H, W) is "
                     "float32(float64((i * 7919) % 255) / 127.5 - 1.0)",
            "cases": pixel_cases(pipeline_pixart_sigma.ASPECT_RATIO_256_BIN),
        },
    }
    goldens.mkdir(parents=True, exist_ok=True)
    (goldens / "sizes.json").write_text(render(doc), encoding="utf-8")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    write_size_fixtures(Path(__file__).resolve().parents[1] / "fixtures" / "goldens")
