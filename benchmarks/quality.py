"""Quality of the exported models: ATP against dense LoRA, a two-stage baseline, ATP without distillation,
the paper's components, the uniform layout, and seeds; at a training budget long enough to say something.

Every row trains the real SmolLM2-135M on the same PubMed abstracts for the same steps and tokens with
`axolotl train`; every pruned model is written by `axolotl atp-merge` and evaluated as the exported model
(loaded with `from_pretrained`) on held-out PubMed and on general English (Wikipedia).

Rows (the long protocol: 200 optimizer steps of 4x256 tokens, 204,800 training tokens, per row):
- base (no training) and dense LoRA;
- ATP with the defaults (distillation from the base model, linear budget schedule, plain hard masks in the LoRA
  steps) at 0.2, 0.3, 0.4, 0.5;
- ATP without distillation (`kd_weight: 0`) at the same ratios;
- two-stage: a static Wanda-sp decision over MLP channels (benchmarks/static_importance.py; over both
  structures it removes the wrong KV heads, see benchmarks/decision_quality.py) from calibration rows that are
  not training rows, then LoRA for the same steps on the fixed masks, with the same distillation;
- ATP with the paper's components at 0.3 (`lora_aware: true`: the LoRA-aware forward, with the group lasso it
  resolves to), and at 0.2; the default until 2026-12-07, when three seeds found the two level and the plain step
  became the default; and ATP with `layout: uniform` at 0.3;
- three seeds of ATP and of ATP with the components at 0.3;
- beyond these, single changes to ATP (`plan` says why each is there): Wanda-sp's channels at the freeze, a shorter
  control phase (three seeds), the lean generator options, LoRA r=64 (with a dense LoRA r=64 beside it), and
  Wikipedia passages among the training rows (`GENERAL_SHARE`).

The run is resumable: each row's result (its figures, a small JSON file) is saved under `--rows`
(benchmarks/rows/quality-long by default, which is committed: a session's machine is fresh, and its
benchmarks/work folder, with the checkpoints and exports, does not reach the next session) with its resolved training config
and a key made of it (`benchmarks/saved_rows.py`); a row is run again only when it is missing or its config
changed (a new default changes it; a new option left at its default does not). RESULTS.md is built from the saved rows, with the date and commit;
rows not yet measured are listed as such. Within a row, the long protocol checkpoints every 10 optimizer
steps, and a row stopped midway resumes from its newest complete checkpoint (axolotl's
`auto_resume_from_checkpoints`; the plugin restores the generator, masks and schedule), unless its key changed.

Rows are independent: `--jobs N` trains N at once (each in its own `axolotl train` process, with its own
prepared dataset), for a machine with the cores or a GPU to spare; every row records the machine it ran on.

    python benchmarks/quality.py [--quick] [--no-record] [--work DIR] [--rows DIR] [--max-minutes M] [--only NAME ...]
                                 [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    ROOT,
    assets,
    dump,
    held_out_evals,
    machine,
    pubmed_subset,
    record,
    run_cli,
    smollm2_config,
    train,
    wikipedia_passages,
)
from benchmarks.saved_rows import is_current, is_stale, row_config, row_key, save_row

# train_rows: 200 steps x 4 rows for the long protocol (the calibration split is held out of these).
LONG = {
    "steps": 200,
    "micro_batch_size": 4,
    "eval_tokens": 8192,
    "train_rows": 4000,
    "ratios": [0.2, 0.3, 0.4, 0.5],
    "seeds": [42, 43, 44],
    # A row of the long protocol takes hours on 2 CPU cores: it checkpoints every so many optimizer steps, and a
    # row stopped midway (the session ended) resumes from its newest complete checkpoint on the next run.
    "checkpoint_steps": 10,
}
QUICK = {"steps": 4, "micro_batch_size": 2, "eval_tokens": 1024, "train_rows": 400, "ratios": [0.4], "seeds": [42]}
METHODS = {
    "dense": "dense LoRA",
    "dense-r64": "dense LoRA, r=64",
    "atp": "ATP",
    "atp-nokd": "ATP without distillation",
    "two-stage": "two-stage (Wanda-sp on MLP channels, then LoRA)",
    "components": "ATP with the LoRA-aware forward and group lasso",
    "atp-uniform": "ATP, uniform layout",
    "atp-channels": "ATP, Wanda-sp channels within each layer at the freeze",
    "atp-short-control": "ATP, masks frozen after 50 steps (control_steps: 50)",
    "atp-lean": "ATP, generator every second step on one calibration row (generator_interval: 2, calibration_batch_size: 1)",
    "atp-mixed": "ATP, a quarter of the training rows Wikipedia passages (general English)",
    "atp-r64": "ATP, LoRA r=64",
}
# Each kind with a generator: its change to the protocol's `atp:` block.
ATP_KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "atp": {},
    "atp-nokd": {"kd_weight": 0.0},
    "components": {"lora_aware": True},  # and the group lasso it resolves to (`prox`)
    "atp-uniform": {"layout": "uniform"},
    "atp-channels": {"freeze_channels": "importance"},
    "atp-short-control": {"control_steps": 50},
    "atp-lean": {"generator_interval": 2, "calibration_batch_size": 1},
    "atp-mixed": {},
    "atp-r64": {},
}
# Kinds without a generator or a decision: plain LoRA on the unpruned model.
DENSE_KINDS = ("dense", "dense-r64")
# Kinds that change the LoRA adapter itself: their change to the protocol's training config (alpha follows the rank,
# so that the adapter's scale alpha/r stays 2).
KIND_TRAINING: dict[str, dict[str, Any]] = {
    "dense-r64": {"lora_r": 64, "lora_alpha": 128},
    "atp-r64": {"lora_r": 64, "lora_alpha": 128},
}
# Kinds whose training data mixes general text into PubMed: the share of the training rows that are Wikipedia
# passages (from articles the held-out Wikipedia stream does not read).
GENERAL_SHARE: dict[str, float] = {"atp-mixed": 0.25}

# The kinds the plot draws as lines over the ratios (seed 42); the other rows are single points.
LINE_KINDS = ("atp", "atp-nokd", "two-stage")


def row(kind: str, ratio: float = 0.0, seed: int = 42) -> dict[str, Any]:
    name = kind if kind in DENSE_KINDS else f"{kind}-{ratio}" + (f"-s{seed}" if seed != 42 else "")
    layout = "-" if kind in DENSE_KINDS else ATP_KIND_OPTIONS.get(kind, {}).get("layout", "per_layer")
    return {"name": name, "kind": kind, "method": METHODS[kind], "ratio": ratio, "seed": seed, "layout": layout}


def plan(protocol: dict, quick: bool) -> list[dict[str, Any]]:
    """The rows, most informative first, so that a partial run already answers the main questions."""
    if quick:
        return [row("dense"), row("atp", 0.4), row("two-stage", 0.4)]
    ratios, seeds = protocol["ratios"], protocol["seeds"]
    rows = [row("dense"), row("atp", 0.3), row("two-stage", 0.3), row("atp-nokd", 0.3), row("components", 0.3)]
    rows += [row("atp", r) for r in ratios if r != 0.3]
    rows += [row("two-stage", r) for r in ratios if r != 0.3]
    rows += [row("atp", 0.3, s) for s in seeds[1:]] + [row("components", 0.3, s) for s in seeds[1:]]
    rows += [row("components", 0.2)]
    rows += [row("atp-nokd", r) for r in ratios if r != 0.3]
    rows += [row("atp-uniform", 0.3)]
    # Beyond the rows: the generator's per-layer widths and KV heads with Wanda-sp's channels within each
    # layer (`freeze_channels: importance`), which won zero-shot (RESULTS.md, Decision quality at 0.3).
    rows += [row("atp-channels", 0.3)]
    # Decisions this different all export within 28.3-28.8 at 0.3 after training: does a shorter control phase,
    # leaving 150 of the 200 LoRA steps on the final masks, recover more?
    rows += [row("atp-short-control", 0.3)]
    # Seed 42 gave -2.7% on PubMed and +6% on Wikipedia at 0.3: the two other seeds say whether that is more than
    # one seed's luck before it could become a default.
    rows += [row("atp-short-control", 0.3, s) for s in seeds[1:]]
    # The two options that bring a control-phase step near the 1.5x-of-plain target
    # (benchmarks/training_overhead.py): what do they cost the export?
    rows += [row("atp-lean", 0.3)]
    # Wikipedia at 0.2 stays 1.76x the base model, trained on PubMed alone: does a quarter of general text in the
    # training rows (distilled from the base like the rest) keep it, and what does it cost PubMed?
    rows += [row("atp-mixed", 0.2)]
    # Decisions as different as the generator's and Wanda-sp's export within 1% of each other at 0.3: recovery is the
    # limit. Does a larger adapter recover more on the pruned model than on the dense one?
    rows += [row("dense-r64"), row("atp-r64", 0.3)]
    return rows


def atp_block(run: dict, decision: Path | None) -> dict | None:
    kind = run["kind"]
    if kind in DENSE_KINDS:
        return None
    if kind == "two-stage":
        return {"decision_file": str(decision), "lora_aware": False, "group_lasso": "off", "mlp_round_to": 8}
    block = {"prune_ratio": run["ratio"], "mlp_round_to": 8, "calibration_size": 64, "seed": run["seed"]}
    return block | ATP_KIND_OPTIONS[kind]


def run_config(
    run: dict,
    model_dir: Path,
    data: Path,
    work: Path,
    protocol: dict,
    decision: Path | None,
    shared_prepared: bool = True,
    general: Path | None = None,
) -> dict:
    """The row's training config; `general` is the Wikipedia passages file of the kinds in `GENERAL_SHARE`."""
    out = work / run["name"]
    mixed = run["kind"] in GENERAL_SHARE
    if mixed and general is None:
        raise ValueError(f"row {run['name']} mixes general text: pass its Wikipedia passages file")
    common = {
        "max_steps": protocol["steps"],
        "micro_batch_size": protocol["micro_batch_size"],
        "logging_steps": 10,
        "seed": run["seed"],
        # One prepared dataset for all rows (same data, tokenizer and length): tokenized once. Rows trained at the
        # same time each tokenize their own (two processes writing one prepared folder would race).
        "dataset_prepared_path": str(work / "prepared" if shared_prepared and not mixed else out / "prepared"),
        **KIND_TRAINING.get(run["kind"], {}),
    }
    cfg = smollm2_config(model_dir, data, out, atp=atp_block(run, decision), **common)
    if mixed:
        cfg["datasets"] = [*cfg["datasets"], {"path": str(general), "type": "completion"}]
    return cfg


