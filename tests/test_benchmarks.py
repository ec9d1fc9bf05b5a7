"""Each benchmark's quick mode runs end to end (real SmolLM2-135M, real CLIs) and its figures are sane.

The full modes make the figures in benchmarks/RESULTS.md; these runs write only into a temporary folder.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit import OFFLINE_ENV

pytestmark = [pytest.mark.real, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, work: Path) -> dict | list:
    bindir = Path(sys.executable).parent
    env = {**os.environ, **OFFLINE_ENV, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--no-record", "--work", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "|---|" in done.stdout  # the table is printed
    return json.loads((work / "results.json").read_text())


def test_quality_quick(tmp_path, smollm2, pubmed):
    runs = {r["name"]: r for r in run_quick("quality", tmp_path)["runs"]}
    assert set(runs) == {"base", "dense", "atp-0.4", "two-stage-0.4"}
    for r in runs.values():
        assert math.isfinite(r["PubMed"]) and math.isfinite(r["Wikipedia"]) and r["PubMed"] > 1
    base = runs["base"]["params"]
    assert runs["dense"]["params"] == base
    pruned = [runs[n]["params"] for n in ("atp-0.4", "two-stage-0.4")]
    # Same budget for every pruned model: 40% of the prunable parameters, up to the rounding granularity.
    assert all(0.6 * base < p < 0.8 * base for p in pruned)
    assert max(pruned) - min(pruned) < 0.01 * base


def test_quality_seed_summary_gives_mean_spread_and_range_per_set():
    from benchmarks.quality import seed_summary

    rows = [
        {"kind": "atp", "ratio": 0.3, "seed": s, "PubMed": p, "Wikipedia": w}
        for s, p, w in [(44, 30.0, 50.0), (42, 28.0, 56.0), (43, 29.0, 53.0)]
    ]
    rows += [
        {"kind": "components", "ratio": 0.3, "seed": 42, "PubMed": 27.0, "Wikipedia": 55.0},  # one seed: no line
        {"kind": "atp", "ratio": 0.2, "seed": 43, "PubMed": 20.0, "Wikipedia": 40.0},  # another ratio: left out
    ]
    rows += [
        {"kind": "atp-short-control", "ratio": 0.3, "seed": s, "PubMed": p, "Wikipedia": w}
        for s, p, w in [(43, 27.0, 58.0), (42, 28.0, 60.0)]
    ]
    lines = seed_summary(rows).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| ATP | 42, 43, 44 | 29.00 | 1.00 | 28.00-30.00 | 53.00 | 3.00 | 50.00-56.00 |"
    assert lines[3].startswith("| ATP, masks frozen after 50 steps (control_steps: 50) | 42, 43 | 27.50 | 0.71 |")
    assert seed_summary(rows[3:5]) == ""


def test_export_speed_quick(tmp_path, smollm2, pubmed):
    rows = run_quick("export_speed", tmp_path)
    dense = [r for r in rows if r["layout"].startswith("dense")]
    pruned = [r for r in rows if not r["layout"].startswith("dense")]
    assert len(dense) == 2 and {r["layout"] for r in pruned} == {"per_layer", "uniform"}
    for r in pruned:
        assert r["params"] < dense[0]["params"]
        assert r["flops_per_token"] < dense[0]["flops_per_token"]
        assert r["tokens_per_s_b1"] > 0 and r["tokens_per_s_b8"] > 0


def test_merge_cost_quick(tmp_path, smollm2, pubmed):
    data = run_quick("merge_cost", tmp_path)
    assert len(data["rows"]) == 4  # two models, with and without verification
    for r in data["rows"]:
        assert r["seconds"] > 0 and r["peak_rss_mb"] > data["floor_mb"] > 0
    assert max(r["shards"] for r in data["rows"]) > 1  # the random model is written in several shards


def test_decision_quality_quick(tmp_path, smollm2, pubmed):
    """Zero-shot decision quality: the rows of the static criteria and of a masks file, at the budget asked."""
    from transformers import AutoConfig

    from benchmarks.synthetic import write_random_masks

    masks = tmp_path / "random_masks.json"
    write_random_masks(AutoConfig.from_pretrained(smollm2), masks, 0.2, "per_layer", seed=1)
    bindir = Path(sys.executable).parent
    env = {**os.environ, **OFFLINE_ENV, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, str(ROOT / "benchmarks" / "decision_quality.py"), "--quick", "--no-record"]
    command += ["--work", str(tmp_path), "--ratio", "0.2", "--masks", f"random={masks}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = {r["decision"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert len(rows) == 9 and "|---|" in done.stdout
    base = rows["base (nothing removed)"]
    assert base["removed"] == 0.0 and math.isfinite(base["PubMed"]) and math.isfinite(base["Wikipedia"])
    for name in ("Wanda-sp, both structures", "Wanda-sp, MLP channels only (two-stage's decision)", "random"):
        assert 0.2 - 1e-6 <= rows[name]["removed"] < 0.21, rows[name]  # the budget, up to one rounding block (fp32)
    assert rows["Wanda-sp, MLP channels only (two-stage's decision)"]["kv_heads_kept"] == 1.0
    # The same per-layer counts as the file: the same parameters removed, other groups.
    assert rows["Wanda-sp at random's per-layer counts"]["removed"] == pytest.approx(rows["random"]["removed"])
    # Removing groups costs perplexity; the parts remove less than the whole.
    assert all(r["PubMed"] > base["PubMed"] for n, r in rows.items() if r["removed"] > 0)
    assert all(r["Wikipedia"] > base["Wikipedia"] for n, r in rows.items() if r["removed"] > 0)
    assert rows["random: its MLP part only"]["removed"] < rows["random"]["removed"]


def test_memory_estimate_adds_up():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_estimate.py"), "--no-record"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    rows = [line.split("|")[1:3] for line in done.stdout.splitlines() if line.startswith("| ") and "GB" not in line]
    items = [(name.strip(), float(value.strip("* "))) for name, value in rows]
    parts = [v for n, v in items if not n.startswith(("**total", "total"))]
    total = next(v for n, v in items if n.startswith("**total"))
    assert abs(sum(parts) - total) < 0.1 * len(parts)
    assert next(v for n, v in items if n.startswith("total with")) > total


def test_quality_row_resumes_only_its_own_checkpoints(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.quality import prepare_resume, with_checkpoints

    run_dir = tmp_path / "atp-0.3" / "run"
    assert prepare_resume(run_dir, "key-a") is None  # a fresh row
    for step in (10, 20):
        (run_dir / f"checkpoint-{step}").mkdir()
    assert prepare_resume(run_dir, "key-a") == 20  # the same config: resumed
    assert (run_dir / "checkpoint-10").is_dir()
    assert prepare_resume(run_dir, "key-b") is None  # the config changed: its checkpoints are not resumed
    assert not list(run_dir.glob("checkpoint-*"))
    cfg = with_checkpoints({"save_strategy": "no", "max_steps": 200}, 10)
    assert cfg["save_strategy"] == "steps" and cfg["save_steps"] == 10 and cfg["auto_resume_from_checkpoints"]
    assert cfg["max_steps"] == 200


def test_demo_variants_change_one_key_of_the_demo_config(tmp_path):
    sys.path.insert(0, str(ROOT))
    from axolotl_atp.args import ATPConfig
    from benchmarks.demo_variants import (
        FIXED_DECISION_ROWS,
        TEACHER_SOURCES,
        VARIANTS,
        demo_config,
        report,
        variant_config,
    )

    model, data = tmp_path / "model", tmp_path / "train.jsonl"
    demo = demo_config(model, data, tmp_path / "demo")
    assert demo["base_model"] == str(model) and demo["datasets"][0]["path"] == str(data)
    for name, (_, change) in VARIANTS.items():
        if name in FIXED_DECISION_ROWS or name in TEACHER_SOURCES:
            continue  # their blocks name a decision file or a teacher adapter (built by another row)
        cfg = variant_config(name, model, data, tmp_path, decision=None)
        assert cfg["output_dir"] == str(tmp_path / name / "run")
        if name == "dense":
            assert "atp" not in cfg and "plugins" not in cfg
            assert cfg["lora_mlp_kernel"] is False and cfg["lora_qkv_kernel"] is False  # CUDA-only kernels
            continue
        assert cfg["atp"] == {**demo["atp"], **change}
        resolved = ATPConfig(**cfg["atp"])
        assert all(getattr(resolved, k) == v for k, v in change.items())
    rows = {
        "base": {"name": "base", "method": "base", "PubMed": 21.0, "Wikipedia": 23.0, "params": 10},
        "dense": {"name": "dense", "method": "dense", "PubMed": 15.0, "Wikipedia": 22.0, "params": 10},
        "two-stage": {"name": "two-stage", "method": "two", "PubMed": 30.0, "Wikipedia": 40.0, "params": 8},
        "defaults": {
            "name": "defaults",
            "method": "atp",
            "PubMed": 27.0,
            "Wikipedia": 35.0,
            "params": 8,
            "freeze_flips": 3,
            "groups": 300,
            "remaining_at_freeze": 0.812,
        },
    }
    table = report(rows)
    assert "| atp | 8 | 27.00 | 35.00 | 1.80 | 0.90 | 0.812 | 1.00% |" in table
    missing = next(line for line in table.splitlines() if line.startswith("Not yet measured:"))
    assert "ce-calibration" in missing and "two-stage" not in missing
    assert "Over seeds" not in table  # one seed per row so far
    seeded = {
        "defaults@7": {**rows["defaults"], "name": "defaults@7", "variant": "defaults", "seed": 7, "PubMed": 29.0},
        "two-stage@7": {**rows["two-stage"], "name": "two-stage@7", "variant": "two-stage", "seed": 7, "PubMed": 26.0},
    }
    table = report(rows | seeded)
    assert "| atp | 8 | 27.00 |" in table and "| atp | 8 | 29.00 |" not in table  # the first table is seed 42
    assert "| atp | 7, 42 | 28.00 (27.00-29.00) | 35.00 (35.00-35.00) | 1.00 |" in table
    assert "| two | 7, 42 | 28.00 (26.00-30.00) | 40.00 (40.00-40.00) |  |" in table


def test_teacher_row_distils_from_the_dense_rows_adapter_and_its_key_follows_the_weights(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.demo_variants import PROTOCOL, demo_config, variant_config
    from benchmarks.saved_rows import row_config, row_key

    def adapter(folder: Path, weights: bytes) -> Path:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text('{"r": 16}')
        (folder / "adapter_model.safetensors").write_bytes(weights)
        return folder

    model, data = tmp_path / "model", tmp_path / "train.jsonl"
    teacher = adapter(tmp_path / "dense" / "run", b"weights-a")
    cfg = variant_config("teacher-dense", model, data, tmp_path, decision=None, teacher=teacher)
    demo = demo_config(model, data, tmp_path / "demo")
    assert cfg["atp"] == {**demo["atp"], "kd_teacher": str(teacher)}
    key = row_key(row_config(cfg, PROTOCOL))
    assert str(teacher) not in json.dumps(row_config(cfg, PROTOCOL))  # the key is the weights', not the path's
    moved = adapter(tmp_path / "elsewhere", b"weights-a")
    assert row_key(row_config({**cfg, "atp": {**cfg["atp"], "kd_teacher": str(moved)}}, PROTOCOL)) == key
    retrained = adapter(tmp_path / "retrained", b"weights-b")
    assert row_key(row_config({**cfg, "atp": {**cfg["atp"], "kd_teacher": str(retrained)}}, PROTOCOL)) != key


@pytest.mark.real
def test_wikipedia_training_passages_skip_the_evaluated_articles(tmp_path, smollm2, pubmed):
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from benchmarks.common import held_out_evals, wikipedia_passages
    from devkit.assets import ensure_wikipedia
    from devkit.evaluation import read_texts

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    out = wikipedia_passages(tokenizer, tmp_path / "wiki.jsonl", 40, eval_tokens=8192)
    passages = read_texts(out)
    assert len(passages) == 40 and all(len(p) >= 1000 for p in passages)
    evaluated = held_out_evals(tokenizer, pubmed, 8192)["Wikipedia"]
    # the evaluated stream is the first articles' tokens: no passage's text is in them
    evaluated_text = tokenizer.decode(evaluated)
    assert not any(p.splitlines()[0] in evaluated_text for p in passages)
    # and the first passage starts the article right after the last one the stream reached
    articles = read_texts(ensure_wikipedia() / "articles.jsonl")
    reached = next(i for i, a in enumerate(articles) if a.split("\n")[0].strip() not in evaluated_text)
    assert articles[reached].startswith(passages[0].split("\n")[0])


def test_overhead_step_times_come_from_the_progress_bar():
    sys.path.insert(0, str(ROOT))
    from benchmarks.training_overhead import mean_step, step_elapsed

    log = (
        " 0%|          | 0/4 [00:00<?, ?it/s] 25%|##5       | 1/4 [00:37<01:50, 37.31s/it]"
        " 50%|#####     | 2/4 [00:51<00:28, 14.0s/it]\r 75%|#######5  | 3/4 [01:01<00:10, 10.2s/it]"
        "100%|##########| 4/4 [1:00:11<00:00,  9.0s/it]"
    )
    elapsed = step_elapsed(log)
    assert elapsed == {0: 0, 1: 37, 2: 51, 3: 61, 4: 3611}
    assert mean_step(elapsed, 1, 3) == 12.0  # steps 2 and 3: the first step's start-up left out


def test_overhead_modes_need_the_lora_defaults_section(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT))
    from benchmarks import training_overhead

    monkeypatch.setattr(sys, "argv", ["training_overhead.py", "--modes", "lean"])
    with pytest.raises(SystemExit) as exited:
        training_overhead.main()  # refused before any asset is loaded or any run trains
    assert exited.value.code == 2
    assert "--modes goes with --lora-defaults" in capsys.readouterr().err


def test_a_row_trained_on_uncommitted_code_says_so(tmp_path, monkeypatch):
    from benchmarks.quality import _commit

    monkeypatch.delenv("AXOLOTL_ATP_COMMIT", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "axolotl_atp").mkdir()
    (tmp_path / "axolotl_atp" / "args.py").write_text("A = 1\n")
    (tmp_path / "notes.md").write_text("x\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "notes.md").write_text("y\n")  # not code: the commit still names what runs
    assert _commit(tmp_path) == head
    (tmp_path / "axolotl_atp" / "args.py").write_text("A = 2\n")
    assert _commit(tmp_path) == head + "+uncommitted"


def test_quality_report_lists_a_stale_row_as_not_measured():
    from benchmarks.quality import LONG, report

    rows = [
        {
            "name": "base",
            "kind": "base",
            "method": "base",
            "ratio": 0.0,
            "params": 10,
            "PubMed": 21.0,
            "Wikipedia": 23.0,
        },
        {
            "name": "dense",
            "kind": "dense",
            "method": "dense LoRA",
            "ratio": 0.0,
            "seed": 42,
            "params": 10,
            "PubMed": 17.0,
            "Wikipedia": 22.0,
        },
    ]
    body = report(rows, LONG, ["atp-nokd-0.3", "atp-0.5"], {"atp-nokd-0.3"})
    assert "Not yet measured (2 rows): atp-nokd-0.3 (its saved row is of an earlier config), atp-0.5." in body


def test_quality_row_configs_keep_the_committed_rows_current_and_apply_each_kinds_change(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.quality import LONG, plan, run_config
    from benchmarks.saved_rows import is_current, row_config

    rows = {r["name"]: r for r in plan(LONG, quick=False)}
    model, data, general = tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "wikipedia-1333.jsonl"

    def config(name: str) -> dict:
        return run_config(rows[name], model, data, tmp_path, LONG, None, general=general)

    saved = ROOT / "benchmarks" / "rows" / "quality-long"
    for name in ("dense", "atp-0.3", "atp-nokd-0.2", "atp-short-control-0.3-s43", "atp-lean-0.3"):
        assert is_current(saved / f"{name}.json", row_config(config(name), LONG)), name
    assert config("dense-r64")["lora_r"] == 64 and config("dense-r64")["lora_alpha"] == 128
    assert "atp" not in config("dense-r64")
    assert config("atp-r64-0.3")["lora_r"] == 64 and config("atp-r64-0.3")["atp"]["prune_ratio"] == 0.3
    mixed = config("atp-mixed-0.2")
    assert [Path(d["path"]).name for d in mixed["datasets"]] == ["train.jsonl", "wikipedia-1333.jsonl"]
    assert mixed["dataset_prepared_path"] == str(tmp_path / "atp-mixed-0.2" / "prepared")  # not the shared one
    with pytest.raises(ValueError, match="mixes general text"):
        run_config(rows["atp-mixed-0.2"], model, data, tmp_path, LONG, None)
