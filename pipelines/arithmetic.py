"""The built-in arithmetic task: seeded word problems with step-by-step answers, offline.

A task with right answers, as DMax judges its headline: each row is a question and an answer that
works the numbers out step by step and ends with "The answer is N." Rows are in DMax's trajectory
layout (`question`/`answer` JSON lines), so the preprocess job reads them as `dmax_trajectories`
and the `arithmetic_word_problems` harness task scores a model's final number by exact match.
Numbers stay at most `max_number` (sums twice that) so a small model learns them on CPU. Writes
`train.jsonl` and `heldout.jsonl`, whose questions never occur in the train file.

    python -m pipelines.arithmetic --output data/arithmetic --num_train 20000 --num_heldout 500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Iterator

from pipelines import signals, storage

NAMES = ["Tom", "Mia", "Ben", "Lily", "Sam", "Anna", "Max", "Lucy", "Jack", "Emma"]
ITEMS = ["apples", "stickers", "shells", "cookies", "marbles", "pencils", "stones", "cards"]


def _more(rng: random.Random, top: int) -> tuple[str, str]:
    name, items, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, top), rng.randint(1, top)
    return (f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?",
            f"{name} starts with {a} {items}. After getting {b} more, {name} has {a} + {b} = {a + b}.\n"
            f"The answer is {a + b}.")


def _left(rng: random.Random, top: int) -> tuple[str, str]:
    name, items, a = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, top)
    b = rng.randint(1, a - 1)
    return (f"{name} has {a} {items} and gives away {b}. How many {items} are left?",
            f"{name} starts with {a} {items}. After giving away {b}, {name} has {a} - {b} = {a - b}.\n"
            f"The answer is {a - b}.")


def _boxes(rng: random.Random, top: int) -> tuple[str, str]:
    items, a, b = rng.choice(ITEMS), rng.randint(2, 5), rng.randint(2, top)
    return (f"There are {a} boxes with {b} {items} in each box. How many {items} are there in total?",
            f"The boxes hold {a} x {b} = {a * b} {items}.\nThe answer is {a * b}.")


def _two_steps(rng: random.Random, top: int) -> tuple[str, str]:
    name, items, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, top), rng.randint(1, top)
    c = rng.randint(1, min(top, a + b - 1))
    return (f"{name} has {a} {items} and buys {b} more. Then {name} gives away {c}. "
            f"How many {items} does {name} have now?",
            f"{name} starts with {a} {items}. After buying {b} more, {name} has {a} + {b} = {a + b}. "
            f"After giving away {c}, {name} has {a + b} - {c} = {a + b - c}.\nThe answer is {a + b - c}.")


TEMPLATES: list[Callable[[random.Random, int], tuple[str, str]]] = [_more, _left, _boxes, _two_steps]


def generate_problems(count: int, seed: int = 0, max_number: int = 10) -> Iterator[dict[str, str]]:
    """Yields `count` rows {"question", "answer"} with distinct questions, the same for the same seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    misses = 0
    while len(seen) < count:
        question, answer = rng.choice(TEMPLATES)(rng, max_number)
        if question in seen:
            misses += 1
            if misses > 100 * count:
                raise ValueError(f"fewer than {count} distinct problems with numbers up to {max_number}: "
                                 f"raise --max_number or lower the count")
            continue
        seen.add(question)
        yield {"question": question, "answer": answer}


def write_splits(output: str, num_train: int, num_heldout: int, seed: int, max_number: int) -> None:
    """`output`/train.jsonl and `output`/heldout.jsonl (local or gs://, each written whole):
    distinct questions, none in both."""
    rows = list(generate_problems(num_train + num_heldout, seed, max_number))
    for name, part in (("train", rows[:num_train]), ("heldout", rows[num_train:])):
        storage.write_bytes_atomic(storage.join(output, f"{name}.jsonl"),
                                   "".join(json.dumps(row) + "\n" for row in part).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="Folder for train.jsonl and heldout.jsonl (local or gs://).")
    parser.add_argument("--num_train", type=int, default=20000, help="Training problems.")
    parser.add_argument("--num_heldout", type=int, default=500, help="Held-out problems (accuracy).")
    parser.add_argument("--max_number", type=int, default=10, help="Largest number in a question.")
    parser.add_argument("--seed", type=int, default=0, help="Generator seed.")
    args = parser.parse_args(argv)
    if min(args.num_train, args.num_heldout) < 1 or args.max_number < 2:
        parser.error("--num_train and --num_heldout must be at least 1 and --max_number at least 2")
    return signals.exit_status(lambda: _write(args))


def _write(args: argparse.Namespace) -> int:
    try:
        write_splits(args.output, args.num_train, args.num_heldout, args.seed, args.max_number)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.num_train} training and {args.num_heldout} held-out problems to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
