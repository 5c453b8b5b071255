#!/usr/bin/env python3
"""pixart vs diffusers on the same weights, request and seed: speed, peak memory and parity.

On a GPU machine (PyTorch, transformers and diffusers installed), from the repo root, with a CUDA
build of `pixart` (`cargo build --release -p pixart-cli --features cuda`, see the README's GPU
section; benches/gpu_prepare.sh and gpu_session.sh run it for a machine without Rust):

    python3 benches/gpu_vs_diffusers.py --pixart target-cuda/release/pixart --out benches/results/h100

This creates random full-size PixArt-Σ 1024 weights in the diffusers layout directly on the GPU
(no download: T5 v1.1 XXL, the XL-2 transformer, the SDXL VAE; the tokenizer is the fixtures'
small sentencepiece model, which changes no tensor shape), then in one run:

  * diffusers eager bf16 and `pixart bench` (bf16): end to end at 1024² with 20 steps, per-step
    transformer time, T5, VAE, peak memory;
  * parity: final latents and image, ours vs diffusers, max/mean abs diff, in bf16 and f32.

`--dry-run` runs the same flow on the CPU with the tiny fixture model (f32 and bf16, 256², a few
steps), so the script itself is tested without a GPU. Results go to `--out` as results.json and
results.md, with the GPU, driver, versions and the exact command.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tiny-sigma-256"
PROMPT = "a small cactus with a happy face in the sahara desert"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_full_size_model(out: Path) -> None:
    """Random PixArt-Σ-XL-2-1024-MS weights in the diffusers layout, initialised on the GPU."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu", tie_word_embeddings=False)).to(torch.bfloat16)
        t5.save_pretrained(out / "text_encoder", max_shard_size="10GB")
        del t5
        transformer = PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            interpolation_scale=2, use_additional_conditions=False, caption_channels=4096)
        transformer.save_pretrained(out / "transformer")
        del transformer
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            norm_num_groups=32, scaling_factor=0.13025, sample_size=1024, force_upcast=True)
        vae.save_pretrained(out / "vae")
        del vae
    torch.cuda.empty_cache()
    DPMSolverMultistepScheduler().save_pretrained(out / "scheduler")
    shutil.copytree(FIXTURE / "tokenizer", out / "tokenizer")
    shutil.copy(FIXTURE / "model_index.json", out / "model_index.json")


def run_diffusers(model: Path, device: str, dtype: torch.dtype, size: int, steps: int, seed: int) -> dict:
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    timings: dict[str, list[float]] = {"text_encoder": [], "vae": [], "step": []}
    encode, decode = pipe.encode_prompt, pipe.vae.decode

    def timed(name, fn):
        def inner(*a, **kw):
            sync(device)
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync(device)
            timings[name].append((time.perf_counter() - t) * 1e3)
            return out
        return inner

    pipe.encode_prompt = timed("text_encoder", encode)
    pipe.vae.decode = timed("vae", decode)
    last = {"t": 0.0}

    def on_step(i, t, latents):  # the pipeline's per-step callback (callback_steps=1)
        sync(device)
        now = time.perf_counter()
        timings["step"].append((now - last["t"]) * 1e3)
        last["t"] = now

    def call(output_type):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        start = last["t"] = time.perf_counter()
        out = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=4.5,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type, clean_caption=False,
                   callback=on_step, callback_steps=1)
        sync(device)
        return out, (time.perf_counter() - start) * 1e3

    call("np")  # warm-up
    for v in timings.values():
        v.clear()
    images, total = call("np")
    first_step = timings["step"][0] - timings["text_encoder"][0]  # the first interval includes T5
    step_times = [first_step] + timings["step"][1:]
    latents, _ = call("latent")
    result = {
        "total_ms": total,
        "text_encoder_ms": timings["text_encoder"][0],
        "transformer_step_ms_median": float(np.median(step_times)),
        "vae_ms": timings["vae"][0],
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "image": (images.images[0] * 255).round().astype("uint8"),
        "latents": latents.images.float().cpu().numpy(),
    }
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_pixart(binary: str, model: Path, device: str, dtype: str, size: int, steps: int, seed: int, work: Path) -> dict:
    # diffusers' PixArtSigmaPipeline has no safety checker: compare like with like.
    common = ["--model", str(model), "--device", device, "--dtype", dtype, "--no-safety-checker"]
    bench = subprocess.run([binary, "bench", *common, "--size", f"{size}x{size}", "--steps", str(steps), "--seed", str(seed),
                            "--runs", "1", "--warmup", "1", "--json"], check=True, capture_output=True, text=True)
    report = json.loads(bench.stdout)
    latents_path = work / f"latents-{dtype}.safetensors"
    gen = subprocess.run([binary, "generate", *common, "--prompt", PROMPT, "--image-size", f"{size}x{size}", "--steps", str(steps),
                          "--seed", str(seed), "--out-dir", str(work), "--save-latents", str(latents_path), "--quiet"],
                         check=True, capture_output=True, text=True)
    response = json.loads(gen.stdout)
    from PIL import Image
    from safetensors.numpy import load_file

    image = np.asarray(Image.open(response["images"][0]["url"].removeprefix("file://")).convert("RGB"))
    return {"report": report, "image": image, "latents": load_file(str(latents_path))["latents"]}


