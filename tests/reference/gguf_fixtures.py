"""GGUF and quantized text-encoder fixtures, called by make_fixtures.py.

Writes, with PyPI's gguf package (llama.cpp's own Python writer) and transformers:
  fixtures/gguf/tiny-sigma-256-t5-{f32,f16,bf16,q8_0}.gguf   tiny-sigma-256's T5 with llama.cpp names
  fixtures/gguf/tiny-sigma-256-t5-hf-names-f16.gguf          the same with transformers' names
  fixtures/t5-256/{config.json,model.safetensors}            a 256-wide T5 (k-quant blocks are 256
                                                             wide, so q6k/q5k/q4k apply), f16 storage
  fixtures/t5-256/t5-256-q8_0.gguf                           its q8_0 GGUF with llama.cpp names
  fixtures/goldens/gguf/t5.safetensors                       encoder outputs of transformers' f32 T5 on
                                                             the original weights and on the weights
                                                             each GGUF file dequantizes to
  fixtures/goldens/gguf/e2e_q8_0/                            a diffusers PixArtSigmaPipeline run whose
                                                             T5 holds the q8_0 file's weights
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import quants
from transformers import T5Config, T5EncoderModel

GGUF_TYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}

# Prompts of the tiny model's GGUF goldens (a subset of make_fixtures.T5_PROMPTS, padded to the
# longest so the files stay small).
GGUF_PROMPTS = [
    "a small cactus with a happy face in the sahara desert",
    "an astronaut riding a horse on the moon, cinematic, highly detailed, café ① ﬁne",
]


def llama_cpp_names(state: dict, n_blocks: int) -> dict:
    """transformers name -> llama.cpp name, from gguf-py's own tensor map for T5ENCODER."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, n_blocks)
    out = {}
    for name in state:
        mapped = names.get_name(name, try_suffixes=(".weight",))
        assert mapped is not None, f"gguf-py has no name for {name}"
        out[name] = mapped
    return out


def encoder_state(t5: T5EncoderModel) -> dict:
    # T5EncoderModel holds the embedding twice (shared and encoder.embed_tokens, tied): keep one.
    return {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}


