"""Tokenizers: local Hugging Face tokenizer files when available, otherwise bytes.

:func:`load_tokenizer` reads ``tokenizer.json`` (or GPT-2's ``vocab.json`` + ``merges.txt``) from a local
path with the ``tokenizers`` package (optional extra ``jaxdp[lm]``). Without a path, or without the package,
it returns a :class:`ByteTokenizer`: UTF-8 bytes 0..255 plus one end-of-text token (id 256), vocabulary 257.
The byte tokenizer needs no files and no downloads, and makes every digit of a canary its own token, which is
what the Secret Sharer experiments in :mod:`jaxdp.lm.exposure` want.
"""
from __future__ import annotations

import os
import warnings
from typing import Protocol
from collections.abc import Sequence

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "encode_batch"]


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: token ``b`` is byte ``b``; id 256 is end-of-text (also used as padding)."""

    vocab_size = 257
    eos_id = 256
    pad_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


class HFTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` (GPT-2's byte-level BPE, or any other)."""

    def __init__(self, tok, eos_token: str = "<|endoftext|>"):
        self._tok = tok
        self.vocab_size = int(tok.get_vocab_size())
        eos = tok.token_to_id(eos_token)
        self.eos_id = int(eos) if eos is not None else self.vocab_size - 1
        self.pad_id = self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike | None = None, *, fallback: bool = True) -> Tokenizer:
    """A tokenizer from local files, or the byte-level fallback.

    Args:
      path: ``tokenizer.json``, or a directory holding ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``
        (a Hugging Face GPT-2 directory). None gives :class:`ByteTokenizer`.
      fallback: if the files or the ``tokenizers`` package are missing, warn and return
        :class:`ByteTokenizer` (True) or raise (False). Remember that the model's ``vocab_size`` must match.
    """
    if path is None:
        return ByteTokenizer()
    path = os.fspath(path)
    try:
        import tokenizers
    except ImportError:
        if not fallback:
            raise ImportError("reading tokenizer files needs `tokenizers`: pip install 'jaxdp[lm]'") from None
        warnings.warn("`tokenizers` is not installed; using the byte-level fallback tokenizer", stacklevel=2)
        return ByteTokenizer()
    file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    if os.path.isfile(file):
        return HFTokenizer(tokenizers.Tokenizer.from_file(file))
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        return HFTokenizer(tokenizers.ByteLevelBPETokenizer(vocab, merges)._tokenizer)
    if not fallback:
        raise FileNotFoundError(f"no tokenizer.json or vocab.json + merges.txt at {path!r}")
    warnings.warn(f"no tokenizer files at {path!r}; using the byte-level fallback tokenizer", stacklevel=2)
    return ByteTokenizer()


def encode_batch(tok: Tokenizer, texts: Sequence[str], max_len: int, *, add_eos: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Encode texts into right-padded ``tokens [N, max_len]`` int32 and ``mask [N, max_len]`` bool.

    Each sequence starts with ``eos`` (a beginning-of-text marker, as GPT-2 does) so that its first real token
    is predicted too; texts longer than ``max_len`` are truncated. ``mask`` is True on real tokens.
    """
    tokens = np.full((len(texts), max_len), tok.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), bool)
    for i, t in enumerate(texts):
        ids = ([tok.eos_id] + tok.encode(t) + ([tok.eos_id] if add_eos else []))[:max_len]
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = True
    return tokens, mask
