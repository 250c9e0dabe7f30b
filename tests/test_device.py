"""benchmarks/device.sh, the accelerator check, runs its code paths on CPU with --tiny (CI has no
accelerator): every train-step setting, the 4-worker loader and cached SPD at batch 1 and 32."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import table  # noqa: E402


def test_device_script_runs_every_path_on_cpu(tmp_path):
    out = tmp_path / "device.json"
    result = subprocess.run(["bash", "benchmarks/device.sh", "--tiny", "--steps", "1", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    configs = report["train_step"]["configs"]
    assert set(configs) == {"xla_seq64"}
    for setting in configs.values():
        assert "error" not in setting and 0 < setting["mfu"] and setting["tokens_per_s"] > 0
    assert report["loader"]["grain_packed_tokens_per_s_workers_4"] > 0
    for batch in (1, 32):
        decoded = report["decoding_spd_cached"][f"batch_{batch}"]
        assert decoded["tokens_per_s"] > 0 and decoded["forwards"] >= report["decoding_spd_cached"]["gen_length"] / 32
    rows = table.device(report)  # what the README table shows once a device run is recorded
    assert rows[0][0].endswith("seed-shaped train step, xla_seq64") and rows[0][3].startswith("MFU ")
    assert "cached SPD" in rows[1][0] and "4 workers" in rows[2][0]
    refused = subprocess.run(["bash", "benchmarks/device.sh", "--tiny", "--record"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1 and refused.stderr.strip().startswith("error: --record")
