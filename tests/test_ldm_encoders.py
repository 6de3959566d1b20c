"""Conditioners: ClassEmbedder (labels -> [B, 1, D]) and FrozenCLIPEmbedder (tokens/text -> [B, 77, D]),
built offline from a CLIPTextConfig; text needs local tokenizer files (a one-line error otherwise)."""
import json

import pytest
import torch

from ldm.modules.encoders.modules import ClassEmbedder, FrozenCLIPEmbedder
from tools.tiny_ldm import TINY_CLIP_TEXT


def test_class_embedder_gives_one_token_of_context():
    emb = ClassEmbedder(embed_dim=16, n_classes=11, key="class_label")
    labels = torch.tensor([0, 10, 3])
    c = emb({"class_label": labels})
    assert c.shape == (3, 1, 16) and torch.equal(c, emb(labels))
    assert list(emb.state_dict()) == ["embedding.weight"]


def test_clip_embedder_builds_offline_and_keeps_public_key_layout():
    clip = FrozenCLIPEmbedder(text_config=TINY_CLIP_TEXT)
    tokens = torch.randint(0, 998, (2, 77))
    context = clip(tokens)
    assert context.shape == (2, 77, 32) and torch.equal(context, clip.encode(tokens))
    keys = list(clip.state_dict())
    assert keys[0] == "transformer.text_model.embeddings.token_embedding.weight"
    assert "transformer.text_model.final_layer_norm.weight" in keys
    assert not any(p.requires_grad for p in clip.parameters()) and not clip.transformer.training


def test_missing_tokenizer_is_a_one_line_error(tmp_path):
    clip = FrozenCLIPEmbedder(version=str(tmp_path / "no-such-clip"), text_config=TINY_CLIP_TEXT)
    with pytest.raises(FileNotFoundError, match="vocab.json") as err:
        clip(["a photograph of an astronaut riding a horse"])
    assert "\n" not in str(err.value)


def write_tiny_tokenizer(folder):
    """A CLIP BPE vocabulary of the letters a-z (alone and word-final) plus one merge, 'h o'."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    vocab["ho"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nh o\n")
    return vocab


def test_text_is_tokenized_from_local_files_to_77_tokens(tmp_path):
    vocab = write_tiny_tokenizer(tmp_path / "clip" / "tokenizer")
    clip = FrozenCLIPEmbedder(version=str(tmp_path / "clip"), text_config=TINY_CLIP_TEXT)
    tokens = clip.tokenize(["a horse"])
    expected = [0, vocab["a</w>"], vocab["ho"], vocab["r"], vocab["s"], vocab["e</w>"], 1]
    assert tokens.shape == (1, 77) and tokens[0, :7].tolist() == expected and set(tokens[0, 7:].tolist()) == {1}
    assert clip(["a horse", "zebra"]).shape == (2, 77, 32)
