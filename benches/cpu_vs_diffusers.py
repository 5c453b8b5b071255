#!/usr/bin/env python3
"""pixart vs diffusers on the CPU, side by side in one run, on the same random weights.

From the repo root, with the pinned reference stack (tests/reference/requirements.txt) in a
virtualenv and a release build of pixart:

    cargo build --release -p pixart-cli
    /tmp/refvenv/bin/python benches/cpu_vs_diffusers.py --pixart target/release/pixart \
        --out benches/results/cpu-<machine>

Builds a compute-dominated random PixArt-Σ model in the diffusers layout (not the test fixtures:
a 6-layer, 384-wide transformer with sample_size 64, an SDXL-shaped 4-level VAE, a small T5; the
tokenizer is the fixtures' sentencepiece model), then times on the same request and seed
(512², 10 steps, DPM-Solver++, guidance 4.5, seed 0), in f32 in --rounds rounds (each: pixart,
then diffusers; figures and ratios are the medians over the rounds, every round is listed):

  * diffusers (torch using every core), in a child process of its own: the pipeline call (load
    excluded; the second of two calls), T5, each transformer step (median), VAE decode, and the
    child's peak resident set;
  * `pixart bench` (stage medians over --runs runs after a warm-up) and a whole `pixart generate`
    process (load included: what a user waits for), with its peak resident set;
  * the max per-pixel difference of the two PNGs;
  * the same request asked for in bf16, then in f16 (`--half`): diffusers in that dtype (torch's CPU kernels
    for it, e.g. AVX512-BF16, AVX512-FP16) against `pixart bench --dtype bf16|f16` (bf16: on a CPU
    with AVX512-BF16 the transformer's linear layers and the VAE decoder's 3×3 convolutions
    multiply in bf16, the rest in f32; f16: on a CPU with AVX512-FP16 the transformer's linear
    layers multiply in f16, the rest in f32; elsewhere all f32), the max per-pixel
    difference of `pixart generate --dtype`'s PNG to diffusers' PNG in that dtype and in f32, and
    that process's peak resident set against diffusers' child's.

Prints the ratios (pixart / diffusers: below 1 is faster or smaller) and writes results.json
and results.md to --out with the machine and the command.

What an AVX2-only CPU runs can be measured on an AVX-512 one, both sides lowered alike: a pixart
built without the `gemm` crate's `x86-v4` feature (drop `features = ["x86-v4"]` from the `gemm`
lines of Cargo.toml and crates/pixart-core/Cargo.toml) run with PIXART_SIMD=avx2, torch with
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2, and glibc's copies
on both sides with GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD
(set all five for this script; results.json records them and the capability torch ran with).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_vs_diffusers import FIXTURE, PROMPT, diff, run_diffusers  # noqa: E402

SIZE, STEPS, SEED = 512, 10, 0


def make_cpu_model(out: Path) -> dict:
    """Random weights for a compute-dominated Σ model; returns the configs used."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5_config = dict(vocab_size=1024, d_model=512, d_kv=64, d_ff=1024, num_layers=6, num_heads=8,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    T5EncoderModel(T5Config(**t5_config)).save_pretrained(out / "text_encoder")
    dit_config = dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=6,
                      cross_attention_dim=384, attention_bias=True, sample_size=64, patch_size=2,
                      activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                      norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1,
                      use_additional_conditions=False, caption_channels=512)
    PixArtTransformer2DModel(**dit_config).save_pretrained(out / "transformer")
    vae_config = dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2, latent_channels=4,
                      down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                      norm_num_groups=32, scaling_factor=0.13025, sample_size=512, force_upcast=True)
    AutoencoderKL(**vae_config).save_pretrained(out / "vae")
    DPMSolverMultistepScheduler().save_pretrained(out / "scheduler")
    shutil.copytree(FIXTURE / "tokenizer", out / "tokenizer")
    shutil.copy(FIXTURE / "model_index.json", out / "model_index.json")
    return {"text_encoder": t5_config, "transformer": dit_config, "vae": vae_config}


