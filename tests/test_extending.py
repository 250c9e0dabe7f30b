"""Extending the stack: a new objective and a new decoder are one file each (tests/toys/), found
through the registries by the trainer, the evals and the config loader, with no edit elsewhere."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest

from evals import __main__ as evals_cli
from evals import decoders
from tests.conftest import TINY_MODEL
from trainer import config as config_lib
from trainer import objectives, train
from trainer.errors import ConfigError


@pytest.fixture
def toys(monkeypatch):
    """The toy objective and decoder registered for this test only (the registries are restored)."""
    for registry in (objectives.registry.REGISTRY, decoders.registry.REGISTRY):
        monkeypatch.setattr(registry, "entries", dict(registry.entries))
    for module in ("tests.toys.toy_objective", "tests.toys.toy_decoder"):  # each registers on import
        if module in sys.modules:
            importlib.reload(sys.modules[module])
        else:
            importlib.import_module(module)


def test_a_toy_objective_and_decoder_train_and_evaluate_through_the_registries(toys, tiny_dataset, tmp_path):
    run_dir = tmp_path / "toy"
    overrides = [f"data.path={tiny_dataset}", f"run_dir={run_dir}", *TINY_MODEL, "train.steps=4",
                 "train.checkpoint_every=4", "objective.name=toy_mlm"]
    with pytest.raises(ConfigError, match="objective.mask_rate must be in"):
        config_lib.load(None, [*overrides, "objective.mask_rate=0"]).validate()
    with pytest.raises(ConfigError, match="objective.block_size is not a setting of objective toy_mlm"):
        config_lib.load(None, [*overrides, "objective.block_size=4"])
    cfg = config_lib.load(None, [*overrides, "objective.mask_rate=0.5"])
    cfg.validate()
    assert train.run(cfg) == 0
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert config_lib.load_run(run_dir).objective.mask_rate == 0.5  # its settings are saved with the run

    assert decoders.fitting("toy_mlm") == ("remask", "threshold_full", "left_to_right")
    assert evals_cli.main(["--run_dir", str(run_dir), "--once", "perplexity.max_tokens=500",
                           "perplexity.time_samples=2", "sampling.num_samples=2", "sampling.gen_length=16",
                           "sampling.block_length=8", "wandb_mode=disabled"]) == 0
    record = json.loads((run_dir / "evals" / "ledger.jsonl").read_text().splitlines()[-1])
    assert record["objective"] == "toy_mlm" and np.isfinite(record["perplexity"]["ppl_bound"])
    toy = record["samplers"]["left_to_right"]
    assert toy["matched"] and toy["tokens_per_forward"] == 1.0
    trace = record["trace"]  # the last decoder asked for: left_to_right, one position per pass, in order
    generated = [at for at in trace["decoded_at"] if at]
    assert record["trace"]["sampler"] == "left_to_right" and generated == sorted(generated)


def test_an_unknown_objective_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"objective.name 'mlm' is not a registered objective") as error:
        config_lib.load(None, ["objective.name=mlm"])
    assert set(str(error.value).split("registered: ")[1].rstrip(")").split(", ")) == {"mdlm", "bd3lm", "ar", "oput", "dream", "editflow"}