def write_gguf(path: Path, state: dict, qtype: QT, llama_names: bool, n_blocks: int, d_model: int) -> None:
    """Writes the encoder's tensors: 1-D tensors (norms) in f32 as llama.cpp does; 2-D ones in
    `qtype` when their rows fill its blocks, else f32 (the relative-bias table: 4 heads wide)."""
    names = llama_cpp_names(state, n_blocks) if llama_names else {k: k for k in state}
    writer = gguf.GGUFWriter(str(path), arch="t5encoder")
    writer.add_block_count(n_blocks)
    writer.add_embedding_length(d_model)
    for name, tensor in state.items():
        data = tensor.detach().to(torch.float32).numpy()
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.ndim == 1 or qtype == QT.F32 or data.shape[-1] % block != 0:
            writer.add_tensor(names[name], data)
        elif qtype == QT.F16:
            writer.add_tensor(names[name], data.astype(np.float16))
        else:
            writer.add_tensor(names[name], quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized_state(path: Path, state: dict, llama_names: bool, n_blocks: int) -> dict:
    """The weights the GGUF file holds, read back with gguf-py and dequantized to f32."""
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    names = llama_cpp_names(state, n_blocks) if llama_names else {k: k for k in state}
    out = {}
    for name, tensor in state.items():
        t = stored[names[name]]
        values = quants.dequantize(t.data, t.tensor_type)
        out[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(tensor.shape)
    return out


@torch.no_grad()
def encode_with(t5: T5EncoderModel, state: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    original = {k: v.clone() for k, v in t5.state_dict().items()}
    full = dict(state)
    full["encoder.embed_tokens.weight"] = state["shared.weight"]
    t5.load_state_dict(full, strict=True)
    try:
        return t5(ids, attention_mask=mask)[0].to(torch.float32).contiguous().clone()
    finally:
        t5.load_state_dict(original, strict=True)


def build_t5_256(out: Path) -> T5EncoderModel:
    """A T5 v1.1-shaped encoder 256 wide (q, k, v, o, wi_0, wi_1, wo all have rows of 256), one
    block, a 128-token vocabulary; stored in f16 to keep the fixture small. The reference runs
    in f32 on exactly the f16 values."""
    torch.manual_seed(3)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=128, d_model=256, d_kv=64, num_heads=4, d_ff=256, num_layers=1,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
            relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
        )
    ).eval()
    # transformers' T5 initialisation (q scaled by 1/sqrt(d_model·d_kv), as T5 folds the
    # attention scaling into q), rounded to f16.
    with torch.no_grad():
        for p in t5.parameters():
            p.copy_(p.to(torch.float16).to(torch.float32))
    t5.to(torch.float16).save_pretrained(out)
    return T5EncoderModel.from_pretrained(out, torch_dtype=torch.float32).eval()


@torch.no_grad()
def write_gguf_fixtures(fixtures: Path, goldens: Path, pipe, run_fal_case) -> None:
    gguf_dir = fixtures / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}

    # 1. The tiny pipeline model's T5 in every plain type and q8_0, llama.cpp names.
    t5 = pipe.text_encoder
    cfg = t5.config
    state = encoder_state(t5)
    tok = pipe.tokenizer(GGUF_PROMPTS, padding="longest", max_length=300, truncation=True, return_tensors="pt")
    tensors["tiny/input_ids"] = tok.input_ids.to(torch.int64)
    tensors["tiny/attention_mask"] = tok.attention_mask.to(torch.int64)
    tensors["tiny/original"] = encode_with(t5, state, tok.input_ids, tok.attention_mask)
    for type_name, qtype in GGUF_TYPES.items():
        path = gguf_dir / f"tiny-sigma-256-t5-{type_name}.gguf"
        write_gguf(path, state, qtype, True, cfg.num_layers, cfg.d_model)
        deq = dequantized_state(path, state, True, cfg.num_layers)
        tensors[f"tiny/{type_name}"] = encode_with(t5, deq, tok.input_ids, tok.attention_mask)
    write_gguf(gguf_dir / "tiny-sigma-256-t5-hf-names-f16.gguf", state, QT.F16, False, cfg.num_layers, cfg.d_model)

    # 2. The 256-wide T5: safetensors (quantized on load by the Rust side) and a q8_0 GGUF.
    t5_256 = build_t5_256(fixtures / "t5-256")
    state_256 = encoder_state(t5_256)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(2, 128, (2, 40), generator=gen)
    mask = torch.ones(2, 40, dtype=torch.int64)
    mask[1, 30:] = 0
    ids[1, 30:] = 0
    tensors["t5_256/input_ids"] = ids.to(torch.int64)
    tensors["t5_256/attention_mask"] = mask
    tensors["t5_256/original"] = encode_with(t5_256, state_256, ids, mask)
    path = fixtures / "t5-256" / "t5-256-q8_0.gguf"
    write_gguf(path, state_256, QT.Q8_0, True, 1, 256)
    tensors["t5_256/q8_0"] = encode_with(t5_256, dequantized_state(path, state_256, True, 1), ids, mask)

    (goldens / "gguf").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(goldens / "gguf" / "t5.safetensors"))
    (goldens / "gguf" / "t5.json").write_text(json.dumps({"prompts": GGUF_PROMPTS}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    # 3. diffusers end to end with the q8_0 file's weights in T5 (the default_dpm request).
    deq = dequantized_state(gguf_dir / "tiny-sigma-256-t5-q8_0.gguf", state, True, cfg.num_layers)
    original = {k: v.clone() for k, v in t5.state_dict().items()}
    full = dict(deq)
    full["encoder.embed_tokens.weight"] = deq["shared.weight"]
    t5.load_state_dict(full, strict=True)
    try:
        request = {"prompt": "a small cactus with a happy face in the sahara desert", "seed": 0,
                   "image_size": {"width": 128, "height": 128}}
        run_fal_case(pipe, "e2e_q8_0", "tiny-sigma-256", request, folder=goldens / "gguf" / "e2e_q8_0")
    finally:
        t5.load_state_dict(original, strict=True)
