#!/usr/bin/env python3
"""Image-to-image, inpainting and perturbed-attention guidance (PAG) fixtures, called by make_fixtures.py
(or run alone to rewrite only these files).

diffusers has no PixArt image-to-image or inpainting pipeline. The project's semantics are those of
StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline (4-channel model path) around
PixArtSigmaPipeline's own denoising loop: diffusers' own methods (get_timesteps, prepare_latents,
_encode_vae_image, prepare_mask_latents, the image processors) are called unbound on a small stand-in
`self`, and PixArtSigmaPipeline (or PixArtSigmaPAGPipeline) then runs its loop from those latents over
the kept timesteps with the same generator. Every random draw comes from the one request generator.

Writes, from the committed tiny-sigma-256 model:
  fixtures/images/                         input images drawn with numpy (no downloads):
                                             photo.png      160x96 RGB, gradients, a disc, a bar, a line, a checker
                                             photo.jpg      the photo as JPEG (quality 90, Pillow's default 4:2:0)
                                             photo.webp     the photo as lossless WebP
                                             photo_lossy.webp  the photo as lossy WebP (quality 80)
                                             square.png     128x128 RGB
                                             rgba.png       96x64 RGBA, alpha 0..255 with stripes under alpha 0
                                             gray.png       64x48 mode L
                                             palette.png    64x48 mode P (16 colours)
                                             rotated.jpg    stored 96x64 with EXIF orientation 6 (shown 64x96)
                                             rotated8.png   stored 96x64 with an eXIf orientation 8 (shown 64x96)
                                             mask_center.png  160x96 L, a white rectangle on black
                                             mask_soft.png  80x48 L, a smooth blob crossing 0.5
  fixtures/goldens/images/decoded.safetensors   diffusers.utils.load_image (EXIF transpose + RGB) of every
                                           image as uint8 [H, W, 3] keyed by file name; "<file>:L" the
                                           loaded image .convert("L") as uint8 [H, W] for photo.png and the masks
  fixtures/goldens/images/resize.safetensors    Pillow Lanczos resizes as VaeImageProcessor.resize does them
                                           ("photo:{w}x{h}", "square:{w}x{h}" uint8 [h, w, 3];
                                           "mask_soft:L:{w}x{h}" uint8 [h, w]); "preprocess:photo:96x64" the
                                           f32 [1, 3, 64, 96] of VaeImageProcessor.preprocess; "mask:mask_soft:160x96"
                                           the f32 [1, 1, 96, 160] of the inpainting mask processor
  fixtures/goldens/images/vae_encoder.safetensors  the tiny AutoencoderKL's encode of two inputs
                                           ("photo_96x64", "randn_24x40"): input, moments (quant_conv
                                           output), mean, logvar (clamped), std, mode, sample (seed 11)
  fixtures/goldens/images/add_noise.safetensors  add_noise of DPM-Solver++ and SA-Solver after
                                           set_timesteps(10) at begin indices 0, 3, 7, and DPM's add_noise
                                           after one step from begin index 3 (the inpainting case)
  fixtures/goldens/image_input/<case>/     fal requests run end to end (request.json, model.txt,
                                           image_<i>.png as make_fixtures.run_fal_case writes them):
                                           image-to-image, inpainting, PAG and PAG from image-to-image latents
  fixtures/goldens/image_input/pag_layers.json  diffusers' own PAG layer selection on a 28-block
                                           transformer for a list of patterns (block indices or the error)
  fixtures/goldens/image_input/checks.json      what was verified while writing, per case the bin size,
                                           t_start, kept timesteps and every random draw in order

Running it twice gives byte-identical files (fixed seeds, one thread, no timestamps).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtSigmaPAGPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import (
    Attention,
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
)
from diffusers.models.autoencoders import vae as vae_module
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as sdxl_img2img_module
from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as sdxl_inpaint_module
from diffusers.schedulers import scheduling_sasolver
from diffusers.utils import load_image

MODEL = "tiny-sigma-256"
STEPS = 10

# The mask processor of StableDiffusionXLInpaintPipeline.
MASK_PROCESSOR = dict(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)

# Pillow Lanczos resizes recorded: (file, key, (w, h), mode of the resized image).
RESIZES = [("photo.png", "photo", size, "RGB") for size in
           [(256, 256), (64, 40), (200, 96), (96, 160), (160, 96), (33, 17)]]
RESIZES += [("square.png", "square", size, "RGB") for size in [(100, 100), (150, 150)]]
RESIZES += [("mask_soft.png", "mask_soft:L", size, "L") for size in [(160, 96), (256, 160)]]

PAG_LAYER_PATTERNS = ["blocks.1", "blocks.0", "blocks.2", "blocks\\.1\\.", "blocks.(0|27)", "blocks.1[0-3]",
                      "transformer_blocks.5", "attn1", "blocks", "blocks.99", "mid"]

PROMPT = "a lighthouse on a rocky coast at dusk"

# Image input cases: image-to-image and inpainting through PixArtSigmaPipeline's loop.
IMAGE_CASES = [
    ("img2img_dpm_s03", {"prompt": PROMPT, "image_url": "photo.png", "strength": 0.3, "seed": 1}),
    ("img2img_dpm_s075_two", {"prompt": "a red fox in the snow", "image_url": "photo.png", "strength": 0.75,
                              "num_images": 2, "seed": 2}),
    ("img2img_sa_s075", {"prompt": PROMPT, "image_url": "photo.png", "strength": 0.75, "scheduler": "SA-SOLVER",
                         "seed": 3}),
    ("img2img_dpm_s1", {"prompt": PROMPT, "image_url": "photo.png", "strength": 1.0, "seed": 4}),
    ("img2img_sa_s1", {"prompt": PROMPT, "image_url": "photo.png", "strength": 1.0, "scheduler": "SA-SOLVER",
                       "seed": 5}),
    ("img2img_resize", {"prompt": "a dragon over a castle", "image_url": "photo.png", "strength": 0.6,
                        "image_size": {"width": 96, "height": 128}, "negative_prompt": "text, watermark",
                        "style": "Anime", "seed": 6}),
    ("img2img_nocfg", {"prompt": "two owls on a branch", "image_url": "square.png", "strength": 0.5,
                       "guidance_scale": 1.0, "seed": 7}),
    ("img2img_steps_rounding", {"prompt": PROMPT, "image_url": "photo.png", "strength": 0.29,
                                "num_inference_steps": 7, "seed": 8}),
    ("inpaint_center_dpm", {"prompt": "a hot air balloon", "image_url": "photo.png", "mask_url": "mask_center.png",
                            "strength": 0.8, "seed": 9}),
    ("inpaint_soft_sa_s1", {"prompt": "a hot air balloon", "image_url": "photo.png", "mask_url": "mask_soft.png",
                            "strength": 1.0, "scheduler": "SA-SOLVER", "num_images": 2, "seed": 10}),
    ("inpaint_center_dpm_s1", {"prompt": "a hot air balloon", "image_url": "photo.png",
                               "mask_url": "mask_center.png", "strength": 1.0, "seed": 11}),
]

# PAG cases: PixArtSigmaPAGPipeline, text to image, and one from image-to-image latents.
PAG_SIZE = {"width": 64, "height": 64}
PAG_CASES = [
    ("pag_cfg", {"prompt": "a small cactus with a happy face", "pag_scale": 3.0, "pag_applied_layers": ["blocks.1"],
                 "guidance_scale": 4.5, "seed": 21}),
    ("pag_nocfg", {"prompt": "a small cactus with a happy face", "pag_scale": 2.0, "pag_applied_layers": ["blocks.1"],
                   "guidance_scale": 1.0, "seed": 22}),
    ("pag_two_layers", {"prompt": "an astronaut riding a horse", "pag_scale": 1.5,
                        "pag_applied_layers": ["blocks.0", "blocks.1"], "guidance_scale": 3.0, "num_images": 2,
                        "scheduler": "SA-SOLVER", "seed": 23}),
    ("pag_regex", {"prompt": "a castle in the clouds", "pag_scale": 2.0, "pag_applied_layers": ["blocks.(0|1)"],
                   "guidance_scale": 4.5, "seed": 24}),
]
PAG_IMAGE_CASE = ("pag_img2img", {"prompt": PROMPT, "image_url": "photo.png", "strength": 0.7, "pag_scale": 2.0,
                                  "pag_applied_layers": ["blocks.1"], "guidance_scale": 4.5, "seed": 25})


def versions() -> dict:
    from PIL import features

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__, "libjpeg": features.version("jpg"),
            "libwebp": features.version("webp"), "zlib": features.version("zlib")}


def save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """dtypes as given (uint8 images, int64 timesteps, float32 tensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path))