def with_checkpoints(cfg: dict, every: int) -> dict:
    """`cfg` saving a checkpoint every `every` optimizer steps and resuming from the newest complete one.
    Added after the row key is taken: where a row checkpoints does not change its result."""
    return {
        **cfg,
        "save_strategy": "steps",
        "save_steps": every,
        "save_total_limit": 2,
        "auto_resume_from_checkpoints": True,
    }


def prepare_resume(run_dir: Path, key: str) -> int | None:
    """The step a row will resume from, or None for a fresh start. Checkpoints left by a run of another key
    (the config or a default changed since) are removed, so that the row starts again."""
    stamp = run_dir / "row_key.txt"
    if run_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != key):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key + "\n")
    from axolotl_atp.training.checkpoint_state import checkpoint_step, checkpoints

    found = checkpoints(run_dir)
    return checkpoint_step(found[-1]) if found else None


def merged_dense(model_dir: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def training_facts(log: str) -> dict[str, Any]:
    """What the training log says about the freeze and the losses."""
    facts: dict[str, Any] = {}
    flips = re.search(r"the freeze changed (\d+) of (\d+) group decisions", log)
    if flips:
        facts["freeze_flips"], facts["groups"] = int(flips.group(1)), int(flips.group(2))
    kept = re.search(r"the generator last kept ([0-9.]+) of the prunable parameters", log)
    if kept:
        facts["remaining_at_freeze"] = float(kept.group(1))
    return facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="ratio 0.4, three rows, 4 steps, 1k eval tokens (minutes)")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints, exports and logs of the rows")
    parser.add_argument(
        "--rows",
        type=Path,
        default=None,
        help="where each row's result is saved (default: benchmarks/rows/quality-long, committed; --quick: WORK/rows)",
    )
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new row after this long")
    parser.add_argument("--only", nargs="*", default=None, help="run only these rows (by name)")
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at once (default 1)")
    args = parser.parse_args()
    protocol = QUICK if args.quick else LONG
    work = args.work or ROOT / "benchmarks" / "work" / ("quality-quick" if args.quick else "quality-long")
    started = time.time()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from devkit.evaluation import perplexity

    model_dir, pubmed = assets()
    train_rows = protocol["train_rows"]
    data = pubmed_subset(pubmed, work / "train.jsonl", train_rows)
    # Calibration rows for the static criterion: PubMed training abstracts that no run trains on.
    rows = (pubmed / "train.jsonl").read_text().splitlines(keepends=True)[train_rows : train_rows + 32]
    calibration = work / "static-calibration.jsonl"
    calibration.write_text("".join(rows))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    evals = held_out_evals(tokenizer, pubmed, protocol["eval_tokens"])
    general: dict[float, Path] = {}  # per share, the Wikipedia passages file (its name carries the row count)
    for share in {GENERAL_SHARE[r["kind"]] for r in plan(protocol, args.quick) if r["kind"] in GENERAL_SHARE}:
        count = round(train_rows * share / (1 - share))
        general[share] = wikipedia_passages(
            tokenizer, work / f"wikipedia-{count}.jsonl", count, protocol["eval_tokens"]
        )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = machine()

    def evaluate(model) -> dict:
        model = model.to(device)
        return {name: perplexity(model, ids) for name, ids in evals.items()} | {"params": model.num_parameters()}

    saved = args.rows or (work / "rows" if args.quick else ROOT / "benchmarks" / "rows" / "quality-long")
    base_path = saved / "base.json"
    base_config = {"eval_tokens": protocol["eval_tokens"]}  # the base model is only evaluated
    if not is_current(base_path, base_config):
        base = {"name": "base", "kind": "base", "method": "base (no training)", "ratio": 0.0, "seed": None}
        base.update(layout="-", **evaluate(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)))
        save_row(base_path, base_config, base)

    lock = threading.Lock()

    stale: set[str] = set()  # rows saved with another config and not rerun by this invocation

    def measure(run: dict) -> None:
        decision = None
        if run["kind"] == "two-stage":
            from axolotl_atp.groups import MLP
            from benchmarks.static_importance import write_static_decision

            # MLP channels only: Wanda-sp's choice of KV heads is far worse than its choice of channels (zero-shot
            # on SmolLM2 at 0.2: 1,849 over both structures against 37 over MLP channels only, base 22;
            # benchmarks/decision_quality.py), so the baseline is the static criterion at its best.
            decision = write_static_decision(
                model_dir,
                calibration,
                work / run["name"] / "static_masks.json",
                ratio=run["ratio"],
                layout="per_layer",
                structures=(MLP,),
            )
        share = GENERAL_SHARE.get(run["kind"])
        cfg = run_config(
            run,
            model_dir,
            data,
            work,
            protocol,
            decision,
            shared_prepared=args.jobs == 1,
            general=general[share] if share else None,
        )
        config = row_config(cfg, protocol)
        key = row_key(config)
        path = saved / f"{run['name']}.json"
        if not needs_run(path, config, run["name"], started, args.max_minutes):
            if is_stale(path, config):  # not rerun now: its saved figures are of another config
                stale.add(run["name"])
            return
        begun = time.time()
        commit = _commit()  # the code that trains the row (a commit made while it trains is not)
        run_dir = Path(cfg["output_dir"])
        resumed_from = None
        if protocol.get("checkpoint_steps"):
            resumed_from = prepare_resume(run_dir, key)
            cfg = with_checkpoints(cfg, protocol["checkpoint_steps"])
        # A resumed row's log continues the earlier ones' (the freeze may have been logged by an earlier part).
        log_path = work / run["name"] / f"{run['name']}.log"
        earlier = log_path.read_text() if resumed_from is not None and log_path.is_file() else ""
        log, metrics = train(cfg, run["name"])
        if earlier:
            log = earlier + log
            log_path.write_text(log)
        if run["kind"] in DENSE_KINDS:
            model = merged_dense(model_dir, run_dir)
        else:
            export = work / run["name"] / "export"
            cfg_path = work / run["name"] / f"{run['name']}.yml"
            # The quick mode skips the merge's own logit check (tests/test_merge_e2e.py owns it).
            verify = ["--no-verify"] if args.quick else []
            run_cli(
                ["axolotl", "atp-merge", str(cfg_path), "--output-dir", str(export), "--overwrite", *verify],
                work / run["name"] / "merge.log",
            )
            model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, trust_remote_code=True)
        result = {
            **run,
            **evaluate(model),
            **training_facts(log),
            "train_loss": metrics.get("train_loss"),
            "train_seconds": metrics.get("train_runtime"),
            "seconds": round(time.time() - begun),
            # train_seconds and seconds then cover only the part trained by this invocation.
            "resumed_from_step": resumed_from,
            "machine": where,
            "commit": commit,
            "date": time.strftime("%Y-%m-%d"),
        }
        with lock:
            print(result, flush=True)
            save_row(path, config, result)

    todo = [run for run in plan(protocol, args.quick) if not args.only or run["name"] in args.only]
    failed: list[str] = []
    if args.jobs == 1:
        for run in todo:
            measure(run)
    else:  # a failed row is reported, and the others still run
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {run["name"]: pool.submit(measure, run) for run in todo}
            for name, future in futures.items():
                if future.exception() is not None:
                    print(f"row {name} failed: {future.exception()}", flush=True)
                    failed.append(name)

    results = [json.loads(p.read_text())["row"] for p in sorted(saved.glob("*.json"))]
    results = [r for r in results if r["name"] not in stale]
    order = ["base"] + [r["name"] for r in plan(protocol, args.quick)]
    results.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    dump(work / "results.json", {"protocol": protocol, "runs": results})
    missing = [r["name"] for r in plan(protocol, args.quick) if r["name"] not in {x["name"] for x in results}]
    body = report(results, protocol, missing, stale)
    print(body)
    if failed:
        raise SystemExit(f"rows failed: {', '.join(failed)}")
    if not args.no_record:
        plot = write_plot(results, ROOT / "benchmarks" / ("quality-quick.png" if args.quick else "quality.png"))
        mode = "quick" if args.quick else "long protocol"
        record(
            f"Quality ({mode})",
            f"{body}\n\n![quality]({plot.name})",
            f"python benchmarks/quality.py{' --quick' if args.quick else ''}",
        )


