"""Byte-level BPE tokenizers: training one inside the job, or checking a user's tokenizer.json."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipelines.sources import UserError

# The special tokens of tokenizers trained here; their ids are 0..3 in this order.
PAD, BOS, EOS, MASK = "<|pad|>", "<|bos|>", "<|endoftext|>", "<|mask|>"
TRAINED_SPECIALS = (PAD, BOS, EOS, MASK)

# Names other tokenizers use for each role, tried in order when loading one.
_CANDIDATES = {
    "mask": (MASK, "<|mdm_mask|>", "[MASK]", "<mask>", "<|MASK|>"),
    "eos": (EOS, "</s>", "<|eos|>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]"),
    "bos": (BOS, "<s>", "<bos>", "<|begin_of_text|>", "[CLS]"),
    "pad": (PAD, "<pad>", "[PAD]", "<|padding|>"),
}
MIN_VOCAB_SIZE = 256 + len(TRAINED_SPECIALS)  # every byte plus the specials


class SpecialIds(NamedTuple):
    pad: int
    bos: int | None  # None: the tokenizer has no BOS and records start with the text
    eos: int
    mask: int


def train_bpe(texts: Iterable[str], vocab_size: int) -> str:
    """Trains a byte-level BPE on `texts` (in the given order); returns its JSON.

    Deterministic: the trainer's pair counts are order independent and ties break on
    the pair itself, so the same texts give the same tokenizer.json.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TRAINED_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


def parse(tokenizer_json: str, source: str = "tokenizer.json") -> Tokenizer:
    try:
        return Tokenizer.from_str(tokenizer_json)
    except Exception as e:
        raise UserError(f"{source} is not a Hugging Face tokenizer.json: {e}") from None


def special_ids(tokenizer: Tokenizer, mask_token: str | None = None, source: str = "") -> SpecialIds:
    """Finds the special tokens; a tokenizer without a mask or EOS token is a user error."""

    def find(role: str, explicit: str | None = None) -> int | None:
        for name in (explicit,) if explicit else _CANDIDATES[role]:
            token_id = tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    mask = find("mask", mask_token)
    if mask is None:
        looked_for = mask_token or ", ".join(_CANDIDATES["mask"])
        raise UserError(
            f"tokenizer {source} has no mask token (looked for {looked_for}); add one as a "
            f"special token or name it with --mask_token"
        )
    eos = find("eos")
    if eos is None:
        raise UserError(
            f"tokenizer {source} has no end-of-text token (looked for "
            f"{', '.join(_CANDIDATES['eos'])}); add one as a special token"
        )
    pad = find("pad")
    return SpecialIds(pad=eos if pad is None else pad, bos=find("bos"), eos=eos, mask=mask)


def vocab_size(tokenizer: Tokenizer) -> int:
    """The vocabulary a model needs: the largest id + 1. A tokenizer whose ids have gaps (a special
    token removed) has fewer tokens than that, and counting them would size the embedding too small
    for the ids it produces."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def sha256(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
