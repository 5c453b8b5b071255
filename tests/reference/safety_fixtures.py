"""Safety-checker fixtures, called by make_fixtures.py.

Writes:
  fixtures/tiny-safety-checker/    a tiny random transformers ViTForImageClassification in the layout of
                                   Falconsai/nsfw_image_detection (config.json with id2label normal/nsfw,
                                   preprocessor_config.json of ViTImageProcessor at 224², model.safetensors);
                                   its classifier bias leans to `normal` (+3/−3) so ordinary images pass
  fixtures/goldens/safety/*.png    test images: noise, a gradient, extreme aspect ratios, 1×1, 224×224
  fixtures/goldens/safety/checker.safetensors
                                   transformers' logits (PIL backend of ViTImageProcessor) for those images and
                                   the end-to-end goldens' images; for three of them Pillow's resized bytes and
                                   the processor's pixel_values
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil


# Images whose resized bytes and pixel values are recorded too (the others: logits only).
RESIZE_GOLDENS = ["gradient_300x200", "tall_17x401", "noise_64x48", "portrait_300x450"]


def test_images(rng: np.random.Generator) -> dict[str, np.ndarray]:
    y, x = np.mgrid[0:240, 0:300]
    yy, xx = np.mgrid[0:450, 0:300]
    gradient = np.stack([x * 255 // 299, y * 255 // 239, (x + y) * 255 // 538], axis=-1).astype(np.uint8)[:200]
    return {
        "noise_64x48": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
        "gradient_300x200": gradient,
        "tall_17x401": rng.integers(0, 256, (401, 17, 3), dtype=np.uint8),
        "wide_640x9": rng.integers(0, 256, (9, 640, 3), dtype=np.uint8),
        "pixel_1x1": np.array([[[200, 30, 90]]], dtype=np.uint8),
        "exact_224x224": np.stack([(x[:224, :224] * 7) % 256, (y[:224, :224] * 3) % 256,
                                   (x[:224, :224] ^ y[:224, :224]) % 256], axis=-1).astype(np.uint8),
        "upscale_100x150": rng.integers(0, 256, (150, 100, 3), dtype=np.uint8),
        # Both sides shrink, portrait: Pillow 13 resamples vertically first here.
        "portrait_300x450": np.stack([(xx * 5 + yy) % 256, (yy * 3) % 256, ((xx // 7) * (yy // 9) * 11) % 256],
                                     axis=-1).astype(np.uint8),
    }


@torch.no_grad()
def write_safety_fixtures(fixtures: Path, goldens: Path) -> None:
    out = fixtures / "tiny-safety-checker"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
        layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
        id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config).eval()
    # Random weights of transformers' initialisation are tiny (std 0.02): scale them up so the
    # logits depend visibly on the image, and lean the classifier to `normal`.
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.mul_(10.0)
    model.classifier.bias.copy_(torch.tensor([3.0, -3.0]))
    model.save_pretrained(out)
    processor = ViTImageProcessorPil(
        do_resize=True, size={"height": 224, "width": 224}, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(out)
    # Keep only what the checker reads (as in the published repo).
    cfg_path = out / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor_type"] = "ViTImageProcessor"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    folder = goldens / "safety"
    folder.mkdir(parents=True, exist_ok=True)
    images = test_images(np.random.default_rng(11))
    for name, array in images.items():
        Image.fromarray(array).save(folder / f"{name}.png", format="PNG", optimize=True)
    for case in sorted((goldens / "e2e").iterdir()):
        for png in sorted(case.glob("image_*.png")):
            images[f"e2e_{case.name}_{png.stem}"] = np.array(Image.open(png).convert("RGB"))

    tensors: dict[str, torch.Tensor] = {}
    for name, array in images.items():
        pixel_values = processor(images=[array], return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        tensors[f"{name}/logits"] = model(pixel_values=pixel_values).logits.to(torch.float32).contiguous()
        if name in RESIZE_GOLDENS:
            # The bytes Pillow's resize produced (what the processor then rescales and normalises).
            resized = Image.fromarray(array).resize((224, 224), resample=Image.Resampling.BILINEAR)
            tensors[f"{name}/resized"] = torch.from_numpy(np.array(resized)).contiguous()
            if name == RESIZE_GOLDENS[0]:
                # The processor's own output: the rescale/normalise arithmetic.
                tensors[f"{name}/pixel_values"] = pixel_values.to(torch.float32).contiguous()
    save_file(tensors, str(folder / "checker.safetensors"))
    (folder / "images.json").write_text(json.dumps(sorted(images), indent=1) + "\n")
