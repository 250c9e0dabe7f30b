"""Evaluating a run's checkpoints: once (for a scheduler) or watching as they commit."""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any

import jax
from etils import epath

from evals import decoders, ledger, perplexity, quality, report, runs
from evals.config import EvalConfig
from trainer import checkpointing, objectives, observe, state
from trainer.errors import RunError


class UnreadableStep(Exception):
    """A committed checkpoint that cannot be restored (a damaged file)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _headlines(harness: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """Each harness task's first scored metric (lm_eval's `metric,filter` key) and its value."""
    return {task: first for task, metrics in harness.get("scores", {}).items()
            if (first := next(((k, v) for k, v in metrics.items() if "_stderr" not in k and v is not None), None))}


class Evaluator:
    def __init__(self, run_dir: str, cfg: EvalConfig, force: bool = False, latest: bool = False):
        """`force`: evaluate again, under these settings, steps recorded under other settings (a
        second record per step) instead of refusing."""
        self.run_dir, self.cfg, self.force, self.latest = run_dir, cfg, force, latest
        run = runs.open_run(run_dir, cfg.data_path)
        self.run_cfg, self.manifest, self.tokenizer, self.ids = run.cfg, run.manifest, run.tokenizer, run.ids
        self.samplers, cfg.sampling = decoders.plan(cfg.samplers, cfg.sampling, self.run_cfg)
        self.settings = dataclasses.asdict(cfg)  # what every record of this evaluator is keyed by
        s = cfg.sampling
        self.prompt = self.prompts = None
        if self.samplers:
            documents = perplexity.prompt_documents(self.run_cfg, self.manifest, s.num_samples, s.prompt_tokens)
            self.prompt = perplexity.prompt_rows(documents, s.prompt_tokens)
            self.prompts = quality.read_prompts(self.tokenizer, documents, s.prompt_tokens, s.gen_length, self.ids)
        self.exported = run.exported  # a trainer.export directory, not a run
        self.mngr = None if self.exported is not None else checkpointing.reader(run_dir)
        self.ledger = ledger.Ledger(run_dir)
        self.judge = self._judge()
        self.reference = self._reference()
        self.harness = self._harness()
        self.wandb = observe.Wandb(run_dir, self.run_cfg.wandb.project, cfg.wandb_mode,
                                   dataclasses.asdict(cfg), job_type="evals")

    def _judge(self):
        """(graphdef, params) of the AR run whose latest checkpoint scores samples (gen-ppl), or None."""
        if not self.cfg.gen_ppl_run_dir:
            return None
        ref_cfg = runs.load_config(self.cfg.gen_ppl_run_dir)
        if objectives.get(ref_cfg.objective.name).attention != objectives.registry.CAUSAL:
            raise RunError(f"gen_ppl_run_dir {self.cfg.gen_ppl_run_dir} is not an AR run")
        graphdef, params, _ = state.load_params(self.cfg.gen_ppl_run_dir, cfg=ref_cfg)
        return graphdef, params

    def _reference(self) -> dict[str, Any] | None:
        """The one-token quality of `reference_run_dir`'s latest evaluation under the same prompts,
        generation length and judge (those settings must agree), or None."""
        if not self.cfg.reference_run_dir:
            return None
        same = ("data_path", "gen_ppl_run_dir")
        same_sampling = ("num_samples", "prompt_tokens", "gen_length", "seed")
        for record in reversed(ledger.Ledger(self.cfg.reference_run_dir).records()):
            reference = record.get("quality_reference")
            if not isinstance(reference, dict) or all(reference.get(k) is None for k in quality.REFERENCE_KEYS):
                continue
            theirs = record["settings"]
            differs = [k for k in same if theirs.get(k) != getattr(self.cfg, k)] + [
                f"sampling.{k}" for k in same_sampling if theirs["sampling"].get(k) != getattr(self.cfg.sampling, k)]
            if differs:
                raise RunError(f"reference_run_dir {self.cfg.reference_run_dir} was evaluated with other "
                               f"{', '.join(differs)}: evaluate both with the same settings")
            return reference
        raise RunError(f"reference_run_dir {self.cfg.reference_run_dir} has no evaluated one-token decoding: run "
                       f"python -m evals on it first")

    def _harness(self):
        """The lm-evaluation-harness tasks run on each step (harness.tasks), or None; lm_eval is imported
        only then."""
        if not self.cfg.harness.tasks:
            return None
        from evals.harness import suite

        return suite.Suite(self.cfg.harness, self.cfg.sampling, {
            "run_dir": self.run_dir, "data_path": self.run_cfg.data.path, "judge_run_dir": self.cfg.gen_ppl_run_dir,
            "arithmetic_data": self.cfg.harness.arithmetic_data})

    def pending(self) -> list[int]:
        """Committed steps (`latest`: the latest one only) with no record under these settings. A step
        recorded under other settings only is refused in one line, unless `force`: never evaluated or
        skipped in silence."""
        steps = [self.exported] if self.exported is not None else checkpointing.committed_steps(self.mngr)
        steps = steps[-1:] if self.latest else steps
        done, recorded = self.ledger.steps(self.settings), self.ledger.records()
        todo = [s for s in steps if s not in done]
        self.check_config(todo)
        elsewhere = [s for s in todo if any(r["step"] == s for r in recorded)]
        if elsewhere and not self.force:
            other = next(r.get("settings") or {} for r in recorded if r["step"] == elsewhere[0])
            changed = ", ".join(ledger.differences(other, self.settings)[:3])
            raise RunError(f"step(s) {elsewhere} of {self.run_dir} were evaluated under other settings ({changed}): "
                           f"pass --force to evaluate them again under these (recorded beside the first), or "
                           f"evaluate with the earlier settings")
        return todo

    def check_config(self, steps: list[int]) -> None:
        """The run's config.yaml must describe its checkpoints (an edited model key would make every
        step unreadable): refused in one line before any evaluation, and nothing is recorded, since
        a configuration problem is not a property of a step."""
        if self.exported is not None or not steps:
            return  # an export's weights are checked tensor by tensor as they load
        params = state.abstract_state(self.run_cfg)["params"]
        for step in steps:
            checkpointing.check_shapes(self.mngr, step, params,
                                       f"{self.run_dir}/config.yaml does not describe the run's checkpoints; "
                                       f"restore the config it was trained with (nothing was evaluated)")

    def _model(self, step: int):
        """(graphdef, params) of `step`, or None when keep-last cleanup deleted it meanwhile."""
        if self.exported is not None:
            return runs.load_exported(self.run_dir, self.run_cfg)
        try:
            checkpointing.check_owner(self.mngr, self.run_dir, step)
        except RunError as e:
            raise UnreadableStep(str(e)) from None
        try:
            params = checkpointing.restore_params(self.mngr, step, state.abstract_state(self.run_cfg),
                                                  state.weights_key(self.run_cfg))
            return state.model_graphdef(self.run_cfg), params
        except Exception as e:
            if step in checkpointing.committed_steps(self.mngr):
                raise UnreadableStep(checkpointing.first_line(e)) from None
            print(f"warning: step {step} was deleted (keep-last cleanup) before it was evaluated; skipped")
            return None

    def evaluate(self, step: int) -> dict[str, Any] | None:
        start = time.perf_counter()
        try:
            model = self._model(step)
        except UnreadableStep as e:  # recorded, so that later steps are evaluated and this one not retried
            return {"step": step, "objective": self.run_cfg.objective.name, "error": f"unreadable checkpoint: {e}",
                    "settings": self.settings, "settings_hash": ledger.settings_hash(self.settings),
                    "evaluated_at": _now()}
        if model is None:
            return None
        graphdef, params = model
        restore_seconds = time.perf_counter() - start
        ppl = perplexity.evaluate(graphdef, params, self.run_cfg, self.manifest, self.cfg.perplexity)
        source = self.run_dir if self.exported is not None else epath.Path(self.run_dir) / "checkpoints" / str(step)
        record: dict[str, Any] = {
            "step": step,
            "checkpoint": str(source),
            "objective": self.run_cfg.objective.name,
            "perplexity": ppl,
            "settings": self.settings,
            "settings_hash": ledger.settings_hash(self.settings),
        }
        seconds = {"restore": restore_seconds, "perplexity": time.perf_counter() - start - restore_seconds}
        if self.samplers:
            record.update(self._sample(graphdef, params, step, seconds))
        if self.harness is not None:
            from evals.harness.checkpoint import Checkpoint

            started = time.perf_counter()
            record["harness"] = self.harness.evaluate(
                Checkpoint(self.run_dir, self.run_cfg, self.tokenizer, self.ids, graphdef, params, step))
            seconds["harness"] = time.perf_counter() - started
        seconds["total"] = time.perf_counter() - start
        record["wall_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        record["evaluated_at"] = _now()
        return record

    def _sample(self, graphdef, params, step: int, seconds: dict[str, float]) -> dict[str, Any]:
        s, prompt = self.cfg.sampling, self.prompt
        eos, mask = self.ids["eos"], self.ids["mask"]
        samplers, outputs = {}, {}
        for name in self.samplers:
            out = decoders.generate(name, graphdef, params, prompt, s, mask, eos, jax.random.key(s.seed))
            metrics = {"matched": decoders.is_matched(name, self.run_cfg.objective.name),
                       "attention": decoders.get(name).attention,
                       **quality.sampler_metrics(out, s.prompt_tokens, eos, self.judge, self.prompts)}
            samplers[name], outputs[name] = metrics, out
            seconds[name] = out.seconds
        for name in outputs:
            twin = decoders.get(name).cached_twin
            twin = twin and name.replace(decoders.parse(name)[0], twin, 1)  # at the same threshold
            if twin in outputs:
                # Equal by construction, but the two programs multiply matrices of different shapes, so
                # a near-tie in a trained model can round differently: measured, not assumed.
                same = outputs[name].tokens[:, s.prompt_tokens:] == outputs[twin].tokens[:, s.prompt_tokens:]
                samplers[name][f"agreement_with_{decoders.parse(twin)[0]}"] = float(same.mean())
        own = next((n for n in outputs if decoders.is_one_token(n, s)), None)
        reference = self.reference or (own and {"run_dir": self.run_dir, "step": step, "sampler": own,
                                                **{k: samplers[own].get(k) for k in quality.REFERENCE_KEYS}})
        if reference:
            for metrics in samplers.values():
                metrics.update(quality.versus_reference(metrics, reference))
        traced = list(outputs)[-1]  # the last one asked for (auto: the most parallel decoder)
        shown = outputs[traced]
        return {
            "samplers": samplers,
            "quality_reference": reference,
            "real_continuations": quality.real_continuations(self.prompts),
            "samples_by_sampler": {name: [self.tokenizer.decode(row.tolist()) for row in out.tokens]
                                   for name, out in outputs.items()},
            "samples": [self.tokenizer.decode(row.tolist()) for row in shown.tokens],
            "trace": {
                "sampler": traced,
                "pieces": [self.tokenizer.decode([int(t)], skip_special_tokens=False) for t in shown.tokens[0]],
                "decoded_at": shown.decoded_at[0].tolist(),
                "revisions": shown.revisions[0].tolist(),
            },
        }

    def record(self, result: dict[str, Any]) -> None:
        self.ledger.append(result)
        flat = {f"eval/{k}": v for k, v in result.get("perplexity", {}).items()}
        for name, metrics in result.get("samplers", {}).items():
            flat.update({f"eval/{name}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        for task, metrics in result.get("harness", {}).get("scores", {}).items():
            flat.update({f"eval/harness/{task}/{k}": v for k, v in metrics.items() if v is not None})
        self.wandb.log(result["step"], flat)
        ledger.write_whole(self.ledger.directory / "report.html",
                           report.render(self.ledger.records(self.settings), self.run_dir))

    def once(self) -> int:
        """Evaluates every committed step not yet evaluated under these settings; returns how many."""
        count = 0
        for step in self.pending():
            result = self.evaluate(step)
            if result is None:
                continue
            self.record(result)
            count += 1
            if "error" in result:
                print(f"step {step}: not evaluated, {result['error']} (recorded in the ledger)", flush=True)
                continue
            ppl = result["perplexity"]
            _, figure = perplexity.figure(ppl)
            speeds = "".join(f", {name} {m['tokens_per_forward']:.2f} tokens/forward"
                             for name, m in result.get("samplers", {}).items())
            speeds += "".join(f", {task} {metric} {value:.3f}"
                              for task, (metric, value) in _headlines(result.get("harness", {})).items())
            print(f"step {step}: ppl {figure:.3f}{speeds} ({result['wall_seconds']['total']:.1f}s)", flush=True)
        return count

    def watch(self) -> None:
        """Evaluates checkpoints as they commit, until the run's final step (an export's only
        step) has been evaluated; RunError when the run directory disappears meanwhile."""
        final = self.exported if self.exported is not None else self.run_cfg.train.steps
        while final not in self.ledger.steps(self.settings):
            if not (epath.Path(self.run_dir) / "config.yaml").exists():  # a watcher ends with what it watches
                raise RunError(f"{self.run_dir} was deleted (or lost its config.yaml) while it was watched: stopping")
            if not self.once():
                time.sleep(self.cfg.poll_seconds)

    def close(self) -> None:
        self.wandb.finish()
