#!/usr/bin/env python3
"""LoRA and single-file transformer fixtures, called by make_fixtures.py (or run alone to rewrite only
these files).

Writes, from the committed tiny-sigma-256 model:
  fixtures/lora/a_peft/, b_peft/         real PEFT adapter folders (adapter_model.safetensors +
                                         adapter_config.json) of two random LoRAs made with PEFT's own
                                         get_peft_model on the tiny transformer, targeting the modules
                                         PixArt-sigma's train_pixart_lora_hf.py targets (the patch-embedding
                                         conv, adaLN, timestep and caption MLPs, attention, FF, proj_out);
                                         "a": r 4, alpha 8; "b": r 2, alpha 2
  fixtures/lora/a_<layout>.safetensors   LoRA "a" rewritten in the other layouts found in the wild, each
                                         merging to exactly the delta (alpha/r)·B·A of a_peft per module:
                                           a_unet_prefix    unet.base_model.model.<module>.lora_A/B.weight, alpha/r baked into B
                                           a_simpletuner    transformer.<module>.lora_A/B.weight, alpha/r baked into B
                                           a_alpha_tensors  <module>.lora_A/B.weight + <module>.alpha (scalar)
                                           a_onetrainer     lora_transformer_<module, . -> _>.lora_down/lora_up.weight + .alpha
                                           a_onetrainer_te  the same + one T5 module (lora_te_encoder_block_0_layer_0_SelfAttention_q)
                                           a_original       original PixArt names (blocks.N.attn.qkv, x_embedder.proj, t_block.1,
                                                            ...).lora_down/lora_up.weight + .alpha; packed q/k/v and k/v modules
                                                            carry A stacked and B block-diagonal, alpha scaled with the rank
                                           a_kohya          lora_unet_<original name, . -> _> with a_original's tensors
  fixtures/lora/lokr.safetensors         a LyCORIS LoKr file (lokr_w1/lokr_w2/alpha), to be refused by name
  fixtures/lora/unknown_module.safetensors  PEFT keys for a module the model lacks plus one valid module
  fixtures/single-file/tiny-sigma-256-original.safetensors  the tiny transformer in the original PixArt key layout
                                         (the reverse of diffusers' convert_pixart_sigma_to_diffusers.py) with the
                                         pos_embed and y_embedder.y_embedding tensors real checkpoints carry
  fixtures/single-file/tiny-sigma-256-original.pth         the same dict as {"state_dict": ...} (torch.save)
  fixtures/goldens/lora/<case>/          PixArtSigmaPipeline runs of one fal request (request.json, model.txt,
                                         image_0.png as make_fixtures.run_fal_case writes them) with the LoRAs
                                         of loras.json merged into the transformer by hand
                                         (W' = W + sum of scale·(alpha/r)·B·A, float32); cases base (no LoRA),
                                         one (a at 1.0), two (a at 0.5, b at -0.3), zero (a at 0.0)
  fixtures/goldens/lora/checks.json      what was verified while writing: per layout the largest difference
                                         between its merged deltas and PEFT's, PEFT's own forward against the
                                         hand-merged "one", how far "one" moves the image from "base"

Running it twice gives byte-identical files (fixed seeds, one thread, no timestamps).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import diffusers
import peft
import transformers
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from peft import LoraConfig, PeftModel, get_peft_model

MODEL = "tiny-sigma-256"

# The modules PixArt-sigma's train_pixart_lora_hf.py hands to LoraConfig(target_modules=...).
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                  "proj", "linear", "linear_1", "linear_2"]

# name -> (seed, rank, alpha). PEFT's init_lora_weights=False leaves both factors at nn.Linear's
# default init, which moves the tiny model's weights by about their own size; B is multiplied by
# B_GAIN so the LoRAs change the image clearly without swamping it.
LORAS = {"a": (11, 4, 8), "b": (12, 2, 2)}
B_GAIN = 0.25

REQUEST = {"prompt": "a red fox in the snow", "seed": 7, "image_size": {"width": 64, "height": 64},
           "num_inference_steps": 4}
CASES = {
    "base": [],
    "one": [("a", 1.0)],
    "two": [("a", 0.5), ("b", -0.3)],
    "zero": [("a", 0.0)],
}
PEFT_FOLDER = {"a": "lora/a_peft", "b": "lora/b_peft"}

# The T5 module the a_onetrainer_te file also trains (OneTrainer's lora_te_ prefix).
TE_MODULE = "encoder_block_0_layer_0_SelfAttention_q"


def versions() -> dict:
    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(path))


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Original PixArt names


def original_modules(depth: int) -> list[tuple[str, list[str]]]:
    """(original module, the diffusers modules it holds in output-dimension order), from the table
    of diffusers' convert_pixart_sigma_to_diffusers.py."""
    table = [
        ("x_embedder.proj", ["pos_embed.proj"]),
        ("t_embedder.mlp.0", ["adaln_single.emb.timestep_embedder.linear_1"]),
        ("t_embedder.mlp.2", ["adaln_single.emb.timestep_embedder.linear_2"]),
        ("t_block.1", ["adaln_single.linear"]),
        ("y_embedder.y_proj.fc1", ["caption_projection.linear_1"]),
        ("y_embedder.y_proj.fc2", ["caption_projection.linear_2"]),
    ]
    for n in range(depth):
        d = f"transformer_blocks.{n}"
        table += [
            (f"blocks.{n}.attn.qkv", [f"{d}.attn1.to_q", f"{d}.attn1.to_k", f"{d}.attn1.to_v"]),
            (f"blocks.{n}.attn.proj", [f"{d}.attn1.to_out.0"]),
            (f"blocks.{n}.cross_attn.q_linear", [f"{d}.attn2.to_q"]),
            (f"blocks.{n}.cross_attn.kv_linear", [f"{d}.attn2.to_k", f"{d}.attn2.to_v"]),
            (f"blocks.{n}.cross_attn.proj", [f"{d}.attn2.to_out.0"]),
            (f"blocks.{n}.mlp.fc1", [f"{d}.ff.net.0.proj"]),
            (f"blocks.{n}.mlp.fc2", [f"{d}.ff.net.2"]),
        ]
    table.append(("final_layer.linear", ["proj_out"]))
    return table