def needs_run(path: Path, config: dict, name: str, started: float, max_minutes: float | None) -> bool:
    """Whether row `name` is trained now: its saved result is missing or of another config
    (`saved_rows.is_current`), and the run's `--max-minutes` (counted from `started`) has not passed."""
    return not is_current(path, config) and not out_of_time(name, started, max_minutes)


def out_of_time(name: str, started: float, max_minutes: float | None) -> bool:
    """Whether `--max-minutes` (counted from `started`) has passed; says so for row `name`."""
    if max_minutes is not None and time.time() - started > 60 * max_minutes:
        print(f"not starting {name}: --max-minutes {max_minutes} reached", flush=True)
        return True
    return False


def _commit(root: Path = ROOT) -> str:
    """The checkout's commit, `+uncommitted` where its code differs from it; AXOLOTL_ATP_COMMIT names it where the
    tree is a copy without git."""
    if os.environ.get("AXOLOTL_ATP_COMMIT"):
        return os.environ["AXOLOTL_ATP_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
        # A row trained on uncommitted code says so: HEAD alone would name code that did not run.
        edited = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "axolotl_atp", "benchmarks/*.py"], cwd=root)
    except OSError:
        return "unknown"
    commit = done.stdout.strip() or "unknown"
    return commit + "+uncommitted" if edited.returncode == 1 else commit


