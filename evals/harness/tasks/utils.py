"""Data and metrics of the shipped tasks (the YAML files beside this one).

lm_eval calls each `custom_dataset` loader with the task's metadata, which holds the model_args
(run_dir, data_path, judge_run_dir, arithmetic_data) and --metadata: data comes from local or gs://
files named there, nothing is fetched from a hub, and no path is relative to the working directory.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re

import datasets

from evals import quality, runs
from trainer import data
from trainer.errors import ConfigError, DataError

log = logging.getLogger(__name__)
CHOICES = 4  # tinystories_cloze: the true last word and three distractors
PROMPT_WORDS = 12  # tinystories_continuation: words of a story given as its prompt
_LAST_WORD = re.compile(r"([A-Za-z]+)\W*$")
_FIRST_WORDS = re.compile(rf"(?:\S+\s+){{{PROMPT_WORDS}}}")


def validation_texts(run_dir: str, data_path: str) -> list[str]:
    """The validation documents of `data_path` (default: the run's data), decoded with its tokenizer."""
    path = data_path or (runs.load_config(run_dir).data.path if run_dir else "")
    if not path:
        raise ConfigError("the TinyStories tasks read a preprocess output's validation split: "
                          "pass run_dir (or data_path) in --model_args")
    manifest = data.load_manifest(path)
    tokenizer = runs.tokenizer(path, manifest)
    return [tokenizer.decode(doc["tokens"].tolist()).strip() for doc in data.documents(path, manifest, "validation")]


def distractors(words: list[str], index: int, count: int) -> list[str]:
    """The next `count` distinct words after `index` (wrapping) that differ from words[index]."""
    found: list[str] = []
    for step in range(1, len(words)):
        word = words[(index + step) % len(words)]
        if word.lower() != words[index].lower() and word not in found:
            found.append(word)
            if len(found) == count:
                break
    return found


def load_cloze(run_dir: str = "", data_path: str = "", **_) -> dict[str, datasets.Dataset]:
    """Each validation story's last word against three stories' last words, the true one at a place
    that cycles through the choices."""
    endings = [(text[:m.start(1)].rstrip(), m.group(1)) for text in validation_texts(run_dir, data_path)
               if (m := _LAST_WORD.search(text)) and text[:m.start(1)].strip()]
    words = [word for _, word in endings]
    docs = []
    for index, (context, word) in enumerate(endings):
        others = distractors(words, index, CHOICES - 1)
        if len(others) == CHOICES - 1:
            label = index % CHOICES
            docs.append({"context": context, "choices": [*others[:label], word, *others[label:]], "label": label})
    return {"test": datasets.Dataset.from_list(docs)}


def load_continuation(run_dir: str = "", data_path: str = "", judge_run_dir: str = "",
                      **_) -> dict[str, datasets.Dataset]:
    """Each validation story's first words as the prompt, the rest as the reference."""
    docs = [{"prompt": m.group(0).rstrip(), "reference": text[m.end():], "judge_run_dir": judge_run_dir}
            for text in validation_texts(run_dir, data_path) if (m := _FIRST_WORDS.match(text))]
    return {"test": datasets.Dataset.from_list(docs)}


def load_arithmetic(arithmetic_data: str = "", **_) -> dict[str, datasets.Dataset]:
    """DMax-layout rows (question/answer or chat messages; .jsonl/.json or .parquet, local or gs://),
    parsed as the preprocess job parses them; the target is the answer's last number."""
    from pipelines import documents, sources  # Beam's file systems: only this task needs them

    path = arithmetic_data or os.environ.get("DLM_ARITHMETIC_DATA", "")
    if not path:
        raise ConfigError("arithmetic_word_problems reads DMax-layout rows: pass arithmetic_data=FILE in "
                          "--model_args or --metadata, or set DLM_ARITHMETIC_DATA")
    try:
        units = sources.plan_file_units(sources.expand_inputs([path]), 64 << 20,
                                        columns=(("question", "answer"), ("messages",)))
        parsed = [documents.validate(record, "dmax_trajectories", "text", math.inf)
                  for unit in units for record in sources.read_unit(unit)]
    except sources.UserError as e:
        raise DataError(str(e)) from None
    docs = [{"question": question, "answer": answer, "target": target}
            for doc in parsed if isinstance(doc, documents.Document)
            for question, answer in [doc.texts] if (target := quality.final_number(answer))]
    if len(docs) < len(parsed):
        log.warning("arithmetic_word_problems: %d of %d rows of %s are malformed or have no number in their "
                    "answer; left out", len(parsed) - len(docs), len(parsed), path)
    return {"test": datasets.Dataset.from_list(docs)}


def continuation_results(doc: dict, results: list[str]) -> dict:
    """Per story: its generation, for distinct-2, and (prompt, generation, judge), for gen-ppl."""
    return {"distinct_2": results[0], "gen_ppl": (doc["prompt"], results[0], doc["judge_run_dir"])}


def distinct_2(generations: list[str]) -> float:
    """Distinct bigrams of words over all generations (tokenizer independent)."""
    return quality.distinct_n([g.split() for g in generations], 2)


@functools.cache
def judge(run_dir: str):
    """The harness model of an AR run's latest checkpoint (exact scores only)."""
    from evals.config import HarnessSettings, SamplingConfig
    from evals.harness import checkpoint, model

    lm = model.DiffusionLM(checkpoint.load(run_dir), HarnessSettings(), SamplingConfig())
    if not lm.objective.exact:
        raise ConfigError(f"judge_run_dir {run_dir} is not an AR run (objective {lm.objective.name})")
    return lm


def gen_ppl(items: list[tuple[str, str, str]]) -> float:
    """Perplexity of the generations given their prompts under the judge (NaN without one)."""
    judge_run_dir = items[0][2] if items else ""
    if not judge_run_dir:
        log.warning("tinystories_continuation: no judge_run_dir (an AR run) given, so no gen_ppl")
        return math.nan
    return judge(judge_run_dir).perplexity([(prompt, generation) for prompt, generation, _ in items if generation])
