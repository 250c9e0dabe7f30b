"""The preprocess job end to end on small inputs: outputs, determinism, bad input, gs://, TFDS."""

from __future__ import annotations

import filecmp
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from tokenizers import Tokenizer

from pipelines import corpus, manifest, preprocess, records
from tests.gcs import BUCKET


def run_job(*args: str) -> int:
    return preprocess.main([str(a) for a in args])


def decoded_records(directory, split: str) -> list[list[np.ndarray]]:
    m = manifest.load(str(directory))
    dtype = np.dtype(m["record_schema"]["dtype"]).newbyteorder("<")
    num_fields = len(m["record_schema"]["fields"])
    out = []
    for shard in m["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(directory / shard["file"]))
        out += [records.decode(r, num_fields, dtype) for r in reader.read_all()]
        reader.close()
    return out


def texts_of(directory) -> list[str]:
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    return [
        tok.decode(fields[0].tolist())  # specials are skipped by decode
        for split in manifest.SPLITS
        for fields in decoded_records(directory, split)
    ]


def dir_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def assert_identical_dirs(a, b):
    assert dir_files(a) == dir_files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, dir_files(a), shallow=False)
    assert not mismatch and not errors


@pytest.fixture(scope="module")
def stories_out(tmp_path_factory, story_file):
    out = tmp_path_factory.mktemp("job") / "out"
    assert run_job("--dataset", "tinystories", "--input", story_file, "--output", out,
                   "--num_shards", 3, "--vocab_size", 600, "--validation_fraction", 0.1,
                   "--read_chunk_bytes", 4096) == 0
    return out


# --------------------------------------------------------------------------- outputs


def test_outputs_match_the_manifest_and_every_story_lands_once(stories_out, stories, story_file):
    assert manifest.verify(str(stories_out)) == []
    assert dir_files(stories_out) == sorted([
        "dead_letter.jsonl", "manifest.json", "tokenizer.json",
        "train-00000-of-00003.array_record", "train-00001-of-00003.array_record",
        "train-00002-of-00003.array_record", "validation-00000-of-00001.array_record",
    ])
    assert sorted(texts_of(stories_out)) == sorted(stories)
    m = manifest.load(str(stories_out))
    total = sum(m["splits"][s]["num_records"] for s in manifest.SPLITS)
    assert total == len(stories) and m["bad_records"]["total"] == 0
    tokens = sum(len(f[0]) for s in manifest.SPLITS for f in decoded_records(stories_out, s))
    assert tokens == sum(m["splits"][s]["num_tokens"] for s in manifest.SPLITS)
    assert m["dataset"] == "tinystories" and m["record_schema"]["fields"] == ["tokens"]
    assert m["sources"] == [str(story_file)]


def test_records_are_bos_text_eos_with_the_trained_special_ids(stories_out):
    m = manifest.load(str(stories_out))
    ids = m["tokenizer"]["special_ids"]
    assert ids == {"pad": 0, "bos": 1, "eos": 2, "mask": 3}
    assert m["tokenizer"]["trained_by_job"] is True
    assert m["tokenizer"]["vocab_size"] <= 600
    for (tokens,) in decoded_records(stories_out, "train")[:50]:
        assert tokens[0] == ids["bos"] and tokens[-1] == ids["eos"]
        assert ids["mask"] not in tokens[1:-1] and ids["pad"] not in tokens


def test_validation_split_follows_content_hash(stories_out, stories):
    m = manifest.load(str(stories_out))
    from pipelines.documents import content_key

    expected = sorted(s for s in stories if records.split_of(content_key((s,)), 0.1) == "validation")
    tok = Tokenizer.from_file(str(stories_out / "tokenizer.json"))
    got = sorted(tok.decode(f[0].tolist()) for f in decoded_records(stories_out, "validation"))
    assert got == expected and 0 < len(expected) < len(stories) * 0.2
    assert m["splits"]["validation"]["num_records"] == len(expected)


