"""The lm-evaluation-harness backend: exact AR scores, a deterministic diffusion bound whose spread
shrinks with more noise levels and agrees with evals.perplexity, generate_until's stops, and the
shipped tasks through lm_eval.simple_evaluate, lm_eval's CLI and `python -m evals --once`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (the harness extra)")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from evals import __main__ as evals_cli  # noqa: E402
from evals import decoders, perplexity, runs  # noqa: E402
from evals.config import HarnessSettings, PerplexityConfig, SamplingConfig  # noqa: E402
from evals.harness import __main__ as harness_cli  # noqa: E402
from evals.harness import checkpoint, generation, scoring, suite  # noqa: E402
from evals.harness.model import DiffusionLM  # noqa: E402
from tests.conftest import SHARED_DATA, TINY_MODEL  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer import data, objectives, state, train  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.model import Transformer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ["tinystories_cloze", "tinystories_continuation", "arithmetic_word_problems"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    for key, value in {**OFFLINE, "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def ar_run(tiny_dataset, tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("harness") / "ar"
    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "objective.name=ar",
                                 "train.steps=40", "train.checkpoint_every=40"])
    assert train.run(cfg) == 0
    return run_dir


@pytest.fixture(scope="module")
def arithmetic_rows(tmp_path_factory) -> pathlib.Path:
    """DMax-layout rows: the shared sample when present, else generated ones of the same layout."""
    sample = SHARED_DATA / "dmax" / "trajectories-sample.jsonl"
    if sample.exists():
        return sample
    from pipelines import arithmetic

    folder = tmp_path_factory.mktemp("arithmetic")
    arithmetic.write_splits(str(folder), 20, 20, seed=0, max_number=10)
    return folder / "heldout.jsonl"


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


# --------------------------------------------------------------------------- the objectives' token_loss


@pytest.mark.parametrize("name", ["mdlm", "bd3lm", "oput", "ar", "dream"])
def test_token_loss_scores_only_the_chosen_positions_and_sums_to_eval_loss(name):
    model = Transformer(ModelConfig(vocab_size=40, hidden=32, layers=2, heads=2, mlp_hidden=64, max_seq_len=64),
                        nnx.Rngs(0))
    segments = np.array([[1] * 6 + [2] * 5 + [0], [1] * 12], np.int32)
    positions = np.array([[*range(6), *range(5), 0], [*range(12)]], np.int32)
    batch = {"tokens": np.random.default_rng(0).integers(3, 39, segments.shape).astype(np.int32),
             "tokens_segment_ids": segments, "tokens_positions": positions}
    objective = objectives.get(name)
    settings = objective.settings()
    if hasattr(settings, "block_size"):
        settings = dataclasses.replace(settings, block_size=4)
    graphdef, params = nnx.split(model)
    key = jax.random.key(3)

    @jax.jit
    def losses(params, batch):  # (token_loss, eval_loss's sum)
        model = nnx.merge(graphdef, params)
        return (objective.token_loss(model, batch, key, 39, settings, 0.6),
                objective.eval_loss(model, batch, key, 39, settings, 0.6)[0])

    whole, total = losses(params, batch)
    np.testing.assert_allclose(whole.sum(), total, rtol=1e-5)
    scored = (positions >= 3) & (segments != 0)
    part = np.asarray(losses(params, {**batch, "scored": scored})[0])
    assert (part[~scored] == 0).all() and (part[scored] > 0).any()
    if objective.exact:  # a causal model's scores of later tokens do not depend on what else is scored
        np.testing.assert_allclose(part[scored], np.asarray(whole)[scored], rtol=1e-5)


# --------------------------------------------------------------------------- loglikelihood


def test_ar_loglikelihood_is_our_exact_perplexity_code_on_the_same_tokens(ar_run):
    lm = DiffusionLM.create_from_arg_string(f"run_dir={ar_run},batch_size=2")
    assert lm.ckpt.step == 40 and lm.objective.exact
    pairs = [("Once upon a time, there was a little", " girl named Lily."), ("The cat", " sat on the mat. "),
             ("", "Tom liked to play."), ("She smiled ", "and ran home.")]
    results = lm.loglikelihood(requests("loglikelihood", pairs))
    model = nnx.merge(lm.ckpt.graphdef, lm.ckpt.params)
    tokenizer, bos = lm.ckpt.tokenizer, lm.ckpt.ids["bos"]
    ar = objectives.get("ar")

    @jax.jit
    def document_nll(tokens):  # evals.perplexity's exact AR score of one document
        batch = {"tokens": tokens, "tokens_segment_ids": jnp.ones_like(tokens),
                 "tokens_positions": jnp.arange(tokens.shape[1])[None]}
        return ar.eval_loss(model, batch, jax.random.key(0), 0, ar.settings(), 0.0)[0]

    def nll(ids: list[int]) -> float:
        return float(document_nll(jnp.asarray([ids], jnp.int32)))

    for (context, continuation), (loglikelihood, _) in zip(pairs, results):
        context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
        whole, head = tokenizer.encode(context + continuation).ids, tokenizer.encode(context).ids
        assert loglikelihood == pytest.approx(nll([bos, *head]) - nll([bos, *whole]), rel=1e-5, abs=1e-4)

    context = [bos, *tokenizer.encode("Once upon a time").ids]
    logits = model(jnp.asarray([context]), jnp.ones((1, len(context)), jnp.int32), jnp.arange(len(context))[None],
                   True)
    best, worst = int(jnp.argmax(logits[0, -1])), int(jnp.argmin(logits[0, -1]))
    assert lm.score([(context, [best]), (context, [worst])]).greedy_R.tolist() == [True, False]

    text = "Lily and Tom played in the park all day."  # one window: the whole text given BOS
    [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert rolling == pytest.approx(-nll([bos, *tokenizer.encode(text).ids]), rel=1e-5)
    [long] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text * 12,)]))  # several windows
    assert long < rolling < 0


def test_is_greedy_in_loglikelihood_is_whether_the_continuation_is_the_models_own_choice(ar_run):
    lm = DiffusionLM.create_from_arg_string(f"run_dir={ar_run},batch_size=2")
    model = nnx.merge(lm.ckpt.graphdef, lm.ckpt.params)
    tokenizer, bos = lm.ckpt.tokenizer, lm.ckpt.ids["bos"]
    context = [bos, *tokenizer.encode("Once upon a time").ids]
    logits = model(jnp.asarray([context]), jnp.ones((1, len(context)), jnp.int32), jnp.arange(len(context))[None],
                   True)
    best, worst = int(jnp.argmax(logits[0, -1])), int(jnp.argmin(logits[0, -1]))
    asked = [("Once upon a time", tokenizer.decode([token])) for token in (best, worst)]
    assert [lm._pair(*pair)[1] for pair in asked] == [[best], [worst]]  # the texts are those tokens
    assert [greedy for _, greedy in lm.loglikelihood(requests("loglikelihood", asked))] == [True, False]


@pytest.fixture(scope="module")
def bd3lm_checkpoint(bd3lm_run):
    return checkpoint.load(str(bd3lm_run))


def story_pairs(ckpt, count: int) -> list[tuple[list[int], list[int]]]:
    """Token (context, continuation) pairs cut from validation documents."""
    docs = data.documents(ckpt.run_cfg.data.path, data.load_manifest(ckpt.run_cfg.data.path), "validation")
    long = [doc["tokens"] for doc in docs if len(doc["tokens"]) >= 40][:count]
    return [(tokens[:20].tolist(), tokens[20:40].tolist()) for tokens in long]


def test_the_diffusion_estimate_is_deterministic_and_its_spread_shrinks_with_more_levels(bd3lm_checkpoint):
    pairs = story_pairs(bd3lm_checkpoint, 12)

    def estimate(samples: int, seed: int = 0) -> scoring.Estimate:
        lm = DiffusionLM(bd3lm_checkpoint, HarnessSettings(samples=samples, seed=seed, batch_size=4), SamplingConfig())
        return lm.score(pairs)

    first = estimate(4)
    assert np.array_equal(first.loglikelihood_R, estimate(4).loglikelihood_R)
    assert not np.array_equal(first.loglikelihood_R, estimate(4, seed=1).loglikelihood_R)
    assert (first.loglikelihood_R < 0).all() and not first.greedy_R.any()
    few, many = estimate(2), estimate(32)
    assert many.stderr_R.mean() < 0.6 * few.stderr_R.mean()
    # Both estimate the same bound: within a few of the coarse estimate's standard errors.
    assert np.abs(many.loglikelihood_R - few.loglikelihood_R).mean() < 3 * few.stderr_R.mean()


def test_on_whole_validation_texts_the_bound_agrees_with_evals_perplexity(bd3lm_checkpoint):
    ckpt, levels = bd3lm_checkpoint, 16
    run_cfg = ckpt.run_cfg
    manifest = data.load_manifest(run_cfg.data.path)
    batches = list(itertools.islice(data.packed_dataset(run_cfg, manifest, "validation", 4, shuffle=False,
                                                        repeat=False), 2))
    rows = np.concatenate([b["tokens"] for b in batches])
    segments = np.concatenate([b["tokens_segment_ids"] for b in batches])
    texts = [row[segment_ids == s] for row, segment_ids in zip(rows, segments)
             for s in np.unique(segment_ids[segment_ids > 0])]  # the documents (pieces) of two batches
    ppl = perplexity.evaluate(ckpt.graphdef, ckpt.params, run_cfg, manifest, PerplexityConfig(
        max_tokens=np.count_nonzero(batches[0]["tokens_segment_ids"]) + 1, time_samples=levels, batch_size=4))
    assert ppl["ppl_tokens"] == sum(map(len, texts))  # perplexity read the same two batches
    # Packed alike (best-fit decreasing rebuilds the loader's rows), so a seed gives both the same masks.
    assert np.array_equal(scoring.pack(texts, [np.ones(len(t), bool) for t in texts], 64, 4)["tokens"], rows)

    scored = sum(len(t) - 1 for t in texts)  # each text's first token is context, as in evals.perplexity

    def nats(seed: int) -> float:  # every token of each text asked for: the bound of the whole text
        lm = DiffusionLM(ckpt, HarnessSettings(samples=levels, seed=seed, batch_size=4), SamplingConfig())
        return -lm.score([([], text.tolist()) for text in texts]).loglikelihood_R.sum() / scored

    assert nats(0) == pytest.approx(ppl["nats_per_token"], rel=1e-5)  # the same rows, grid and masks
    assert nats(1) == pytest.approx(ppl["nats_per_token"], rel=0.04)  # other masks: 512 tokens' noise


# --------------------------------------------------------------------------- generate_until


def test_generate_until_stops_at_a_stop_string_and_at_max_gen_toks(ar_run, bd3lm_checkpoint, caplog):
    ar = DiffusionLM.create_from_arg_string(f"run_dir={ar_run}")
    assert decoders.fitting("ar") == ("causal",) and decoders.resolve("", "ar", ar.sampling) == "causal"

    def generate(lm, context: str, **kwargs) -> str:
        return lm.generate_until(requests("generate_until", [(context, kwargs)]))[0]

    free = generate(ar, "Once upon a time,", until=[], max_gen_toks=12)
    short = generate(ar, "Once upon a time,", until=[], max_gen_toks=4)
    assert len(free) > len(short) > 0 and free.startswith(short)  # greedy and causal: the same first tokens
    at = next(i for i in range(2, len(free) - 1) if free[i:i + 2] not in free[:i + 1])  # first seen after 2 chars
    cut = generate(ar, "Once upon a time,", until=["never there", free[at:at + 2]], max_gen_toks=12)
    assert cut == free[:at]
    assert generate(ar, "Once upon a time,", until=free[at:at + 2], max_gen_toks=12) == cut  # a string, as the CLI

    prompt = [ar.prefix, *ar._encode("Once upon a time " * 30)]
    with caplog.at_level("WARNING"):
        [long] = generation.generate(ar.ckpt, "", ar.sampling, 2, 0, [generation.Request(prompt, 10, 0.0)])
    assert len(prompt) > 64 and len(long) <= 10 and "were cut to their last tokens" in caplog.text

    bd3lm = DiffusionLM(bd3lm_checkpoint, HarnessSettings(batch_size=2), SamplingConfig())
    asks = [generation.Request([bd3lm.prefix, *bd3lm._encode(text)], n, 0.0)
            for text, n in (("Once upon a time", 5), ("Once upon a time", 11))]  # within a block, across one
    lengths = [len(ids) for ids in generation.generate(bd3lm.ckpt, "", bd3lm.sampling, 2, 0, asks)]
    assert all(n <= ask.max_tokens for n, ask in zip(lengths, asks)) and any(lengths)  # blocks of 8, cut back


# --------------------------------------------------------------------------- tasks


def test_the_shipped_tasks_run_through_simple_evaluate(bd3lm_checkpoint, bd3lm_run, ar_run, arithmetic_rows,
                                                       monkeypatch):
    lm = DiffusionLM(bd3lm_checkpoint, HarnessSettings(samples=2, batch_size=8), SamplingConfig())
    metadata = {"run_dir": str(bd3lm_run), "judge_run_dir": str(ar_run), "arithmetic_data": str(arithmetic_rows)}
    manager = suite.task_manager(TASKS, metadata)
    out = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, limit=2, log_samples=True,
                                  gen_kwargs={"max_gen_toks": 8}, torch_random_seed=None)
    scores = suite.scores(out)
    assert 0 <= scores["tinystories_cloze"]["acc,none"] <= 1 and len(lm.stderrs) == 8  # 2 stories x 4 words
    assert 0 < scores["tinystories_continuation"]["distinct_2,none"] <= 1
    assert 1 < scores["tinystories_continuation"]["gen_ppl,none"] < 1e4  # the AR judge's score
    assert 0 <= scores["arithmetic_word_problems"]["exact_match,final_number"] <= 1
    cloze = out["samples"]["tinystories_cloze"][0]
    assert len(cloze["doc"]["choices"]) == 4 and cloze["doc"]["context"][-1] != " "
    assert all(len(s["resps"][0][0]) <= 60 for s in out["samples"]["tinystories_continuation"])  # <= 8 tokens

    # The answers themselves score 1: the task's target and filter read the final number.
    monkeypatch.setattr(lm, "generate_until", lambda reqs: [r.doc["answer"] for r in reqs])
    right = lm_eval.simple_evaluate(model=lm, tasks=["arithmetic_word_problems"], task_manager=manager, limit=3,
                                    torch_random_seed=None)
    assert suite.scores(right)["arithmetic_word_problems"]["exact_match,final_number"] == 1

    with pytest.raises(ConfigError, match="run_dir is required"):
        DiffusionLM.create_from_arg_string("samples=4")
    with pytest.raises(ConfigError, match="samples must be at least 2"):
        DiffusionLM.create_from_arg_string(f"run_dir={bd3lm_run},samples=1")
    with pytest.raises(ConfigError, match="sampler 'spd@x' is not a registered decoder"):
        DiffusionLM.create_from_arg_string(f"run_dir={bd3lm_run},sampler=spd@x")
    with pytest.raises(ConfigError, match="sampling.nope is not a config key"):
        DiffusionLM.create_from_arg_string(f"run_dir={bd3lm_run},sampling.nope=1")


def test_the_shipped_tasks_run_through_the_lm_eval_cli(bd3lm_run, ar_run, arithmetic_rows, tmp_path, monkeypatch,
                                                       capsys):
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    args = f"run_dir={bd3lm_run},samples=2,batch_size=8,judge_run_dir={ar_run},arithmetic_data={arithmetic_rows}"
    result = subprocess.run([sys.executable, "-m", "evals.harness", "--model", "diffusion-lm-jax", "--model_args", args,
                             "--tasks", ",".join(TASKS), "--limit", "2", "--gen_kwargs", "max_gen_toks=8",
                             "--output_path", str(tmp_path / "out")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = (tmp_path / "out").rglob("results_*.json")
    assert set(json.loads(path.read_text())["results"]) == set(TASKS)
    assert "tinystories_cloze" in result.stdout and "diffusion-lm-jax" in result.stdout
    monkeypatch.setattr(sys, "argv", ["evals.harness", "--model", "diffusion-lm-jax", "--model_args",
                                      f"run_dir={tmp_path / 'missing'}", "--tasks", "tinystories_cloze"])
    assert harness_cli.main() == 2  # a user error: one line after lm_eval's log
    assert capsys.readouterr().err.splitlines()[-1] == f"error: run directory {tmp_path / 'missing'} does not exist"


def test_once_with_harness_tasks_writes_their_scores_into_the_ledger(bd3lm_run, ar_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(bd3lm_run, run_dir, ignore=shutil.ignore_patterns("evals"))
    assert evals_cli.main(["--run_dir", str(run_dir), "--once", "perplexity.max_tokens=500",
                           "perplexity.time_samples=2", "samplers=one_token", "sampling.num_samples=2",
                           "sampling.gen_length=8", "wandb_mode=disabled", f"gen_ppl_run_dir={ar_run}",
                           "harness.tasks=tinystories_cloze,tinystories_continuation", "harness.limit=2",
                           "harness.samples=2"]) == 0
    record = json.loads((run_dir / "evals" / "ledger.jsonl").read_text().splitlines()[-1])
    harness = record["harness"]
    assert set(harness["scores"]) == {"tinystories_cloze", "tinystories_continuation"} and harness["samples"] == 2
    assert 0 <= harness["scores"]["tinystories_cloze"]["acc,none"] <= 1 and harness["bound_stderr"] > 0
    assert harness["scores"]["tinystories_continuation"]["gen_ppl,none"] > 1
    assert "harness" in record["wall_seconds"] and "tinystories_cloze acc,none" in capsys.readouterr().out
    page = (run_dir / "evals" / "report.html").read_text()
    assert "lm-evaluation-harness at step 40" in page and "distinct_2,none" in page
    assert evals_cli.main(["--run_dir", str(run_dir), "--once", "harness.tasks=nope", "sampling.gen_length=8"]) == 2
    assert "harness.tasks: unknown ['nope']" in capsys.readouterr().err


def test_an_ar_run_still_gets_no_samplers_from_auto(ar_run):
    run_cfg = runs.load_config(str(ar_run))
    assert decoders.plan("auto", SamplingConfig(), run_cfg)[0] == []
    assert decoders.plan("causal", SamplingConfig(prompt_tokens=4, gen_length=8), run_cfg)[0] == ["causal"]
    graphdef, params, _ = state.load_params(str(ar_run), cfg=run_cfg)
    out = decoders.generate("causal", graphdef, params, np.full((2, 4), 5, np.int32),
                            SamplingConfig(prompt_tokens=4, gen_length=8), 3, 2, jax.random.key(0))
    assert out.tokens.shape == (2, 12) and (out.forwards <= 8).all() and out.batch_forwards == out.forwards.max()


@pytest.mark.parametrize("extra,message", [(["--tasks", "no_such_task"], "Tasks not found: no_such_task"),
                                           (["--tasks", "tinystories_cloze", "--limit", "0"], "--limit 0: must be"),
                                           (["--tasks", "tinystories_cloze", "--limit=-3"], "--limit -3: must be")])
def test_the_harness_cli_refuses_an_unknown_task_and_a_limit_of_nothing_in_one_line(ar_run, monkeypatch, capsys,
                                                                                     extra, message):
    from evals.harness import __main__ as harness_cli

    monkeypatch.setattr(sys, "argv", ["evals.harness", "--model", "diffusion-lm-jax", "--model_args",
                                      f"run_dir={ar_run}", *extra])
    assert harness_cli.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not [line for line in err if line.startswith("Traceback")]