def diffusers_child(model: Path, out: Path, dtype: str) -> None:
    """Runs in a child process: diffusers' timings, image and peak RSS in `dtype`."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    result = run_diffusers(model, "cpu", torch_dtype, SIZE, STEPS, SEED)
    from PIL import Image

    Image.fromarray(result.pop("image")).save(out / f"diffusers-{dtype}.png")
    result.pop("latents", None)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["torch_threads"] = torch.get_num_threads()
    (out / f"diffusers-{dtype}.json").write_text(json.dumps(result))


def timed_process(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """Runs `cmd`; returns the result, its wall time in ms and its own peak resident set in bytes
    (`wait4`'s usage of that child alone, not the largest child so far)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = (time.perf_counter() - start) * 1e3
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{stderr}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), wall, usage.ru_maxrss * 1024


def diffusers_in_child(args: argparse.Namespace, model: Path, out: Path, dtype: str) -> None:
    """diffusers' call in a child process of its own (its peak RSS is its own)."""
    subprocess.run([sys.executable, __file__, "--pixart", args.pixart, "--out", str(args.out),
                    "--diffusers-child", str(model), str(out), dtype], check=True)


def pixart_generate(args: argparse.Namespace, common: list[str], out_dir: Path) -> tuple[str, float, int]:
    """A whole `pixart generate` process: its PNG's path, wall time (ms) and peak RSS (bytes)."""
    gen, wall_ms, rss = timed_process(
        [args.pixart, "generate", *common, "--prompt", PROMPT, "--image-size", f"{SIZE}x{SIZE}",
         "--steps", str(STEPS), "--seed", str(SEED), "--out-dir", str(out_dir), "--quiet"])
    return json.loads(gen.stdout)["images"][0]["url"].removeprefix("file://"), wall_ms, rss


def pixart_bench(args: argparse.Namespace, common: list[str]) -> dict:
    """`pixart bench --json`'s report (--runs runs after one warm-up)."""
    bench, _, _ = timed_process(
        [args.pixart, "bench", *common, "--size", f"{SIZE}x{SIZE}", "--steps", str(STEPS), "--seed", str(SEED),
         "--prompt", PROMPT, "--runs", str(args.runs), "--warmup", "1", "--json"])
    return json.loads(bench.stdout)


