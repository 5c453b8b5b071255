#!/usr/bin/env python3
"""What encoding an input picture costs: the SDXL VAE encoder on a 2048² image, pixart against
diffusers, time and peak memory.

From the repo root, with the pinned reference stack (tests/reference/requirements.txt) in a
virtualenv and a release build of pixart:

    cargo build --release -p pixart-cli
    $VENV/bin/python benches/image_encode_memory.py --pixart target/release/pixart --out benches/results/image-encode-<machine>

Builds a model folder from the bundled tiny model with a random VAE of the SDXL VAE's real shape
(128/256/512/512 channels, 83.7 M parameters, f32) and its transformer configured for the 2048
aspect-ratio table, and a 2048×2048 input picture. pixart: `pixart bench --image` at 2048², one
denoising step (steps 4, strength 0.25, no guidance), reporting the `image_encode` stage (Lanczos
resize to the bin, VAE encode, posterior sample) with the process's peak resident set within it.
diffusers: `VaeImageProcessor.preprocess` + `AutoencoderKL.encode(...).latent_dist.sample()` on the
same weights and picture in a fresh process, with its peak resident set (`ru_maxrss`). Writes
results.json and results.md to --out with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_cost import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SDXL_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
                in_channels=3, out_channels=3, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def make_model(folder: Path) -> int:
    """The tiny model with an SDXL-shaped random VAE and the 2048 table; returns the VAE's size."""
    from diffusers import AutoencoderKL

    shutil.copytree(ROOT / "tests/fixtures/tiny-sigma-256", folder)
    config_path = folder / "transformer/config.json"
    config = json.loads(config_path.read_text())
    config["sample_size"] = 256  # the 2048 aspect-ratio table: a 2048² request runs at 2048²
    config_path.write_text(json.dumps(config, indent=2))
    shutil.rmtree(folder / "vae")
    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL_VAE)
    vae.save_pretrained(folder / "vae")
    return sum(p.numel() for p in vae.parameters())


def make_picture(path: Path, side: int) -> None:
    """A smooth random RGB picture (low-frequency noise, upsampled), as PNG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(side // 32, side // 32, 3), dtype=np.uint8)
    Image.fromarray(small).resize((side, side), Image.BICUBIC).save(path)


DIFFUSERS_ENCODE = """
import json, resource, sys, time, torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image
torch.set_grad_enabled(False)
vae = AutoencoderKL.from_pretrained(sys.argv[1])
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
image = load_image(sys.argv[2])
started = time.perf_counter()
x = VaeImageProcessor(vae_scale_factor=8).preprocess(image, height=image.height, width=image.width)
latents = vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(0)) * vae.config.scaling_factor
elapsed = time.perf_counter() - started
print(json.dumps({"encode_ms": elapsed * 1e3, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_after_load_bytes": loaded, "latents": list(latents.shape), "threads": torch.get_num_threads()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True, help="path to a release build of pixart")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    parser.add_argument("--side", type=int, default=2048, help="the picture's side, in pixels")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    side = args.side
    with tempfile.TemporaryDirectory() as tmp:
        model, picture = Path(tmp) / "model", Path(tmp) / "picture.png"
        parameters = make_model(model)
        make_picture(picture, side)
        command = [args.pixart, "bench", "--model", str(model), "--no-safety-checker", "--size", f"{side}x{side}",
                   "--image", str(picture), "--strength", "0.25", "--steps", "4", "--guidance-scale", "1",
                   "--runs", "1", "--warmup", "0", "--json"]
        report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        diffusers = json.loads(subprocess.run([sys.executable, "-c", DIFFUSERS_ENCODE, str(model / "vae"), str(picture)],
                                              check=True, capture_output=True, text=True).stdout)
    pixart = {
        "encode_ms": report["stages"]["image_encode"]["median_ms"],
        "peak_rss_bytes": report["peak_memory_by_stage_bytes"]["image_encode"],
        "rss_after_load_bytes": report["peak_memory_by_stage_bytes"]["load"],
        "decode_ms": report["stages"]["vae"]["median_ms"],
        "decode_peak_rss_bytes": report["peak_memory_by_stage_bytes"].get("vae"),
    }
    result = {
        "machine": {"cpu": cpu_model(), "cores": torch.get_num_threads(), "platform": platform.platform()},
        "command": " ".join(["python3", "benches/image_encode_memory.py", "--pixart", args.pixart, "--out", str(args.out)]),
        "picture": f"{side}x{side}", "vae_parameters": parameters, "dtype": "f32",
        "pixart": pixart, "diffusers": diffusers,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    gib = 1 << 30
    rows = [
        ("encode (resize + VAE encode + sample)", f"{pixart['encode_ms'] / 1e3:.1f} s", f"{diffusers['encode_ms'] / 1e3:.1f} s"),
        ("peak resident set during the encode", f"{pixart['peak_rss_bytes'] / gib:.2f} GiB",
         f"{diffusers['peak_rss_bytes'] / gib:.2f} GiB"),
        ("resident set after loading", f"{pixart['rss_after_load_bytes'] / gib:.2f} GiB",
         f"{diffusers['rss_after_load_bytes'] / gib:.2f} GiB"),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    (args.out / "results.md").write_text(
        f"# Encoding a {side}² picture: the SDXL VAE encoder (random weights, f32)\n\n"
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} threads. Command: `{result['command']}`\n\n"
        f"| | pixart | diffusers |\n|---|---|---|\n{table}\n")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
