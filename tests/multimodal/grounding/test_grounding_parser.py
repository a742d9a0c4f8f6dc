"""Report parser of the PET/CT weak-label pipeline: parity with the official regex steps, LLM consensus, findings."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from zoo.multimodal.grounding.report_parser import (
    Finding,
    clean_report,
    consensus_vote,
    count_slice_suv_mentions,
    extract_findings,
    extract_slice_suv_sentences,
    extraction_prompt,
    keep_after_multiple_value_filter,
    llm_slice_suv,
    mentions_prior_study,
    parse_llm_response,
)

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "parity" / "petct_parser" / "report_parser.json"
CASES = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("case", CASES["sentence_cases"], ids=lambda c: c["sentence"][:40])
def test_sentence_steps_match_official(case):
    sentence = case["sentence"]
    got = [{"sentence": s.sentence, "slice": s.slice, "suv": s.suv} for s in extract_slice_suv_sentences(sentence)]
    assert got == case["extracted"]
    assert count_slice_suv_mentions(sentence) == (case["slice_count"], case["suv_count"])
    assert mentions_prior_study(sentence) is case["contains_previous"]
    assert keep_after_multiple_value_filter(sentence) is case["kept_after_multiple_filter"]


@pytest.mark.parametrize("case", CASES["llm_response_cases"], ids=lambda c: c["response"][:24])
def test_llm_response_parsing_matches_official(case):
    slice_value, suv_value = parse_llm_response(case["response"])
    assert (slice_value, suv_value) == (case["slice"], case["suv"])
    # the pipeline stores a missing value as 0
    assert (slice_value or 0, suv_value or 0) == (case["pipeline_slice"], case["pipeline_suv"])


def test_clean_report_normalises_export_artifacts():
    raw = "FINDINGS:_x000D_\n# Node on slice 88...SUV max 6.2   Spleen normal.\n\n"
    # as officially: the run of 4 spaces left by "_x000D_\n# " holds a triple space, which becomes ". "
    assert clean_report(raw) == "FINDINGS:. Node on slice 88. SUV max 6.2. Spleen normal."


def test_sentence_split_handles_glued_periods_and_templates():
    text = ("No FDG avid lung nodules are noted.Physiologic uptake in bowel. Background liver metabolic activity "
            "has SUV max 2.2 on slice 120. Right axillary node SUV max 4.1 on slice 97.Left hilar node is on "
            "slice 110 with SUV max 3.3.")
    got = [(s.slice, s.suv) for s in extract_slice_suv_sentences(text)]
    assert got == [("97", "4.1"), ("110", "3.3")]


def test_semicolons_split_and_the_official_early_stop():
    two = "Node A on slice 10 with SUV 3.5; node B on slice 20 with SUV 4.5."
    assert [(s.slice, s.suv) for s in extract_slice_suv_sentences(two)] == [("10", "3.5"), ("20", "4.5")]
    one_sided = "Node A on slice 10 with SUV 3.5; smaller node nearby."
    assert [s.sentence for s in extract_slice_suv_sentences(one_sided)] == [one_sided]
    many = "A slice 1 SUV 3.1; b slice 2 SUV 3.2; c. Later node on slice 30 with SUV max 5.5."
    assert [s.slice for s in extract_slice_suv_sentences(many)] == ["1", "2"]  # official: stops reading here
    assert [s.slice for s in extract_slice_suv_sentences(many, stop_after_multi_semicolon=False)] == ["1", "2", "30"]


def test_consensus_vote():
    assert consensus_vote([88, 88, 12]) == 88
    assert consensus_vote([88, 12, 7]) is None
    assert consensus_vote([3.1, 4.0, 4.0, 3.1], min_votes=2) == 3.1  # tie: the first model's answer
    assert consensus_vote([0, 0, 101]) == 0
    with pytest.raises(ValueError, match="values is empty"):
        consensus_vote([])


def _answering_model(slice_offset: int = 0, suv_text: str | None = None):
    """A deterministic fake LLM: reads the last sentence of the prompt with the official regexes."""
    def model(prompt: str) -> str:
        sentence = prompt.rsplit("Sentence: ", 1)[1].split("\n[/INST]")[0]
        found = extract_slice_suv_sentences(sentence)[0]
        return f"Slice: {int(found.slice) + slice_offset}\nSUV: {suv_text or found.suv}"
    return model


def test_prompt_ends_with_the_sentence():
    prompt = extraction_prompt("Node on slice 5 with SUV 3.0.")
    assert prompt.rstrip().endswith("Sentence: Node on slice 5 with SUV 3.0.\n[/INST]")
    assert prompt.count("[INST]") == 4 and "Slice: 0\nSUV: 0" in prompt


def test_llm_consensus_over_fake_models():
    sentence = "Left axillary node on slice 97 has SUV max 5.8."
    good, off_by_one, broken = _answering_model(), _answering_model(slice_offset=1), _answering_model(suv_text="5.8.")
    assert llm_slice_suv(sentence, [good, good, off_by_one]) == (97, 5.8)
    # "5.8." voids both values of that model: its (0, 0) cannot outvote two agreeing models
    assert llm_slice_suv(sentence, [broken, good, good]) == (97, 5.8)
    assert llm_slice_suv(sentence, [good, off_by_one, broken]) == (None, 5.8)  # votes are per value


def test_extract_findings_runs_every_step():
    report = ("Physiologic uptake in the brain. Right cervical node (slice 88) has SUV max 6.2. "
              "Background liver metabolic activity has SUV max 2.6 on slice 150. "
              "Mild hilar uptake on slice 131 with SUV max 2.1. "
              "Iliac lesion on slice 233 with SUV max 9.0 and sacral lesion on slice 240 with SUV max 7.5. "
              "Spleen: uptake on slice 176 with SUV max 3.4.")
    want = [Finding("Right cervical node (slice 88) has SUV max 6.2.", 88, 6.2),
            Finding("Spleen: uptake on slice 176 with SUV max 3.4.", 176, 3.4)]
    assert extract_findings(report) == want  # 2.1 < 2.5 dropped; two slices dropped; template skipped
    models = [_answering_model(), _answering_model(), _answering_model(slice_offset=3)]
    assert extract_findings(report, models=models) == want
    no_spleen = extract_findings(report, sentence_filter=lambda s: not re.search(r"spleen", s, re.IGNORECASE))
    assert no_spleen == want[:1]
    assert extract_findings(report, models=[_answering_model(slice_offset=n) for n in range(3)]) == []
