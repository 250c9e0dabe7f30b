"""How many tokens per forward can a confidence-threshold decoder reach on a corpus at its own odds?

    python benchmarks/ceiling.py [--steps 600] [--docs 256] [--out results.json]

For each corpus of the decoding benchmark (the generated stories and the arithmetic problems,
prepared as there: same documents, tokenizer and block size), trains its AR twin (the recipe's
judge: configs/tinystories_tiny_ar.yaml, --steps) and reads where the held-out documents' own
continuations are a choice: the positions whose most likely token, given all the text to their
left, has probability below the decoder's threshold. The threshold and SPD decoders commit, per
pass, the positions they are sure of and at most one they are not (the leftmost), so a model as
sure as the data allows, no surer, needs at least one pass per such position and one per block:
ceiling = generated tokens / sum over blocks of max(1, unsure positions in the block). It is an
upper bound for such a model (a token that depends on a choice in its own block needs a later
pass, not counted). Read beside the decoding benchmark's base threshold decoder: below the
ceiling, a model can go faster by being sure in parallel of what the data fixes (what OPUT is
for); past it, only by being sure of the data's choices, choosing as its greedy self would.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from _common import emit, latest, run
from decoding import PROMPT_LEN, prepare_data
from flax import nnx

from trainer import data

CORPORA = {"generated": 112, "arithmetic": 64}  # generated tokens per prompt, as decoding.py decodes them
BLOCK = 8  # the base's block (configs/tinystories_tiny_bd3lm.yaml)


def held_out(data_path: str, count: int, gen_length: int) -> list[tuple[np.ndarray, int]]:
    """The first `count` validation documents that continue a prompt, cut to the prompt and at most
    `gen_length` generated tokens through their EOS, each with its prompt length (a story's first
    PROMPT_LEN tokens, a question's own)."""
    manifest = data.load_manifest(data_path)
    eos = data.special_ids(manifest)["eos"]
    found = []
    for doc in data.documents(data_path, manifest, "validation"):
        tokens = doc["tokens"]
        prompt_len = int(doc["prompt_len"]) or PROMPT_LEN  # 0: a text document
        if len(tokens) <= prompt_len:
            continue
        generated = tokens[prompt_len:prompt_len + gen_length]
        ends = np.flatnonzero(generated == eos)
        found.append((tokens[:prompt_len + (ends[0] + 1 if len(ends) else len(generated))], prompt_len))
        if len(found) == count:
            break
    return found


def next_token_confidence(graphdef, params, docs: list[tuple[np.ndarray, int]], pad: int) -> list[np.ndarray]:
    """Per document, the AR model's probability of its most likely next token at each generated
    position, given everything before it (the documents padded at the end: a causal model's
    earlier positions do not see the padding)."""
    model = nnx.merge(graphdef, params)
    width = max(len(tokens) for tokens, _ in docs)
    x = jnp.asarray(np.stack([np.pad(tokens, (0, width - len(tokens)), constant_values=pad) for tokens, _ in docs]))
    positions = jnp.broadcast_to(jnp.arange(width), x.shape)
    p_max = np.asarray(jnp.max(jax.nn.softmax(model(x, jnp.ones_like(x), positions, causal=True), -1), -1))
    # position t is predicted at t - 1
    return [p_max[i, prompt_len - 1:len(tokens) - 1] for i, (tokens, prompt_len) in enumerate(docs)]


def fewest_passes(unsure_G: np.ndarray, prompt_len: int, width: int) -> int:
    """Passes a decoder committing at most one unsure position per pass needs for the generated
    positions prompt_len.. (blocks of `width` aligned to absolute positions): per block, one per
    unsure position, at least one."""
    index = prompt_len + np.arange(len(unsure_G))
    blocks = index // width
    return sum(max(1, int(unsure_G[blocks == b].sum())) for b in np.unique(blocks))


def ceiling(confidence: list[np.ndarray], docs: list[tuple[np.ndarray, int]], threshold: float) -> dict:
    tokens = sum(len(c) for c in confidence)
    unsure = [c < threshold for c in confidence]
    passes = sum(fewest_passes(u, prompt_len, BLOCK) for u, (_, prompt_len) in zip(unsure, docs))
    return {"tokens_per_forward_ceiling": round(tokens / passes, 3),
            "unsure_per_document": round(sum(int(u.sum()) for u in unsure) / len(docs), 2),
            "generated_per_document": round(tokens / len(docs), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="Steps of each AR twin (the recipe's judge's).")
    parser.add_argument("--docs", type=int, default=256, help="Held-out documents read per corpus.")
    parser.add_argument("--thresholds", default="0.5,0.7,0.9", help="Comma-separated thresholds.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    results = {}
    for corpus, gen_length in CORPORA.items():
        with tempfile.TemporaryDirectory() as tmp:
            data_path = prepare_data(tmp, corpus)
            run("-m", "trainer", "--config", "configs/tinystories_tiny_ar.yaml", f"run_dir={tmp}/ar",
                f"data.path={data_path}", f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}",
                "wandb.mode=disabled", "seed=0")
            _, (graphdef, params) = latest(f"{tmp}/ar")
            docs = held_out(data_path, args.docs, gen_length)
            confidence = next_token_confidence(graphdef, params, docs,
                                               data.special_ids(data.load_manifest(data_path))["eos"])
        results[corpus] = {"documents": len(docs), "gen_length": gen_length, "block": BLOCK,
                           **{f"threshold_{t}": ceiling(confidence, docs, t) for t in thresholds}}
    emit({"benchmark": "ceiling", "machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                                             f"{jax.devices()[0].device_kind}",
          "ar_steps": args.steps, "results": results}, args.out)


if __name__ == "__main__":
    from absl import flags

    flags.FLAGS(sys.argv[:1])  # Grain's worker processes read absl flags
    main()