def report(results: list[dict], protocol: dict, missing: list[str], stale: Collection[str] = ()) -> str:
    """The RESULTS.md section: the table of the rows measured with their current config, the seed summary, the
    targets, and the rows still to measure (`stale`: saved with an earlier config, so left out of the tables)."""
    steps, mb = protocol["steps"], protocol["micro_batch_size"]
    lines = [
        f"SmolLM2-135M, LoRA r=16 on all seven projections, {steps} optimizer steps of {mb}x256 tokens "
        f"({steps * mb * 256:,} training tokens) of PubMed abstracts for every trained row; ATP's generator trains "
        f"for the first half. Perplexity on {protocol['eval_tokens']:,} held-out tokens of each set, measured on "
        "the exported models (`atp-merge`, loaded with `from_pretrained`). Each row's commit and date are its own "
        "(rows are kept between sessions and rerun only when their config changes); so is its machine (rows can be "
        "trained on a GPU with the same fp32 config, `--jobs`).",
        "",
        format_table(results),
    ]
    seeds = seed_summary(results)
    if seeds:
        lines += ["", seeds]
    lines += ["", format_targets(results)]
    if missing:
        names = [name + (" (its saved row is of an earlier config)" if name in stale else "") for name in missing]
        lines += ["", f"Not yet measured ({len(missing)} rows): {', '.join(names)}."]
    return "\n".join(lines)


