"""Report parsing for PET/CT weak labels: which sentences state a lesion's axial slice and SUVmax, and the values.

The rules reproduce the official pipeline (zhuemann/cog_2d_segmentation @ d5558044, ``data_prepocessing/``), step by
step, so that the same reports give the same findings:

1. :func:`clean_report` (``split_sentences.split_sentences``): ``_x000D_``, newlines and ``#`` become spaces, a
   triple space or ``...`` (or any run of 2+ periods) becomes ``". "``, whitespace is collapsed.
2. :func:`extract_slice_suv_sentences` (``extract_sentences_and_numbers``): periods glued to the next word get a
   space (unless the text holds ``i.e.``/``e.g``), the text is split after ``. ! ? * newline``, the templated
   background-activity sentences are skipped, and a sentence is kept when both ``slice`` and ``suv`` are followed
   (after any words) by a number; the first number after each keyword is its value. A sentence with one ``;`` is
   split in two when both halves state a slice and an SUV; with two or more ``;`` each part is checked on its own
   and, as in the official code, **the rest of the report is not read** (``stop_after_multi_semicolon``).
3. :func:`keep_after_multiple_value_filter` (``detect_and_remove_multiple_suv_slice``): drop a sentence with more
   than two SUV mentions, with one slice and two SUV mentions unless it mentions a ``previous``/``previously`` study,
   or with more than one slice mention.
4. Optional ``sentence_filter`` (the official step drops sentences without anatomy, from RadGraph/LLM annotations
   made offline): any ``Callable[[str], bool]``.
5. Optional LLM extraction (``llm_slice_suv_extraction``): every language model (any ``Callable[[str], str]``:
   prompt in, response out) answers :func:`extraction_prompt`; :func:`parse_llm_response` reads ``slice: N`` and
   ``SUV: x`` (a value that does not parse, e.g. ``8.4.``, voids both); a missing value counts as 0. Then
   :func:`consensus_vote` (``concenus_voting``) keeps the most frequent answer when at least ``min_votes`` models
   agree (the official run: three models, two must agree).
6. ``SUV >= 2.5`` (``threshold_suv_max``).

The official prompt is a ten-shot ``[INST]`` prompt built from real report sentences; :func:`extraction_prompt`
asks the same question (axial slice and SUVmax of the current scan, 0 when several slices are given) in the same
answer format with invented example sentences.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

__all__ = [
    "MIN_SUV",
    "Finding",
    "LanguageModel",
    "SliceSuvSentence",
    "clean_report",
    "consensus_vote",
    "count_slice_suv_mentions",
    "extract_findings",
    "extract_slice_suv_sentences",
    "extraction_prompt",
    "keep_after_multiple_value_filter",
    "llm_slice_suv",
    "mentions_prior_study",
    "parse_llm_response",
]

MIN_SUV = 2.5  # official threshold_suv_max: findings below it are not labelled

LanguageModel = Callable[[str], str]

# First number after the keyword, lazily skipping words: "SUV max of 6.2" -> 6.2, "slices 190" -> 190.
_FIRST_NUMBER_AFTER = r"\s*(?:\w+\s*)*?(\d+(?:\.\d+)?)"
_SLICE_MENTION = re.compile(r"slice(?:\s+\w+)*\s+\d+\b", re.IGNORECASE)  # integer after the words
_SUV_MENTION = re.compile(r"SUV(?:\s+\w+)*\s+\d+\.\d+\b", re.IGNORECASE)  # only decimals count as SUV mentions
_PRIOR_STUDY = re.compile(r"\b(previous|previously)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?*\n])\s+")
_GLUED_PERIOD = re.compile(r"\.(?!(\d|\s|\n|\)|e\.g\.|i\.e\.|/))")
_LLM_SLICE = re.compile(r"slice:\s*(\d+)", re.IGNORECASE)
_LLM_SUV = re.compile(r"SUV:\s*([\d.]+)", re.IGNORECASE)
# Templated lines of every report: they state an SUV (and sometimes a slice) of normal tissue, never a lesion.
_BACKGROUND_SENTENCES = ("Background liver metabolic activity", "Background mediastinal blood pool metabolic activity")


@dataclass(frozen=True)
class SliceSuvSentence:
    """A report sentence (or ``;`` part) that states a slice and an SUV, with the first number after each keyword
    exactly as written (strings, as the official pipeline stores them)."""

    sentence: str
    slice: str
    suv: str


@dataclass(frozen=True)
class Finding:
    """A labelled-to-be finding: its sentence, the stated axial slice number (report convention) and SUVmax."""

    sentence: str
    slice_number: int
    suv_max: float


def clean_report(text: str) -> str:
    """The official report clean-up before sentence splitting (see module docstring, step 1)."""
    text = text.replace("_x000D_", " ").replace("\n", " ").replace("#", " ")
    text = text.replace("   ", ". ").replace("...", ". ")
    text = re.sub(r"\.{2,}", ". ", text)
    return re.sub(r"\s+", " ", text).strip()


def _separate_glued_sentences(text: str) -> str:
    # Reports often lack the space after a period ("noted.Physiologic"); the sentence split needs it.
    text = text.replace(".Physiologic", ". Physiologic")
    if "i.e." in text or "e.g" in text:
        return text
    return _GLUED_PERIOD.sub(". ", text)


def _slice_and_suv(sentence: str, slice_word: str, suv_word: str) -> tuple[str, str] | None:
    slice_match = re.search(re.escape(slice_word) + _FIRST_NUMBER_AFTER, sentence, re.IGNORECASE)
    suv_match = re.search(re.escape(suv_word) + _FIRST_NUMBER_AFTER, sentence, re.IGNORECASE)
    if slice_match and suv_match:
        return slice_match.group(1), suv_match.group(1)
    return None


def _parts_with_values(parts: Sequence[str], slice_word: str, suv_word: str) -> list[SliceSuvSentence]:
    found = []
    for part in parts:
        values = _slice_and_suv(part, slice_word, suv_word)
        if values:
            found.append(SliceSuvSentence(part, *values))
    return found


def _split_on_semicolon(sentence: str, slice_word: str, suv_word: str) -> list[SliceSuvSentence]:
    """One ``;``: two findings when both halves state both values, else the whole sentence (or nothing)."""
    first, second = sentence.split(";")
    halves = _parts_with_values([first, second], slice_word, suv_word)
    if len(halves) == 2:
        return halves
    return _parts_with_values([sentence], slice_word, suv_word)


def extract_slice_suv_sentences(text: str, slice_word: str = "slice", suv_word: str = "suv",
                                stop_after_multi_semicolon: bool = True) -> list[SliceSuvSentence]:
    """Sentences of a report that state both a slice and an SUV, with their values (module docstring, step 2).

    Args:
        text: report text (apply :func:`clean_report` first, as the official pipeline does).
        slice_word, suv_word: the keywords (case-insensitive).
        stop_after_multi_semicolon: the official code stops reading the report after the first sentence with two or
            more ``;`` (a ``break`` in its loop); False reads on.

    Returns:
        One :class:`SliceSuvSentence` per sentence or ``;`` part, in report order.
    """
    results: list[SliceSuvSentence] = []
    for sentence in _SENTENCE_END.split(_separate_glued_sentences(text)):
        if any(template in sentence for template in _BACKGROUND_SENTENCES):
            continue
        n_semicolons = sentence.count(";")
        if n_semicolons >= 2:
            results += _parts_with_values(sentence.split(";"), slice_word, suv_word)
            if stop_after_multi_semicolon:
                break
        elif n_semicolons == 1:
            results += _split_on_semicolon(sentence, slice_word, suv_word)
        else:
            results += _parts_with_values([sentence], slice_word, suv_word)
    return results


def count_slice_suv_mentions(sentence: str) -> tuple[int, int]:
    """(slice mentions, SUV mentions) as the official multiple-value filter counts them.

    A slice mention is ``slice`` + words + an integer, an SUV mention is ``SUV`` + words + a decimal; the word run
    is greedy, so "slice 64 and on slice 66" is one mention and "SUV max 12" (no decimal) is none.
    """
    return len(_SLICE_MENTION.findall(sentence)), len(_SUV_MENTION.findall(sentence))


def mentions_prior_study(sentence: str) -> bool:
    """True when the sentence says ``previous`` or ``previously`` (a second SUV then refers to the prior scan)."""
    return bool(_PRIOR_STUDY.search(sentence))


def keep_after_multiple_value_filter(sentence: str) -> bool:
    """The official multiple-value filter (module docstring, step 3): False drops the sentence."""
    n_slice, n_suv = count_slice_suv_mentions(sentence)
    if n_suv > 2:
        return False
    if n_slice == 1 and n_suv > 1:
        return mentions_prior_study(sentence)
    return n_slice <= 1


_PROMPT_INSTRUCTION = ("You extract numbers from one sentence of a PET/CT report. Return the axial slice number "
                       "and the SUV max of the finding on the current scan, not of a prior study. If the sentence "
                       "gives several slice numbers, return 0 for both.")
_PROMPT_EXAMPLES = (
    ("A 1.6 cm right axillary node shows SUV max 5.8 on axial slice 97.", "Slice: 97\nSUV: 5.8"),
    ("The left adrenal nodule (slice 161) has SUV max of 3.4, previously 6.0.", "Slice: 161\nSUV: 3.4"),
    ("Two mesenteric nodes show SUV max 4.1 and 3.6 on slices 180 and 186.", "Slice: 0\nSUV: 0"),
)


def extraction_prompt(sentence: str) -> str:
    """Few-shot ``[INST]`` prompt asking for ``Slice: N`` / ``SUV: x`` of ``sentence`` (module docstring, step 5)."""
    turns = [f"[INST]\n{_PROMPT_INSTRUCTION}\nSentence: {s}\n[/INST]\n{answer}" for s, answer in _PROMPT_EXAMPLES]
    return "<s> " + "\n".join(turns) + f"\n</s>\n[INST]\n{_PROMPT_INSTRUCTION}\nSentence: {sentence}\n[/INST]"


def parse_llm_response(response: str) -> tuple[int | None, float | None]:
    """``(slice, suv)`` from an LLM answer; None where absent. An SUV that is not a number (``"8.4."``) voids both,
    as in the official ``extract_values``."""
    slice_match = _LLM_SLICE.search(response)
    suv_match = _LLM_SUV.search(response)
    try:
        slice_value = int(slice_match.group(1)) if slice_match else None
        suv_value = float(suv_match.group(1)) if suv_match else None
    except ValueError:
        return None, None
    return slice_value, suv_value


def consensus_vote(values: Sequence[Hashable], min_votes: int = 2) -> Hashable | None:
    """The most frequent value (ties: the one seen first) if at least ``min_votes`` voters gave it, else None."""
    if not values:
        raise ValueError("consensus_vote: values is empty; give one answer per model")
    counts = Counter(values)
    best = max(counts, key=counts.get)  # Counter keeps first-seen order, so ties go to the earlier model
    return best if counts[best] >= min_votes else None


def llm_slice_suv(sentence: str, models: Sequence[LanguageModel],
                  min_votes: int = 2) -> tuple[int | None, float | None]:
    """Slice and SUV of ``sentence`` by consensus of ``models`` (module docstring, step 5); None without consensus.

    Each model's missing value counts as 0 (so models answering "0" or nothing can agree on 0).
    """
    if not models:
        raise ValueError("llm_slice_suv: models is empty; give at least one Callable[[str], str]")
    prompt = extraction_prompt(sentence)
    answers = [parse_llm_response(model(prompt)) for model in models]
    slices = [0 if s is None else s for s, _ in answers]
    suvs = [0.0 if v is None else float(v) for _, v in answers]
    return consensus_vote(slices, min_votes), consensus_vote(suvs, min_votes)


def _as_slice_number(value: str) -> int:
    return int(float(value))


def extract_findings(report: str, *, models: Sequence[LanguageModel] | None = None, min_votes: int = 2,
                     sentence_filter: Callable[[str], bool] | None = None, min_suv: float = MIN_SUV,
                     clean: bool = True, stop_after_multi_semicolon: bool = True) -> list[Finding]:
    """The whole text side of the weak-label pipeline: report -> findings with a slice and an SUVmax >= ``min_suv``.

    Args:
        report: the findings section of one report.
        models: language models for the extraction step (``Callable[[str], str]``); None uses the regex values.
        min_votes: models that must agree (official: 2 of 3).
        sentence_filter: extra keep/drop rule per sentence (official: "mentions anatomy"); None keeps all.
        min_suv: SUVmax threshold (official 2.5).
        clean: apply :func:`clean_report` first.
        stop_after_multi_semicolon: see :func:`extract_slice_suv_sentences`.

    Returns:
        Findings in report order. Sentences without consensus, with slice number 0 (the prompt's "several slices"
        answer; the official pipeline loses them later because no image slice matches) or below ``min_suv`` are
        dropped.
    """
    text = clean_report(report) if clean else report
    findings = []
    for item in extract_slice_suv_sentences(text, stop_after_multi_semicolon=stop_after_multi_semicolon):
        if not keep_after_multiple_value_filter(item.sentence):
            continue
        if sentence_filter is not None and not sentence_filter(item.sentence):
            continue
        if models:
            slice_number, suv = llm_slice_suv(item.sentence, models, min_votes)
        else:
            slice_number, suv = _as_slice_number(item.slice), float(item.suv)
        if slice_number is None or suv is None or slice_number <= 0 or suv < min_suv:
            continue
        findings.append(Finding(item.sentence, int(slice_number), float(suv)))
    return findings