def test_batch_encoding_round_trips_every_field_of_every_record():
    fields_FD = [[[1, 2], [], [65_535]], [[5], [6, 7, 8], []]]  # two fields, empty ones included
    for dtype in (np.dtype("<u2"), np.dtype("<u4")):
        encoded, counts = records.encode_batch(fields_FD, dtype)
        assert counts.tolist() == [3, 3, 1]
        for d, record in enumerate(encoded):
            assert [f.tolist() for f in records.decode(record, 2, dtype)] == [fields_FD[0][d], fields_FD[1][d]]


def test_record_ids_are_the_tokenizers_own_encoding(stories_out, stories):
    # The job encodes without offsets (encode_batch_fast); ids must equal the plain encode's.
    tok = Tokenizer.from_file(str(stories_out / "tokenizer.json"))
    ids = {tuple(tok.encode(s, add_special_tokens=False).ids) for s in stories}
    got = [tuple(tokens[1:-1].tolist()) for (tokens,) in decoded_records(stories_out, "train")]
    assert got and all(g in ids for g in got)


def test_rerun_two_workers_and_unspilled_records_are_byte_identical(stories_out, story_file, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where local runs spill
    args = ["--dataset", "tinystories", "--input", story_file, "--num_shards", 3,
            "--vocab_size", 600, "--validation_fraction", 0.1]
    # Other read units, and batches of 7 documents: the tokenizer's one-batch lookahead spans batches.
    assert run_job(*args, "--output", tmp_path / "again", "--read_chunk_bytes", 100_000, "--batch_docs", 7) == 0
    assert run_job(*args, "--output", tmp_path / "two", "--direct_num_workers", 2,
                   "--direct_running_mode", "multi_processing") == 0
    monkeypatch.setattr(preprocess, "LOCAL_RUNNERS", ())  # records through the GroupByKey, as on Dataflow
    assert run_job(*args, "--output", tmp_path / "grouped") == 0
    for out in ("again", "two", "grouped"):
        assert_identical_dirs(stories_out, tmp_path / out)
    assert not list(tmp_path.glob("preprocess-spill-*"))  # spill files go with the job


def test_summary_reports_counters(story_file, tmp_path, capsys):
    assert run_job("--dataset", "tinystories", "--input", story_file, "--output", tmp_path / "o",
                   "--vocab_size", 300) == 0
    out = capsys.readouterr().out
    assert "documents   train" in out and "shards      9 written" in out
    assert "bad records none" in out
    m = manifest.load(str(tmp_path / "o"))  # counted where the records are made, batch by batch
    assert f"tokens      {sum(m['splits'][s]['num_tokens'] for s in manifest.SPLITS):,} (" in out


def test_given_tokenizer_is_used_and_declared(stories_out, story_file, tmp_path):
    assert run_job("--dataset", "tinystories", "--input", story_file, "--output", tmp_path / "o",
                   "--tokenizer", stories_out / "tokenizer.json", "--num_shards", 3,
                   "--validation_fraction", 0.1, "--shard_compression", "brotli") == 0
    m = manifest.load(str(tmp_path / "o"))
    assert m["tokenizer"]["trained_by_job"] is False
    assert m["options"]["shard_compression"] == "brotli"
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (stories_out / "tokenizer.json").read_bytes()
    for split in manifest.SPLITS:  # same tokenizer, same options but compression: the same records
        a = [f[0].tolist() for f in decoded_records(stories_out, split)]
        assert a == [f[0].tolist() for f in decoded_records(tmp_path / "o", split)]
    shard = m["splits"]["train"]["shards"][0]["file"]  # the same records, other chunk bytes
    assert (tmp_path / "o" / shard).read_bytes() != (stories_out / shard).read_bytes()


def _tokenizer_json(specials: list[str], path) -> str:
    """A small BPE with these special tokens."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a small story"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False))
    pathlib.Path(path).write_text(tok.to_str())
    return str(path)


def test_named_mask_token_of_a_given_tokenizer(story_file, tmp_path):
    path = _tokenizer_json(["</s>", "<extra_mask>"], tmp_path / "t.json")
    out = tmp_path / "o"
    assert run_job("--dataset", "tinystories", "--input", story_file, "--output", out,
                   "--tokenizer", path, "--mask_token", "<extra_mask>") == 0
    ids = manifest.load(str(out))["tokenizer"]["special_ids"]
    assert ids == {"pad": 0, "bos": None, "eos": 0, "mask": 1}
    assert decoded_records(out, "train")[0][0][-1] == 0  # no BOS; EOS closes each record


# --------------------------------------------------------------------------- layouts


def test_text_jsonl_and_parquet_layouts_give_the_same_shards(shared_data, tmp_path):
    ts = shared_data / "tinystories"
    for name, chunk in (("TinyStoriesV2-GPT4-valid.sample-a.txt", 50_000),
                        ("sample-a.jsonl", 30_000), ("sample-a.parquet", 1 << 20)):
        assert run_job("--dataset", "tinystories", "--input", ts / name, "--output",
                       tmp_path / name, "--vocab_size", 1000, "--read_chunk_bytes", chunk) == 0
    first = manifest.load(str(tmp_path / "sample-a.jsonl"))
    assert first["splits"]["train"]["num_records"] + first["splits"]["validation"]["num_records"] == 1979
    shards = [n for n in dir_files(tmp_path / "sample-a.jsonl") if n.endswith(".array_record")]
    for other in ("TinyStoriesV2-GPT4-valid.sample-a.txt", "sample-a.parquet"):
        match, mismatch, errors = filecmp.cmpfiles(tmp_path / "sample-a.jsonl", tmp_path / other,
                                                   shards + ["tokenizer.json"], shallow=False)
        assert not mismatch and not errors


def _trajectory_rows(shared_data) -> list[dict]:
    with open(shared_data / "dmax" / "trajectories-sample.jsonl") as f:
        return [json.loads(line) for line in f][:120]


def test_trajectories_keep_prompt_and_response_apart(shared_data, tmp_path):
    rows = _trajectory_rows(shared_data)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    assert run_job("--dataset", "dmax_trajectories", "--input", path, "--output", out,
                   "--vocab_size", 400, "--num_shards", 2) == 0
    m = manifest.load(str(out))
    assert m["record_schema"]["fields"] == ["prompt", "response"]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = m["tokenizer"]["special_ids"]
    pairs = set()
    for split in manifest.SPLITS:
        for prompt, response in decoded_records(out, split):
            assert prompt[0] == ids["bos"] and response[-1] == ids["eos"]
            assert ids["eos"] not in prompt and ids["bos"] not in response
            pairs.add((tok.decode(prompt.tolist()).strip(), tok.decode(response.tolist())))
    assert pairs == {(r["question"], r["answer"]) for r in rows}


def test_dmax_messages_layout_with_flag_in_parquet_equals_question_answer(shared_data, tmp_path):
    rows = _trajectory_rows(shared_data)
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = [{"messages": [{"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}], "flag": True}
            for r in rows]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "chat.parquet", row_group_size=25)
    common = ["--dataset", "dmax_trajectories", "--vocab_size", 400, "--num_shards", 2]
    assert run_job(*common, "--input", plain, "--output", tmp_path / "a") == 0
    assert run_job(*common, "--input", tmp_path / "chat.parquet", "--output", tmp_path / "b") == 0
    shards = [n for n in dir_files(tmp_path / "a") if n.endswith(".array_record")]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", shards, shallow=False)
    assert len(match) == 3 and not mismatch and not errors


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def messy_inputs(tmp_path, stories):
    """Good stories plus one of each bad record kind, across the three file layouts."""
    good = stories[:200]
    text = tmp_path / "in" / "a.txt"
    text.parent.mkdir()
    body = b"".join(s.encode() + b"\n<|endoftext|>\n" for s in good[:100])
    body += b"bad \xff\xfe bytes\n<|endoftext|>\n   \n<|endoftext|>\n"
    body += b"x" * 5000 + b"\n<|endoftext|>\n"
    text.write_bytes(body)
    lines = [json.dumps({"text": s}) for s in good[100:150]] + ['{"text": "unterminated', '{"title": 1}']
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(lines) + "\n")
    rows = [{"text": s} for s in good[150:]] + [{"text": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "c.parquet")
    return tmp_path / "in", good


def test_bad_records_go_to_dead_letters_and_good_ones_land(messy_inputs, tmp_path):
    inputs, good = messy_inputs
    out = tmp_path / "o"
    assert run_job("--dataset", "tinystories", "--input", f"{inputs}/*", "--output", out,
                   "--vocab_size", 400, "--max_doc_chars", 4000, "--max_bad_fraction", 0.05) == 0
    assert sorted(texts_of(out)) == sorted(good)
    letters = [json.loads(line) for line in (out / "dead_letter.jsonl").read_text().splitlines()]
    reasons = sorted(letter["reason"] for letter in letters)
    assert reasons == ["empty", "invalid_utf8", "malformed_json", "missing_field", "missing_field",
                       "too_long"]
    by_reason = {letter["reason"]: letter for letter in letters}
    assert by_reason["invalid_utf8"]["source"].endswith("a.txt")
    raw_text = (inputs / "a.txt").read_bytes()
    assert raw_text[by_reason["invalid_utf8"]["position"]:].startswith(b"bad \xff")
    assert by_reason["too_long"]["raw"] == "x" * 5000 + "\n"  # the raw record, byte for byte
    assert by_reason["malformed_json"]["raw"] == '{"text": "unterminated\n'
    m = manifest.load(str(out))
    assert m["bad_records"]["by_reason"] == {"empty": 1, "invalid_utf8": 1, "malformed_json": 1,
                                             "missing_field": 2, "too_long": 1}


def test_too_many_bad_records_fail_with_one_line_and_no_manifest(messy_inputs, tmp_path):
    inputs, _ = messy_inputs
    out = tmp_path / "o"
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.preprocess", "--dataset", "tinystories", "--input",
         f"{inputs}/*", "--output", str(out), "--vocab_size", "300", "--max_doc_chars", "4000",
         "--max_bad_fraction", "0.01"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "TMPDIR": str(spill_root)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: 6 of 206 records are bad")
    assert "Traceback" not in result.stderr
    assert not (out / "manifest.json").exists()
    assert (out / "dead_letter.jsonl").exists()
    assert not list(spill_root.glob("preprocess-spill-*"))  # a failed job removes its spill files too


def test_a_failed_overwrite_keeps_the_finished_dataset(messy_inputs, story_file, tmp_path):
    inputs, _ = messy_inputs
    out = tmp_path / "o"
    assert run_job("--dataset", "tinystories", "--input", story_file, "--output", out, "--vocab_size", 300) == 0
    before = {n: (out / n).read_bytes() for n in dir_files(out)}
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.preprocess", "--dataset", "tinystories", "--input", f"{inputs}/*",
         "--output", str(out), "--vocab_size", "300", "--max_doc_chars", "4000", "--overwrite"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "records are bad" in result.stderr
    assert {n: (out / n).read_bytes() for n in dir_files(out)} == before  # nothing of it was lost
    assert manifest.verify(str(out)) == []
    (staging,) = tmp_path.glob("o.staging-*")  # the failed job's dead letters, beside it
    assert (staging / "dead_letter.jsonl").exists() and str(staging) in result.stdout


def test_trajectory_rows_missing_prompt_or_response(tmp_path):
    rows = [{"question": f"q{i}?", "answer": f"a{i}."} for i in range(30)]
    rows += [{"answer": "only an answer"}, {"question": "only a question"},
             {"messages": [{"role": "user", "content": "hi"}]}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    assert run_job("--dataset", "dmax_trajectories", "--input", path, "--output", out,
                   "--vocab_size", 300, "--max_bad_fraction", 0.2) == 0
    letters = [json.loads(line) for line in (out / "dead_letter.jsonl").read_text().splitlines()]
    assert [letter["reason"] for letter in letters] == ["missing_prompt", "missing_response",
                                                        "missing_response"]
    m = manifest.load(str(out))
    assert m["splits"]["train"]["num_records"] + m["splits"]["validation"]["num_records"] == 30


def _user_error(capsys, *args) -> str:
    assert run_job(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_input_errors_are_one_line_exit_2_and_write_nothing(tmp_path, story_file, capsys):
    out = tmp_path / "o"
    base = ["--dataset", "tinystories", "--output", out]
    assert "matches no files" in _user_error(capsys, *base, "--input", tmp_path / "none*.txt")
    (tmp_path / "folder.txt").mkdir()  # root reads any file, but no one reads a directory
    assert "cannot read input file" in _user_error(capsys, *base, "--input", tmp_path / "folder.txt")
    no_mask = _tokenizer_json(["<|endoftext|>"], tmp_path / "nomask.json")
    assert "has no mask token" in _user_error(capsys, *base, "--input", story_file, "--tokenizer", no_mask)
    assert "--validation_fraction" in _user_error(capsys, *base, "--input", story_file,
                                                  "--validation_fraction", 1.5)
    assert not out.exists()
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert "is a file, not a directory" in _user_error(capsys, "--dataset", "tinystories", "--input", story_file,
                                                      "--output", a_file)
    inside = story_file.parent / "out"  # the input glob would read the job's own files back in
    assert "would read the job's own output" in _user_error(
        capsys, "--dataset", "tinystories", "--input", f"{story_file.parent}/*", "--output", inside)
    assert not inside.exists()


def test_existing_manifest_needs_overwrite(story_file, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["--dataset", "tinystories", "--input", story_file, "--output", out, "--vocab_size", 300]
    assert run_job(*args, "--num_shards", 4) == 0
    before = {n: (out / n).read_bytes() for n in dir_files(out)}
    assert "pass --overwrite" in _user_error(capsys, *args)
    assert {n: (out / n).read_bytes() for n in dir_files(out)} == before
    assert run_job(*args, "--num_shards", 2, "--overwrite") == 0
    assert manifest.verify(str(out)) == []
    assert not (out / "train-00003-of-00004.array_record").exists()  # stale shards are gone


def test_a_killed_job_leaves_no_manifest(tmp_path):
    big = tmp_path / "big.txt"
    corpus.write_tinystories_layout(corpus.generate_stories(30_000, seed=5), str(big))
    out = tmp_path / "o"
    job = subprocess.Popen([sys.executable, "-m", "pipelines.preprocess", "--dataset", "tinystories",
                            "--input", str(big), "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out.exists() and any(out.iterdir())):
            time.sleep(0.05)
    finally:
        job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL  # it was killed midway, not finished
    assert out.exists() and any(out.iterdir())  # it had started writing
    assert not (out / "manifest.json").exists()
    assert manifest.verify(str(out)) == [f"{out}/manifest.json is missing: the job did not finish"]


# --------------------------------------------------------------------------- gs://, TFDS, Dataflow


def test_gcs_input_and_output_round_trip(gcs_emulator, stories_out, story_file):
    upload = (
        "import sys\nfrom apache_beam.io.filesystems import FileSystems\n"
        "with FileSystems.create(sys.argv[2]) as f: f.write(open(sys.argv[1], 'rb').read())"
    )
    gcs_emulator.python(upload, str(story_file), f"gs://{BUCKET}/in/stories.txt")
    job = subprocess.run(
        [sys.executable, "-m", "pipelines.preprocess", "--dataset", "tinystories",
         "--input", f"gs://{BUCKET}/in/*.txt", "--output", f"gs://{BUCKET}/out", "--num_shards", "3",
         "--vocab_size", "600", "--validation_fraction", "0.1"],
        env=gcs_emulator.env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-2000:]
    check = (
        "import sys, json, hashlib\nfrom apache_beam.io.filesystems import FileSystems\n"
        "from pipelines import manifest\n"
        "print(json.dumps({'problems': manifest.verify(sys.argv[1]), 'files': {\n"
        "  m.path.rsplit('/', 1)[1]: hashlib.sha256(FileSystems.open(m.path).read()).hexdigest()\n"
        "  for m in FileSystems.match([sys.argv[1] + '/*'])[0].metadata_list}}))"
    )
    remote = json.loads(gcs_emulator.python(check, f"gs://{BUCKET}/out").strip().splitlines()[-1])
    assert remote["problems"] == []
    import hashlib

    local = {n: hashlib.sha256((stories_out / n).read_bytes()).hexdigest() for n in dir_files(stories_out)}
    assert sorted(remote["files"]) == sorted(local)  # no temporary files left behind
    for name, digest in local.items():
        if name != "manifest.json":  # its sources and input differ (gs:// vs local)
            assert remote["files"][name] == digest, name


TFDS_BUILDER = '''
import sys
import numpy as np
import tensorflow_datasets as tfds

class TinyTales(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"story": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, line in enumerate(open(sys.argv[2]).read().split("\\n<|endoftext|>\\n")):
            if line.strip():
                yield i, {"story": line, "id": i}

TinyTales(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
'''


def test_tfds_dataset_from_a_data_dir(story_file, stories, tmp_path):
    data_dir = tmp_path / "tfds"
    script = tmp_path / "build_tiny_tales.py"  # TFDS wants a builder defined in a file
    script.write_text(TFDS_BUILDER)
    subprocess.run([sys.executable, str(script), str(data_dir), str(story_file)], check=True,
                   capture_output=True, timeout=300)
    out = tmp_path / "o"
    assert run_job("--dataset", "tfds", "--input", "tiny_tales:train", "--tfds_data_dir", data_dir,
                   "--text_field", "story", "--output", out, "--vocab_size", 500,
                   "--max_bad_fraction", 0) == 0
    assert sorted(texts_of(out)) == sorted(stories)
    assert manifest.load(str(out))["sources"] == ["tfds:tiny_tales:train"]


def test_dataflow_graph_builds_and_stages_this_package(story_file, tmp_path, monkeypatch):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions, SetupOptions

    # Validation asks GCS whether the temp bucket soft-deletes (a warning only); no GCS here.
    monkeypatch.setattr(GoogleCloudOptions, "_warn_if_soft_delete_policy_enabled", lambda *a: None)

    from pipelines import config as config_lib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config, beam_args = config_lib.parse([
        "--dataset", "tinystories", "--input", str(story_file), "--output", "gs://dataflow-out-bucket/out",
        "--runner", "DataflowRunner", "--project", "my-project-123", "--region", "us-central1",
        "--temp_location", "gs://dataflow-temp-bucket/tmp", "--setup_file", f"{root}/setup.py"])
    options = preprocess.pipeline_options(beam_args)
    assert options.view_as(SetupOptions).setup_file == f"{root}/setup.py"
    units, sources_read = preprocess.plan(config)
    pipeline = beam.Pipeline(options=options)
    preprocess.build_pipeline(pipeline, config, units, sources_read, None)
    proto = pipeline.to_runner_api()
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"ReadAndValidate", "TrainBPE", "Tokenize", "WriteShards", "WriteManifest"} <= names
    with pytest.raises(preprocess.UserError, match="--setup_file"):
        preprocess.pipeline_options(["--runner", "DataflowRunner", "--project", "p"])
    # What Beam's stager does with --setup_file: the sdist must carry all three packages.
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)], cwd=root,
                   check=True, capture_output=True, timeout=300)
    import tarfile

    (sdist,) = dist.iterdir()
    members = tarfile.open(sdist).getnames()
    for module in ("pipelines/preprocess.py", "trainer/__init__.py", "evals/__init__.py"):
        assert any(m.endswith(module) for m in members), module
    requires = next(m for m in members if m.endswith(".egg-info/requires.txt"))
    declared = tarfile.open(sdist).extractfile(requires).read().decode()
    for package in ("apache-beam", "array-record", "tokenizers", "[gcp]"):
        assert package in declared, package


def test_parquet_without_the_text_column_or_with_damaged_pages_ends_in_one_line(stories, tmp_path, capsys):
    import pyarrow.parquet as pq

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"story": stories[:50]}), wrong)
    assert "has no column text (it has story); name the text column with --text_field" in _user_error(
        capsys, "--dataset", "tinystories", "--input", wrong, "--output", tmp_path / "o1")
    damaged = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"text": stories[:200]}), damaged, compression="snappy")
    raw = bytearray(damaged.read_bytes())
    for i in range(200, len(raw) // 2):  # the data pages; the footer at the end stays intact
        raw[i] ^= 0x5A
    damaged.write_bytes(bytes(raw))
    result = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--dataset", "tinystories", "--input",
                             str(damaged), "--output", str(tmp_path / "o2"), "--vocab_size", "300"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot read row group 0 of parquet file")
    assert not (tmp_path / "o2" / "manifest.json").exists()
