"""Report text -> token embeddings for ConTEXTual Net 3D, from any ``transformers`` encoder (frozen by default).

The official model runs a frozen ``LlamaModel`` (Llama-2-7B, hidden 4096) on the report sentence, its token ids
padded (id 0) or truncated to 200 with an attention mask of zeros on the padding, and feeds every position's
``last_hidden_state`` to the cross-attentions (padding positions included). :class:`ReportTokenEncoder` does the
same with any model whose output has ``last_hidden_state``; :func:`build_tiny_text_encoder` makes a small random
BERT and a word-level tokenizer entirely offline (tests, quick starts).

Before tokenising, the stated slice number and SUV are removed from the sentence so the network cannot read the
answer's position from the text: :func:`scrub_stated_values`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import nn

__all__ = ["OFFICIAL_MAX_TOKENS", "ReportTokenEncoder", "build_tiny_text_encoder", "scrub_stated_values"]

OFFICIAL_MAX_TOKENS = 200
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def scrub_stated_values(text: str, slice_number: float | None = None, suv_max: float | str | None = None,
                        mode: Literal["official", "all_numbers"] = "official") -> str:
    """Remove the stated slice and SUV from a report sentence before tokenising.

    ``official`` (the official data loader): delete every occurrence of ``str(int(slice_number))`` and of
    ``str(suv_max)`` as substrings, then ``...``, and strip. Note the substring rule: slice 88 also deletes the
    "88" of "188", and an SUV stored as the float ``12.0`` does not match a written "12". ``all_numbers`` deletes
    every number (integers and decimals) and collapses the spaces left behind.
    """
    if mode == "all_numbers":
        return re.sub(r"\s{2,}", " ", _NUMBER.sub("", text)).strip()
    if mode != "official":
        raise ValueError(f"mode={mode!r}; accepted: 'official', 'all_numbers'")
    if slice_number is not None:
        text = text.replace(str(int(slice_number)), "")
    if suv_max is not None:
        text = text.replace(str(suv_max), "")
    return text.replace("...", "").strip()


class ReportTokenEncoder(nn.Module):
    """Token embeddings of report sentences: ``(B, max_length, hidden)`` and the token mask ``(B, max_length)``.

    Args:
        model: a ``transformers`` model returning ``last_hidden_state`` (``LlamaModel``, ``BertModel``, ...).
        tokenizer: its tokenizer (``__call__`` giving ``input_ids``).
        max_length: tokens per sentence after padding/truncation (official 200).
        pad_token_id: id used for padding (official 0, whatever the tokenizer's pad token).
        freeze: keep the language model frozen (official) - no gradients, always in eval mode.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = OFFICIAL_MAX_TOKENS, pad_token_id: int = 0,
                 freeze: bool = True) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length={max_length!r} must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self.freeze = bool(freeze)
        if self.freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", **kwargs) -> ReportTokenEncoder:
        """Load ``AutoModel`` (in ``dtype``, e.g. ``"bfloat16"`` for a 7B LLaMA) and ``AutoTokenizer`` from a hub
        name or a local folder (offline when ``HF_HUB_OFFLINE=1``); ``kwargs`` go to the constructor."""
        from transformers import AutoModel, AutoTokenizer

        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16', 'float16')")
        model = AutoModel.from_pretrained(name_or_path, dtype=getattr(torch, dtype))
        return cls(model, AutoTokenizer.from_pretrained(name_or_path), **kwargs)

    @property
    def hidden_size(self) -> int:
        """Width of the token embeddings."""
        return int(self.model.config.hidden_size)

    def train(self, mode: bool = True) -> ReportTokenEncoder:
        """``nn.Module.train``, except that a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze:
            self.model.eval()  # a frozen encoder never uses dropout
        return self

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, both ``(B, max_length)`` long: truncated, then padded with
        ``pad_token_id`` (mask 0) as the official forward pads."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got one str; wrap it in a list")
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_length)
        ids = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        for row, tokens in enumerate(encoded["input_ids"]):
            ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(B, max_length, hidden)`` (float32) and token mask ``(B, max_length)`` (bool) of ``texts``."""
        device = next(self.model.parameters()).device
        ids, mask = (t.to(device) for t in self.tokenize(texts))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.float(), mask.bool()


def _word_level_tokenizer(words: Iterable[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: n for n, token in enumerate(specials)}
    for word in sorted({w.lower() for w in words} - set(vocab)):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # splits punctuation, as BERT does
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def build_tiny_text_encoder(words: Iterable[str], hidden_size: int = 32, num_layers: int = 1,
                            num_heads: int = 2, max_length: int = 32, seed: int = 0,
                            freeze: bool = True) -> ReportTokenEncoder:
    """A small random BERT with a word-level tokenizer over ``words`` (lower-cased; others map to ``[UNK]``),
    built offline. Deterministic for a given ``seed``."""
    from transformers import BertConfig, BertModel

    tokenizer = _word_level_tokenizer(words)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
                        max_position_embeddings=max(max_length, 8), pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return ReportTokenEncoder(model, tokenizer, max_length=max_length, freeze=freeze)
