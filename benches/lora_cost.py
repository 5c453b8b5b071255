#!/usr/bin/env python3
"""What a LoRA costs a generation: `pixart bench --lora` on the CPU benchmark's model.

From the repo root, with the pinned reference stack (tests/reference/requirements.txt, peft
included) in a virtualenv and a release build of pixart:

    cargo build --release -p pixart-cli
    /tmp/refvenv/bin/python benches/lora_cost.py --pixart target/release/pixart --out benches/results/lora-cost-<machine>

Builds the random model of benches/cpu_vs_diffusers.py (6-layer 384-wide transformer) and a
rank-16 LoRA on it made with PEFT (alpha 16, the modules PixArt-sigma's own LoRA script targets),
then runs `pixart bench --lora` at 512², 10 steps: the transformer step without and with the
LoRA in one process (median over the runs, after a warm-up each), and the time of the one merge.
Writes results.json and results.md to --out with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_vs_diffusers import make_cpu_model  # noqa: E402

TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj", "linear",
           "linear_1", "linear_2"]


def make_lora(model: Path, out: Path, rank: int) -> int:
    """A random rank-`rank` PEFT LoRA on the model's transformer; returns its parameter count."""
    from diffusers import PixArtTransformer2DModel
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    transformer = PixArtTransformer2DModel.from_pretrained(model / "transformer")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(transformer, config)
    peft_model.save_pretrained(out)
    return sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixart", required=True, help="path to a release build of pixart")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json and results.md")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, lora = Path(tmp) / "model", Path(tmp) / "lora"
        make_cpu_model(model)
        parameters = make_lora(model, lora, args.rank)
        command = [args.pixart, "bench", "--model", str(model), "--no-safety-checker", "--size", "512x512",
                   "--steps", "10", "--runs", str(args.runs), "--warmup", "1", "--lora", str(lora), "--json"]
        report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    result = {
        "machine": {"cpu": cpu_model(), "cores": torch.get_num_threads(), "platform": platform.platform()},
        "command": " ".join(["python3", "benches/lora_cost.py", "--pixart", args.pixart, "--out", str(args.out)]),
        "lora": {"rank": args.rank, "parameters": parameters, "targets": TARGETS},
        "bench": report["lora"],
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    bench = report["lora"]
    table = (
        f"# LoRA cost on {result['machine']['cpu']}\n\n"
        f"`{result['command']}`: rank-{args.rank} LoRA ({parameters} parameters) on the CPU benchmark's model, "
        f"512², 10 steps, median of {args.runs} runs after a warm-up.\n\n"
        "| transformer step without | with the LoRA | ratio | merge (once per LoRA set) |\n|---|---|---|---|\n"
        f"| {bench['base_transformer_step_median_ms']:.1f} ms | {bench['transformer_step_median_ms']:.1f} ms "
        f"| {bench['step_ratio']:.3f} | {bench['merge_ms']:.1f} ms |\n"
    )
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