def diff(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    scale = float(np.abs(b.astype(np.float64)).max()) or 1.0
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "max_abs_of_range": float(d.max()) / scale}


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ["diffusers", "transformers"]:
        env[name] = __import__(name).__version__
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        env["driver"] = smi.stdout.strip()
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True, help="path to the pixart binary (a CUDA build for GPU runs)")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    parser.add_argument("--model-dir", type=Path,
                        help="where the full-size random weights are kept: made there when missing, reused when present")
    parser.add_argument("--dtypes", default="bf16,f32", help="comma-separated, from bf16 and f32 (default both)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny fixture model: tests the script itself")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int)
    args = parser.parse_args()
    dtypes = {"bf16": torch.bfloat16, "f32": torch.float32}
    unknown = set(args.dtypes.split(",")) - dtypes.keys()
    if unknown:
        parser.error(f"--dtypes: {sorted(unknown)} not among {sorted(dtypes)}")

    device = "cpu" if args.dry_run else "cuda"
    steps = args.steps or (3 if args.dry_run else 20)
    size = args.size or (256 if args.dry_run else 1024)
    seed = 0
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.dry_run:
            model = FIXTURE
        elif args.model_dir:
            model = args.model_dir
            if not (model / "model_index.json").exists():
                make_full_size_model(model)
        else:
            model = work / "pixart-sigma-1024-random"
            make_full_size_model(model)
        results = {"command": " ".join([sys.executable, *sys.argv]), "device": device, "size": size, "steps": steps,
                   "seed": seed, "environment": environment(device), "runs": {}}
        for dtype_name in args.dtypes.split(","):
            torch_dtype = dtypes[dtype_name]
            theirs = run_diffusers(model, device, torch_dtype, size, steps, seed)
            ours = run_pixart(args.pixart, model, device, dtype_name, size, steps, seed, work)
            stages = ours["report"]["stages"]
            results["runs"][dtype_name] = {
                "diffusers": {k: v for k, v in theirs.items() if k not in ("image", "latents")},
                "pixart": {
                    "total_ms": stages["total"]["median_ms"],
                    "text_encoder_ms": stages["text_encoder"]["median_ms"],
                    "transformer_step_ms_median": stages["transformer_step"]["median_ms"],
                    "vae_ms": stages["vae"]["median_ms"],
                    "peak_memory_bytes": ours["report"]["peak_memory_bytes"],
                    "memory_measure": ours["report"]["memory_measure"],
                },
                "speedup_end_to_end": theirs["total_ms"] / stages["total"]["median_ms"],
                "parity": {"latents": diff(ours["latents"], theirs["latents"]), "image_u8": diff(ours["image"], theirs["image"])},
            }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# pixart vs diffusers — {results['environment'].get('gpu', results['environment'].get('cpu'))}", "",
             f"`{results['command']}`", "", f"Environment: `{json.dumps(results['environment'])}`", "",
             f"{size}², {steps} steps, DPM-Solver++, guidance 4.5, seed {seed}.", "",
             "| dtype | stage | diffusers | pixart |", "|---|---|---|---|"]
    for dtype_name, run in results["runs"].items():
        for key in ["total_ms", "text_encoder_ms", "transformer_step_ms_median", "vae_ms", "peak_memory_bytes"]:
            lines.append(f"| {dtype_name} | {key} | {run['diffusers'][key]} | {run['pixart'][key]} |")
        lines.append(f"| {dtype_name} | speed-up end to end | | {run['speedup_end_to_end']:.2f}× |")
        for what, d in run["parity"].items():
            lines.append(f"| {dtype_name} | parity {what} (max / mean abs; max of diffusers' max abs) | | "
                         f"{d['max_abs']:.3g} / {d['mean_abs']:.3g}; {d['max_abs_of_range']:.2%} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
