"""Conditioning encoders: `ClassEmbedder` (class labels) and `FrozenCLIPEmbedder` (SD v1 text, CLIP ViT-L/14).

`transformers` is imported only when a FrozenCLIPEmbedder is built. Its weights come from the LDM checkpoint
(`cond_stage_model.transformer.*`) or from a local Hugging Face directory; nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

# The text tower of openai/clip-vit-large-patch14 (SD v1's conditioner): 768 wide, 12 layers, 77 tokens
CLIP_VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, projection_dim=768)
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def tokenizer_file(version: str, name: str) -> str:
    """Path of tokenizer file `name` in the local directory `version` (also its `tokenizer/` subfolder) or in
    the local Hugging Face cache; never downloads. (transformers would silently build an empty tokenizer.)"""
    for folder in (Path(version), Path(version) / "tokenizer"):
        if (folder / name).is_file():
            return str(folder / name)
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(version, name)
    except Exception:  # not a valid repo id either
        cached = None
    if isinstance(cached, str):
        return cached
    raise FileNotFoundError(f"CLIP tokenizer file {name} for {version!r} not found (looked in {version}, "
                            f"{version}/tokenizer and the local Hugging Face cache): set "
                            f"cond_stage_config.params.version to a folder with {' and '.join(TOKENIZER_FILES)}, "
                            f"or pass token ids instead of text")


class TextModelKeys(nn.Module):
    """Holds a CLIP text tower as `text_model` so its keys read `text_model.*` (the layout of the public
    SD checkpoints), and calls it."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def forward(self, **kwargs):
        return self.text_model(**kwargs)


class ClassEmbedder(nn.Module):
    """Class labels -> [B, 1, embed_dim] cross-attention context (`embedding`). cin256 uses class 1000 as
    the unconditional (null) class for classifier-free guidance."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch, key: str | None = None) -> torch.Tensor:
        """`batch` is {key: labels [B]} (the public interface) or the labels tensor itself."""
        labels = batch if isinstance(batch, torch.Tensor) else batch[key or self.key]
        return self.embedding(labels[:, None])                  # [B, 1, embed_dim]


class FrozenCLIPEmbedder(nn.Module):
    """Text (list of str) or token ids [B, max_length] -> CLIP last hidden state [B, max_length, width].

    `version`: a local Hugging Face directory (config + weights + tokenizer files) or a hub name; with a
    hub name the network is built from `text_config` (default: ViT-L/14) with weights to be loaded from the
    LDM checkpoint, and the tokenizer is read from the local Hugging Face cache only when text is encoded.
    `device` is accepted for config compatibility; the module follows .to().
    """

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device=None, max_length: int = 77,
                 text_config: dict | None = None):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel
        self.version, self.max_length = version, max_length
        if (Path(version) / "config.json").is_file():
            model = CLIPTextModel.from_pretrained(version, local_files_only=True)
        else:
            model = CLIPTextModel(CLIPTextConfig(**(CLIP_VIT_L14_TEXT if text_config is None else text_config)))
        # transformers < 5 nests the text tower as `text_model`; newer versions do not: keep the public key
        # layout `transformer.text_model.*` either way
        self.transformer = model if hasattr(model, "text_model") else TextModelKeys(model)
        self._tokenizer = None
        self.freeze()

    def freeze(self) -> None:
        self.transformer.eval()
        for p in self.parameters():
            p.requires_grad = False

    @property
    def tokenizer(self):
        """The CLIP BPE tokenizer from local files (read on first use; a one-line error when they are missing)."""
        if self._tokenizer is None:
            from transformers import CLIPTokenizer
            folders = {str(Path(tokenizer_file(self.version, name)).parent) for name in TOKENIZER_FILES}
            if len(folders) != 1:
                raise FileNotFoundError(f"CLIP tokenizer files for {self.version!r} are in different folders: {folders}")
            tokenizer = CLIPTokenizer.from_pretrained(folders.pop(), local_files_only=True)
            if len(tokenizer) <= len(tokenizer.all_special_tokens):
                raise ValueError(f"the CLIP tokenizer read for {self.version!r} has an empty vocabulary")
            self._tokenizer = tokenizer
        return self._tokenizer

    def tokenize(self, text: list[str]) -> torch.Tensor:
        batch = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt")
        return batch["input_ids"]

    def forward(self, text) -> torch.Tensor:
        tokens = text if isinstance(text, torch.Tensor) else self.tokenize(list(text))
        device = self.transformer.get_input_embeddings().weight.device
        return self.transformer(input_ids=tokens.to(device)).last_hidden_state   # [B, max_length, width]

    def encode(self, text) -> torch.Tensor:
        return self(text)
