"""Sample quality and each sampler's speed and quality figures, with bootstrap intervals over the
prompts. Quality is exact where the data allows it: on the built-in corpus every sample is parsed
against the corpus's grammar (sentence validity, story correctness); diversity (distinct
continuations, distinct-n, unigram entropy) is read against the prompts' real continuations,
since a figure that rewards collapse is no figure; generative perplexity under an AR checkpoint
is secondary (it finds repeated words likely)."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from evals.decoders.common import Samples, generated_lengths
from pipelines import corpus
from trainer.objectives.masking import token_nll

BOOTSTRAP = 1000  # resamples of the prompts for the 90% intervals
INTERVAL = (5, 95)  # percentiles
# A decoder writes at the reference's quality when its exact measure (story correctness, or an
# arithmetic answer's accuracy) is at least this share of the reference's and its distinct
# continuations and distinct-2 at least DIVERSITY_SHARE of them.
CORRECTNESS_SHARE = 0.95
DIVERSITY_SHARE = 0.9
EXACT_KEYS = ("story_correctness", "accuracy")  # the exact measures: the built-in grammar, a final number
DIVERSITY_KEYS = ("distinct_continuations", "distinct_2")
REFERENCE_KEYS = (*EXACT_KEYS, *DIVERSITY_KEYS, "gen_ppl")  # a reference's figures
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def exact_key(metrics: dict[str, Any]) -> str | None:
    """Which exact measure `metrics` carry (None on data without one, such as real TinyStories)."""
    return next((key for key in EXACT_KEYS if metrics.get(key) is not None), None)


def final_number(text: str) -> str:
    """The last number of `text` without thousands separators ("" if none): an answer's result."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else ""


class Prompts(NamedTuple):
    """What samples are read against: the prompts' validation documents."""
    tokenizer: Tokenizer
    bos_id: int | None  # a document's first token, not text
    real: list[np.ndarray]  # each prompt's real continuation (at most gen_length tokens, through its EOS)
    grammar: bool  # every document is a correct story of the built-in corpus: samples are checked

    def text(self, tokens: np.ndarray) -> str:
        """The text of `tokens`, special tokens (a mask left in a sample) written out, a leading BOS not."""
        tokens = np.asarray(tokens).tolist()
        return self.tokenizer.decode(tokens[1:] if tokens[:1] == [self.bos_id] else tokens, skip_special_tokens=False)


def read_prompts(tokenizer: Tokenizer, documents: list[np.ndarray], prompt_len: int, gen_length: int,
                 ids: dict[str, int | None]) -> Prompts:
    """The real continuations of the prompts, and whether the built-in grammar describes the data
    (every document parses as a correct story: real TinyStories never does). `ids`: the special ids."""
    eos = ids["eos"]
    real = [_to_eos(doc[prompt_len:prompt_len + gen_length], eos, keep=True) for doc in documents]
    prompts = Prompts(tokenizer, ids.get("bos"), real, False)
    grammar = all(corpus.check_story("", prompts.text(_to_eos(doc, eos)), ended=True).correct for doc in documents)
    return prompts._replace(grammar=grammar)


def _to_eos(tokens: np.ndarray, eos_id: int, keep: bool = False) -> np.ndarray:
    """`tokens` up to their first EOS (`keep`: through it, as a sample's generated tokens are counted)."""
    ends = np.flatnonzero(tokens == eos_id)
    return tokens[:ends[0] + keep] if len(ends) else tokens


def unigram_entropy(sequences: list[np.ndarray]) -> float:
    """Entropy in bits of the tokens pooled over the samples (collapse onto few words lowers it)."""
    _, counts = np.unique(np.concatenate(sequences) if sequences else np.zeros(0, np.int64), return_counts=True)
    p = counts / max(counts.sum(), 1)
    return float(-(p * np.log2(p)).sum())


def diversity(sequences: list[np.ndarray]) -> dict[str, float]:
    """Distinct continuations (unique samples / samples: prompts continued into the same text),
    distinct-n and unigram entropy."""
    return {"distinct_continuations": len({tuple(s.tolist()) for s in sequences}) / max(len(sequences), 1),
            **{f"distinct_{n}": distinct_n(sequences, n) for n in (1, 2, 3)},
            "unigram_entropy": unigram_entropy(sequences)}


def story_checks(out: Samples, prompt_len: int, eos_id: int, prompts: Prompts) -> list[corpus.StoryCheck]:
    """Each sample parsed against the built-in grammar (prompt + generation to its first EOS; a
    sample without EOS was cut at the generation limit, so its last sentence is judged as a prefix)."""
    checks = []
    for row in out.tokens:
        generated = row[prompt_len:]
        ended = bool((generated == eos_id).any())
        checks.append(corpus.check_story(prompts.text(row[:prompt_len]), prompts.text(_to_eos(generated, eos_id)),
                                         ended))
    return checks


def correctness(checks: list[corpus.StoryCheck]) -> dict[str, Any]:
    """Story correctness (share of samples without an error) and sentence validity (valid / complete
    generated sentences), each with its interval; and each sample's first error ("" = none)."""
    valid = np.array([c.valid for c in checks], float)
    sentences = np.array([c.sentences for c in checks], float)
    correct = np.array([c.correct for c in checks], float)
    return {"story_correctness": float(correct.mean()),
            "story_correctness_interval": pooled_interval(correct, np.ones_like(correct)),
            "sentence_validity": float(valid.sum() / max(sentences.sum(), 1)),
            "sentence_validity_interval": pooled_interval(valid, sentences),
            "story_errors": [c.errors[0] if c.errors else "" for c in checks]}


