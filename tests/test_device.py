"""benchmarks/device.sh, the accelerator check, runs its code paths on CPU with --tiny (CI has no
accelerator): every objective's train step, cached decoding against a bare forward, the 4-worker
loader, all without Beam (the accelerator images have none)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import table  # noqa: E402


def test_device_script_runs_every_path_on_cpu_without_beam(tmp_path):
    out = tmp_path / "device.json"
    result = subprocess.run(["bash", "benchmarks/device.sh", "--tiny", "--steps", "1", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["beam_imported"] is False
    configs = report["train_step"]["configs"]
    assert set(configs) == {"mdlm_4x64", "ar_4x64", "bd3lm_4x64", "oput_4x64", "mdlm_4x64_remat_dots"}
    for name, setting in configs.items():
        assert "error" not in setting and 0 < setting["mfu"] and setting["tokens_per_s"] > 0, name
        assert setting["attention"] == "xla" and setting["xla_memory_gib"] > 0 and setting["compile_seconds"] > 0
    for name in ("bd3lm_4x64", "oput_4x64"):  # two streams (and a rollout): more executed than token-once
        assert configs[name]["mfu_executed"] > configs[name]["mfu"]
    assert configs["mdlm_4x64"]["mfu_executed"] == configs["mdlm_4x64"]["mfu"]
    assert report["loader"]["grain_packed_tokens_per_s_workers_4"] > 0
    assert set(report["init_compile_seconds"]) == {"scanned", "unrolled"}
    for batch in (1, 32):
        row = report["decoding"][f"batch_{batch}"]
        assert row["bare_forward_ms"] > 0
        for name in ("spd_cached", "one_token"):
            assert row[name]["tokens_per_s"] > 0 and row[name]["per_forward_vs_bare"] > 0
        assert row["one_token"]["forwards"] == report["decoding"]["gen_length"]  # one token per forward
    rows = table.device(report)  # what the README table shows once a device run is recorded
    assert rows[0][0].endswith("seed-shaped train step, mdlm_4x64 (xla, remat full)") and rows[0][3].startswith("MFU ")
    assert any("spd_cached decoding, batch 1" in r[0] for r in rows) and any("4 workers" in r[0] for r in rows)
    refused = subprocess.run(["bash", "benchmarks/device.sh", "--tiny", "--record"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1 and refused.stderr.strip().startswith("error: --record")
