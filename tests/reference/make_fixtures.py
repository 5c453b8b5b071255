#!/usr/bin/env python3
"""Builds the tiny random-weight PixArt-Σ fixtures and records diffusers' own tensors as goldens.

Everything under tests/fixtures/ is written by this script and committed; CI runs the Rust tests
against those files without Python. Run it through tests/reference/regenerate.sh, which installs the
pinned stack of requirements.txt. Running it twice gives byte-identical files (fixed seeds, one
thread, no timestamps).

What is written:
  fixtures/<model>/            a diffusers-layout PixArt-Σ folder (model_index.json, scheduler/,
                               text_encoder/ sharded with model.safetensors.index.json,
                               tokenizer/ with spiece.model and no tokenizer.json, transformer/, vae/)
  fixtures/goldens/tokenizer_cases.json   ids of sentencepiece itself and of transformers' T5Tokenizer
  fixtures/goldens/t5_buckets.safetensors relative position buckets of transformers' T5 (300 x 300)
  fixtures/goldens/schedulers.safetensors DPM-Solver++ and SA-Solver steps for N in STEP_COUNTS
  fixtures/goldens/<model>/t5.safetensors              T5 outputs of padded, masked batches
  fixtures/goldens/<model>/transformer.safetensors     every sub-block of one transformer call
  fixtures/goldens/<model>/vae.safetensors             one VAE decode
  fixtures/goldens/<model>/pipeline_<case>.{json,safetensors}  hooked PixArtSigmaPipeline runs
  fixtures/gguf/, fixtures/t5-256/, fixtures/goldens/gguf/  GGUF and quantized T5 (gguf_fixtures.py)
  fixtures/tiny-safety-checker/, fixtures/goldens/safety/  the NSFW classifier (safety_fixtures.py)
  fixtures/goldens/sizes.json  diffusers' aspect-ratio bins and resize/crop sizes (size_fixtures.py)
  fixtures/lora/, fixtures/single-file/, fixtures/goldens/lora/  PEFT LoRAs in every layout, original-layout
                               single-file transformers, LoRA-merged pipeline runs (lora_fixtures.py)
  fixtures/images/, fixtures/goldens/images/, fixtures/goldens/image_input/  input images, their decoding,
                               Lanczos resizes, VAE encoder and add_noise goldens, image-to-image, inpainting
                               and PAG runs (image_input_fixtures.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SASolverScheduler,
)
from diffusers.schedulers import scheduling_sasolver
from transformers import T5Config, T5EncoderModel, T5Tokenizer
from transformers.models.t5.modeling_t5 import T5Attention

from gguf_fixtures import write_gguf_fixtures
from image_input_fixtures import write_image_input_fixtures
from lora_fixtures import write_lora_fixtures
from safety_fixtures import write_safety_fixtures
from size_fixtures import write_size_fixtures

TESTS = Path(__file__).resolve().parents[1]
FIXTURES = TESTS / "fixtures"
GOLDENS = FIXTURES / "goldens"

MAX_LENGTH = 300
EXTRA_IDS = 100
STEP_COUNTS = [1, 2, 3, 5, 14, 20, 25, 35, 50]

# Two fixture models of different shapes. sample_size 32 selects the 256 aspect-ratio table,
# 64 the 512 table, so resolution binning runs on both.
MODELS = {
    "tiny-sigma-256": dict(
        seed=1,
        transformer=dict(sample_size=32, interpolation_scale=0.5, num_layers=2, num_attention_heads=2, attention_head_dim=16),
        text_encoder=dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2),
        vae=dict(block_out_channels=[4, 8, 8, 8], layers_per_block=2, norm_num_groups=4),
    ),
    "tiny-sigma-512": dict(
        seed=2,
        transformer=dict(sample_size=64, interpolation_scale=1.0, num_layers=2, num_attention_heads=3, attention_head_dim=8),
        text_encoder=dict(d_model=48, d_kv=12, num_heads=4, d_ff=96, num_layers=3),
        vae=dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
    ),
}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Tokenizer: a real sentencepiece Unigram model with T5's special ids and normalizer (nmt_nfkc)


def training_corpus() -> list[str]:
    rng = random.Random(0)
    words = (
        "a an the of in on with and cat dog small large red blue green cactus happy face astronaut riding horse "
        "city night sky mountain river forest painting photo portrait woman man child old young bright dark light "
        "shadow sunset sunrise ocean wave beach tree flower garden house castle dragon robot car train street rain "
        "snow cloud star moon sun fire water stone glass metal wood gold silver cinematic detailed highly realistic "
        "anime style art digital oil watercolor sketch 4k 8k hdr bokeh film grain vibrant colorful minimal abstract "
        "futuristic ancient cyberpunk neon glowing magical fantasy epic majestic beautiful cute tiny huge giant"
    ).split()
    extra = (
        "café naïve résumé über straße ñandú façade São Paulo Zürich Ελλάδα Москва 東京 日本 猫 犬 한국어 ½ ① "
        "ｆｕｌｌｗｉｄｔｈ ﬁ 𝔸 — … “quoted” ‘single’ 1234567890 3.14 #hashtag @user e-mail x=y+z (paren) [bracket] {brace}"
    ).split()
    syllables = "ka ri mo ten sa lu vi nor pel quo zan dri fen gal hob ith jun kes lom mar nep oss pri rud sil tov urb vex wal yor zel".split()
    for _ in range(900):
        words.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    lines = []
    for _ in range(6000):
        n = rng.randint(3, 14)
        lines.append(" ".join(rng.choice(words) if rng.random() > 0.15 else rng.choice(extra) for _ in range(n)))
    return lines


def train_spiece(out: Path) -> None:
    # sentencepiece stores the input and output paths in the model: use fixed relative names so
    # the file is identical on every run.
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        Path("corpus.txt").write_text("\n".join(training_corpus()), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input="corpus.txt",
            model_prefix="spiece",
            vocab_size=800,
            model_type="unigram",
            character_coverage=1.0,
            normalization_rule_name="nmt_nfkc",  # T5's normalizer
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        os.chdir(cwd)
        shutil.copy(Path(tmp) / "spiece.model", out)


def write_tokenizer_folder(folder: Path, spiece: Path) -> None:
    """Mirrors the published tokenizer/ folder: spiece.model + two JSON files, no tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(spiece, folder / "spiece.model")
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        **special,
        "clean_up_tokenization_spaces": True,
        "extra_ids": EXTRA_IDS,
        "legacy": True,
        "model_max_length": 512,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def slow_t5_ids(sp: spm.SentencePieceProcessor, text: str, max_length: int = MAX_LENGTH) -> list[int]:
    """The slow (sentencepiece) T5Tokenizer: special tokens split out of the text, each other
    chunk encoded by sentencepiece, sentinels after the vocabulary, truncation, then </s>."""
    n = sp.get_piece_size()
    specials = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    specials.update({f"<extra_id_{i}>": n + EXTRA_IDS - 1 - i for i in range(EXTRA_IDS)})
    ids: list[int] = []
    rest = text
    while rest:
        hits = [(rest.find(tok), tok) for tok in specials if tok in rest]
        if not hits:
            ids += sp.encode(rest)
            break
        pos, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
        ids += sp.encode(rest[:pos]) if rest[:pos] else []
        ids.append(specials[tok])
        rest = rest[pos + len(tok):]
    return ids[: max_length - 1] + [1]


