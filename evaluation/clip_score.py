"""CLIP score of image-caption pairs, as the paper computes it (its Table 2; SPEC §6).

The paper scores Stable Diffusion with the `clip-score` package (github.com/Taited/clip-score): the CLIP model
`openai/clip-vit-base-patch32` through transformers (its processor: shortest side to 224 bicubic, centre crop,
CLIP's normalisation; captions tokenized, here padded to CLIP's 77 tokens with an attention mask, which leaves
the embedding unchanged), and the score is the mean over pairs of the cosine similarity of the projected image
and text embeddings. The paper reports it x100 (26.88 for FP SD v1.4 on COCO), so `clip_score` here is 100 x
that mean. The computation is written here rather than called from the package: its loop reads the features as
tensors, and transformers 5 returns them inside output objects (`pooler_output`).

The weights are never downloaded here and never replaced by a stand-in: a local folder (`--clip_model PATH`) or the
model already in the user's Hugging Face cache; otherwise `ClipUnavailable` says why, in one line.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.device import pick_device

DEFAULT_CLIP = "openai/clip-vit-base-patch32"      # the clip-score package's default model
CONTEXT = 77                                        # CLIP's text context (tokens), padded to it with attention masks


class ClipUnavailable(RuntimeError):
    """CLIP score cannot be computed here; the message says why."""


def load_clip(model: str | Path = DEFAULT_CLIP, device: torch.device | str | None = None):
    """(CLIPModel, processor) from a local folder or the Hugging Face cache only (local_files_only)."""
    try:
        from transformers import AutoModel, AutoProcessor
    except ImportError as e:
        raise ClipUnavailable("CLIP score unavailable: transformers is not installed") from e
    try:
        clip = AutoModel.from_pretrained(str(model), local_files_only=True)
        processor = AutoProcessor.from_pretrained(str(model), local_files_only=True)
    except (OSError, ValueError) as e:
        where = "the folder" if Path(model).is_dir() else "the Hugging Face cache"
        raise ClipUnavailable(f"CLIP score unavailable: no CLIP weights for {model} in {where} "
                              f"({str(e).splitlines()[0][:120]}); pass --clip_model PATH to a local copy") from None
    return clip.to(pick_device(str(device) if device is not None else None)).eval(), processor


class _Pairs(torch.utils.data.Dataset):
    """(image, caption) pairs in the clip-score package's form: {"real": image inputs, "fake": text inputs}."""

    def __init__(self, images: np.ndarray, captions: list[str], processor):
        self.images, self.captions, self.processor = images, captions, processor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image
        im = self.images[i]
        image = Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).convert("RGB")
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        text = self.processor.tokenizer(self.captions[i], padding="max_length", truncation=True,
                                        max_length=CONTEXT, return_tensors="pt")
        return {"real": {"pixel_values": pixels}, "fake": {k: v[0] for k, v in text.items()}}


def _features(output) -> torch.Tensor:
    """The projected embedding of get_image_features / get_text_features (a tensor, or transformers 5's output)."""
    return output if torch.is_tensor(output) else output.pooler_output


@torch.no_grad()
def clip_score(images: np.ndarray, captions: list[str], model: str | Path = DEFAULT_CLIP,
               device: torch.device | str | None = None, batch_size: int = 50) -> float:
    """100 x the mean cosine similarity of CLIP's embeddings of images[i] (uint8 NHWC) and captions[i]."""
    if len(images) != len(captions):
        raise ValueError(f"CLIP score pairs images with captions: {len(images)} images, {len(captions)} captions")
    clip, processor = load_clip(model, device)
    dev = next(clip.parameters()).device
    total = 0.0
    for batch in torch.utils.data.DataLoader(_Pairs(images, captions, processor), batch_size=batch_size):
        img = _features(clip.get_image_features(**{k: v.to(dev) for k, v in batch["real"].items()}))
        txt = _features(clip.get_text_features(**{k: v.to(dev) for k, v in batch["fake"].items()}))
        total += float(torch.nn.functional.cosine_similarity(img.float(), txt.float()).sum())
    return 100.0 * total / len(images)
