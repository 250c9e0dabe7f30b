"""The built-in arithmetic task: right answers, distinct held-out questions, DMax's layout through Beam."""

from __future__ import annotations

import json
import re

from pipelines import arithmetic, manifest, preprocess

STEP = re.compile(r"(\d+) ([+x-]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}


def test_problems_are_seeded_distinct_and_every_step_is_right():
    rows = list(arithmetic.generate_problems(3000, seed=4, max_number=10))
    assert rows == list(arithmetic.generate_problems(3000, seed=4, max_number=10))
    assert rows != list(arithmetic.generate_problems(3000, seed=5, max_number=10))
    assert len({r["question"] for r in rows}) == 3000
    for row in rows:
        steps = STEP.findall(row["answer"])
        assert steps, row
        for a, op, b, result in steps:
            assert OPS[op](int(a), int(b)) == int(result) >= 0, row
        assert row["answer"].endswith(f"\nThe answer is {steps[-1][3]}.")
        assert all(int(n) <= 10 for n in re.findall(r"\d+", row["question"]))
    for phrase in ("gets", "are left", "boxes", "buys"):  # every template is drawn
        assert any(phrase in row["question"] for row in rows), phrase


def test_heldout_questions_are_never_trained_on_and_preprocess_reads_the_rows(tmp_path):
    arithmetic.write_splits(str(tmp_path), 400, 50, seed=0, max_number=10)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 400 and len(heldout) == 50
    assert not {r["question"] for r in train} & {r["question"] for r in heldout}
    out = tmp_path / "data"
    assert preprocess.main(["--dataset", "dmax_trajectories", "--input", str(tmp_path / "train.jsonl"), "--output",
                            str(out), "--vocab_size", "300", "--num_shards", "1"]) == 0
    splits = manifest.load(str(out))["splits"]
    assert splits["train"]["num_records"] + splits["validation"]["num_records"] == 400


def test_an_impossible_request_is_one_line(tmp_path, capsys):
    assert arithmetic.main(["--output", str(tmp_path), "--num_train", "100000", "--max_number", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "raise --max_number" in err
    assert not (tmp_path / "train.jsonl").exists()
