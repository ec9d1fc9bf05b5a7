"""Variants of the demo config, trained and exported side by side: which ATP settings give the best exported
model at the budget a CPU affords, and does the generator beat a static decision given the same LoRA steps?

Every row trains the real SmolLM2-135M with `example_ymls/smollm2-135m-pubmed-cpu.yml` (prune 0.2, 80 steps of
2x256 tokens of the demo's 3,000 PubMed abstracts, 40 control steps, calibration batch 1, distillation on), with
one change per row; every pruned model is written by `axolotl atp-merge` and evaluated as the exported model on
8,192 held-out PubMed tokens (the demo's) and 8,192 Wikipedia tokens. Rows:

- `dense`: the same LoRA steps with no plugin (what the ratios divide by);
- `defaults`: the demo config as it is;
- `two-stage`: Wanda-sp's decision over MLP channels from 32 abstracts the run does not train on, then the same
  LoRA steps on the fixed masks with the same distillation (no LoRA-aware forward, no group lasso);
- `ce-calibration`: the generator's calibration loss is the CE on the labels instead of the KL to the unpruned
  model (`kd_calibration: false`, the default until 2026-11-30);
- `components`: the paper's LoRA-aware forward in the LoRA steps, with the group lasso it resolves to
  (`lora_aware: true`; the default until 2026-12-07. Until then this row was `ablation`: plain hard masks and no
  group lasso, with CE calibration, which are now the defaults but for the calibration, i.e. `ce-calibration`);
- `prior-budget-10`: the importance prior at scale 10, centred on each layer's budget quantile;
- `prior-mean-10`: the importance prior at scale 10, centred on each layer's mean (MLP channels start, and
  stay near, Wanda-sp's ranking; the generator's KL signal chooses the heads);
- `prior-global`: the importance prior centred on the budget quantile of all layers' scores together, so that
  the static decision it leans towards is two-stage's, per-layer widths included;
- `prior-global-lr3e-3`: the same with `generator_lr: 0.003` (AdamW moves every logit near the threshold by about
  the learning rate times the generator's width a step whatever its gradient's size, so a noisy calibration
  gradient walks the decision away from the prior's ranking; a smaller step walks less);
- `decision-masks`: the LoRA steps of the control phase train with the generator's noise-free decision instead of
  its Gumbel sample (`control_masks: decision`; with the sample, 15-17% of the group decisions flip between
  consecutive steps of the demo's ramp);
- `random-start`: the generator started at random (the paper);
- `no-kd`: no distillation;
- `interval-2`: a generator step every second optimizer step (with the demo's calibration batch of 1, the
  setting that meets the control-phase cost target, `benchmarks/training_overhead.py`);
- `control-20`: the masks freeze after 20 steps instead of 40, leaving 60 LoRA steps on the final decision
  (measured with CE calibration);
- `fixed-atp-decision`: the `ce-calibration` row's frozen decision given as a fixed decision from the first
  step and trained as `two-stage` is (same LoRA steps and distillation): whether ATP loses to two-stage by its
  decision or by its joint phase;
- `mlp-only`: ATP pruning MLP channels only, the structures two-stage prunes: the generator against Wanda-sp
  on equal terms (measured with CE calibration);
- `fixed-prior-10-decision`: the same for the `prior-mean-10` row's decision (no KV head pruned, 85% of
  Wanda-sp's MLP channels, other per-layer widths);
- `teacher-dense`: distillation from the `dense` row's LoRA adapter instead of the base model ("teacher
  correction": a teacher that knows the domain; `kd_teacher: DENSE_RUN`); the `dense` row is trained first
  where its adapter is not in the work folder.

`--seeds 7 13` trains the named rows again with `seed: 7` and `seed: 13` (rows `NAME@7`, `NAME@13`); the
report gives the mean and the spread of the seeds a row has.

Each row's result (its figures, a small JSON file) is saved under `--rows` (benchmarks/rows/demo-variants,
committed: a session's machine is fresh, and the checkpoints and exports under `--work`, benchmarks/work/demo-variants,
do not reach the next session) keyed by its resolved config and rerun only when it changes, so a run stopped
midway keeps its finished rows; RESULTS.md is built from the saved rows.
One seed per row: differences of a few percent are within what a seed changes.

    python benchmarks/demo_variants.py [--only NAME ...] [--max-minutes M] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, assets, held_out_evals, machine, record, run_cli, train
from benchmarks.quality import _commit, merged_dense, needs_run, out_of_time, training_facts
from benchmarks.saved_rows import is_current, is_stale, row_config, save_row

EXAMPLE = ROOT / "example_ymls" / "smollm2-135m-pubmed-cpu.yml"
PROTOCOL = {"steps": 80, "micro_batch_size": 2, "eval_tokens": 8192, "train_rows": 3000}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense LoRA (no pruning)", {}),
    "defaults": ("ATP, the demo config", {}),
    "two-stage": ("two-stage (Wanda-sp on MLP channels, then LoRA)", {}),
    "ce-calibration": ("ATP, kd_calibration: false (CE calibration)", {"kd_calibration": False}),
    "components": ("ATP, lora_aware: true (and the group lasso it resolves to)", {"lora_aware": True}),
    "prior-budget-10": (
        "ATP, importance_scale 10, importance_centre budget",
        {"importance_scale": 10.0, "importance_centre": "budget"},
    ),
    "prior-mean-10": ("ATP, importance_scale 10 (mean centre)", {"importance_scale": 10.0}),
    "prior-global": ("ATP, importance_centre global", {"importance_centre": "global"}),
    "prior-global-lr3e-3": (
        "ATP, importance_centre global, generator_lr 0.003",
        {"importance_centre": "global", "generator_lr": 0.003},
    ),
    "decision-masks": ("ATP, control_masks: decision", {"control_masks": "decision"}),
    "random-start": ("ATP, generator_init: random", {"generator_init": "random"}),
    "no-kd": ("ATP, kd_weight: 0", {"kd_weight": 0.0}),
    "interval-2": ("ATP, generator_interval: 2", {"generator_interval": 2}),
    "control-20": ("ATP, control_steps: 20, CE calibration", {"control_steps": 20, "kd_calibration": False}),
    "fixed-atp-decision": ("the ce-calibration row's ATP decision, then LoRA as two-stage", {}),
    "fixed-prior-10-decision": ("the prior-mean-10 row's ATP decision, then LoRA as two-stage", {}),
    "mlp-only": (
        "ATP, structures: [mlp_channels], CE calibration",
        {"structures": ["mlp_channels"], "kd_calibration": False},
    ),
    "teacher-dense": ("ATP, kd_teacher: the dense row's adapter (teacher correction)", {}),
}
# The rows trained on another row's frozen decision, and that row.
DECISION_SOURCES = {"fixed-atp-decision": "ce-calibration", "fixed-prior-10-decision": "prior-mean-10"}
# The rows distilled from another row's adapter, and that row.
TEACHER_SOURCES = {"teacher-dense": "dense"}
FIXED_DECISION_ROWS = ("two-stage", *DECISION_SOURCES)


def demo_config(model_dir: Path, data: Path, out: Path) -> dict[str, Any]:
    """The example config with this machine's paths, writing under `out`."""
    text = EXAMPLE.read_text().replace("CACHE/smollm2-135m-hf", str(model_dir))
    cfg = yaml.safe_load(text)
    cfg["datasets"] = [{**cfg["datasets"][0], "path": str(data)}]
    cfg["output_dir"] = str(out / "run")
    return cfg