def u8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8))


# ----------------------------------------------------------------------------------------------
# Input images


def photo_array() -> np.ndarray:
    """160x96: smooth gradients with hard-edged shapes, so resizing has edges and Lanczos rings."""
    h, w = 96, 160
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 30 + 200 * x / (w - 1)
    g = 40 + 170 * y / (h - 1)
    b = 128 + 90 * np.sin(x / 17.0) * np.cos(y / 11.0)
    img = np.stack([r, g, b], axis=-1)
    disc = (x - 42) ** 2 + (y - 40) ** 2 <= 17.5 ** 2
    img[disc] = [180, 20, 30]
    bar = (x >= 92) & (x < 131) & (y >= 18) & (y < 51)
    img[bar] = [245, 245, 250]
    line = np.abs((y - 90) + 0.55 * (x - 10)) < 1.2
    img[line] = [5, 5, 10]
    checker = (x >= 120) & (y >= 62) & (((x // 3) + (y // 3)) % 2 == 0)
    img[checker] = [0, 0, 0]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def square_array() -> np.ndarray:
    n = 128
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    rad = np.hypot(x - 50, y - 70)
    r = 127.5 + 127.5 * np.cos(rad / 6.0)
    g = 255 * x / (n - 1)
    b = 255 * (1 - y / (n - 1))
    img = np.stack([r, g, b], axis=-1)
    img[(x > 80) & (x < 110) & (y > 10) & (y < 40)] = [20, 200, 60]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def rgba_array() -> np.ndarray:
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w]
    stripes = ((x + 2 * y) // 5) % 2
    rgb = np.stack([np.where(stripes, 230, 40), (x * 255) // (w - 1), np.where(stripes, 60, 200)], axis=-1)
    # Alpha: 0 on the left quarter (stripes underneath), a ramp, 255 on the right quarter, and a
    # half-transparent band.
    alpha = np.clip((x - 24) * 255 // 47, 0, 255)
    alpha = np.where((y >= 40) & (y < 48), 128, alpha)
    return np.concatenate([rgb, alpha[..., None]], axis=-1).astype(np.uint8)


def gray_array() -> np.ndarray:
    h, w = 48, 64
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    v = 255 * np.clip(1 - np.hypot(x - 20, y - 24) / 40, 0, 1)
    v[(x >= 44) & (x < 48)] = 255
    v[(x >= 52) & (x < 54)] = 0
    return np.round(v).astype(np.uint8)


def palette_image() -> Image.Image:
    h, w = 48, 64
    y, x = np.mgrid[0:h, 0:w]
    index = ((x // 8) + 4 * ((y // 12) % 4)) % 16
    image = Image.fromarray(index.astype(np.uint8), mode="P")
    colours = []
    for i in range(16):
        colours += [(i * 53) % 256, (i * 97 + 40) % 256, (255 - i * 16) % 256]
    image.putpalette(colours)
    return image


def rotated_array() -> np.ndarray:
    """Stored 96x64; asymmetric so any wrong orientation shows."""
    h, w = 64, 96
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * x / (w - 1), 255 * y / (h - 1), np.full_like(x, 90)], axis=-1)
    img[(x < 20) & (y < 12)] = [255, 255, 255]  # top-left marker
    img[(x > 80) & (y > 50)] = [0, 0, 0]  # bottom-right marker
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def mask_center_array() -> np.ndarray:
    h, w = 96, 160
    m = np.zeros((h, w), dtype=np.uint8)
    m[21:70, 50:115] = 255  # edges off the 8-pixel latent grid at the 320x192 bin
    return m


def mask_soft_array() -> np.ndarray:
    """80x48: a smooth blob plus a ramp; values cross 0.5 on a curve, so binarisation decides."""
    h, w = 48, 80
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    blob = 1 - ((x - 46) / 26) ** 2 - ((y - 22) / 17) ** 2
    v = np.clip(0.45 + 0.6 * blob + 0.15 * (x / (w - 1) - 0.5), 0, 1)
    return np.round(255 * v).astype(np.uint8)


def orientation_exif(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation
    return exif


def write_images(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    png = dict(format="PNG", optimize=True)
    photo = Image.fromarray(photo_array(), mode="RGB")
    photo.save(folder / "photo.png", **png)
    photo.save(folder / "photo.jpg", format="JPEG", quality=90)
    photo.save(folder / "photo.webp", format="WEBP", lossless=True)
    photo.save(folder / "photo_lossy.webp", format="WEBP", quality=80)
    Image.fromarray(square_array(), mode="RGB").save(folder / "square.png", **png)
    Image.fromarray(rgba_array(), mode="RGBA").save(folder / "rgba.png", **png)
    Image.fromarray(gray_array(), mode="L").save(folder / "gray.png", **png)
    palette_image().save(folder / "palette.png", **png)
    rotated = Image.fromarray(rotated_array(), mode="RGB")
    rotated.save(folder / "rotated.jpg", format="JPEG", quality=90, exif=orientation_exif(6).tobytes())
    rotated.save(folder / "rotated8.png", exif=orientation_exif(8).tobytes(), **png)
    Image.fromarray(mask_center_array(), mode="L").save(folder / "mask_center.png", **png)
    Image.fromarray(mask_soft_array(), mode="L").save(folder / "mask_soft.png", **png)


def load(folder: Path, name: str) -> Image.Image:
    # load_image takes a str path (a Path object is refused).
    return load_image(str(folder / name))


# ----------------------------------------------------------------------------------------------
# Module goldens


def write_decoded(images: Path, out: Path, checks: dict) -> None:
    rec = {}
    for path in sorted(images.iterdir()):
        image = load(images, path.name)
        assert image.mode == "RGB"
        rec[path.name] = u8(image)
        if path.name in ("photo.png", "mask_center.png", "mask_soft.png"):
            rec[f"{path.name}:L"] = u8(image.convert("L"))
    photo = rec["photo.png"].to(torch.int16)
    checks["decoded"] = {
        "photo.webp_equals_png": bool(torch.equal(rec["photo.webp"], rec["photo.png"])),
        "photo.jpg_max_diff_from_png": int((rec["photo.jpg"].to(torch.int16) - photo).abs().max()),
        "photo_lossy.webp_max_diff_from_png": int((rec["photo_lossy.webp"].to(torch.int16) - photo).abs().max()),
        "sizes_hw": {k: list(v.shape[:2]) for k, v in rec.items() if ":" not in k},
        "stored_modes": {p.name: Image.open(p).mode for p in sorted(images.iterdir())},
        "rotated8.png_equals_rotated_source": bool(torch.equal(
            rec["rotated8.png"], u8(Image.fromarray(rotated_array()).transpose(Image.Transpose.ROTATE_90)))),
        "rgba_is_alpha_dropped_not_composited": bool(torch.equal(rec["rgba.png"], torch.from_numpy(rgba_array()[..., :3]))),
    }
    # EXIF orientation 6 and 8 turn the stored 96x64 into 64x96.
    assert rec["rotated.jpg"].shape[:2] == (96, 64) and rec["rotated8.png"].shape[:2] == (96, 64)
    assert checks["decoded"]["rotated8.png_equals_rotated_source"]
    assert checks["decoded"]["rgba_is_alpha_dropped_not_composited"]
    save(out, rec)


def write_resize(images: Path, out: Path, checks: dict) -> None:
    rec = {}
    for name, key, (w, h), mode in RESIZES:
        image = load(images, name)
        if mode == "L":
            image = image.convert("L")
        resized = image.resize((w, h), resample=Image.LANCZOS)
        # What VaeImageProcessor.resize does for a PIL image in the default mode.
        via_processor = VaeImageProcessor(vae_scale_factor=8).resize(image, h, w)
        assert np.array_equal(np.asarray(resized), np.asarray(via_processor)), key
        rec[f"{key}:{w}x{h}"] = u8(resized)
    photo = load(images, "photo.png")
    pre = VaeImageProcessor(vae_scale_factor=8).preprocess(photo, height=64, width=96)
    assert pre.dtype == torch.float32 and pre.shape == (1, 3, 64, 96)
    rec["preprocess:photo:96x64"] = pre
    expected = torch.from_numpy(np.asarray(photo.resize((96, 64), resample=Image.LANCZOS)).astype(np.float32) / 255.0)
    expected = (2.0 * expected - 1.0).permute(2, 0, 1)[None]
    soft = load(images, "mask_soft.png")
    mask = VaeImageProcessor(**MASK_PROCESSOR).preprocess(soft, height=96, width=160)
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 96, 160)
    rec["mask:mask_soft:160x96"] = mask
    # The mask processor resizes the RGB image, then converts to L: for a gray RGB image that is the
    # L image resized, since L of equal channels is the channel itself.
    l_first = np.asarray(soft.convert("L").resize((160, 96), resample=Image.LANCZOS)).astype(np.float32) / 255.0
    checks["resize"] = {
        "preprocess_equals_2*(lanczos_u8/255)-1": bool(torch.equal(pre, expected)),
        "mask_equals_(lanczos_of_L/255 >= 0.5)": bool(torch.equal(mask[0, 0], torch.from_numpy((l_first >= 0.5).astype(np.float32)))),
        "mask_soft_160x96_ones": int(mask.sum()),
        "mask_soft_160x96_pixels_within_0.02_of_0.5": int((np.abs(l_first - 0.5) < 0.02).sum()),
    }
    save(out, rec)


@torch.no_grad()
def write_vae_encoder(pipe: PixArtSigmaPipeline, images: Path, out: Path) -> None:
    vae: AutoencoderKL = pipe.vae
    photo = VaeImageProcessor(vae_scale_factor=8).preprocess(load(images, "photo.png"), height=64, width=96)
    inputs = {"photo_96x64": photo, "randn_24x40": torch.randn(1, 3, 40, 24, generator=torch.Generator("cpu").manual_seed(3))}
    rec = {}
    for case, x in inputs.items():
        dist = vae.encode(x).latent_dist
        rec[f"{case}:input"] = x
        rec[f"{case}:moments"] = dist.parameters
        rec[f"{case}:mean"] = dist.mean
        rec[f"{case}:logvar"] = dist.logvar
        rec[f"{case}:std"] = dist.std
        rec[f"{case}:mode"] = dist.mode()
        rec[f"{case}:sample"] = dist.sample(torch.Generator("cpu").manual_seed(11))
    save(out, {k: v.to(torch.float32) for k, v in rec.items()})


@torch.no_grad()
def write_add_noise(pipe: PixArtSigmaPipeline, sa_solver_for, out: Path, checks: dict) -> None:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(2))
    rec = {"x": x, "noise": noise}
    schedulers = {"dpm": lambda: DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
                  "sa": lambda: sa_solver_for(pipe)}
    for name, make in schedulers.items():
        sched = make()
        sched.set_timesteps(STEPS)
        rec[f"{name}:timesteps"] = sched.timesteps.to(torch.int64)
        for k in (0, 3, 7):
            sched.set_begin_index(k)
            rec[f"{name}:begin{k}"] = sched.add_noise(x, noise, sched.timesteps[k:k + 1])
    # Inpainting adds noise after a step: DPM-Solver then takes the sigma of its step_index, not of
    # the timestep passed.
    dpm = schedulers["dpm"]()
    dpm.set_timesteps(STEPS)
    dpm.set_begin_index(3)
    model_output = torch.randn(1, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(4))
    stepped = dpm.step(model_output, dpm.timesteps[3], x, return_dict=False)[0]
    rec["dpm:after_step_from3:model_output"] = model_output
    rec["dpm:after_step_from3:step_output"] = stepped
    rec["dpm:after_step_from3"] = dpm.add_noise(x, noise, dpm.timesteps[4:5])
    begin4 = schedulers["dpm"]()
    begin4.set_timesteps(STEPS)
    begin4.set_begin_index(4)
    # With a begin index set and no step taken, DPM-Solver uses the begin index whatever timestep is passed.
    begin3 = schedulers["dpm"]()
    begin3.set_timesteps(STEPS)
    begin3.set_begin_index(3)
    sa = schedulers["sa"]()
    sa.set_timesteps(STEPS)
    checks["add_noise"] = {
        "dpm_step_index_after_one_step_from3": int(dpm.step_index),
        "dpm_after_step_from3_equals_begin4": bool(torch.equal(rec["dpm:after_step_from3"],
                                                               begin4.add_noise(x, noise, begin4.timesteps[4:5]))),
        "dpm_begin_index_overrides_timestep_passed": bool(torch.equal(rec["dpm:begin3"],
                                                                      begin3.add_noise(x, noise, begin3.timesteps[0:1]))),
        "sa_ignores_begin_index": bool(torch.equal(sa.add_noise(x, noise, sa.timesteps[3:4]), rec["sa:begin3"])),
        "model_output_of_after_step_from3": "standard normal, seed 4",
    }
    save(out, {k: (v if v.dtype == torch.int64 else v.to(torch.float32)) for k, v in rec.items()})


# ----------------------------------------------------------------------------------------------
# PAG layer selection


def pag_processor_blocks(pag: PixArtSigmaPAGPipeline, cfg: bool) -> list[int]:
    expected = PAGCFGIdentitySelfAttnProcessor2_0 if cfg else PAGIdentitySelfAttnProcessor2_0
    pag_classes = (PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0)
    names = [name for name, module in pag.transformer.named_modules()
             if isinstance(module, Attention) and isinstance(module.processor, pag_classes)]
    assert all(type(m.processor) is expected for n, m in pag.transformer.named_modules() if n in names)
    assert all(n.startswith("transformer_blocks.") and n.endswith(".attn1") for n in names), names
    return [int(n.split(".")[1]) for n in names]


@torch.no_grad()
def write_pag_layers(pipe: PixArtSigmaPipeline, out: Path) -> None:
    config = dict(pipe.transformer.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["num_layers"] = 28
    torch.manual_seed(0)
    deep = PixArtTransformer2DModel(**config).eval()
    original = deep.attn_processors
    results = []
    for pattern in PAG_LAYER_PATTERNS:
        entry: dict = {"pattern": pattern}
        for cfg in (True, False):
            pag = PixArtSigmaPAGPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                         transformer=deep, scheduler=pipe.scheduler, pag_applied_layers=[pattern])
            try:
                pag._set_pag_attn_processor(pag_applied_layers=pag.pag_applied_layers, do_classifier_free_guidance=cfg)
                found = {"blocks": pag_processor_blocks(pag, cfg)}
            except ValueError as e:
                found = {"error": str(e)}
            finally:
                deep.set_attn_processor(dict(original))  # it pops from the dict
            if cfg:
                entry.update(found)
            else:
                assert found == {k: entry[k] for k in found}, (pattern, found, entry)
        results.append(entry)
    doc = {"about": "PixArtSigmaPAGPipeline(pag_applied_layers=[pattern]) on a 28-block PixArtTransformer2DModel "
                    "(the tiny config with num_layers=28): the blocks whose attn1 gets the PAG processor after "
                    "_set_pag_attn_processor (the same with and without classifier-free guidance), or the error "
                    "diffusers raises; patterns are Python regular expressions searched in module names",
           "num_layers": 28, "versions": versions(), "cases": results}
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# End-to-end cases


class SdxlSelf:
    """The attributes diffusers' SDXL img2img / inpaint methods read from `self`."""

    _encode_vae_image = StableDiffusionXLInpaintPipeline._encode_vae_image

    def __init__(self, pipe):
        self.scheduler = pipe.scheduler
        self.vae = pipe.vae
        self.vae_scale_factor = pipe.vae_scale_factor
        self.image_processor = pipe.image_processor


@contextlib.contextmanager
def recorded_draws(draws: list):
    """Logs (where, shape) of every randn_tensor call of the VAE posterior, the SDXL pipelines and
    SA-Solver, in order."""
    modules = {"vae_posterior": vae_module, "img2img_noise": sdxl_img2img_module,
               "inpaint_noise": sdxl_inpaint_module, "sa_solver_step": scheduling_sasolver}
    originals = {name: m.randn_tensor for name, m in modules.items()}

    def wrap(name, fn):
        def inner(shape, *a, **kw):
            draws.append((name, list(shape)))
            return fn(shape, *a, **kw)
        return inner

    for name, m in modules.items():
        m.randn_tensor = wrap(name, originals[name])
    try:
        yield
    finally:
        for name, m in modules.items():
            m.randn_tensor = originals[name]


@contextlib.contextmanager
def kept_timesteps(pipe, num_inference_steps: int, kept: torch.Tensor):
    """The pipeline's loop iterates only `kept`; the scheduler keeps its full schedule and begin index."""
    module = sys.modules[type(pipe).__module__]
    original = module.retrieve_timesteps

    def retrieve(scheduler, n=None, device=None, timesteps=None, sigmas=None, **kwargs):
        assert n == num_inference_steps and timesteps is None and sigmas is None and not kwargs
        assert scheduler is pipe.scheduler
        return kept, len(kept)

    module.retrieve_timesteps = retrieve
    try:
        yield
    finally:
        module.retrieve_timesteps = original


def bin_table(pipe) -> dict:
    return {256: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN,
            32: ASPECT_RATIO_256_BIN}[pipe.transformer.config.sample_size]


class ImageInputPipeline:
    """Stands in for the pipeline inside make_fixtures.run_fal_case, which maps the request's text
    fields (style template, negative prompt, steps, guidance, images, seed) exactly as for
    text-to-image and writes request.json, model.txt and the PNGs. The call prepares the
    image-to-image or inpainting latents with diffusers' SDXL methods and runs `pipe`'s own loop
    from them with the same generator."""

    def __init__(self, pipe, request: dict, images: Path, record: dict, extra: dict | None = None):
        self.pipe = pipe
        self.request = request
        self.images = images
        self.record = record
        self.extra = extra or {}

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @scheduler.setter
    def scheduler(self, value):
        self.pipe.scheduler = value

    @torch.no_grad()
    def __call__(self, *, prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt,
                 height, width, generator, output_type, clean_caption):
        pipe, request, rec = self.pipe, self.request, self.record
        entered = pipe.scheduler
        if isinstance(entered, DPMSolverMultistepScheduler):
            # A fresh scheduler per case, so the shared one never carries a begin index.
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(entered.config)
        scheduler = pipe.scheduler
        try:
            image = load(self.images, request["image_url"])
            if "image_size" in request:
                assert (width, height) == (request["image_size"]["width"], request["image_size"]["height"])
            else:
                # run_fal_case's default preset does not apply: the output has the input image's size.
                width, height = image.size
            bin_h, bin_w = pipe.image_processor.classify_height_width_bin(height, width, ratios=bin_table(pipe))
            rec.update(output_size_wh=[width, height], bin_hw=[bin_h, bin_w], scheduler=type(scheduler).__name__)
            strength = request["strength"]
            sd = SdxlSelf(pipe)
            inpaint = "mask_url" in request
            owner = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
            draws: list = []
            with recorded_draws(draws):
                init_image = pipe.image_processor.preprocess(image, height=bin_h, width=bin_w)
                scheduler.set_timesteps(num_inference_steps, device="cpu")
                kept, n_kept = owner.get_timesteps(sd, num_inference_steps, strength, "cpu")
                t_start = num_inference_steps - n_kept
                assert scheduler.begin_index == t_start and torch.equal(kept, scheduler.timesteps[t_start:])
                rec.update(t_start=t_start, init_timestep=int(num_inference_steps * strength),
                           n_times_strength=num_inference_steps * strength,
                           kept_timesteps=[int(t) for t in kept], full_timesteps=[int(t) for t in scheduler.timesteps])
                loop = LoopWatch(pipe, scheduler)
                try:
                    if inpaint:
                        latents, callback, blend = self.inpaint_latents(
                            sd, init_image, kept, num_images_per_prompt, bin_h, bin_w, guidance_scale > 1.0,
                            generator, loop)
                    else:
                        # One prompt: batch_size 1, num_images_per_prompt images.
                        latents = StableDiffusionXLImg2ImgPipeline.prepare_latents(
                            sd, init_image, kept[:1].repeat(num_images_per_prompt), 1, num_images_per_prompt,
                            torch.float32, "cpu", generator, True)
                        callback = blend = None
                    with kept_timesteps(pipe, num_inference_steps, kept):
                        out = pipe(prompt=prompt, negative_prompt=negative_prompt,
                                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                   num_images_per_prompt=num_images_per_prompt, height=height, width=width,
                                   generator=generator, latents=latents, output_type=output_type,
                                   clean_caption=clean_caption, use_resolution_binning=True,
                                   callback=callback, callback_steps=1, **self.extra)
                finally:
                    loop.restore()
            rec["draws"] = [{"from": w, "shape": s, "values": int(np.prod(s))} for w, s in draws]
            if not isinstance(scheduler, DPMSolverMultistepScheduler):
                # SA-Solver draws every step's noise from the request's generator.
                assert all(g is generator for g in loop.step_generators), "the loop did not pass the generator"
                rec["steps_drew_from_request_generator"] = True
            assert loop.timesteps == rec["kept_timesteps"], (loop.timesteps, kept)
            assert loop.first_step_index == t_start, (loop.first_step_index, t_start)
            rec["step_index_at_first_step"] = loop.first_step_index
            if isinstance(scheduler, DPMSolverMultistepScheduler):
                # DPM-Solver's add_noise: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t at the begin index.
                sigma = float(scheduler.sigmas[t_start])
                alpha_t = 1.0 / (sigma ** 2 + 1.0) ** 0.5
                rec["add_noise_alpha_sigma"] = [alpha_t, sigma * alpha_t]
            else:
                # SA-Solver's add_noise: sqrt(alphas_cumprod[t]), sqrt(1 - alphas_cumprod[t]) at the timestep passed.
                acp = float(scheduler.alphas_cumprod[int(kept[0])])
                rec["add_noise_alpha_sigma"] = [acp ** 0.5, (1.0 - acp) ** 0.5]
            # How far the final latents are from the image's own (posterior mean) latents: strength at work.
            sf = pipe.vae.config.scaling_factor
            assert len(loop.decoded) == 1
            reference = pipe.vae.encode(init_image).latent_dist.mode() * sf
            rec["final_latents_rms_from_image_latents"] = round(float(((loop.decoded[0] * sf - reference) ** 2).mean().sqrt()), 4)
            if blend is not None:
                rec.update(blend["record"])
                last = loop.blended[-1]
                rec["callback_tensor_is_loop_tensor"] = loop.is_loop_tensor
                assert all(loop.is_loop_tensor) and len(loop.is_loop_tensor) == len(kept) - 1
                assert torch.equal(loop.decoded[0], last / sf)
                rec["decoded_latents_are_last_blend"] = True
                outside = (blend["init_mask"] == 0).expand_as(last)
                rec["outside_mask_equals_image_latents"] = bool(torch.equal(last[outside], blend["image_latents"][outside]))
                assert rec["outside_mask_equals_image_latents"]
                rec["blend_add_noise_timesteps"] = loop.noise_timesteps
                rec["blend_step_index_at_add_noise"] = loop.step_indices
            return out
        finally:
            pipe.scheduler = entered

    def inpaint_latents(self, sd, init_image, kept, num_images, bin_h, bin_w, do_cfg, generator, loop):
        """StableDiffusionXLInpaintPipeline's steps 5-7 for a 4-channel model: mask, masked image,
        latents (draw 1 image latents, draw 2 noise), mask latents (draw 3: the masked image's
        latents, never used by a 4-channel model), and the blend as the loop's callback."""
        pipe, scheduler, strength = self.pipe, sd.scheduler, self.request["strength"]
        mask_image = load(self.images, self.request["mask_url"])
        mask = VaeImageProcessor(**MASK_PROCESSOR).preprocess(mask_image, height=bin_h, width=bin_w)
        masked_image = init_image * (mask < 0.5)
        is_strength_max = strength == 1.0
        latents, noise, image_latents = StableDiffusionXLInpaintPipeline.prepare_latents(
            sd, num_images, pipe.vae.config.latent_channels, bin_h, bin_w, torch.float32, "cpu", generator, None,
            image=init_image, timestep=kept[:1].repeat(num_images), is_strength_max=is_strength_max,
            add_noise=True, return_noise=True, return_image_latents=True)
        if is_strength_max:
            assert torch.equal(latents, noise * scheduler.init_noise_sigma)
        record = dict(is_strength_max=is_strength_max, mask_pixel_hw=list(mask.shape[-2:]), mask_pixel_ones=int(mask.sum()))
        mask, _masked_image_latents = StableDiffusionXLInpaintPipeline.prepare_mask_latents(
            sd, mask, masked_image, num_images, bin_h, bin_w, torch.float32, "cpu", generator, do_cfg)
        init_mask = mask.chunk(2)[0] if do_cfg else mask
        record.update(mask_latent_hw=list(init_mask.shape[-2:]), mask_latent_ones=int(init_mask[0].sum()))
        callback = inpaint_blend(scheduler, kept, image_latents, noise, init_mask, loop)
        return latents, callback, {"record": record, "init_mask": init_mask, "image_latents": image_latents}


class LoopWatch:
    """Wraps the scheduler's step and the VAE's decode for one call: the timesteps stepped, the
    step index the scheduler started from, whether each step continues from the tensor the
    callback changed, and the latents decoded. restore() removes the wrappers."""

    def __init__(self, pipe, scheduler):
        self.scheduler, self.vae = scheduler, pipe.vae
        self.timesteps: list[int] = []
        self.first_step_index = None
        self.callback_tensors: list[torch.Tensor] = []
        self.is_loop_tensor: list[bool] = []
        self.blended: list[torch.Tensor] = []
        self.noise_timesteps: list[int] = []
        self.step_indices: list = []
        self.decoded: list[torch.Tensor] = []
        self.step_generators: list = []
        step, decode = scheduler.step, self.vae.decode

        # functools.wraps keeps step's signature visible: the pipeline passes the generator to a
        # step that declares one (SA-Solver draws its noise from it).
        @functools.wraps(step)
        def watched_step(model_output, timestep, sample, *a, **kw):
            if self.callback_tensors:
                self.is_loop_tensor.append(sample is self.callback_tensors[-1])
            self.step_generators.append(kw.get("generator"))
            res = step(model_output, timestep, sample, *a, **kw)
            if self.first_step_index is None:
                self.first_step_index = scheduler.step_index - 1
            self.timesteps.append(int(timestep))
            return res

        def watched_decode(z, *a, **kw):
            self.decoded.append(z.clone())
            return decode(z, *a, **kw)

        scheduler.step = watched_step
        self.vae.decode = watched_decode

    def restore(self) -> None:
        del self.scheduler.step
        del self.vae.decode


def inpaint_blend(scheduler, kept, image_latents, noise, init_mask, loop: LoopWatch):
    """StableDiffusionXLInpaintPipeline's 4-channel blend after each scheduler.step, applied in
    place to the loop's own tensor through PixArtSigmaPipeline's `callback`."""

    def callback(i, t, latents):
        assert int(t) == int(kept[i])
        init_latents_proper = image_latents
        if i < len(kept) - 1:
            noise_timestep = kept[i + 1]
            loop.noise_timesteps.append(int(noise_timestep))
            loop.step_indices.append(scheduler.step_index)
            init_latents_proper = scheduler.add_noise(init_latents_proper, noise, torch.tensor([noise_timestep]))
        latents.copy_((1 - init_mask) * init_latents_proper + init_mask * latents)
        loop.callback_tensors.append(latents)
        loop.blended.append(latents.clone())

    return callback


class PagPipeline:
    """Stands in for the pipeline inside run_fal_case: PixArtSigmaPAGPipeline called with the
    request's PAG fields added."""

    def __init__(self, pag, extra: dict):
        self.pag = pag
        self.extra = extra

    @property
    def scheduler(self):
        return self.pag.scheduler

    @scheduler.setter
    def scheduler(self, value):
        self.pag.scheduler = value

    def __call__(self, **kwargs):
        return self.pag(**kwargs, **self.extra)


def pag_pipeline(pipe: PixArtSigmaPipeline, layers: list[str]) -> PixArtSigmaPAGPipeline:
    pag = PixArtSigmaPAGPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                 transformer=pipe.transformer, scheduler=pipe.scheduler, pag_applied_layers=layers)
    pag.set_progress_bar_config(disable=True)
    return pag


def with_defaults(request: dict, steps: int) -> dict:
    """The request as written to request.json: steps, guidance, images and negative prompt always
    present; image_size, scheduler, style, mask_url and the PAG fields only when used."""
    out = {"prompt": request["prompt"]}
    out["negative_prompt"] = request.get("negative_prompt", "")
    out["seed"] = request["seed"]
    out["num_inference_steps"] = request.get("num_inference_steps", steps)
    out["guidance_scale"] = request.get("guidance_scale", 4.5)
    out["num_images"] = request.get("num_images", 1)
    for key in ("image_url", "mask_url", "strength", "image_size", "scheduler", "style", "pag_scale",
                "pag_applied_layers"):
        if key in request:
            out[key] = request[key]
    return out


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def processor_classes(transformer) -> dict:
    return {k: type(v).__name__ for k, v in transformer.attn_processors.items()}


@torch.no_grad()
def write_cases(pipe: PixArtSigmaPipeline, images: Path, gold: Path, run_fal_case, checks: dict) -> None:
    cases = checks.setdefault("cases", {})
    base_processors = processor_classes(pipe.transformer)
    for name, raw in IMAGE_CASES:
        request = with_defaults(raw, STEPS)
        rec: dict = {}
        run_fal_case(ImageInputPipeline(pipe, request, images, rec), name, MODEL, request, folder=gold / name)
        cases[name] = rec

    for name, raw in PAG_CASES:
        request = with_defaults({**raw, "image_size": PAG_SIZE}, 8)
        pag = pag_pipeline(pipe, request["pag_applied_layers"])
        run_fal_case(PagPipeline(pag, {"pag_scale": request["pag_scale"]}), name, MODEL, request, folder=gold / name)
        assert processor_classes(pipe.transformer) == base_processors, name
        bin_h, bin_w = pipe.image_processor.classify_height_width_bin(PAG_SIZE["height"], PAG_SIZE["width"],
                                                                      ratios=bin_table(pipe))
        cases[name] = {"bin_hw": [bin_h, bin_w], "t_start": 0, "output_size_wh": [PAG_SIZE["width"], PAG_SIZE["height"]],
                       "pag_processor": "PAGCFGIdentitySelfAttnProcessor2_0" if request["guidance_scale"] > 1
                       else "PAGIdentitySelfAttnProcessor2_0",
                       "processors_restored_after_call": True}

    name, raw = PAG_IMAGE_CASE
    request = with_defaults(raw, STEPS)
    pag = pag_pipeline(pipe, request["pag_applied_layers"])
    rec = {}
    run_fal_case(ImageInputPipeline(pag, request, images, rec, extra={"pag_scale": request["pag_scale"]}),
                 name, MODEL, request, folder=gold / name)
    assert processor_classes(pipe.transformer) == base_processors
    cases[name] = rec
    write_pag_checks(pipe, gold, run_fal_case, checks)

    # The random tiny VAE does not reproduce the photo, so strength is checked on the latents: the
    # lower the strength, the closer the final latents stay to the image's own.
    order = ["img2img_steps_rounding", "img2img_dpm_s03", "img2img_dpm_s075_two", "img2img_dpm_s1"]
    checks["strength_vs_image_latents"] = {
        "about": "rms(final latents - scaling_factor * posterior mean of the binned photo), photo.png, DPM",
        **{case: cases[case]["final_latents_rms_from_image_latents"] for case in order}}
    rms = [cases[case]["final_latents_rms_from_image_latents"] for case in order]
    assert rms == sorted(rms), checks["strength_vs_image_latents"]


@torch.no_grad()
def write_pag_checks(pipe: PixArtSigmaPipeline, gold: Path, run_fal_case, checks: dict) -> None:
    name, raw = PAG_CASES[0]
    request = with_defaults({**raw, "image_size": PAG_SIZE}, 8)
    pag_checks: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # pag_scale 0 turns PAG off: the PAG pipeline then gives PixArtSigmaPipeline's image.
        pag = pag_pipeline(pipe, request["pag_applied_layers"])
        run_fal_case(PagPipeline(pag, {"pag_scale": 0.0}), "pag_zero", MODEL, request, folder=tmp / "zero")
        run_fal_case(pipe, "plain", MODEL, request, folder=tmp / "plain")
        zero, plain = read_png(tmp / "zero" / "image_0.png"), read_png(tmp / "plain" / "image_0.png")
        pag_checks["pag_scale_0_equals_sigma_pipeline_max_levels"] = int(np.abs(zero - plain).max())
        with_pag = read_png(gold / name / "image_0.png")
        pag_checks["pag_cfg_vs_no_pag_max_levels"] = int(np.abs(with_pag - plain).max())
        pag_checks["pag_cfg_vs_no_pag_mean_levels"] = round(float(np.abs(with_pag - plain).mean()), 3)
    # pag_adaptive_scale > 0 fails in this diffusers version: _get_pag_scale compares a batch of
    # timesteps with 0.
    errors = {}
    for label, guidance in (("cfg", 4.5), ("nocfg", 1.0)):
        pag = pag_pipeline(pipe, ["blocks.1"])
        before = pipe.transformer.attn_processors
        try:
            pag("a cat", num_inference_steps=1, guidance_scale=guidance, height=64, width=64, pag_scale=2.0,
                pag_adaptive_scale=0.5, generator=torch.Generator("cpu").manual_seed(0), output_type="np",
                clean_caption=False)
            errors[label] = None
        except Exception as e:  # noqa: BLE001 - the message is the finding
            errors[label] = f"{type(e).__name__}: {e}"
        finally:
            pipe.transformer.set_attn_processor(dict(before))
    pag_checks["adaptive_scale_0.5"] = errors
    assert all(errors.values()), errors
    assert pag_checks["pag_scale_0_equals_sigma_pipeline_max_levels"] == 0, pag_checks
    checks["pag"] = pag_checks


@torch.no_grad()
def write_image_input_fixtures(fixtures: Path, goldens: Path, run_fal_case) -> None:
    # sa_solver_for is make_fixtures' SA-Solver (imported here: make_fixtures imports this module).
    from make_fixtures import sa_solver_for

    images = fixtures / "images"
    image_goldens = goldens / "images"
    gold = goldens / "image_input"
    for folder in (image_goldens, gold):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    write_images(images)

    pipe = PixArtSigmaPipeline.from_pretrained(fixtures / MODEL, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    checks: dict = {"versions": versions()}
    write_decoded(images, image_goldens / "decoded.safetensors", checks)
    write_resize(images, image_goldens / "resize.safetensors", checks)
    write_vae_encoder(pipe, images, image_goldens / "vae_encoder.safetensors")
    write_add_noise(pipe, sa_solver_for, image_goldens / "add_noise.safetensors", checks)
    write_pag_layers(pipe, gold / "pag_layers.json")
    write_cases(pipe, images, gold, run_fal_case, checks)
    (gold / "checks.json").write_text(json.dumps(checks, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    from make_fixtures import FIXTURES, GOLDENS, run_fal_case

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    write_image_input_fixtures(FIXTURES, GOLDENS, run_fal_case)
