"""Saved benchmark rows: which saved row still stands for a config (benchmarks/saved_rows.py)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.saved_rows import is_current, is_stale, row_config, row_key, save_row  # noqa: E402

PROTOCOL = {"steps": 200, "micro_batch_size": 4, "eval_tokens": 8192, "train_rows": 4000, "ratios": [0.3]}


def config(out: str = "/a", **atp) -> dict:
    cfg = {
        "datasets": [{"path": f"{out}/train.jsonl", "type": "completion"}],
        "output_dir": f"{out}/run",
        "learning_rate": 2e-4,
        "atp": {"prune_ratio": 0.3, **atp},
    }
    return row_config(cfg, PROTOCOL)


def test_a_row_is_current_for_its_config_wherever_its_work_folder_lies(tmp_path):
    path = tmp_path / "atp-0.3.json"
    assert not is_current(path, config())
    save_row(path, config(), {"PubMed": 20.0})
    assert is_current(path, config(out="/elsewhere"))  # paths do not decide a result
    assert not is_current(path, config(kd_weight=0.0))  # an option changed
    assert not is_current(path, {**config(), "protocol": {**config()["protocol"], "steps": 100}})


def test_a_row_is_stale_only_when_saved_with_another_config(tmp_path):
    path = tmp_path / "atp-0.3.json"
    assert not is_stale(path, config())  # missing: not measured, not stale
    save_row(path, config(), {"PubMed": 20.0})
    assert not is_stale(path, config())
    assert is_stale(path, config(kd_weight=0.0))


def test_an_option_added_since_at_its_default_keeps_the_row_and_at_another_value_does_not(tmp_path):
    path = tmp_path / "atp-0.3.json"
    current = config()
    measured = json.loads(json.dumps(current))
    del measured["cfg"]["atp"]["control_masks"]  # the option did not exist when the row was measured
    save_row(path, measured, {"PubMed": 20.0})
    assert is_current(path, current)
    assert not is_current(path, config(control_masks="decision"))


def test_a_row_saved_with_its_key_only_gets_its_config_when_the_key_matches(tmp_path):
    path = tmp_path / "atp-0.3.json"
    path.write_text(json.dumps({"key": row_key(config()), "row": {"PubMed": 20.0}}))
    assert not is_current(path, config(kd_weight=0.0))
    assert "config" not in json.loads(path.read_text())
    assert is_current(path, config())
    assert json.loads(path.read_text())["config"] == config()


def test_an_evaluation_only_row_is_current_by_its_key_alone(tmp_path):
    path = tmp_path / "base.json"
    save_row(path, {"eval_tokens": 1000}, {"PubMed": 21.0})
    assert is_current(path, {"eval_tokens": 1000})
    assert not is_current(path, {"eval_tokens": 2000})
    assert not is_current(path, config())  # a trained row's config never matches an evaluation-only row
