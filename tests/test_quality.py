"""Sample quality: exact correctness against the built-in grammar, diversity against the real
continuations, and what "at the reference's quality" means."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from evals import quality
from evals.decoders.common import Samples
from pipelines import corpus

STORIES = list(corpus.generate_stories(40, seed=5))


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_dataset / "tokenizer.json"))


def _samples(tokenizer, prompt_len: int, texts: list[str], gen_length: int, eos: int) -> Samples:
    """Prompt + generation rows as a decoder returns them: EOS after the text, EOS-filled; a text
    longer than gen_length is cut at the limit (no EOS)."""
    rows = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        generated = (ids[prompt_len:] + [eos] * gen_length)[:gen_length]
        rows.append(ids[:prompt_len] + generated)
    tokens = np.array(rows, np.int32)
    return Samples(tokens, np.zeros_like(tokens), np.zeros_like(tokens), np.ones(len(rows), np.int32), 1, 1.0)


def test_samples_are_checked_only_where_the_grammar_describes_the_data(tokenizer):
    eos, bos = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|bos|>")
    docs = [np.array([bos] + tokenizer.encode(s).ids + [eos]) for s in STORIES[:4]]  # as preprocess writes them
    prompts = quality.read_prompts(tokenizer, docs, 16, 64, {"eos": eos, "bos": bos})
    assert prompts.grammar and all(len(r) == 64 and eos not in r for r in prompts.real)
    short = quality.read_prompts(tokenizer, docs, 16, 400, {"eos": eos, "bos": bos})  # the stories end inside
    assert [len(r) for r in short.real] == [len(d) - 16 for d in docs] and all(r[-1] == eos for r in short.real)
    real_tinystories = "One day, a little girl named Lily found a needle in her room. She knew it was difficult."
    other = quality.read_prompts(tokenizer, docs[:3] + [np.array(tokenizer.encode(real_tinystories).ids)], 16, 64,
                                 {"eos": eos, "bos": bos})
    assert not other.grammar
    out = _samples(tokenizer, 16, STORIES[:4], 64, eos)
    assert "story_correctness" in quality.sampler_metrics(out, 16, eos, prompts=prompts)
    assert "story_correctness" not in quality.sampler_metrics(out, 16, eos, prompts=other)  # absent, not zero


def test_correctness_counts_each_sample_and_cut_samples_are_judged_as_prefixes(tokenizer):
    eos = tokenizer.token_to_id("<|endoftext|>")
    story = STORIES[0]
    broken = story.replace(" found ", " found found ", 1)
    mask_left = story.replace(" showed it", " <|mask|> showed it", 1)
    early = story[:story.index("\n")]  # EOS after the first paragraph: the story is not finished
    out = _samples(tokenizer, 16, [story, story, broken, mask_left, early], 200, eos)
    cut = _samples(tokenizer, 16, [story], 40, eos)  # cut mid-sentence at the limit
    prompts = quality.Prompts(tokenizer, None, [], True)
    checks = quality.story_checks(out, 16, eos, prompts)
    assert [c.correct for c in checks] == [True, True, False, False, False]
    assert quality.story_checks(cut, 16, eos, prompts)[0].correct
    figures = quality.correctness(checks)
    assert figures["story_correctness"] == pytest.approx(0.4)
    low, high = figures["story_correctness_interval"]
    assert 0 <= low <= 0.4 <= high <= 1
    assert figures["story_errors"][0] == "" and "found found" in figures["story_errors"][2]
    valid = sum(c.valid for c in checks) / sum(c.sentences for c in checks)
    assert figures["sentence_validity"] == pytest.approx(valid) and valid < 1


def test_diversity_catches_prompts_continued_into_the_same_text():
    varied = [np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8]), np.array([1, 3, 5, 7])]
    collapsed = [np.array([9, 9, 9, 9])] * 3
    assert quality.diversity(varied)["distinct_continuations"] == 1.0
    assert quality.diversity(collapsed)["distinct_continuations"] == pytest.approx(1 / 3)
    assert quality.diversity(collapsed)["unigram_entropy"] == 0.0
    assert quality.diversity(varied)["unigram_entropy"] > quality.diversity(varied[:1])["unigram_entropy"] == 2.0


@pytest.mark.parametrize("correct, distinct, distinct_2, at", [
    (0.95, 0.9, 0.9, True), (0.94, 1.0, 1.0, False), (1.0, 0.89, 1.0, False), (1.0, 1.0, 0.89, False),
])
def test_at_the_references_quality_means_correct_and_as_diverse(correct, distinct, distinct_2, at):
    reference = {"story_correctness": 0.8, "distinct_continuations": 1.0, "distinct_2": 0.2, "gen_ppl": 10.0}
    metrics = {"story_correctness": 0.8 * correct, "distinct_continuations": distinct,
               "distinct_2": 0.2 * distinct_2, "gen_ppl": 5.0}
    ratios = quality.versus_reference(metrics, reference)
    assert ratios["at_reference_quality"] is at
    assert ratios["gen_ppl_vs_reference"] == 0.5  # a lower gen-ppl (repetition) earns nothing here
    assert "at_reference_quality" not in quality.versus_reference({"gen_ppl": 5.0, "distinct_2": 0.2}, reference)


def test_an_arithmetic_answer_is_judged_by_its_final_number_against_the_references_accuracy():
    """On the arithmetic task the exact measure is accuracy: the same shares decide the quality."""
    assert quality.final_number("3 x 1,200 = 3,600.\nThe answer is 3,600.") == "3600"
    assert quality.final_number("-2 + 5 = 3") == "3" and quality.final_number("no number") == ""
    reference = {"accuracy": 0.8, "distinct_continuations": 1.0, "distinct_2": 0.2}
    assert quality.exact_key(reference) == "accuracy" and quality.exact_key({"distinct_2": 0.2}) is None
    for accuracy, at in ((0.76, True), (0.75, False)):
        ratios = quality.versus_reference({**reference, "accuracy": accuracy}, reference)
        assert ratios["at_reference_quality"] is at and ratios["accuracy_vs_reference"] == accuracy / 0.8