def length_distance(lengths_N: np.ndarray, real_M: np.ndarray, bin_width: int = 8) -> float:
    """Total variation between the histograms (bins of `bin_width` tokens) of the samples' generated
    lengths and the real continuations' (each through its EOS, cut at gen_length): 0 = the same
    distribution, 1 = disjoint. How well a decoder that chooses its length (Edit Flows) chooses it."""
    bins = int(max(lengths_N.max(initial=0), real_M.max(initial=0))) // bin_width + 1
    ours = np.bincount(lengths_N // bin_width, minlength=bins) / max(len(lengths_N), 1)
    theirs = np.bincount(real_M // bin_width, minlength=bins) / max(len(real_M), 1)
    return float(0.5 * np.abs(ours - theirs).sum())


def real_continuations(prompts: Prompts) -> dict[str, Any]:
    """The figures of the data itself, what a sampler's diversity is read against."""
    return {"sequences": len(prompts.real), "mean_length": float(np.mean([len(r) for r in prompts.real])),
            **diversity(prompts.real),
            **({"story_correctness": 1.0, "sentence_validity": 1.0} if prompts.grammar else {})}


def versus_reference(metrics: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """A sampler's quality as ratios to the reference's, and whether it is at the reference's
    quality (exact measures only: absent where the data has no checker)."""
    ratios = {f"{key}_vs_reference": metrics[key] / reference[key]
              for key in REFERENCE_KEYS
              if metrics.get(key) is not None and reference.get(key)}
    exact = exact_key(reference)
    shares = {exact: CORRECTNESS_SHARE, **dict.fromkeys(DIVERSITY_KEYS, DIVERSITY_SHARE)}
    if exact and all(metrics.get(key) is not None and reference.get(key) is not None for key in shares):
        ratios["at_reference_quality"] = all(metrics[key] >= share * reference[key] for key, share in shares.items())
    return ratios


def distinct_n(sequences: list[np.ndarray], n: int) -> float:
    """Unique n-grams / all n-grams over the samples (1.0 = no repetition)."""
    grams = [tuple(s[i:i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def generated_nll(graphdef, params, tokens_BT: np.ndarray, prompt_len: int, lengths_B: np.ndarray) -> np.ndarray:
    """[B] summed NLL of each sample's generated tokens (up to its first EOS) given its prompt,
    under a causal (AR) model."""
    model = nnx.merge(graphdef, params)
    tokens = jnp.asarray(tokens_BT)
    segments = jnp.ones_like(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    nll = np.asarray(token_nll(model(tokens, segments, positions, causal=True)[:, :-1], tokens[:, 1:]))
    index = np.arange(1, tokens.shape[1])
    scored = (index >= prompt_len)[None, :] & (index < prompt_len + lengths_B[:, None])
    return np.where(scored, nll, 0.0).sum(1)


def pooled_interval(numerator_B: np.ndarray, denominator_B: np.ndarray, transform=lambda x: x,
                    seed: int = 0) -> list[float]:
    """90% bootstrap interval over the prompts of transform(sum numerator / sum denominator)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(numerator_B), (BOOTSTRAP, len(numerator_B)))
    values = transform(numerator_B[picks].sum(1) / np.maximum(denominator_B[picks].sum(1), 1))
    return [float(v) for v in np.percentile(values, INTERVAL)]


def sampler_metrics(out: Samples, prompt_len: int, eos_id: int, judge=None, prompts: Prompts | None = None) -> dict:
    """Speed and quality of one sampler's output, counted per sequence (as if decoded alone):
    tokens per forward = generated tokens (to the first EOS) / the forwards the sequences needed,
    each with a bootstrap interval over the prompts. `judge`: (graphdef, params) of an AR model
    for generative perplexity; `prompts`: the prompts' documents, for story correctness where the
    built-in grammar describes them."""
    lengths = generated_lengths(out, prompt_len, eos_id)
    generated = [row[prompt_len:prompt_len + n] for row, n in zip(out.tokens, lengths)]
    metrics = {
        "tokens_per_forward": float(lengths.sum() / max(out.forwards.sum(), 1)),
        "tokens_per_forward_interval": pooled_interval(lengths, out.forwards),
        "forwards_per_sequence": float(out.forwards.mean()),
        "batch_forwards": out.batch_forwards,
        "tokens_per_s": float(lengths.sum() / out.seconds),
        "seconds": round(out.seconds, 4),
        "mean_length": float(lengths.mean()),
        "sequences": len(lengths),
        **diversity(generated),
    }
    if prompts is not None:
        metrics["length_tv"] = length_distance(lengths, np.array([len(r) for r in prompts.real]))
    if prompts is not None and prompts.grammar:
        metrics.update(correctness(story_checks(out, prompt_len, eos_id, prompts)))
    if judge is not None:
        nll = generated_nll(*judge, out.tokens, prompt_len, lengths)
        metrics["gen_ppl"] = float(np.exp(nll.sum() / lengths.sum()))
        metrics["gen_ppl_interval"] = pooled_interval(nll, lengths, np.exp)
    return metrics