def variant_config(
    name: str, model_dir: Path, data: Path, work: Path, decision: Path | None, teacher: Path | None = None
) -> dict[str, Any]:
    cfg = demo_config(model_dir, data, work / name)
    cfg["dataset_prepared_path"] = str(work / "prepared")  # same data and tokenizer: tokenized once
    if name == "dense":
        cfg.pop("plugins")
        cfg.pop("atp")
        # Without the plugin, axolotl turns its fused LoRA kernels on, and they need CUDA: off, as the plugin has them.
        cfg.update({f"lora_{k}_kernel": False for k in ("mlp", "qkv", "o", "embedding")})
    elif name in FIXED_DECISION_ROWS:
        assert decision is not None
        keep = ("structures", "mlp_round_to")
        cfg["atp"] = {k: cfg["atp"][k] for k in keep} | {
            "decision_file": str(decision),
            "lora_aware": False,
            "group_lasso": "off",
        }
    else:
        cfg["atp"] = {**cfg["atp"], **VARIANTS[name][1]}
    if name in TEACHER_SOURCES:
        assert teacher is not None
        cfg["atp"]["kd_teacher"] = str(teacher)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None, help="run only these rows (by name)")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new row after this long")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--seeds", nargs="*", type=int, default=[], help="train the rows again with these seeds")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "demo-variants")
    parser.add_argument(
        "--rows",
        type=Path,
        default=ROOT / "benchmarks" / "rows" / "demo-variants",
        help="where each row's result is saved (committed, so that the next session's fresh machine keeps it)",
    )
    parser.add_argument(
        "--section",
        default="Demo-config variants (prune 0.2, 80 steps)",
        help="the RESULTS.md section the report replaces (another name keeps the rows of a --work folder that is "
        "no longer on this machine)",
    )
    args = parser.parse_args()
    started = time.time()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    model_dir, pubmed = assets()
    lines = (pubmed / "train.jsonl").read_text().splitlines(keepends=True)
    data = work / "train.jsonl"  # the demo's subset: the first 3,000 training abstracts
    if not data.is_file() or data.read_text() != "".join(lines[: PROTOCOL["train_rows"]]):
        data.write_text("".join(lines[: PROTOCOL["train_rows"]]))
    calibration = work / "static-calibration.jsonl"  # abstracts the runs do not train on
    calibration.write_text("".join(lines[PROTOCOL["train_rows"] : PROTOCOL["train_rows"] + 32]))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    evals = held_out_evals(tokenizer, pubmed, PROTOCOL["eval_tokens"])
    saved: Path = args.rows
    base_path = saved / "base.json"
    base_config = {"eval_tokens": PROTOCOL["eval_tokens"]}  # the base model is only evaluated
    if not is_current(base_path, base_config):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        save_row(base_path, base_config, {"name": "base", "method": "base (no training)", **evaluate(base, evals)})

    for name in args.only or list(VARIANTS):
        if name not in VARIANTS:
            raise SystemExit(f"unknown row {name!r}: one of {', '.join(VARIANTS)}")
    stale: set[str] = set()  # rows saved with another config (a default changed): not reported until rerun
    for seed in [None, *args.seeds]:
        for name in args.only or list(VARIANTS):
            row = row_name(name, seed)
            decision = fixed_decision(name, seed, work, model_dir, calibration)
            if name in FIXED_DECISION_ROWS and decision is None:
                print(f"not starting {row}: its source row of the same seed has no decision yet", flush=True)
                continue
            teacher = None
            if name in TEACHER_SOURCES:
                source = row_name(TEACHER_SOURCES[name], seed)
                teacher = work / source / "run"
                if not (teacher / "adapter_config.json").is_file():
                    if out_of_time(source, started, args.max_minutes):
                        continue
                    run_source(TEACHER_SOURCES[name], seed, model_dir, data, work, saved, evals)
            cfg = seeded_config(name, seed, model_dir, data, work, decision, teacher)
            config = row_config(cfg, PROTOCOL)
            path = saved / f"{row}.json"
            if needs_run(path, config, row, started, args.max_minutes):
                train_row(row, name, cfg, config, path, model_dir, work, evals)
            elif is_stale(path, config):  # not rerun now: its saved figures are of another config
                stale.add(row)

    saved_rows = [json.loads(p.read_text())["row"] for p in saved.glob("*.json")]
    rows = {row["name"]: row for row in saved_rows if row["name"] not in stale}
    body = report(rows, expected=args.only or list(VARIANTS))
    print(body)
    if not args.no_record:
        record(args.section, body, shlex.join(["python", "benchmarks/demo_variants.py", *sys.argv[1:]]))