def original_state(transformer: PixArtTransformer2DModel) -> dict[str, torch.Tensor]:
    """The transformer's weights under the original repo's keys, in the order its model lists them,
    with the fixed sin-cos pos_embed buffer and a random null-caption y_embedding as real
    checkpoints carry them."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    cfg = transformer.config
    depth = cfg.num_layers
    out: dict[str, torch.Tensor] = {}
    # PatchEmbed's buffer is diffusers' get_2d_sincos_pos_embed at the model's base size and
    # interpolation scale, the table the original model stores as pos_embed.
    out["pos_embed"] = transformer.pos_embed.pos_embed.detach().clone().to(torch.float32)
    assert out["pos_embed"].shape == (1, (cfg.sample_size // cfg.patch_size) ** 2, cfg.num_attention_heads * cfg.attention_head_dim)
    block_modules = {}
    for orig, diff in original_modules(depth):
        if orig.startswith("blocks."):
            block_modules.setdefault(int(orig.split(".")[1]), []).append((orig, diff))
            continue
        if orig == "final_layer.linear":
            continue
        for suffix in ("weight", "bias"):
            out[f"{orig}.{suffix}"] = torch.cat([sd.pop(f"{m}.{suffix}") for m in diff], dim=0)
    gen = torch.Generator().manual_seed(5)
    out["y_embedder.y_embedding"] = torch.randn(300, cfg.caption_channels, generator=gen) / cfg.caption_channels ** 0.5
    for n in range(depth):
        out[f"blocks.{n}.scale_shift_table"] = sd.pop(f"transformer_blocks.{n}.scale_shift_table")
        for orig, diff in block_modules[n]:
            for suffix in ("weight", "bias"):
                out[f"{orig}.{suffix}"] = torch.cat([sd.pop(f"{m}.{suffix}") for m in diff], dim=0)
    for suffix in ("weight", "bias"):
        out[f"final_layer.linear.{suffix}"] = sd.pop(f"proj_out.{suffix}")
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    assert not sd, f"transformer keys without an original name: {sorted(sd)}"
    return out


def diffusers_from_original(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """diffusers' convert_pixart_sigma_to_diffusers.py mapping, written out as that script does it
    (no micro-conditions, no qk-norm), to check the original-layout file converts back."""
    state = dict(state)
    c = {}
    c["pos_embed.proj.weight"] = state.pop("x_embedder.proj.weight")
    c["pos_embed.proj.bias"] = state.pop("x_embedder.proj.bias")
    c["caption_projection.linear_1.weight"] = state.pop("y_embedder.y_proj.fc1.weight")
    c["caption_projection.linear_1.bias"] = state.pop("y_embedder.y_proj.fc1.bias")
    c["caption_projection.linear_2.weight"] = state.pop("y_embedder.y_proj.fc2.weight")
    c["caption_projection.linear_2.bias"] = state.pop("y_embedder.y_proj.fc2.bias")
    c["adaln_single.emb.timestep_embedder.linear_1.weight"] = state.pop("t_embedder.mlp.0.weight")
    c["adaln_single.emb.timestep_embedder.linear_1.bias"] = state.pop("t_embedder.mlp.0.bias")
    c["adaln_single.emb.timestep_embedder.linear_2.weight"] = state.pop("t_embedder.mlp.2.weight")
    c["adaln_single.emb.timestep_embedder.linear_2.bias"] = state.pop("t_embedder.mlp.2.bias")
    c["adaln_single.linear.weight"] = state.pop("t_block.1.weight")
    c["adaln_single.linear.bias"] = state.pop("t_block.1.bias")
    for d in range(depth):
        p = f"transformer_blocks.{d}"
        c[f"{p}.scale_shift_table"] = state.pop(f"blocks.{d}.scale_shift_table")
        q, k, v = torch.chunk(state.pop(f"blocks.{d}.attn.qkv.weight"), 3, dim=0)
        qb, kb, vb = torch.chunk(state.pop(f"blocks.{d}.attn.qkv.bias"), 3, dim=0)
        c[f"{p}.attn1.to_q.weight"], c[f"{p}.attn1.to_q.bias"] = q, qb
        c[f"{p}.attn1.to_k.weight"], c[f"{p}.attn1.to_k.bias"] = k, kb
        c[f"{p}.attn1.to_v.weight"], c[f"{p}.attn1.to_v.bias"] = v, vb
        c[f"{p}.attn1.to_out.0.weight"] = state.pop(f"blocks.{d}.attn.proj.weight")
        c[f"{p}.attn1.to_out.0.bias"] = state.pop(f"blocks.{d}.attn.proj.bias")
        c[f"{p}.ff.net.0.proj.weight"] = state.pop(f"blocks.{d}.mlp.fc1.weight")
        c[f"{p}.ff.net.0.proj.bias"] = state.pop(f"blocks.{d}.mlp.fc1.bias")
        c[f"{p}.ff.net.2.weight"] = state.pop(f"blocks.{d}.mlp.fc2.weight")
        c[f"{p}.ff.net.2.bias"] = state.pop(f"blocks.{d}.mlp.fc2.bias")
        c[f"{p}.attn2.to_q.weight"] = state.pop(f"blocks.{d}.cross_attn.q_linear.weight")
        c[f"{p}.attn2.to_q.bias"] = state.pop(f"blocks.{d}.cross_attn.q_linear.bias")
        k, v = torch.chunk(state.pop(f"blocks.{d}.cross_attn.kv_linear.weight"), 2, dim=0)
        kb, vb = torch.chunk(state.pop(f"blocks.{d}.cross_attn.kv_linear.bias"), 2, dim=0)
        c[f"{p}.attn2.to_k.weight"], c[f"{p}.attn2.to_k.bias"] = k, kb
        c[f"{p}.attn2.to_v.weight"], c[f"{p}.attn2.to_v.bias"] = v, vb
        c[f"{p}.attn2.to_out.0.weight"] = state.pop(f"blocks.{d}.cross_attn.proj.weight")
        c[f"{p}.attn2.to_out.0.bias"] = state.pop(f"blocks.{d}.cross_attn.proj.bias")
    c["proj_out.weight"] = state.pop("final_layer.linear.weight")
    c["proj_out.bias"] = state.pop("final_layer.linear.bias")
    c["scale_shift_table"] = state.pop("final_layer.scale_shift_table")
    state.pop("y_embedder.y_embedding")
    state.pop("pos_embed")
    assert not state, f"original keys left over: {sorted(state)}"
    return c


# ----------------------------------------------------------------------------------------------
# LoRA "a" and "b" with PEFT


def make_peft_lora(transformer: PixArtTransformer2DModel, name: str, out: Path) -> None:
    seed, rank, alpha = LORAS[name]
    model = copy.deepcopy(transformer)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGET_MODULES, init_lora_weights=False)
    wrapped = get_peft_model(model, config)
    with torch.no_grad():
        for module in wrapped.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                assert module.lora_B["default"].weight.abs().max() > 0
                module.lora_B["default"].weight.mul_(B_GAIN)
    with tempfile.TemporaryDirectory() as tmp:
        wrapped.save_pretrained(tmp)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "adapter_model.safetensors", out / "adapter_model.safetensors")
        cfg = json.loads((Path(tmp) / "adapter_config.json").read_text())
    # A diffusers model carries no hub name: make the field a fixed string, and give the target
    # list (a set inside PEFT) a fixed order.
    cfg["base_model_name_or_path"] = MODEL
    cfg["target_modules"] = sorted(cfg["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_peft(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]:
    """{diffusers module: (A, B)}, alpha, r of a PEFT adapter folder."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs = {}
    for key in tensors:
        assert key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight")), key
        module = key[len("base_model.model."):].rsplit(".", 2)[0]
        pairs[module] = (tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"])
    return pairs, float(cfg["lora_alpha"]), int(cfg["r"])


def lora_delta(a: torch.Tensor, b: torch.Tensor, coefficient: float) -> torch.Tensor:
    """coefficient·B·A shaped like the weight (a conv's B is [out, r, 1, 1], A [r, in, kh, kw])."""
    if a.dim() == 4:
        out = b.shape[0]
        return ((b.reshape(out, -1) @ a.reshape(a.shape[0], -1)) * coefficient).reshape(out, *a.shape[1:])
    return (b @ a) * coefficient


# ----------------------------------------------------------------------------------------------
# The other layouts of LoRA "a"


def write_layouts(lora_dir: Path, pairs: dict, alpha: float, rank: int, depth: int, te_config) -> dict[str, dict]:
    """Writes every other layout of one PEFT LoRA; returns {file name: tensors} for the checks."""
    baked = alpha / rank
    files: dict[str, dict[str, torch.Tensor]] = {}

    files["a_unet_prefix.safetensors"] = {
        f"unet.base_model.model.{m}.{part}.weight": t for m, (a, b) in pairs.items()
        for part, t in (("lora_A", a), ("lora_B", b * baked))
    }
    files["a_simpletuner.safetensors"] = {
        f"transformer.{m}.{part}.weight": t for m, (a, b) in pairs.items()
        for part, t in (("lora_A", a), ("lora_B", b * baked))
    }
    alpha_tensors = {}
    for m, (a, b) in pairs.items():
        alpha_tensors[f"{m}.lora_A.weight"] = a
        alpha_tensors[f"{m}.lora_B.weight"] = b
        alpha_tensors[f"{m}.alpha"] = scalar(alpha)
    files["a_alpha_tensors.safetensors"] = alpha_tensors

    onetrainer = {}
    for m, (a, b) in pairs.items():
        base = "lora_transformer_" + m.replace(".", "_")
        onetrainer[f"{base}.lora_down.weight"] = a
        onetrainer[f"{base}.lora_up.weight"] = b
        onetrainer[f"{base}.alpha"] = scalar(alpha)
    files["a_onetrainer.safetensors"] = onetrainer
    # One T5 self-attention q LoRA with the tiny text encoder's real q shape [heads·d_kv, d_model].
    gen = torch.Generator().manual_seed(13)
    inner, d_model = te_config.num_heads * te_config.d_kv, te_config.d_model
    te = dict(onetrainer)
    te[f"lora_te_{TE_MODULE}.lora_down.weight"] = torch.randn(rank, d_model, generator=gen) * 0.1
    te[f"lora_te_{TE_MODULE}.lora_up.weight"] = torch.randn(inner, rank, generator=gen) * 0.1
    te[f"lora_te_{TE_MODULE}.alpha"] = scalar(alpha)
    files["a_onetrainer_te.safetensors"] = te

    original = {}
    for orig, modules in original_modules(depth):
        if not all(m in pairs for m in modules):
            continue
        a_list = [pairs[m][0] for m in modules]
        b_list = [pairs[m][1] for m in modules]
        if len(modules) == 1:
            a_packed, b_packed = a_list[0], b_list[0]
        else:
            # Rows of the packed weight are [q; k; v] (or [k; v]): A stacked along the rank,
            # B block-diagonal, so B·A stacks the per-module products.
            a_packed = torch.cat(a_list, dim=0)
            b_packed = torch.block_diag(*b_list)
        original[f"{orig}.lora_down.weight"] = a_packed
        original[f"{orig}.lora_up.weight"] = b_packed
        original[f"{orig}.alpha"] = scalar(alpha * len(modules))
    files["a_original.safetensors"] = original
    kohya = {}
    for orig, _ in original_modules(depth):
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            if f"{orig}.{suffix}" in original:
                kohya[f"lora_unet_{orig.replace('.', '_')}.{suffix}"] = original[f"{orig}.{suffix}"]
    files["a_kohya.safetensors"] = kohya

    for name, tensors in files.items():
        save(lora_dir / name, tensors)

    # LyCORIS LoKr: the packed qkv of block 0 as kron(w1, w2), [96, 32] = [8, 4] (x) [12, 8].
    gen = torch.Generator().manual_seed(14)
    lokr = {
        "lora_unet_blocks_0_attn_qkv.lokr_w1": torch.randn(8, 4, generator=gen) * 0.1,
        "lora_unet_blocks_0_attn_qkv.lokr_w2": torch.randn(12, 8, generator=gen) * 0.1,
        "lora_unet_blocks_0_attn_qkv.alpha": scalar(4.0),
    }
    save(lora_dir / "lokr.safetensors", lokr)
    # A module the two-block model lacks, plus one it has.
    a0, b0 = pairs["transformer_blocks.0.attn1.to_q"]
    unknown = {
        "transformer_blocks.7.attn1.to_q.lora_A.weight": a0.clone(),
        "transformer_blocks.7.attn1.to_q.lora_B.weight": b0.clone(),
        "transformer_blocks.0.attn1.to_q.lora_A.weight": a0.clone(),
        "transformer_blocks.0.attn1.to_q.lora_B.weight": b0.clone(),
    }
    save(lora_dir / "unknown_module.safetensors", unknown)
    return files


def deltas_of_layout(path: Path, depth: int, module_names: list[str]) -> dict[str, torch.Tensor]:
    """Reads a layout file back and returns {diffusers module: merged delta at scale 1}, interpreting
    the keys as each producer defines them (no alpha: coefficient 1)."""
    t = load_file(str(path))
    name = path.name
    out: dict[str, torch.Tensor] = {}
    if name in ("a_unet_prefix.safetensors", "a_simpletuner.safetensors", "a_alpha_tensors.safetensors"):
        prefix = {"a_unet_prefix.safetensors": "unet.base_model.model.", "a_simpletuner.safetensors": "transformer."}.get(name, "")
        for key in t:
            assert key.startswith(prefix), key
            if not key.endswith(".lora_A.weight"):
                continue
            m = key[len(prefix): -len(".lora_A.weight")]
            a, b = t[key], t[f"{prefix}{m}.lora_B.weight"]
            coefficient = float(t[f"{m}.alpha"]) / a.shape[0] if f"{m}.alpha" in t else 1.0
            out[m] = lora_delta(a, b, coefficient)
        return out
    if name.startswith("a_onetrainer"):
        munged = {"lora_transformer_" + m.replace(".", "_"): m for m in module_names}
        for key in t:
            if key.startswith("lora_te_"):
                continue
            assert key.startswith("lora_transformer_"), key
            if key.endswith(".lora_down.weight"):
                base = key[: -len(".lora_down.weight")]
                a, b = t[key], t[f"{base}.lora_up.weight"]
                out[munged[base]] = lora_delta(a, b, float(t[f"{base}.alpha"]) / a.shape[0])
        return out
    if name in ("a_original.safetensors", "a_kohya.safetensors"):
        table = original_modules(depth)
        lookup = {orig if name == "a_original.safetensors" else "lora_unet_" + orig.replace(".", "_"): mods for orig, mods in table}
        for key in t:
            if not key.endswith(".lora_down.weight"):
                continue
            base = key[: -len(".lora_down.weight")]
            a, b = t[key], t[f"{base}.lora_up.weight"]
            packed = lora_delta(a, b, float(t[f"{base}.alpha"]) / a.shape[0])
            mods = lookup[base]
            for m, part in zip(mods, torch.chunk(packed, len(mods), dim=0)):
                out[m] = part
        return out
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------
# Goldens


@torch.no_grad()
def merge_into(transformer: PixArtTransformer2DModel, loras: list[tuple[dict, float, int, float]]) -> None:
    """W' = W + sum of scale·(alpha/r)·B·A, float32, in the order given."""
    params = dict(transformer.named_parameters())
    for pairs, alpha, rank, scale in loras:
        for m, (a, b) in pairs.items():
            w = params[f"{m}.weight"]
            w.copy_(w + lora_delta(a, b, scale * alpha / rank))


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)).astype(np.int16)