def format_table(results: list[dict]) -> str:
    dense = next((r for r in results if r["kind"] == "dense"), None)
    two_stage = {r["ratio"]: r for r in results if r["kind"] == "two-stage"}
    lines = [
        "| row | prune ratio | seed | parameters | PubMed PPL | Wikipedia PPL | PubMed / dense LoRA | PubMed / two-stage "
        "| freeze flips | commit, date, machine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        vs_dense = f"{r['PubMed'] / dense['PubMed']:.2f}" if dense and r["kind"] not in ("base", *DENSE_KINDS) else ""
        ref = two_stage.get(r["ratio"])
        vs_two = (
            f"{r['PubMed'] / ref['PubMed']:.2f}" if ref and r["kind"] not in ("two-stage", "base", *DENSE_KINDS) else ""
        )
        flips = f"{r['freeze_flips'] / r['groups']:.2%}" if r.get("groups") else ""
        when = ", ".join(str(r[k]) for k in ("commit", "date", "machine") if r.get(k))
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r.get('seed') or ''} | {r['params']:,} | {r['PubMed']:.2f} | "
            f"{r['Wikipedia']:.2f} | {vs_dense} | {vs_two} | {flips} | {when} |"
        )
    return "\n".join(lines)


def seed_summary(results: list[dict]) -> str:
    """Mean, sample standard deviation and range over the seeds at 0.3 of every method measured with more than one
    seed there, in the order of `results`, on both sets."""
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in results if r["ratio"] == 0.3):
        rows = sorted((r for r in results if r["kind"] == kind and r["ratio"] == 0.3), key=lambda r: r["seed"])
        if len(rows) < 2:
            continue
        cells = []
        for metric in ("PubMed", "Wikipedia"):
            values = [r[metric] for r in rows]
            cells.append(
                f"{statistics.mean(values):.2f} | {statistics.stdev(values):.2f} | {min(values):.2f}-{max(values):.2f}"
            )
        seeds = ", ".join(str(r["seed"]) for r in rows)
        lines.append(f"| {METHODS[kind]} | {seeds} | {' | '.join(cells)} |")
    if not lines:
        return ""
    head = (
        "| at 0.3 | seeds | mean PubMed PPL | std | range | mean Wikipedia PPL | std | range |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(lines)


TARGETS = {0.2: 1.25, 0.3: 1.5, 0.4: 1.8, 0.5: 2.5}


def format_targets(results: list[dict]) -> str:
    by = {(r["kind"], r["ratio"], r.get("seed")): r for r in results}
    dense, base = by.get(("dense", 0.0, 42)), by.get(("base", 0.0, None))
    lines = ["| target | measured | status |", "|---|---|---|"]
    for ratio, limit in TARGETS.items():
        atp = by.get(("atp", ratio, 42))
        if atp and dense:
            value = atp["PubMed"] / dense["PubMed"]
            lines.append(f"| ATP / dense LoRA at {ratio} at most {limit} | {value:.2f} | {_status(value <= limit)} |")
        else:
            lines.append(f"| ATP / dense LoRA at {ratio} at most {limit} | not yet measured | - |")
    for ratio in TARGETS:
        atp, two = by.get(("atp", ratio, 42)), by.get(("two-stage", ratio, 42))
        if atp and two:
            value = atp["PubMed"] / two["PubMed"]
            lines.append(f"| ATP / two-stage at {ratio} at most 0.9 | {value:.2f} | {_status(value <= 0.9)} |")
    atp = by.get(("atp", 0.2, 42))
    if atp and base:
        value = atp["Wikipedia"] / base["Wikipedia"]
        lines.append(f"| Wikipedia at 0.2 / base at most 1.5 | {value:.2f} | {_status(value <= 1.5)} |")
    return "\n".join(lines)


def _status(met: bool) -> str:
    return "met" if met else "**missed**"


def write_plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("PubMed", "Wikipedia"), strict=True):
        for kind, marker in zip(LINE_KINDS, ("o", "^", "s"), strict=True):
            pts = sorted((r["ratio"], r[metric]) for r in results if r["kind"] == kind and r.get("seed") == 42)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=METHODS[kind])
        for r in results:
            if r["kind"] in ("base", *DENSE_KINDS):
                color = {"base": "grey", "dense": "black"}.get(r["kind"], "dimgrey")
                ax.axhline(r[metric], linestyle="--", linewidth=1, color=color, label=f"{r['method']} (unpruned)")
            elif r["kind"] not in LINE_KINDS or r.get("seed") != 42:
                ax.scatter([r["ratio"]], [r[metric]], marker="x", label=f"{r['name']}")
        ax.set_xlabel("prune ratio (of prunable parameters)")
        ax.set_ylabel(f"{metric} perplexity (exported model)")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