def seeded_config(
    name: str,
    seed: int | None,
    model_dir: Path,
    data: Path,
    work: Path,
    decision: Path | None,
    teacher: Path | None = None,
) -> dict[str, Any]:
    """Row `name` at `seed`: its variant's config, writing under the row's own folder."""
    cfg = variant_config(name, model_dir, data, work, decision, teacher)
    cfg["output_dir"] = str(work / row_name(name, seed) / "run")
    if seed is not None:
        cfg["seed"] = seed
    return cfg


def run_source(name: str, seed: int | None, model_dir: Path, data: Path, work: Path, saved: Path, evals: dict) -> None:
    """Train row `name` (a teacher's source) again, because the work folder lacks its adapter; its saved figures
    are replaced by the new run's (the runs are deterministic on one machine)."""
    row = row_name(name, seed)
    cfg = seeded_config(name, seed, model_dir, data, work, None)
    train_row(row, name, cfg, row_config(cfg, PROTOCOL), saved / f"{row}.json", model_dir, work, evals)


def row_name(variant: str, seed: int | None) -> str:
    """The saved row of `variant` at `seed`: the plain name for the demo's seed, `NAME@SEED` for `--seeds`."""
    return variant if seed is None else f"{variant}@{seed}"


def fixed_decision(name: str, seed: int | None, work: Path, model_dir: Path, calibration: Path) -> Path | None:
    """The fixed decision of a `FIXED_DECISION_ROWS` row: Wanda-sp's (the same for every seed), or a copy of the
    frozen masks of its `DECISION_SOURCES` row of the same seed (None while that row has not been trained)."""
    if name == "two-stage":
        decision = work / name / "static_masks.json"
        if not decision.is_file():
            from axolotl_atp.groups import MLP
            from benchmarks.static_importance import write_static_decision

            write_static_decision(model_dir, calibration, decision, ratio=0.2, layout="per_layer", structures=(MLP,))
        return decision
    if name in DECISION_SOURCES:
        source = work / row_name(DECISION_SOURCES[name], seed) / "run" / "atp_masks.json"
        decision = work / row_name(name, seed) / "decision.json"
        if source.is_file():
            decision.parent.mkdir(parents=True, exist_ok=True)
            decision.write_text(source.read_text())
        return decision if decision.is_file() else None
    return None