@torch.no_grad()
def write_lora_fixtures(fixtures: Path, goldens: Path, run_fal_case) -> None:
    lora_dir = fixtures / "lora"
    single_dir = fixtures / "single-file"
    gold_dir = goldens / "lora"
    for folder in (lora_dir, single_dir, gold_dir):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

    pipe = PixArtSigmaPipeline.from_pretrained(fixtures / MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    depth = transformer.config.num_layers
    original_weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    checks: dict = {"versions": versions()}

    # A. The PEFT adapters, read back from the written folders from here on.
    for name in LORAS:
        make_peft_lora(transformer, name, fixtures / PEFT_FOLDER[name])
    adapters = {name: read_peft(fixtures / PEFT_FOLDER[name]) for name in LORAS}
    pairs_a, alpha_a, rank_a = adapters["a"]
    module_names = sorted(pairs_a)
    targeted = sorted(m for m, mod in transformer.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)))
    assert module_names == targeted, (module_names, targeted)
    checks["modules"] = module_names

    # PEFT's own deltas (get_delta_weight on the adapter loaded the documented way).
    peft_model = PeftModel.from_pretrained(copy.deepcopy(transformer), fixtures / PEFT_FOLDER["a"])
    peft_deltas = {}
    for m, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A") and "default" in module.lora_A:
            peft_deltas[m] = module.get_delta_weight("default").detach().clone()
    assert sorted(peft_deltas) == module_names

    # B. Every other layout, checked against PEFT's deltas.
    files = write_layouts(lora_dir, pairs_a, alpha_a, rank_a, depth, pipe.text_encoder.config)
    # Largest |difference| over all modules, against PEFT's get_delta_weight and against a_peft's
    # (alpha/r)·B·A as a matrix product (PEFT merges the conv through conv2d, which sums in
    # another order).
    own = {m: lora_delta(a, b, alpha_a / rank_a) for m, (a, b) in pairs_a.items()}
    checks["layouts"] = {"a_peft": {"vs_peft": max(float((own[m] - peft_deltas[m]).abs().max()) for m in module_names),
                                    "vs_a_peft_matmul": 0.0}}
    for name in files:
        deltas = deltas_of_layout(lora_dir / name, depth, module_names)
        assert sorted(deltas) == module_names, name
        checks["layouts"][name.removesuffix(".safetensors")] = {
            "vs_peft": max(float((deltas[m] - peft_deltas[m]).abs().max()) for m in module_names),
            "vs_a_peft_matmul": max(float((deltas[m] - own[m]).abs().max()) for m in module_names),
        }
    assert all(v["vs_peft"] < 1e-6 for v in checks["layouts"].values()), checks["layouts"]

    # D. Single-file transformers.
    orig = original_state(transformer)
    save(single_dir / f"{MODEL}-original.safetensors", orig)
    torch.save({"state_dict": orig}, single_dir / f"{MODEL}-original.pth")
    back = diffusers_from_original(load_file(str(single_dir / f"{MODEL}-original.safetensors")), depth)
    loaded = torch.load(single_dir / f"{MODEL}-original.pth", weights_only=True)["state_dict"]
    back_pth = diffusers_from_original(loaded, depth)
    check_model = PixArtTransformer2DModel.from_config(transformer.config)
    for state in (back, back_pth):
        check_model.load_state_dict(state, strict=True)
        for k, v in check_model.state_dict().items():
            assert torch.equal(v, original_weights[k]), k
    checks["single_file_roundtrip"] = "original .safetensors and .pth convert back to identical weights; load_state_dict strict"

    # C. Goldens: the hand-merged transformer through make_fixtures' fal request path.
    for case, entries in CASES.items():
        transformer.load_state_dict(original_weights, strict=True)
        merge_into(transformer, [(*adapters[n], scale) for n, scale in entries])
        folder = gold_dir / case
        run_fal_case(pipe, f"lora_{case}", MODEL, REQUEST, folder=folder)
        loras = [{"path": PEFT_FOLDER[n], "scale": scale} for n, scale in entries]
        (folder / "loras.json").write_text(json.dumps(loras, indent=2) + "\n", encoding="utf-8")
    transformer.load_state_dict(original_weights, strict=True)
    assert (gold_dir / "zero" / "image_0.png").read_bytes() == (gold_dir / "base" / "image_0.png").read_bytes()
    base_px = read_png(gold_dir / "base" / "image_0.png")
    one_px = read_png(gold_dir / "one" / "image_0.png")
    two_px = read_png(gold_dir / "two" / "image_0.png")
    checks["image_change"] = {
        "one_vs_base_max": int(np.abs(one_px - base_px).max()),
        "one_vs_base_mean": round(float(np.abs(one_px - base_px).mean()), 3),
        "two_vs_base_max": int(np.abs(two_px - base_px).max()),
        "zero_equals_base": True,
    }

    # PEFT's own forward (adapter unmerged, active at scale 1) against the hand-merged "one".
    pipe.transformer = peft_model.get_base_model()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_fal_case(pipe, "lora_peft", MODEL, REQUEST, folder=Path(tmp))
            peft_px = read_png(Path(tmp) / "image_0.png")
    finally:
        pipe.transformer = transformer
    merged = peft_model.merge_and_unload()
    hand = copy.deepcopy(transformer)
    merge_into(hand, [(*adapters["a"], 1.0)])
    hand_sd = hand.state_dict()
    checks["peft"] = {
        "forward_vs_hand_merged_max_levels": int(np.abs(peft_px - one_px).max()),
        "merge_and_unload_vs_hand_merged_max_weight_diff": max(
            float((v - hand_sd[k]).abs().max()) for k, v in merged.state_dict().items()),
    }
    assert checks["peft"]["forward_vs_hand_merged_max_levels"] <= 1, checks["peft"]
    (gold_dir / "checks.json").write_text(json.dumps(checks, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    from make_fixtures import FIXTURES, GOLDENS, run_fal_case

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    write_lora_fixtures(FIXTURES, GOLDENS, run_fal_case)