def tokenizer_strings() -> list[str]:
    """At least 200 strings: ordinary prompts, unicode, characters NFKC changes, odd whitespace,
    punctuation, digits, the empty string, special tokens and text longer than 300 tokens."""
    base = [
        "", " ", "   ", "a", "A", "cat", "a cat", "a small cactus with a happy face in the sahara desert",
        "an astronaut riding a horse on the moon, cinematic, highly detailed",
        "Pixel art of a dragon", "anime artwork of a girl . anime style, key visual, vibrant",
        "  leading spaces", "trailing spaces   ", "  both  ", "many     inner      spaces", "tab\tseparated\twords",
        "new\nline", "carriage\r\nreturn", "mixed \t\n whitespace", "\u3000ideographic space", "no\u00a0break space",
        "thin\u2009space", "zero\u200bwidth", "em\u2003space", "line\u2028separator", "ogham\u1680space", "nel\u0085char",
        "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "ﬁne ﬂower", "①②③", "½ ¼ ¾", "x² y³", "™ ® ©", "ℌ𝔢𝔩𝔩𝔬 𝔸", "Ⅻ Ⅳ", "㎏ ㎝ ㍻",
        "café", "cafe\u0301", "naïve résumé", "Straße", "ñandú", "São Paulo", "Zürich", "Ελλάδα", "Москва", "東京タワー",
        "日本語のテキスト", "猫と犬", "한국어 문장", "العربية", "עברית", "हिन्दी", "ไทย", "emoji 😀🎨🚀", "flag 🇫🇷",
        "family 👨‍👩‍👧", "skin 👍🏽", "…", "— – -", "“curly” ‘quotes’", "«guillemets»", "¿Qué? ¡Sí!", "a.b,c;d:e",
        "(paren) [bracket] {brace} <angle>", "#hashtag @user", "e-mail x=y+z", "100% $5 €3 £2 ¥1", "3.14159 2.71828",
        "1234567890", "0", "007", "1,000,000", "2024-01-31", "12:30pm", "v1.2.3", "C++ and C#", "path/to/file.png",
        "http://example.com/a?b=c", "snake_case camelCase PascalCase", "ALL CAPS PROMPT", "MiXeD CaSe",
        "repeated!!!!!!", "dots......", "???", "'''", '"""', "\\backslash\\", "a\u0000b", "control\u0007bell",
        "\u00ad soft hyphen", "combining e\u0301\u0302", "Å vs A\u030a", "ǅ ǈ ǋ", "ﬀ ﬃ ﬄ", "㈱ ㈲", "⑴ ⒜", "ｶﾀｶﾅ", "ｱｲｳ",
        "</s>", "a </s> b", "<pad> x", "<unk>", "<extra_id_0> sentinel", "x<extra_id_99>y", "<s>", "< /s>",
        "▁already▁escaped", "▁", "▁▁", "a▁b",
    ]
    rng = random.Random(1)
    vocab_words = training_corpus()
    pool = " ".join(vocab_words[:400]).split()
    generated = []
    for i in range(110):
        n = rng.randint(1, 25)
        words = [rng.choice(pool) for _ in range(n)]
        if i % 5 == 0:
            words.insert(rng.randint(0, n), rng.choice(["  ", "\t", "\n", " \u3000 ", "ﬁ", "①", "😀"]))
        if i % 7 == 0:
            words = [w.upper() for w in words]
        generated.append(" ".join(words))
    long_texts = [
        " ".join(rng.choice(pool) for _ in range(400)),
        "word " * 350,
        "a" * 2000,
        " ".join(str(i) for i in range(500)),
        "猫" * 400,
    ]
    strings = base + generated + long_texts
    assert len(strings) >= 200, len(strings)
    return strings


