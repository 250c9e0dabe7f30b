"""Self-generated trajectories: deterministic, resumable without losing or duplicating a row, and
tokenized back by the preprocess job with the same meaning; OPUT starts from a bd3lm run."""

from __future__ import annotations

import json

import jax

import pytest

from evals import quality, trajectories
from evals.trajectories import TrajectoriesConfig
from pipelines import preprocess
from tests.conftest import TINY_MODEL
from trainer import config as config_lib
from trainer import data, train
from trainer.errors import ConfigError, MismatchError

SMALL = ["num_prompts=10", "prompt_tokens=6", "batch_size=4", "rows_per_part=4", "sampling.gen_length=24"]


def make(run_dir, output, *overrides):
    cfg = config_lib.load_into(TrajectoriesConfig(), None, [*SMALL, *overrides])
    return trajectories.generate_trajectories(str(run_dir), str(output), cfg)


def rows_of(output) -> list[dict]:
    return [json.loads(line) for part in sorted(output.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(bd3lm_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("trajectories") / "straight"
    return make(bd3lm_run, output), output


def test_trajectories_are_deterministic_and_described(straight, bd3lm_run, tmp_path):
    result, output = straight
    again = make(bd3lm_run, tmp_path / "again")
    assert rows_of(tmp_path / "again") == rows_of(output) and len(rows_of(output)) == result["rows"] == 10
    assert result["files"] == again["files"] and len(result["files"]) == 3  # 10 prompts in parts of 4
    sidecar = json.loads((output / "trajectories.json").read_text())
    assert sidecar["model"]["step"] == 40 and sidecar["model"]["objective"] == "bd3lm"
    assert sidecar["sampler"] == "threshold" and sidecar["settings"]["sampling"]["gen_length"] == 24
    row = rows_of(output)[0]
    assert set(row) == {"question", "answer"} and row["question"] and row["answer"]


def test_each_batch_is_decoded_once_with_its_own_noise(bd3lm_run, tmp_path, monkeypatch):
    """10 identical prompts sampled at temperature 1 in batches of 4 (parts of 4): every batch is
    decoded exactly once, and no two batches draw the same noise (their samples differ)."""
    from evals import decoders

    real, calls = decoders.generate, []

    def counted(*args, **kwargs):
        calls.append(args[3].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(decoders, "generate", counted)
    one_prompt = [trajectories.Prompt(i, prompt.tokens, prompt.question) for i, prompt in
                  enumerate([trajectories.prompts(str(config_lib.load_run(bd3lm_run).data.path), "train",
                                                  TrajectoriesConfig(prompt_tokens=6, num_prompts=1),
                                                  _tokenizer(bd3lm_run))[0]] * 10)]
    monkeypatch.setattr(trajectories, "prompts", lambda *args: one_prompt)
    make(bd3lm_run, tmp_path / "noisy", "sampling.temperature=1.0")
    assert calls == [4, 4, 4]  # parts of 4, 4 and 2 prompts: one batch each, one decode each
    answers = [r["answer"] for r in rows_of(tmp_path / "noisy")]
    assert len(answers) == 10 and len({answers[0], answers[4], answers[8]}) == 3  # first row of each batch


def _tokenizer(run_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(config_lib.load_run(run_dir).data.path) + "/tokenizer.json")


def test_a_killed_job_resumes_without_losing_or_duplicating_rows(straight, bd3lm_run, tmp_path, monkeypatch):
    _, reference = straight
    output = tmp_path / "killed"
    real, calls = trajectories.decode_part, []

    def dies_on_the_second_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            (output / ".part-00001-of-00003.jsonl.tmp-dead").write_text('{"question": "half')  # a torn write
            raise KeyboardInterrupt  # the job is killed here
        return real(*args, **kwargs)

    monkeypatch.setattr(trajectories, "decode_part", dies_on_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        make(bd3lm_run, output)
    assert not (output / "trajectories.json").exists() and len(list(output.glob("part-*"))) == 1
    monkeypatch.setattr(trajectories, "decode_part", real)
    calls.clear()
    resumed = make(bd3lm_run, output)
    assert rows_of(output) == rows_of(reference) and resumed["rows"] == 10  # same rows, once each
    assert make(bd3lm_run, output) == resumed  # finished: nothing is redone
    with pytest.raises(config_lib.ConfigError, match="other settings"):
        make(bd3lm_run, output, "sampling.threshold=0.5")


def test_trajectories_round_trip_through_preprocess(straight, tiny_dataset, tmp_path):
    _, output = straight
    out = tmp_path / "data"
    assert preprocess.main(["--dataset", "dmax_trajectories", "--input", str(output / "part-*.jsonl"),
                            "--output", str(out), "--tokenizer", str(tiny_dataset / "tokenizer.json"),
                            "--prompt_suffix", "", "--num_shards", "1", "--validation_fraction", "0"]) == 0
    manifest = data.load_manifest(str(out))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    decoded = set()
    for doc in data.documents(str(out), manifest, "train"):
        prompt_len = int(doc["prompt_len"])
        decoded.add((tokenizer.decode(doc["tokens"][:prompt_len].tolist()),
                     tokenizer.decode(doc["tokens"][prompt_len:].tolist())))
    # Preprocess strips the prompt and the response's trailing whitespace (pipelines/documents.py).
    assert decoded == {(r["question"].strip(), r["answer"].rstrip()) for r in rows_of(output)}
    # The prompts are exactly the documents' first tokens: the cut fell between pre-tokens.
    assert all(len(doc["tokens"][:int(doc["prompt_len"])]) == 6 for doc in data.documents(str(out), manifest, "train"))


def test_oput_starts_from_a_bd3lm_run_only_when_tokenizer_and_blocks_match(bd3lm_run, trajectory_dataset, straight,
                                                                         tiny_dataset, tmp_path):
    _, output = straight
    own = tmp_path / "own"
    assert preprocess.main(["--dataset", "dmax_trajectories", "--input", str(output / "part-*.jsonl"),
                            "--output", str(own), "--tokenizer", str(tiny_dataset / "tokenizer.json"),
                            "--prompt_suffix", "", "--num_shards", "1", "--validation_fraction", "0"]) == 0
    common = [*TINY_MODEL, "objective.name=oput", "train.steps=2", "train.checkpoint_every=2",
              f"train.init_from_run={bd3lm_run}", "data.seq_len=32", "objective.supervised_eos=4"]
    cfg = config_lib.load(None, [*common, f"data.path={own}", f"run_dir={tmp_path / 'oput'}", "objective.block_size=8"])
    assert train.run(cfg) == 0
    wrong_blocks = config_lib.load(None, [*common, f"data.path={own}", f"run_dir={tmp_path / 'b'}",
                                          "objective.block_size=16"])
    with pytest.raises(MismatchError, match="block_size=8"):
        train.run(wrong_blocks)
    other_tokenizer = config_lib.load(None, [*common, f"data.path={trajectory_dataset}", f"run_dir={tmp_path / 't'}",
                                             "objective.block_size=8", "model.vocab_size=0"])
    with pytest.raises(MismatchError, match="another tokenizer|model.vocab_size"):
        train.run(other_tokenizer)
    assert not (tmp_path / "b").exists() and not (tmp_path / "t").exists()  # refused before writing anything


def test_filling_the_trained_length_keeps_whole_blocks_for_full_attention_decoders(bd3lm_run, tmp_path):
    result = make(bd3lm_run, tmp_path / "full", "num_prompts=4", "sampler=remask", "sampling.gen_length=0",
                  "sampling.block_length=8")
    sampling = result["settings"]["sampling"]
    fill = 64 - sampling["prompt_tokens"]  # data.seq_len 64 less the longest prompt
    assert sampling["gen_length"] == fill - fill % 8 and len(rows_of(tmp_path / "full")) == 4


def test_sampling_keys_the_job_sets_itself_are_refused():
    for key in ("sampling.prompt_tokens=8", "sampling.num_samples=4"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            config_lib.load_into(TrajectoriesConfig(), None, [key]).validate()


def test_an_export_makes_the_same_trajectories_as_its_run(straight, bd3lm_run, tmp_path):
    from trainer import export

    _, output = straight
    assert export.main(["--run_dir", str(bd3lm_run), "--output", str(tmp_path / "hf")]) == 0
    result = make(tmp_path / "hf", tmp_path / "from_export")
    assert result["model"]["step"] == 40 and rows_of(tmp_path / "from_export") == rows_of(output)


def test_keep_correct_keeps_exactly_the_answers_the_corpus_grammar_accepts(tiny_dataset):
    """Rejection sampling: of each prompt's whole story and the same story cut short (an EOS before
    its end), keep=correct keeps the whole ones only and counts the others; keep=all keeps both."""
    from types import SimpleNamespace

    import numpy as np
    from tokenizers import Tokenizer

    from pipelines import corpus

    tokenizer = Tokenizer.from_file(str(tiny_dataset / "tokenizer.json"))
    ids = data.special_ids(data.load_manifest(str(tiny_dataset)))
    stories = [tokenizer.encode(story, add_special_tokens=False).ids for story in corpus.generate_stories(3, seed=7)]
    prompt_len, gen_length = 6, max(map(len, stories))
    part, rows = [], []
    for story in stories:
        for cut in (len(story), 12):  # whole, then cut in its second sentence
            prompt = np.array([ids["bos"], *story[:prompt_len - 1]], np.int32)
            part.append(trajectories.Prompt(len(part), prompt,
                                            tokenizer.decode(story[:prompt_len - 1], skip_special_tokens=False)))
            answer = story[prompt_len - 1:cut]
            rows.append([*prompt, *answer, *[ids["eos"]] * (gen_length - len(answer))])
    generate = lambda batch, key: SimpleNamespace(tokens=np.array(rows[:len(batch)], np.int32))  # noqa: E731
    kept = {}
    for keep in ("all", "correct"):
        kept[keep] = trajectories.decode_part(part, generate, jax.random.key(0), len(part), ids["eos"], gen_length, tokenizer,
                                              True, keep)
    whole = [tokenizer.decode(story[prompt_len - 1:]) for story in stories]
    assert [r["answer"] for r in kept["correct"][0]] == whole and kept["correct"][1]["incorrect"] == 3
    assert len(kept["all"][0]) == 6 and kept["all"][1]["incorrect"] == 0


def test_questions_of_a_trajectory_dataset_rejoin_as_its_own_rows(trajectory_dataset, tmp_path):
    """The recipe re-tokenizes a trajectory dataset's answers with the suffix the job records: the
    rows then hold the data's own prompt tokens (joined with '' the answer's first word fused with
    the question's last, and OPUT learned another layout: its answers dropped the name)."""
    manifest = data.load_manifest(str(trajectory_dataset))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(trajectory_dataset / "tokenizer.json"))
    cfg = config_lib.load_into(TrajectoriesConfig(), None, ["num_prompts=20"])
    found = trajectories.prompts(str(trajectory_dataset), "train", cfg, tokenizer)
    originals = list(data.documents(str(trajectory_dataset), manifest, "train"))[:20]
    rows = [{"question": p.question, "answer": tokenizer.decode(doc["tokens"][int(doc["prompt_len"]):].tolist())}
            for p, doc in zip(found, originals)]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    suffix = trajectories.rejoin_suffix(manifest)
    assert suffix == "\n"
    for joined, same in ((suffix, True), ("", False)):
        out = tmp_path / f"data{len(joined)}"
        assert preprocess.main(["--dataset", "dmax_trajectories", "--input", str(source), "--output", str(out),
                                "--tokenizer", str(trajectory_dataset / "tokenizer.json"), "--prompt_suffix", joined,
                                "--num_shards", "1", "--validation_fraction", "0"]) == 0
        rejoined = sorted(tuple(d["tokens"].tolist()) for d in data.documents(str(out), data.load_manifest(str(out)),
                                                                                 "train"))
        assert len(rejoined) == 20
        assert (rejoined == sorted(tuple(d["tokens"].tolist()) for d in originals)) == same


def test_keep_correct_on_a_trajectory_dataset_keeps_the_answers_with_the_records_final_number(trajectory_dataset):
    """Each question answered with its record's own response and with the same steps ending on another
    number: keep=correct keeps the first only (DMax's data has right answers, not a grammar)."""
    from types import SimpleNamespace

    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(trajectory_dataset / "tokenizer.json"))
    ids = data.special_ids(data.load_manifest(str(trajectory_dataset)))
    cfg = config_lib.load_into(TrajectoriesConfig(), None, ["num_prompts=3"])
    found = trajectories.prompts(str(trajectory_dataset), "train", cfg, tokenizer)
    assert all(p.response.endswith(f"The answer is {quality.final_number(p.response)}.") for p in found)
    part, rows = [], []
    for prompt in found:
        right = prompt.response
        wrong = right[:right.rindex(" ")] + f" {int(quality.final_number(right)) + 1}."
        for answer in (right, wrong):
            part.append(prompt._replace(index=len(part)))
            rows.append([*prompt.tokens, *tokenizer.encode(answer, add_special_tokens=False).ids, ids["eos"]])
    length = len(found[0].tokens)
    assert all(len(p.tokens) == length for p in found)  # one batch of equal prompts
    gen_length = max(map(len, rows)) - length
    rows = [row + [ids["eos"]] * (length + gen_length - len(row)) for row in rows]
    generate = lambda batch, key: SimpleNamespace(tokens=np.array(rows[:len(batch)], np.int32))  # noqa: E731
    kept, dropped = trajectories.decode_part(part, generate, jax.random.key(0), len(part), ids["eos"], gen_length,
                                             tokenizer, True, "correct")
    assert [r["answer"] for r in kept] == [p.response for p in found] and dropped["incorrect"] == 3
