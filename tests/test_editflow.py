"""Edit Flows against the oracles of ../shared/notes/dream-editflow.md (B5): the alignment, the
schedules, x_t and the remaining edits, the loss against a per-edit loop, the tau-leaping step,
and a run through the trainer and evals."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evals.config import SamplingConfig
from evals.decoders import editflow as decoder
from tests.conftest import TINY_MODEL
from trainer.objectives import editflow as ef

B, M = 1, 99  # a BOS and a MASK id for the notes' examples


def rm_blanks(z):
    return [int(v) for v in z if v not in (ef.BLANK, ef.PADCOL)]


def levenshtein(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


# Alignment -----------------------------------------------------------------------------------

def test_the_notes_alignments_put_gaps_early():
    z0, z1 = ef.align(np.array([B]), np.array([B, 5, 6, 7]))
    assert z0.tolist() == [B, ef.BLANK, ef.BLANK, ef.BLANK] and z1.tolist() == [B, 5, 6, 7]  # three INS after row 0
    z0, z1 = ef.align(np.array([B, M, M, M]), np.array([B, 5, 6]))
    assert z0.tolist() == [B, M, M, M] and z1.tolist() == [B, ef.BLANK, 5, 6]  # DEL row 1, SUB rows 2 and 3


def test_an_alignment_holds_both_sequences_and_costs_their_edit_distance():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, x1 = rng.integers(0, 4, rng.integers(0, 9)), rng.integers(0, 4, rng.integers(0, 9))
        z0, z1 = ef.align(x0, x1)
        assert len(z0) == len(z1)
        assert rm_blanks(z0) == x0.tolist() and rm_blanks(z1) == x1.tolist()
        assert int((z0 != z1).sum()) == levenshtein(x0.tolist(), x1.tolist())
        assert not ((z0 == ef.BLANK) & (z1 == ef.BLANK)).any()


def test_columns_share_the_prefix_and_fit_the_row():
    s = ef.EditFlowSettings(prior="masks", prior_masks=4)
    x1 = np.arange(10, 40)
    row = ef.columns(x1, 3, s, M, 16)
    used = row["z1"] != ef.PADCOL
    assert row["z0"][:3].tolist() == row["z1"][:3].tolist() == [10, 11, 12]  # never edited
    assert rm_blanks(row["z0"]) == [10, 11, 12, M, M, M, M]
    assert rm_blanks(row["z1"]) == x1[:16].tolist() and row["x1_len"] == 16 and used.all()  # 3 + max(4, 13)
    assert row["truncated"] == 1
    short = ef.columns(x1[:8], 3, s, M, 16)
    assert rm_blanks(short["z1"]) == x1[:8].tolist() and (short["z0"][8:] == ef.PADCOL).all()  # 3 + max(4, 5)
    with_masks = np.array([10, 11, 12, M, M, 13, M, 14] * 3)  # more columns than tokens: cut until they fit
    odd = ef.columns(with_masks, 3, s, M, 16)
    assert rm_blanks(odd["z1"]) == with_masks[:int(odd["x1_len"])].tolist() and (odd["z1"] != ef.PADCOL).sum() <= 16


# Schedules -----------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ef.KAPPAS)
def test_kappa_runs_from_0_to_1_with_its_derivative(schedule):
    k0, _ = ef.kappa(jnp.float32(0.0), schedule)
    k1, _ = ef.kappa(jnp.float32(1.0), schedule)
    assert float(k0) == pytest.approx(0.0, abs=1e-7) and float(k1) == pytest.approx(1.0, abs=1e-6)
    t = np.linspace(0.05, 0.95, 19)
    h = 1e-2  # float32: a larger step, a central difference
    numeric = (np.asarray(ef.kappa(t + h, schedule)[0]) - np.asarray(ef.kappa(t - h, schedule)[0])) / (2 * h)
    np.testing.assert_allclose(np.asarray(ef.kappa(t, schedule)[1]), numeric, rtol=1e-3)


def test_the_weights_of_the_notes_table():
    table = {"linear": (1.3333, 2.0), "cubic": (1.3333, 1.0), "cosine": (0.6506, 1.5708)}
    for schedule, expected in table.items():
        got = [float(ef.weight(np.float64(t), schedule, 20.0)) for t in (0.25, 0.5)]
        np.testing.assert_allclose(got, expected, atol=1e-4)
    assert float(ef.weight(np.float64(0.999), "linear", 20.0)) == 20.0  # clipped


# x_t and the remaining edits -----------------------------------------------------------------

def apply_edits(xt, kind, row, tok):
    """All remaining edits at once: deletions and substitutions at their rows, insertions after
    their row in column order."""
    out = []
    for i, token in enumerate(xt):
        ops = [(k, t) for k, r, t in zip(kind, row, tok) if r == i]
        if not any(k == ef.DEL for k, _ in ops):
            out.append(next((t for k, t in ops if k == ef.SUB), token))
        out += [t for k, t in ops if k == ef.INS]
    return out


def random_columns(rng, prior="masks"):
    s = ef.EditFlowSettings(prior=prior, prior_masks=int(rng.integers(0, 6)))
    x1 = rng.integers(3, 9, rng.integers(2, 14))
    return ef.columns(x1, int(rng.integers(1, len(x1))), s, M, 24)


def test_kappa_0_gives_x0_kappa_1_gives_x1_and_the_remaining_edits_lead_to_x1():
    rng = np.random.default_rng(1)
    for trial in range(30):
        rows = [random_columns(rng, "masks" if trial % 2 else "empty") for _ in range(3)]
        z0, z1 = (jnp.asarray(np.stack([r[k] for r in rows])) for k in ("z0", "z1"))
        for kappa in (0.0, 1.0, float(rng.uniform())):
            xt, n, zt = ef.sample_xt(jax.random.key(trial), z0, z1, jnp.full(3, kappa), 0)
            kind, row, tok = ef.remaining_edits(zt, z1)
            for b in range(3):
                x_t = np.asarray(xt[b, :int(n[b])]).tolist()
                if kappa == 0.0:
                    assert x_t == rm_blanks(z0[b])
                if kappa == 1.0:
                    assert x_t == rm_blanks(z1[b]) and (kind[b] < 0).all()
                assert apply_edits(x_t, *(np.asarray(a[b]).tolist() for a in (kind, row, tok))) == rm_blanks(z1[b])


# The loss ------------------------------------------------------------------------------------

def loop_loss(sub, ins, rates, n, zt, z1, w, denom):
    """The notes' per-edit loop (PT's commented reference), one example."""
    survival = float(rates[:n].sum())
    nb, total = 0, 0.0
    for col in range(len(z1)):
        if z1[col] == ef.PADCOL:
            continue
        if zt[col] != z1[col]:
            if zt[col] == ef.BLANK:
                r = max(nb - 1, 0)
                total += np.log(rates[r, ef.INS]) + jax.nn.log_softmax(ins[r])[z1[col]]
            elif z1[col] == ef.BLANK:
                total += np.log(rates[nb, ef.DEL])
            else:
                total += np.log(rates[nb, ef.SUB]) + jax.nn.log_softmax(sub[nb])[z1[col]]
        nb += zt[col] != ef.BLANK
    return w * (survival - total) / denom


def outputs(rng, batch, length, vocab=12):
    return (jnp.asarray(rng.normal(size=(batch, length, vocab)), jnp.float32),
            jnp.asarray(rng.normal(size=(batch, length, vocab)), jnp.float32),
            jnp.asarray(rng.uniform(0.1, 3.0, size=(batch, length, 3)), jnp.float32))


def test_the_vectorised_loss_equals_the_per_edit_loop_and_ignores_padding():
    rng = np.random.default_rng(2)
    rows = [random_columns(rng) for _ in range(4)]
    z0, z1 = (jnp.asarray(np.stack([r[k] for r in rows])) for k in ("z0", "z1"))
    xt, n, zt = ef.sample_xt(jax.random.key(0), z0, z1, jnp.array([0.2, 0.5, 0.7, 0.9]), 0)
    kind, row, tok = ef.remaining_edits(zt, z1)
    sub, ins, rates = outputs(rng, 4, z0.shape[1])
    w, denom = jnp.array([1.3, 0.7, 2.0, 5.0]), jnp.array([r["x1_len"] for r in rows], jnp.float32)
    got = ef.loss_B(sub, ins, rates, n, kind, row, tok, w, denom)
    want = [loop_loss(np.asarray(sub[b]), np.asarray(ins[b]), np.asarray(rates[b]), int(n[b]), np.asarray(zt[b]),
                      np.asarray(z1[b]), float(w[b]), float(denom[b])) for b in range(4)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    assert (np.asarray(kind) >= 0).any()  # the check covers edits, not only survival
    # Pad rows (any outputs past n) and pad columns (PADCOL, no edit) change nothing.
    pad = 5
    padded = [jnp.concatenate([a, jnp.asarray(rng.uniform(0.1, 9, (4, pad, a.shape[2])), a.dtype)], 1)
              for a in (sub, ins, rates)]
    wide = lambda a, v: jnp.concatenate([a, jnp.full((4, pad), v, a.dtype)], 1)  # noqa: E731
    kind2, row2, tok2 = ef.remaining_edits(wide(zt, ef.PADCOL), wide(z1, ef.PADCOL))
    np.testing.assert_allclose(np.asarray(ef.loss_B(*padded, n, kind2, row2, tok2, w, denom)), np.asarray(got),
                               rtol=1e-6)


def test_at_kappa_1_the_loss_is_the_survival_rates_alone():
    rng = np.random.default_rng(3)
    rows = [random_columns(rng) for _ in range(2)]
    z0, z1 = (jnp.asarray(np.stack([r[k] for r in rows])) for k in ("z0", "z1"))
    xt, n, zt = ef.sample_xt(jax.random.key(0), z0, z1, jnp.ones(2), 0)
    sub, ins, rates = outputs(rng, 2, z0.shape[1])
    got = ef.loss_B(sub, ins, rates, n, *ef.remaining_edits(zt, z1), jnp.full(2, 2.0), jnp.full(2, 4.0))
    want = [2.0 * float(rates[b, :int(n[b])].sum()) / 4.0 for b in range(2)]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_freely_fitted_rates_reach_the_count_of_edits():
    """The optimum of w (r - n log r) is r = n: a row's fitted rate counts its edits (here two
    insertions after row 0, one substitution at row 1, nothing at row 2)."""
    z1 = jnp.array([[7, 8, 9, 5, 6]])
    zt = jnp.array([[7, ef.BLANK, ef.BLANK, 4, 6]])
    kind, row, tok = ef.remaining_edits(zt, z1)
    vocab = 12
    logits = jnp.zeros((1, 3, vocab))

    def loss(log_rates):
        return ef.loss_B(logits, logits, jnp.exp(log_rates), jnp.array([3]), kind, row, tok, jnp.ones(1),
                         jnp.ones(1)).sum()

    log_rates = jnp.zeros((1, 3, 3))
    for _ in range(2000):
        log_rates -= 0.05 * jax.grad(loss)(log_rates)
    fitted = np.asarray(jnp.exp(log_rates[0]))
    assert fitted[0, ef.INS] == pytest.approx(2.0, rel=1e-2) and fitted[1, ef.SUB] == pytest.approx(1.0, rel=1e-2)
    assert fitted[2].max() < 0.05 and fitted[0, ef.SUB] < 0.05


# The tau-leaping step ------------------------------------------------------------------------

CFG = SamplingConfig(gen_length=8, remask_steps=4, edit_kappa="linear", edit_max_w=20.0, edit_masks=2)
PROMPT, TOTAL, V, MASK, EOS = 3, 11, 12, 10, 11


def start(batch=2):
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 9, (batch, PROMPT)), jnp.int32)
    return prompt, decoder.start_state(prompt, TOTAL, CFG.edit_masks, MASK, EOS)


def step_with(rates, s, step=1, seed=0):
    logits = jnp.asarray(np.random.default_rng(seed).normal(size=(s.tokens.shape[0], TOTAL, V)), jnp.float32)
    return decoder.tau_leap_step(logits, logits, rates, s, step, jax.random.key(seed), PROMPT, CFG, MASK, EOS)


def test_zero_rates_leave_the_rows_as_they_are():
    _, s = start()
    after = step_with(jnp.zeros((2, TOTAL, 3)), s)
    assert (after.tokens == s.tokens).all() and (after.n == s.n).all() and not after.overflow.any()


def test_certain_deletions_leave_the_prompt_alone():
    prompt, s = start()
    after = step_with(jnp.zeros((2, TOTAL, 3)).at[..., ef.DEL].set(1e6), s)
    assert (after.n == PROMPT).all() and (after.tokens[:, :PROMPT] == prompt).all()
    assert (after.tokens[:, PROMPT:] == EOS).all()


def test_insertions_grow_a_row_by_at_most_its_length_and_never_past_the_buffer():
    prompt, s = start()
    everywhere = jnp.zeros((2, TOTAL, 3)).at[..., ef.INS].set(1e6)
    after = step_with(everywhere, s)
    # every gap from the prompt's last token on takes one token: 3 new ones for 5 rows
    assert (after.n == s.n + 3).all() and not after.overflow.any()
    again = step_with(everywhere, after, step=2)
    assert (again.n == TOTAL).all() and again.overflow.all()  # 8 + 6 > 11: cut and flagged
    assert (again.tokens[:, :PROMPT] == prompt).all()


def test_random_rates_never_edit_the_prompt():
    rng = np.random.default_rng(4)
    prompt, s = start(4)
    for step in range(8):
        s = step_with(jnp.asarray(rng.uniform(0, 30, (4, TOTAL, 3)), jnp.float32), s, step, seed=step)
        assert (s.tokens[:, :PROMPT] == prompt).all() and (s.n >= PROMPT).all() and (s.n <= TOTAL).all()
        index = np.arange(TOTAL)
        assert (np.asarray(s.tokens)[index[None, :] >= np.asarray(s.n)[:, None]] == EOS).all()


# Through the trainer and evals ---------------------------------------------------------------

EDITFLOW = ["objective.name=editflow", "objective.prompt_max=8", "train.steps=6", "train.checkpoint_every=6"]


@pytest.fixture(scope="module")
def editflow_run(tiny_dataset, tmp_path_factory, request):
    from trainer import config as config_lib
    from trainer import train

    run_dir = tmp_path_factory.mktemp("runs") / "editflow"
    compiled = []
    real = train.make_train_step

    def recorded(*args, **kwargs):
        compiled.append(real(*args, **kwargs))
        return compiled[-1]

    train.make_train_step = recorded
    try:
        cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, *EDITFLOW])
        assert train.run(cfg) == 0
    finally:
        train.make_train_step = real
    return run_dir, compiled


def test_an_editflow_run_trains_with_one_compiled_step(editflow_run):
    run_dir, compiled = editflow_run
    assert len(compiled) == 1 and compiled[0]._cache_size() == 1  # every batch has the same shapes
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(np.isfinite(losses))


def test_an_editflow_run_is_evaluated_and_decoded_by_its_own_decoder(editflow_run):
    from evals import __main__ as evals_cli
    from evals.ledger import Ledger

    run_dir, _ = editflow_run
    assert evals_cli.main(["--run_dir", str(run_dir), "--once", "sampling.num_samples=4", "sampling.gen_length=16",
                           "sampling.prompt_tokens=8", "perplexity.max_tokens=500", "wandb_mode=disabled"]) == 0
    record = Ledger(str(run_dir)).records()[-1]
    assert "loss_ppl" in record["perplexity"] and "ppl_bound" not in record["perplexity"]  # not a bound
    metrics = record["samplers"]["editflow"]
    assert metrics["forwards_per_sequence"] == 16 and 0 <= metrics["length_tv"] <= 1
    assert len(record["samples"]) == 4


def test_an_editflow_run_is_not_exported_without_its_heads(editflow_run, tmp_path, capsys):
    from trainer import export

    run_dir, _ = editflow_run
    assert export.main(["--run_dir", str(run_dir), "--output", str(tmp_path / "out")]) == 2
    assert "Edit Flows run" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_decoders_refuse_a_model_read_otherwise_than_trained(tiny_dataset, tmp_path):
    from evals.decoders import registry
    from trainer import config as config_lib
    from trainer.errors import ConfigError

    cfg = config_lib.load(None, [f"data.path={tiny_dataset}", f"run_dir={tmp_path}", *TINY_MODEL, *EDITFLOW])
    with pytest.raises(ConfigError, match="Edit Flows' heads"):
        registry.plan("remask", SamplingConfig(), cfg)
    assert registry.plan("auto", SamplingConfig(gen_length=32), cfg)[0] == ["editflow"]
    mdlm = dataclasses.replace(cfg, objective=config_lib.load(None, ["objective.name=mdlm"]).objective)
    with pytest.raises(ConfigError, match="no Dream.s shift, no Edit Flows"):
        registry.plan("editflow", SamplingConfig(), mdlm)


def test_an_editflow_model_starts_from_an_mdlm_run_with_its_lm_head_copied(editflow_run, tiny_dataset, tmp_path):
    from trainer import config as config_lib
    from trainer import state, train

    mdlm_dir = tmp_path / "mdlm"
    base = [f"data.path={tiny_dataset}", *TINY_MODEL, "train.steps=2", "train.checkpoint_every=2"]
    assert train.run(config_lib.load(None, [*base, f"run_dir={mdlm_dir}"])) == 0
    adapted = tmp_path / "adapted"
    cfg = config_lib.load(None, [*base, *EDITFLOW[:2], f"run_dir={adapted}", f"train.init_from_run={mdlm_dir}",
                                 "train.steps=1", "optim.lr=1e-9"])
    assert train.run(cfg) == 0
    source, params = state.load_params(str(mdlm_dir)).params, state.load_params(str(adapted)).params
    np.testing.assert_allclose(np.asarray(params["edit"]["ins"]["kernel"]),
                               np.asarray(source["embed"]["embedding"]).T, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["blocks"][0]["mlp"]["up"]["kernel"]),
                               np.asarray(source["blocks"][0]["mlp"]["up"]["kernel"]), atol=1e-6)


def test_the_time_input_starts_silent_and_a_run_without_it_starts_a_run_with_it(editflow_run, tmp_path):
    from flax import nnx

    from trainer import config as config_lib
    from trainer import state, train
    from trainer.config import ModelConfig
    from trainer.model import Transformer

    model = Transformer(ModelConfig(vocab_size=20, hidden=16, layers=1, heads=2, mlp_hidden=32, max_seq_len=16),
                        nnx.Rngs(0), edit_heads=True, time_input=True)
    tokens, ones = jnp.arange(8)[None], jnp.ones((1, 8), jnp.int32)
    at = lambda t: model.edit_outputs(tokens, ones, jnp.arange(8)[None], jnp.array([t]))[2]  # noqa: E731
    np.testing.assert_array_equal(at(0.1), at(0.9))  # zero-initialised projection: the trunk's outputs
    model.edit.time.kernel[...] = jnp.ones_like(model.edit.time.kernel[...])
    assert not np.allclose(at(0.1), at(0.9))

    run_dir, _ = editflow_run
    timed = tmp_path / "timed"
    cfg = config_lib.load_run(run_dir)
    cfg = config_lib.load(None, [f"data.path={cfg.data.path}", *TINY_MODEL, *EDITFLOW, f"run_dir={timed}",
                                 "objective.time_input=true", f"train.init_from_run={run_dir}", "train.steps=1",
                                 "optim.lr=1e-9"])
    assert train.run(cfg) == 0
    source, params = state.load_params(str(run_dir)).params, state.load_params(str(timed)).params
    np.testing.assert_allclose(np.asarray(params["edit"]["rates"]["kernel"]),
                               np.asarray(source["edit"]["rates"]["kernel"]), atol=1e-6)
    assert "time" in params["edit"] and "time" not in source["edit"]


def test_trajectories_share_their_prompt_and_are_never_packed(trajectory_dataset, tmp_path):
    from trainer import config as config_lib
    from trainer import data

    cfg = config_lib.load(None, [f"data.path={trajectory_dataset}", f"run_dir={tmp_path}", *TINY_MODEL,
                                 "objective.name=editflow"])
    manifest = data.load_manifest(str(trajectory_dataset))
    batch = next(iter(data.edit_dataset(cfg, manifest, "train", 4, shuffle=False, repeat=False)))
    documents = data.documents(str(trajectory_dataset), manifest, "train")
    records = [documents[i] for i in range(4)]
    for b, record in enumerate(records):
        p = int(record["prompt_len"])
        assert batch["prompt_len"][b] == p  # the question is the shared prefix, whatever prompt_max says
        assert (batch["z0"][b, :p] == record["tokens"][:p]).all() and (batch["z1"][b, :p] == batch["z0"][b, :p]).all()
        assert rm_blanks(batch["z1"][b]) == record["tokens"][:int(batch["x1_len"][b])].tolist()
        assert (batch["z0"][b, p:] == ef.BLANK).sum() == int(batch["x1_len"][b]) - p  # the answer: insertions only


def test_editflow_settings_are_checked(tiny_dataset, tmp_path):
    from trainer import config as config_lib
    from trainer.errors import ConfigError

    base = [f"data.path={tiny_dataset}", f"run_dir={tmp_path}", *TINY_MODEL, "objective.name=editflow"]
    for override, key in (("objective.kappa=quartic", "objective.kappa"), ("objective.prior=noise", "objective.prior"),
                          ("objective.prior_masks=60", "objective.prior_masks")):
        with pytest.raises(ConfigError, match=key):
            config_lib.load(None, [*base, override]).validate()
