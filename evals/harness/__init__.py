"""lm-evaluation-harness for every checkpoint of this stack (MDLM, BD3LM, OPUT, AR).

- model.py: the registered lm_eval model `diffusion-lm-jax` (loglikelihood, loglikelihood_rolling,
  generate_until) over a checkpoint (checkpoint.py), scoring requests (scoring.py) and generating
  (generation.py);
- tasks/: the shipped offline tasks (YAML + utils.py);
- suite.py: the tasks `python -m evals` runs on each new step (harness.tasks);
- __main__.py: `python -m evals.harness ARGS`, lm_eval's CLI with the model registered.
Only suite.py, model.py and __main__.py import lm_eval (the `harness` extra)."""