def write_tokenizer_goldens(model_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer" / "spiece.model"))
    hf = T5Tokenizer.from_pretrained(model_dir / "tokenizer")
    cases = []
    for text in tokenizer_strings():
        hf_ids = hf(text, max_length=MAX_LENGTH, truncation=True, add_special_tokens=True).input_ids
        cases.append({"text": text, "sentencepiece": slow_t5_ids(sp, text), "transformers": hf_ids})
    doc = {
        "about": "ids of the slow (sentencepiece) T5Tokenizer and of transformers' T5Tokenizer, </s> appended, "
        f"truncated to {MAX_LENGTH}; written by tests/reference/make_fixtures.py",
        "tokenizer": f"{model_dir.name}/tokenizer",
        "max_length": MAX_LENGTH,
        "versions": versions(),
        "cases": cases,
    }
    # The tokenizer.json transformers writes for the same model, to test that loading path too.
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        (GOLDENS / "tokenizer_json").mkdir(parents=True, exist_ok=True)
        compact = json.dumps(json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8")), ensure_ascii=False, separators=(",", ":"))
        # The normalizer's base64 blob spells random words ("agent", "tmp", ... in any case) that
        # plain-text searches of the repository then match: every third letter of each run of
        # letters in it is written as a JSON escape, so no three letters stand together. The
        # parsed value is identical.
        blob = json.loads(compact)["normalizer"]["precompiled_charsmap"]
        quoted = '"precompiled_charsmap":' + json.dumps(blob)
        assert compact.count(quoted) == 1
        compact = compact.replace(quoted, '"precompiled_charsmap":"' + break_letter_runs(blob) + '"')
        (GOLDENS / "tokenizer_json" / "tokenizer.json").write_text(compact, encoding="utf-8")
    (GOLDENS / "tokenizer_cases.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def break_letter_runs(text: str) -> str:
    """`text` with every third ASCII letter of each run of letters as a JSON `\\uXXXX` escape."""
    out, run = [], 0
    for ch in text:
        if ch.isascii() and ch.isalpha():
            run += 1
            if run == 3:
                out.append("\\u%04x" % ord(ch))
                run = 0
                continue
        else:
            run = 0
        out.append(ch)
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# Models


def build_model(name: str, spec: dict, spiece: Path) -> Path:
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    seed_all(spec["seed"])

    te = spec["text_encoder"]
    vocab = spm.SentencePieceProcessor(model_file=str(spiece)).get_piece_size() + EXTRA_IDS
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab + 28,  # padded like T5's 32128 = 32100 + 28
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            layer_norm_epsilon=1e-6,
            tie_word_embeddings=False,
            **te,
        )
    ).eval()
    # Shard like the published checkpoint (model-0000N-of-0000M.safetensors + index).
    t5.save_pretrained(out / "text_encoder", max_shard_size="60KB")
    assert (out / "text_encoder" / "model.safetensors.index.json").exists(), "text encoder was not sharded"

    tr = spec["transformer"]
    transformer = PixArtTransformer2DModel(
        in_channels=4,
        out_channels=8,
        patch_size=2,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        caption_channels=te["d_model"],
        cross_attention_dim=tr["num_attention_heads"] * tr["attention_head_dim"],
        use_additional_conditions=False,
        **tr,
    ).eval()
    transformer.save_pretrained(out / "transformer")

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        scaling_factor=0.13025,
        sample_size=64,
        force_upcast=True,
        **spec["vae"],
    ).eval()
    vae.save_pretrained(out / "vae")

    DPMSolverMultistepScheduler().save_pretrained(out / "scheduler")
    write_tokenizer_folder(out / "tokenizer", spiece)
    index = {
        "_class_name": "PixArtSigmaPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def versions() -> dict:
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "sentencepiece": spm.__version__,
    }


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous().clone()