def measure_round(args: argparse.Namespace, common: list[str], model: Path, work: Path) -> dict:
    """One f32 round: a whole `pixart generate` process, `pixart bench`, then diffusers' child;
    returns both sides' figures, their ratios and both PNGs."""
    work.mkdir(parents=True)
    png, generate_ms, generate_rss = pixart_generate(args, common, work)
    report = pixart_bench(args, common)
    diffusers_in_child(args, model, work, "f32")
    theirs = json.loads((work / "diffusers-f32.json").read_text())
    stages = report["stages"]
    ours = {
        "generate_process_ms": generate_ms,
        "pipeline_total_ms": stages["total"]["median_ms"],
        "text_encoder_ms": stages["text_encoder"]["median_ms"],
        "transformer_step_ms_median": stages["transformer_step"]["median_ms"],
        "vae_ms": stages["vae"]["median_ms"],
        "peak_rss_bytes": generate_rss,
        "load_s": report["load_s"],
    }
    ratios = {
        "transformer_step": ours["transformer_step_ms_median"] / theirs["transformer_step_ms_median"],
        "vae": ours["vae_ms"] / theirs["vae_ms"],
        "text_encoder": ours["text_encoder_ms"] / theirs["text_encoder_ms"],
        "pipeline_call": ours["pipeline_total_ms"] / theirs["total_ms"],
        "generate_process_vs_pipeline_call": ours["generate_process_ms"] / theirs["total_ms"],
        "peak_rss": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
    }
    print(f"round {work.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
    return {"ours": ours, "theirs": theirs, "ratios": ratios, "png": png, "their_png": work / "diffusers-f32.png"}


def measure_half(args: argparse.Namespace, common: list[str], model: Path, work: Path, dtype: str) -> dict:
    """The request asked for in `dtype` (bf16 or f16): `pixart bench` and a whole `pixart generate`
    process with `--dtype`, then diffusers' child in that dtype; both sides' figures, their
    ratios and both images (arrays)."""
    from PIL import Image

    half_common = [arg if arg != "f32" else dtype for arg in common]
    report = pixart_bench(args, half_common)
    png, _, generate_rss = pixart_generate(args, half_common, work / dtype)
    diffusers_in_child(args, model, work, dtype)
    theirs = json.loads((work / f"diffusers-{dtype}.json").read_text())
    stages = report["stages"]
    ours = {
        "cpu_products": report.get("cpu_products"),
        "pipeline_total_ms": stages["total"]["median_ms"],
        "transformer_step_ms_median": stages["transformer_step"]["median_ms"],
        "vae_ms": stages["vae"]["median_ms"],
        "peak_rss_bytes": generate_rss,
    }
    ratios = {
        "transformer_step": ours["transformer_step_ms_median"] / theirs["transformer_step_ms_median"],
        "vae": ours["vae_ms"] / theirs["vae_ms"],
        "pipeline_call": ours["pipeline_total_ms"] / theirs["total_ms"],
        "peak_rss": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
    }
    images = (np.asarray(Image.open(png).convert("RGB")),
              np.asarray(Image.open(work / f"diffusers-{dtype}.png").convert("RGB")))
    return {"theirs": theirs, "ours": ours, "ratios": ratios, "images": images}


def half_summary(dtype: str, half: dict, their_f32_img: np.ndarray) -> dict:
    """results.json's record of one half-precision request (see `measure_half`)."""
    ours_img, their_img = half["images"]
    return {
        f"diffusers_{dtype}": half["theirs"],
        f"pixart_dtype_{dtype}": half["ours"],
        f"png_max_pixel_diff_to_diffusers_{dtype}": int(diff(ours_img, their_img)["max_abs"]),
        "png_max_pixel_diff_to_diffusers_f32": int(diff(ours_img, their_f32_img)["max_abs"]),
        f"diffusers_{dtype}_png_max_pixel_diff_to_diffusers_f32": int(diff(their_img, their_f32_img)["max_abs"]),
        f"ratios_pixart_over_diffusers_{dtype}": half["ratios"],
    }


def half_lines(dtype: str, summary: dict) -> list[str]:
    """results.md's table of one half-precision request."""
    mib = 1 << 20
    theirs, ours = summary[f"diffusers_{dtype}"], summary[f"pixart_dtype_{dtype}"]
    ratios = summary[f"ratios_pixart_over_diffusers_{dtype}"]
    products = ours["cpu_products"]
    how = {"bf16": "the transformer's linear layers and the VAE decoder's 3×3 convolutions in bf16, everything else "
                   "in f32",
           "f16": "the transformer's linear layers in f16, everything else in f32"}.get(products, "everything in f32")
    lines = ["", f"The same request in {dtype}: diffusers computing in {dtype} against `pixart --dtype {dtype}` "
             f"(on this CPU: {how}):", "",
             f"| what | diffusers {dtype} | pixart `--dtype {dtype}` | pixart / diffusers |", "|---|---|---|---|"]
    for label, key, ratio in [("transformer step (median, CFG batch 2)", "transformer_step_ms_median", "transformer_step"),
                              ("VAE decode", "vae_ms", "vae"), ("pipeline call (load excluded)", None, "pipeline_call")]:
        theirs_ms, ours_ms = (theirs[key], ours[key]) if key else (theirs["total_ms"], ours["pipeline_total_ms"])
        lines.append(f"| {label} | {theirs_ms:.1f} ms | {ours_ms:.1f} ms | {ratios[ratio]:.2f} |")
    lines.append(f"| peak RSS (`pixart generate --dtype {dtype}` process; diffusers' {dtype} process) | "
                 f"{theirs['peak_rss_bytes'] / mib:.1f} MiB | {ours['peak_rss_bytes'] / mib:.1f} MiB | "
                 f"{ratios['peak_rss']:.2f} |")
    lines.append(f"| PNG max per-pixel difference: pixart {dtype} to diffusers {dtype} / to diffusers f32; diffusers "
                 f"{dtype} to f32 | | | {summary[f'png_max_pixel_diff_to_diffusers_{dtype}']}/255, "
                 f"{summary['png_max_pixel_diff_to_diffusers_f32']}/255; "
                 f"{summary[f'diffusers_{dtype}_png_max_pixel_diff_to_diffusers_f32']}/255 |")
    return lines


def rounds_table(rounds: list[dict]) -> list[str]:
    """Markdown lines: each round's ratios (pixart ms / diffusers ms for the step)."""
    lines = ["", "Rounds (pixart / diffusers):", "",
             "| round | transformer step | VAE decode | whole `pixart generate` vs diffusers' call | peak RSS |",
             "|---|---|---|---|---|"]
    for i, r in enumerate(rounds, 1):
        step = f"{r['ratios']['transformer_step']:.2f} ({r['ours']['transformer_step_ms_median']:.0f} / " \
               f"{r['theirs']['transformer_step_ms_median']:.0f} ms)"
        lines.append(f"| {i} | {step} | {r['ratios']['vae']:.2f} | "
                     f"{r['ratios']['generate_process_vs_pipeline_call']:.2f} | {r['ratios']['peak_rss']:.2f} |")
    return lines


def half_dtypes(spec: str) -> list[str]:
    """The dtypes `--half` names, in the order given ("none": none)."""
    dtypes = [d.strip() for d in spec.split(",") if d.strip() and d.strip() != "none"]
    unknown = [d for d in dtypes if d not in ("bf16", "f16")]
    if unknown:
        raise SystemExit(f"--half: {', '.join(unknown)} is not bf16, f16 or none")
    return dtypes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True, help="path to a release build of pixart")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    parser.add_argument("--runs", type=int, default=3, help="measured pixart bench runs per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="f32 rounds (pixart, then diffusers); figures and ratios are their medians")
    parser.add_argument("--half", default="bf16,f16",
                        help="the half-precision requests to compare after the f32 rounds: bf16, f16, both "
                             "(comma-separated) or none")
    parser.add_argument("--model-dir", type=Path,
                        help="keep the random model here (made on the first run, reused after)")
    parser.add_argument("--diffusers-child", nargs=3, metavar=("MODEL", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.diffusers_child:
        model_dir, out_dir, dtype = args.diffusers_child
        diffusers_child(Path(model_dir), Path(out_dir), dtype)
        return

    half_requests = half_dtypes(args.half)  # a typo fails here, not after the f32 rounds
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model_dir or work / "pixart-sigma-cpu-random"
        if not (model / "model_index.json").exists():
            configs = make_cpu_model(model)
        else:
            # A model from an earlier run: record the configs it was made with.
            configs = {part: json.loads((model / part / "config.json").read_text())
                       for part in ["text_encoder", "transformer", "vae"]}
        # diffusers' PixArtSigmaPipeline has no safety checker: compare like with like.
        common = ["--model", str(model), "--device", "cpu", "--dtype", "f32", "--no-safety-checker"]
        # f32 in rounds, each pixart then diffusers: a neighbour's load that comes and goes
        # lands on both sides of some round, not on one side of the only one.
        rounds = [measure_round(args, common, model, work / f"round-{i + 1}") for i in range(args.rounds)]
        halves = {dtype: measure_half(args, common, model, work, dtype) for dtype in half_requests}
        from PIL import Image

        ours_img = np.asarray(Image.open(rounds[-1]["png"]).convert("RGB"))
        their_img = np.asarray(Image.open(rounds[-1]["their_png"]).convert("RGB"))

    # Each figure: its median over the rounds; each ratio: the median of the rounds' ratios.
    theirs = {key: median(r["theirs"][key] for r in rounds)
              for key in ["transformer_step_ms_median", "vae_ms", "text_encoder_ms", "total_ms", "peak_rss_bytes"]}
    theirs["torch_threads"] = rounds[0]["theirs"]["torch_threads"]
    ours = {key: median(r["ours"][key] for r in rounds) for key in rounds[0]["ours"]}
    ratios = {key: median(r["ratios"][key] for r in rounds) for key in rounds[0]["ratios"]}
    summaries = {dtype: half_summary(dtype, half, their_img) for dtype, half in halves.items()}
    targets = {"transformer_step": 0.8, "vae": 0.8, "generate_process_vs_pipeline_call": 0.9, "peak_rss": 1.0}
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "torch_threads": theirs["torch_threads"]}
    for name in ["diffusers", "transformers"]:
        env[name] = __import__(name).__version__
    try:
        env["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
        env["cpu_simd"] = " ".join(f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))
    except (OSError, StopIteration):
        pass
    # What lowers either side's instruction set (to measure what an AVX2-only CPU runs on a
    # newer one): ours, torch's own kernels, MKL's, oneDNN's and glibc's string functions;
    # torch's choice as it ran.
    for name in ["PIXART_SIMD", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "GLIBC_TUNABLES"]:
        env[name] = os.environ.get(name, "")
    env["torch_cpu_capability"] = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "request": {"size": SIZE, "steps": STEPS, "seed": SEED, "scheduler": "DPM-SOLVER", "guidance_scale": 4.5, "dtype": "f32"},
        "model": configs,
        "environment": env,
        "diffusers": theirs,
        "pixart": ours,
        "ratios_pixart_over_diffusers": ratios,
        "targets": targets,
        "png_max_pixel_diff": int(diff(ours_img, their_img)["max_abs"]),
        **{f"{dtype}_request": summary for dtype, summary in summaries.items()},
        "rounds": [{k: r[k] for k in ["ours", "theirs", "ratios"]} for r in rounds],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    mib = 1 << 20
    rows = [
        ("transformer step (median, CFG batch 2)", theirs["transformer_step_ms_median"], ours["transformer_step_ms_median"], "ms", "transformer_step"),
        ("VAE decode", theirs["vae_ms"], ours["vae_ms"], "ms", "vae"),
        ("T5", theirs["text_encoder_ms"], ours["text_encoder_ms"], "ms", "text_encoder"),
        ("pipeline call (load excluded)", theirs["total_ms"], ours["pipeline_total_ms"], "ms", "pipeline_call"),
        ("diffusers call vs whole `pixart generate` (load included)", theirs["total_ms"], ours["generate_process_ms"], "ms",
         "generate_process_vs_pipeline_call"),
        ("peak RSS", theirs["peak_rss_bytes"] / mib, ours["peak_rss_bytes"] / mib, "MiB", "peak_rss"),
    ]
    lines = [f"# pixart vs diffusers on the CPU — {env.get('cpu_model', env['cpu'])}, {env['cores']} cores", "",
             f"`{results['command']}`", "", f"Environment: `{json.dumps(env)}`", "",
             f"{SIZE}², {STEPS} steps, DPM-Solver++, guidance 4.5, seed {SEED}, f32. Model: "
             + f"random, configs in results.json. {len(rounds)} rounds (pixart, then diffusers): each figure "
             + "is the median of the rounds' figures, each ratio the median of the rounds' ratios.", "",
             "| what | diffusers | pixart | pixart / diffusers | target |", "|---|---|---|---|---|"]
    for label, theirs_v, ours_v, unit, key in rows:
        target = f"≤ {targets[key]}" if key in targets else ""
        lines.append(f"| {label} | {theirs_v:.1f} {unit} | {ours_v:.1f} {unit} | {ratios[key]:.2f} | {target} |")
    lines.append(f"| PNG max per-pixel difference | | | {results['png_max_pixel_diff']}/255 | |")
    lines += rounds_table(rounds)
    for dtype, summary in summaries.items():
        lines += half_lines(dtype, summary)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