def train_row(
    row: str, name: str, cfg: dict, config: dict, path: Path, model_dir: Path, work: Path, evals: dict
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    begun = time.time()
    commit = _commit()  # the code that trains the row (a commit made while it trains is not)
    log, metrics = train(cfg, row)
    if name == "dense":
        model = merged_dense(model_dir, Path(cfg["output_dir"]))
    else:
        export = work / row / "export"
        merge = ["axolotl", "atp-merge", str(work / row / f"{row}.yml"), "--output-dir", str(export)]
        run_cli([*merge, "--overwrite", "--no-verify"], work / row / "merge.log")
        model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, trust_remote_code=True)
    result = {
        "name": row,
        "variant": name,
        "seed": cfg.get("seed"),
        "method": VARIANTS[name][0],
        **evaluate(model, evals),
        **training_facts(log),
        "train_seconds": metrics.get("train_runtime"),
        "seconds": round(time.time() - begun),
        "machine": machine(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(result, flush=True)
    save_row(path, config, result)


def evaluate(model, evals: dict) -> dict[str, Any]:
    from devkit.evaluation import perplexity

    return {name: perplexity(model, ids, desc=name) for name, ids in evals.items()} | {"params": model.num_parameters()}


def report(rows: dict[str, dict], expected: list[str] | None = None) -> str:
    """The tables of the saved `rows`; the `expected` rows (default: every variant) that are missing are listed."""
    order = ["base", *VARIANTS]
    dense, two = rows.get("dense"), rows.get("two-stage")
    lines = [
        "SmolLM2-135M with the demo config (`example_ymls/smollm2-135m-pubmed-cpu.yml`: prune 0.2, 80 steps of 2x256 "
        "tokens, 40 control steps, distillation on), one change per row; perplexity of the exported model "
        f"on {PROTOCOL['eval_tokens']:,} held-out PubMed and Wikipedia tokens. Each row's commit and date are its own. "
        "The first table is seed 42 (the demo's).",
        "",
        "| row | parameters | PubMed PPL | Wikipedia PPL | PubMed / dense LoRA | PubMed / two-stage | kept at the freeze "
        "| freeze flips | train s | commit, date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    single = {name: r for name, r in rows.items() if "@" not in name}
    for name in sorted(single, key=lambda n: order.index(n) if n in order else len(order)):
        r = rows[name]
        pruned = name not in ("base", "dense")
        vs_dense = f"{r['PubMed'] / dense['PubMed']:.2f}" if dense and pruned else ""
        vs_two = f"{r['PubMed'] / two['PubMed']:.2f}" if two and pruned and name != "two-stage" else ""
        kept = f"{r['remaining_at_freeze']:.3f}" if r.get("remaining_at_freeze") is not None else ""
        flips = f"{r['freeze_flips'] / r['groups']:.2%}" if r.get("groups") else ""
        secs = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else ""
        when = ", ".join(str(r[k]) for k in ("commit", "date") if r.get(k))
        lines.append(
            f"| {r['method']} | {r['params']:,} | {r['PubMed']:.2f} | {r['Wikipedia']:.2f} | {vs_dense} | {vs_two} "
            f"| {kept} | {flips} | {secs} | {when} |"
        )
    missing = [n for n in (expected or VARIANTS) if n not in rows]
    if missing:
        lines += ["", f"Not yet measured: {', '.join(missing)}."]
    return "\n".join(lines + seed_table(rows))


def seed_table(rows: dict[str, dict]) -> list[str]:
    """Mean and range over the seeds of every variant trained with more than one seed (the plain row is seed 42)."""
    by_variant: dict[str, list[dict]] = {}
    for name, r in rows.items():
        by_variant.setdefault(r.get("variant", name.split("@")[0]), []).append(r)
    seeded = {v: rs for v, rs in by_variant.items() if len(rs) > 1}
    if not seeded:
        return []

    def spread(rs: list[dict], key: str) -> str:
        values = [r[key] for r in rs]
        return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    two = seeded.get("two-stage")
    lines = [
        "",
        "Over seeds (mean, and the range in brackets):",
        "",
        "| row | seeds | PubMed PPL | Wikipedia PPL | PubMed / two-stage (means) |",
        "|---|---|---|---|---|",
    ]
    for variant in sorted(seeded, key=lambda v: list(VARIANTS).index(v) if v in VARIANTS else len(VARIANTS)):
        rs = sorted(seeded[variant], key=lambda r: r.get("seed") or 42)
        seeds = ", ".join(str(r.get("seed") or 42) for r in rs)
        vs_two = ""
        if two and variant != "two-stage":
            vs_two = f"{statistics.mean(r['PubMed'] for r in rs) / statistics.mean(r['PubMed'] for r in two):.2f}"
        lines.append(f"| {rs[0]['method']} | {seeds} | {spread(rs, 'PubMed')} | {spread(rs, 'Wikipedia')} | {vs_two} |")
    return lines


if __name__ == "__main__":
    main()