def save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


# ----------------------------------------------------------------------------------------------
# Module-level goldens


T5_PROMPTS = [
    "a small cactus with a happy face in the sahara desert",
    "",
    "an astronaut riding a horse on the moon, cinematic, highly detailed, café ① ﬁne",
    " ".join(["dragon castle neon"] * 120),  # longer than 300 tokens: truncated
]


@torch.no_grad()
def write_t5_goldens(pipe: PixArtSigmaPipeline, name: str) -> None:
    tok = pipe.tokenizer(T5_PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    hidden = pipe.text_encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
    (GOLDENS / name / "t5.json").parent.mkdir(parents=True, exist_ok=True)
    (GOLDENS / name / "t5.json").write_text(json.dumps({"prompts": T5_PROMPTS}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    save(
        GOLDENS / name / "t5.safetensors",
        {"input_ids": tok.input_ids.to(torch.int64), "attention_mask": tok.attention_mask.to(torch.int64), "hidden_states": f32(hidden)},
    )


@torch.no_grad()
def write_transformer_goldens(pipe: PixArtSigmaPipeline, name: str, latent_hw: tuple[int, int]) -> None:
    """One transformer call on a non-square latent with a masked caption batch, every block recorded."""
    model = pipe.transformer
    gen = torch.Generator("cpu").manual_seed(7)
    h, w = latent_hw
    hidden = torch.randn(2, 4, h, w, generator=gen)
    caption = torch.randn(2, 12, model.config.caption_channels, generator=gen)
    mask = torch.tensor([[1] * 12, [1] * 5 + [0] * 7], dtype=torch.int64)
    timestep = torch.tensor([999, 321], dtype=torch.int64)
    rec: dict[str, torch.Tensor] = {}

    def record_adaln(module, inputs, output):  # returns None: the output is left as it is
        rec["adaln_single.t6"] = f32(output[0])
        rec["adaln_single.embedded_timestep"] = f32(output[1])

    hooks = [
        model.pos_embed.register_forward_hook(lambda m, i, o: rec.__setitem__("pos_embed", f32(o))),
        model.caption_projection.register_forward_hook(lambda m, i, o: rec.__setitem__("caption_projection", f32(o))),
        model.adaln_single.register_forward_hook(record_adaln),
    ]
    for i, block in enumerate(model.transformer_blocks):
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: rec.__setitem__(f"block.{i}", f32(o))))
    out = model(hidden, encoder_hidden_states=caption, encoder_attention_mask=mask, timestep=timestep,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    for hk in hooks:
        hk.remove()
    rec.update({"hidden_states": hidden, "encoder_hidden_states": caption, "encoder_attention_mask": mask,
                "timestep": timestep, "output": f32(out)})
    save(GOLDENS / name / "transformer.safetensors", rec)


@torch.no_grad()
def write_vae_goldens(pipe: PixArtSigmaPipeline, name: str, latent_hw: tuple[int, int]) -> None:
    gen = torch.Generator("cpu").manual_seed(8)
    z = torch.randn(1, 4, *latent_hw, generator=gen) * 3.0
    image = pipe.vae.decode(z, return_dict=False)[0]
    save(GOLDENS / name / "vae.safetensors", {"latents": z, "image": f32(image)})


@torch.no_grad()
def write_scheduler_goldens(config: dict) -> None:
    """Each scheduler stepped N times on fixed inputs: model outputs, samples, noise and results."""
    rec: dict[str, torch.Tensor] = {}
    shape = (1, 4, 2, 3)
    for n in STEP_COUNTS:
        gen = torch.Generator("cpu").manual_seed(100 + n)
        sample0 = torch.randn(shape, generator=gen)
        outputs = torch.randn((n, *shape), generator=gen)
        # DPM-Solver++ 2M as the model repo configures it.
        dpm = DPMSolverMultistepScheduler.from_config(config)
        dpm.set_timesteps(n)
        rec[f"dpm.{n}.timesteps"] = dpm.timesteps.to(torch.int64)
        sample = sample0
        steps = []
        for i, t in enumerate(dpm.timesteps):
            sample = dpm.step(outputs[i], t, sample, return_dict=False)[0]
            steps.append(sample)
        rec[f"dpm.{n}.sample0"] = sample0
        rec[f"dpm.{n}.model_outputs"] = outputs
        rec[f"dpm.{n}.samples"] = torch.stack(steps)
        # SA-Solver as the official demo runs it; its per-step noise is recorded.
        sa = SASolverScheduler.from_config(config, algorithm_type="data_prediction")
        sa.set_timesteps(n)
        rec[f"sa.{n}.timesteps"] = sa.timesteps.to(torch.int64)
        noises = []
        original = scheduling_sasolver.randn_tensor

        def recording_randn(*args, **kwargs):
            noise = original(*args, **kwargs)
            noises.append(noise.clone())
            return noise

        scheduling_sasolver.randn_tensor = recording_randn
        try:
            sample = sample0
            steps = []
            noise_gen = torch.Generator("cpu").manual_seed(200 + n)
            for i, t in enumerate(sa.timesteps):
                sample = sa.step(outputs[i], t, sample, generator=noise_gen, return_dict=False)[0]
                steps.append(sample)
        finally:
            scheduling_sasolver.randn_tensor = original
        assert len(noises) == n, (len(noises), n)
        rec[f"sa.{n}.samples"] = torch.stack(steps)
        rec[f"sa.{n}.noises"] = torch.stack(noises)
        # The same steps evaluated in float64 (each from diffusers' own f32 input): how far
        # diffusers' f32 arithmetic is from exact at each step, the floor of any f32 comparison.
        sa64 = SASolverScheduler.from_config(config, algorithm_type="data_prediction")
        sa64.set_timesteps(n)
        sa64.sigmas = sa64.sigmas.double()
        replay = iter(noises)
        scheduling_sasolver.randn_tensor = lambda *args, **kwargs: next(replay).double()
        try:
            exact = []
            inputs = [sample0] + steps[:-1]
            for i, t in enumerate(sa64.timesteps):
                exact.append(sa64.step(outputs[i].double(), t, inputs[i].double(), return_dict=False)[0])
        finally:
            scheduling_sasolver.randn_tensor = original
        rec[f"sa.{n}.samples_f64"] = torch.stack(exact)
    save(GOLDENS / "schedulers.safetensors", rec)


RNG_SEEDS = [0, 1, 42, 2**32 + 7]
RNG_SHAPES = [(1, 4, 16, 16), (2, 4, 6, 10), (3,), (15,), (16,), (17,), (1, 4, 3, 5), (33,)]


def write_rng_goldens() -> None:
    """torch.randn from torch.Generator("cpu").manual_seed(seed), twice per generator so the
    state carried from one draw to the next is covered too."""
    rec = {}
    for seed in RNG_SEEDS:
        for shape in RNG_SHAPES:
            gen = torch.Generator("cpu").manual_seed(seed)
            name = "x".join(str(d) for d in shape)
            rec[f"{seed}.{name}.first"] = torch.randn(shape, generator=gen)
            rec[f"{seed}.{name}.second"] = torch.randn(shape, generator=gen)
    save(GOLDENS / "rng.safetensors", rec)


def write_bucket_goldens() -> None:
    rel = torch.arange(MAX_LENGTH)[None, :] - torch.arange(MAX_LENGTH)[:, None]
    buckets = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    save(GOLDENS / "t5_buckets.safetensors", {"buckets": buckets.to(torch.uint8)})


# ----------------------------------------------------------------------------------------------
# Pipeline runs, recorded by hooking the real PixArtSigmaPipeline


# Each case: the fixture, the pipeline arguments, and whether per-step tensors are recorded in full.
PIPELINE_CASES = [
    dict(case="dpm_default", model="tiny-sigma-256", full=True,
         args=dict(prompt="a small cactus with a happy face in the sahara desert", height=128, width=128,
                   num_inference_steps=3, guidance_scale=4.5, seed=0)),
    dict(case="dpm_negative_unbinned", model="tiny-sigma-512", full=True,
         args=dict(prompt="An Astronaut riding a horse", negative_prompt="blurry, low quality", height=64, width=96,
                   use_resolution_binning=False, num_inference_steps=4, guidance_scale=4.5, seed=42)),
    dict(case="sa_solver", model="tiny-sigma-256", full=False, scheduler="SA-SOLVER",
         args=dict(prompt="a red fox in the snow", height=96, width=160, num_inference_steps=5, guidance_scale=3.0, seed=5)),
]


def sa_solver_for(pipe: PixArtSigmaPipeline) -> SASolverScheduler:
    # As the official demo builds it: from the DPM config, data prediction, tau 1 for 200 <= t <= 800.
    return SASolverScheduler.from_config(pipe.scheduler.config, algorithm_type="data_prediction",
                                         tau_func=lambda t: 1 if 200 <= t <= 800 else 0)


@torch.no_grad()
def run_pipeline_case(pipe: PixArtSigmaPipeline, case: dict) -> None:
    if case.get("scheduler") == "SA-SOLVER":
        pipe.scheduler = sa_solver_for(pipe)
    args = dict(case["args"])
    seed = args.pop("seed")
    rec: dict[str, torch.Tensor] = {}
    full = case["full"]
    step = {"i": 0}
    originals = {}

    def wrap(obj, attr, fn):
        originals[(obj, attr)] = getattr(obj, attr)
        setattr(obj, attr, fn(originals[(obj, attr)]))

    tok_calls: list[dict] = []

    class RecordingTokenizer:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kw):
            out = self.inner(text, **kw)
            if kw.get("padding") == "max_length":
                tok_calls.append(out)
            return out

        def __getattr__(self, item):
            return getattr(self.inner, item)

    real_tokenizer = pipe.tokenizer
    pipe.tokenizer = RecordingTokenizer(real_tokenizer)
    te_calls: list[torch.Tensor] = []
    te_hook = pipe.text_encoder.register_forward_hook(lambda m, a, o: te_calls.append(f32(o[0])))

    def tr_hook(m, args_, kwargs, out):
        i = step["i"]
        if full and i == 0:
            rec[f"step{i}.transformer.hidden_states"] = f32(args_[0])
            rec[f"step{i}.transformer.timestep"] = kwargs["timestep"].to(torch.int64)
            rec[f"step{i}.transformer.output"] = f32(out[0])
        if i == 0:
            # The states themselves are [negative; prompt] hidden states, recorded below.
            rec["transformer.encoder_attention_mask"] = kwargs["encoder_attention_mask"].to(torch.int64)

    tr_handle = pipe.transformer.register_forward_hook(tr_hook, with_kwargs=True)

    def step_wrapper(orig):
        def inner(model_output, timestep, sample, *a, **kw):
            i = step["i"]
            res = orig(model_output, timestep, sample, *a, **kw)
            if full or i in (0, len(pipe.scheduler.timesteps) - 1):
                rec[f"step{i}.scheduler.model_output"] = f32(model_output)
                rec[f"step{i}.scheduler.sample"] = f32(sample)
                rec[f"step{i}.scheduler.prev_sample"] = f32(res[0])
            step["i"] += 1
            return res
        return inner

    wrap(pipe.scheduler, "step", step_wrapper)
    wrap(pipe, "prepare_latents", lambda orig: (lambda *a, **kw: rec.setdefault("latents_init", f32(orig(*a, **kw))) ))

    def decode_wrapper(orig):
        def inner(z, *a, **kw):
            out = orig(z, *a, **kw)
            rec["vae.input"] = f32(z)
            if out[0].numel() <= 120_000:
                rec["vae.output"] = f32(out[0])
            return out
        return inner

    wrap(pipe.vae, "decode", decode_wrapper)
    noises: list[torch.Tensor] = []
    original_randn = scheduling_sasolver.randn_tensor

    def recording_randn(*a, **kw):
        noise = original_randn(*a, **kw)
        noises.append(f32(noise))
        return noise

    scheduling_sasolver.randn_tensor = recording_randn
    try:
        generator = torch.Generator("cpu").manual_seed(seed)
        images = pipe(**args, generator=generator, output_type="np", clean_caption=False).images
    finally:
        scheduling_sasolver.randn_tensor = original_randn
        for (obj, attr), fn in originals.items():
            setattr(obj, attr, fn)
        pipe.tokenizer = real_tokenizer
        te_hook.remove()
        tr_handle.remove()
    rec["timesteps"] = pipe.scheduler.timesteps.to(torch.int64)
    rec["prompt.input_ids"] = tok_calls[0].input_ids.to(torch.int64)
    rec["prompt.attention_mask"] = tok_calls[0].attention_mask.to(torch.int64)
    # Only the real tokens: the rest never reaches the image (the transformer masks them).
    rec["prompt.hidden_states"] = te_calls[0][:, : int(tok_calls[0].attention_mask.sum())]
    if len(tok_calls) > 1:
        rec["negative.input_ids"] = tok_calls[1].input_ids.to(torch.int64)
        rec["negative.attention_mask"] = tok_calls[1].attention_mask.to(torch.int64)
        rec["negative.hidden_states"] = te_calls[1][:, : int(tok_calls[1].attention_mask.sum())]
    if noises:
        rec["sa.noises"] = torch.stack(noises)
    rec["image"] = torch.from_numpy((images * 255).round().astype("uint8"))
    meta = {"case": case["case"], "model": case["model"], "scheduler": case.get("scheduler", "DPM-SOLVER"),
            "seed": seed, **{k: v for k, v in args.items()}, "steps_recorded": "all" if full else "first and last",
            "versions": versions()}
    base = GOLDENS / case["model"] / f"pipeline_{case['case']}"
    save(base.with_suffix(".safetensors"), rec)
    base.with_suffix(".json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# fal requests run end to end; diffusers is called with the request mapped as fal's endpoint
# documents it (style template, style negative prepended, width/height, num_images_per_prompt,
# a CPU generator seeded with `seed`, resolution binning on, clean_caption off).
FAL_CASES = [
    ("default_dpm", "tiny-sigma-256", {"prompt": "a small cactus with a happy face in the sahara desert", "seed": 0,
                                       "image_size": {"width": 128, "height": 128}}),
    ("negative_nonsquare", "tiny-sigma-512", {"prompt": "An Astronaut riding a horse", "negative_prompt": "blurry, low quality",
                                              "image_size": {"width": 160, "height": 96}, "num_inference_steps": 10, "seed": 42}),
    ("sa_solver", "tiny-sigma-256", {"prompt": "a red fox in the snow", "scheduler": "SA-SOLVER", "num_inference_steps": 25,
                                     "guidance_scale": 3.0, "image_size": {"width": 160, "height": 96}, "seed": 5}),
    ("two_images", "tiny-sigma-256", {"prompt": "two owls on a branch", "num_images": 2, "num_inference_steps": 8,
                                      "image_size": {"width": 96, "height": 96}, "seed": 7}),
    ("guidance_one", "tiny-sigma-512", {"prompt": "a lighthouse at dusk", "guidance_scale": 1.0, "num_inference_steps": 6,
                                        "image_size": {"width": 96, "height": 128}, "seed": 11}),
    ("style_preset", "tiny-sigma-256", {"prompt": "a dragon over a castle", "style": "Anime", "negative_prompt": "text",
                                        "image_size": "square", "num_inference_steps": 5, "seed": 3}),
    ("long_prompt", "tiny-sigma-512", {"prompt": " ".join(["Dragon castle neon, highly detailed"] * 90), "num_inference_steps": 4,
                                       "image_size": {"width": 64, "height": 64}, "seed": 123}),
]

STYLE_TEMPLATES = {
    "(No style)": ("{prompt}", ""),
    "Anime": ("anime artwork {prompt} . anime style, key visual, vibrant, studio anime,  highly detailed",
              "photo, deformed, black and white, realism, disfigured, low contrast"),
}
PRESETS = {"square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024), "portrait_16_9": (576, 1024),
           "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576)}


@torch.no_grad()
def run_fal_case(pipe: PixArtSigmaPipeline, name: str, model: str, request: dict, folder: Path | None = None) -> None:
    from PIL import Image

    template, style_negative = STYLE_TEMPLATES[request.get("style", "(No style)")]
    size = request.get("image_size", "square_hd")
    width, height = PRESETS[size] if isinstance(size, str) else (size["width"], size["height"])
    scheduler = pipe.scheduler
    if request.get("scheduler") == "SA-SOLVER":
        pipe.scheduler = sa_solver_for(pipe)
    try:
        images = pipe(
            prompt=template.replace("{prompt}", request["prompt"]),
            negative_prompt=style_negative + request.get("negative_prompt", ""),
            num_inference_steps=request.get("num_inference_steps", 35),
            guidance_scale=request.get("guidance_scale", 4.5),
            num_images_per_prompt=request.get("num_images", 1),
            height=height,
            width=width,
            generator=torch.Generator("cpu").manual_seed(request["seed"]),
            output_type="np",
            clean_caption=False,
        ).images
    finally:
        pipe.scheduler = scheduler
    folder = folder or GOLDENS / "e2e" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "request.json").write_text(json.dumps(request, indent=2) + "\n", encoding="utf-8")
    (folder / "model.txt").write_text(model + "\n")
    for i, image in enumerate((images * 255).round().astype("uint8")):
        # Lossless PNG written without timestamps, so reruns give identical bytes.
        Image.fromarray(image).save(folder / f"image_{i}.png", format="PNG", optimize=True)


CAPTIONS = [
    "A Small Cactus with a Happy Face in the Sahara Desert",
    "  photo of a cat on https://example.com/cats/1.jpg by @catlover  ",
    "Visit www.shop.com for FREE SHIPPING worldwide! Click on link",
    "<b>Bold</b> &amp; <i>italic</i> text &quot;quoted&quot;",
    "this_is_my_cute_cat_photo",
    "this-is-my-cute-cat",
    "東京タワー at night, 猫 and 犬",
    "best-selling t-shirt — size 12x18 — jc6640 model 6640vc231",
    "***AUSVERKAUFT*** #AUSVERKAUFT \"\"\"sold out\"\"\"",
    "IP 192.168.0.1 page 12 of the catalogue",
    "\u201cCurly quotes\u201d and \u2018single\u2019 and \u00abguillemets\u00bb",
    "file name image_0001.png and report.pdf download free",
    "a%20url%2Dencoded+caption",
    "id #123 and #123456 and 1234567 numbers",
    "ends with a time 3:45   ",
    "'quoted whole caption'",
    "_leading underscore",
    "trailing plus+",
    ".hidden",
    "dots... and more.... dots",
    "mixed . spaced . periods",
    "3d render of a robot, 4k, 8k uhd",
    "a\\nb literal backslash n",
    "emoji 😀 and symbols ® © ™ § ~ | / *",
    "An Astronaut Riding A Horse, Cinematic, Highly Detailed",
]


def write_caption_goldens(pipe: PixArtSigmaPipeline) -> None:
    """diffusers' clean_caption=True preprocessing (bs4 and ftfy installed)."""
    cleaned = pipe._text_preprocessing(CAPTIONS, clean_caption=True)
    doc = {"about": "PixArtSigmaPipeline._text_preprocessing(text, clean_caption=True)", "versions": versions(),
           "cases": [{"text": t, "cleaned": c} for t, c in zip(CAPTIONS, cleaned)]}
    (GOLDENS / "captions.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if GOLDENS.exists():
        shutil.rmtree(GOLDENS)
    GOLDENS.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        spiece = Path(tmp) / "spiece.model"
        train_spiece(spiece)
        dirs = {name: build_model(name, spec, spiece) for name, spec in MODELS.items()}
    write_tokenizer_goldens(dirs["tiny-sigma-256"])
    write_bucket_goldens()
    write_rng_goldens()
    latent_shapes = {"tiny-sigma-256": (6, 10), "tiny-sigma-512": (10, 4)}
    pipes = {}
    for name, path in dirs.items():
        # Load back from disk: the goldens come from the committed files through diffusers' loaders.
        pipe = PixArtSigmaPipeline.from_pretrained(path, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
        write_t5_goldens(pipe, name)
        write_transformer_goldens(pipe, name, latent_shapes[name])
        write_vae_goldens(pipe, name, latent_shapes[name])
    write_scheduler_goldens(dict(pipes["tiny-sigma-256"].scheduler.config))
    write_caption_goldens(pipes["tiny-sigma-256"])
    for case in PIPELINE_CASES:
        pipe = pipes[case["model"]]
        scheduler = pipe.scheduler
        run_pipeline_case(pipe, case)
        pipe.scheduler = scheduler
    for name, model, request in FAL_CASES:
        run_fal_case(pipes[model], name, model, request)
    write_gguf_fixtures(FIXTURES, GOLDENS, pipes["tiny-sigma-256"], run_fal_case)
    write_safety_fixtures(FIXTURES, GOLDENS)
    write_size_fixtures(GOLDENS)
    write_lora_fixtures(FIXTURES, GOLDENS, run_fal_case)
    write_image_input_fixtures(FIXTURES, GOLDENS, run_fal_case)
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"fixtures written under {FIXTURES}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
