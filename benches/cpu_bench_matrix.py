#!/usr/bin/env python3
"""`pixart bench` on one model for each compute dtype and SIMD level this CPU runs, in one run.

    python3 benches/cpu_bench_matrix.py --pixart target/release/pixart --model-dir <model> \
        --out benches/results/cpu-<machine>

`<model>` is a diffusers-layout folder, e.g. the random one `cpu_vs_diffusers.py --model-dir`
keeps. Each row is a fresh `pixart bench --json` process (512², 10 steps, one warm-up, --runs
measured runs): `--dtype f32`, `bf16` and `f16`; bf16 again with each bf16 kernel forced
(`PIXART_BF16_KERNEL=dot`: `vdpbf16ps`; `fma`: f32 FMAs on the widened operands; without the
variable the process probes which is faster); and f32 again with `PIXART_SIMD=avx2` and
`PIXART_SIMD=baseline` (our kernels capped at that level; the `gemm` crate's matrix products
keep choosing their own). What `--dtype` computes on this CPU is the report's `cpu_products`
(and `cpu_bf16_kernel`).
The rows alternate over --rounds rounds so that drift on a noisy machine spreads over all of
them; each figure is the median over rounds. Writes bench-matrix.json and bench-matrix.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

# (--dtype, the one environment variable set for the process, or "").
ROWS = [
    ("f32", ""),
    ("bf16", ""),
    ("bf16", "PIXART_BF16_KERNEL=dot"),
    ("bf16", "PIXART_BF16_KERNEL=fma"),
    ("f16", ""),
    ("f32", "PIXART_SIMD=avx2"),
    ("f32", "PIXART_SIMD=baseline"),
]
VARIABLES = ("PIXART_SIMD", "PIXART_BF16_KERNEL")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def computes(row: dict) -> str:
    kernel = row.get("cpu_bf16_kernel")
    return f"{row['cpu_products']} ({kernel})" if kernel else str(row["cpu_products"])


def bench(pixart: str, model: Path, dtype: str, variable: str, runs: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    if variable:
        name, value = variable.split("=", 1)
        env[name] = value
    cmd = [pixart, "bench", "--model", str(model), "--device", "cpu", "--dtype", dtype, "--no-safety-checker",
           "--size", "512x512", "--steps", "10", "--seed", "0", "--runs", str(runs), "--warmup", "1", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True, help="path to a release build of pixart")
    parser.add_argument("--model-dir", required=True, type=Path, help="a diffusers-layout model folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for bench-matrix.json and .md")
    parser.add_argument("--runs", type=int, default=2, help="measured runs per bench process")
    parser.add_argument("--rounds", type=int, default=2, help="times each row is run, alternating")
    args = parser.parse_args()

    samples: dict[tuple[str, str], list[dict]] = {row: [] for row in ROWS}
    for _ in range(args.rounds):
        for dtype, variable in ROWS:
            samples[(dtype, variable)].append(bench(args.pixart, args.model_dir, dtype, variable, args.runs))

    rows = []
    for (dtype, variable), reports in samples.items():
        stage = lambda name: statistics.median(r["stages"][name]["median_ms"] for r in reports)  # noqa: E731
        rows.append({
            "dtype": dtype,
            "environment": variable,
            "cpu_products": reports[0].get("cpu_products"),
            "cpu_bf16_kernel": reports[0].get("cpu_bf16_kernel"),
            "transformer_step_ms": stage("transformer_step"),
            "vae_ms": stage("vae"),
            "text_encoder_ms": stage("text_encoder"),
            "total_ms": stage("total"),
            "peak_memory_mib": statistics.median(r["peak_memory_bytes"] for r in reports) / (1 << 20),
        })
    f32 = rows[0]
    command = ("python3 benches/cpu_bench_matrix.py --pixart target/release/pixart "
               f"--model-dir {args.model_dir} --out {args.out} --runs {args.runs} --rounds {args.rounds}")
    results = {"command": command, "cpu_model": cpu_model(), "cores": os.cpu_count(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-matrix.json").write_text(json.dumps(results, indent=2) + "\n")

    lines = [f"# pixart bench per dtype, bf16 kernel and SIMD level — {results['cpu_model']}, {results['cores']} cores", "",
             f"`{command}`", "",
             "512², 10 steps, DPM-Solver++, f32 unless the row says otherwise; medians over the rounds. "
             "`computes` is the report's `cpu_products` (and `cpu_bf16_kernel`); ratios are to the first row.", "",
             "| --dtype | environment | computes | transformer step | VAE decode | T5 | pipeline | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['environment'] and '`' + r['environment'] + '`'} | {computes(r)} "
            f"| {r['transformer_step_ms']:.1f} ms ({r['transformer_step_ms'] / f32['transformer_step_ms']:.2f}) "
            f"| {r['vae_ms']:.1f} ms ({r['vae_ms'] / f32['vae_ms']:.2f}) | {r['text_encoder_ms']:.1f} ms "
            f"| {r['total_ms']:.1f} ms ({r['total_ms'] / f32['total_ms']:.2f}) | {r['peak_memory_mib']:.0f} MiB |")
    (args.out / "bench-matrix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
