"""`axolotl train` with the plugin, through the real CLI in a subprocess, on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.kit import base_config, run_cli, write_config

pytestmark = pytest.mark.e2e


def train(tmp_path: Path, model: Path, data: Path, name: str = "cfg", **overrides) -> tuple[Path, str]:
    cfg = base_config(model, data, tmp_path, **overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path / f"{name}.yml", cfg)
    result = run_cli(["axolotl", "train", str(path), "--launcher", "python"])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return Path(cfg["output_dir"]), log


def read_masks(run: Path) -> dict:
    return json.loads((run / "atp_masks.json").read_text())


def check_masks_file(masks: dict, prune_ratio: float) -> None:
    geo = masks["geometry"]
    assert masks["prune_ratio"] == prune_ratio
    assert len(masks["layers"]) == geo["num_layers"]
    for layer in masks["layers"]:
        assert layer["kv_heads"] and layer["mlp"] and layer["heads"]
        group = geo["num_heads"] // geo["num_kv_heads"]
        assert layer["heads"] == [k * group + j for k in layer["kv_heads"] for j in range(group)]
    params = masks["params"]
    assert params["prunable_after"] < params["prunable_before"]
    assert params["achieved_prune_ratio"] >= prune_ratio - 1e-9
    # Within one MLP channel-block or one head of the target (the decision's granularity).
    head_cost = (2 * group * geo["head_dim"] + 2 * geo["head_dim"]) * geo["hidden_size"]
    assert params["achieved_prune_ratio"] <= prune_ratio + head_cost / params["prunable_before"]


def test_train_lora_with_accumulation_and_checkpointing(tmp_path, tiny_llama, tiny_data):
    run, log = train(
        tmp_path,
        tiny_llama,
        tiny_data,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        save_strategy="steps",
        save_steps=3,
        # The LoRA-aware forward: its proximal group lasso must still end with exact zeros under accumulation.
        atp={"prune_ratio": 0.3, "control_steps": 3, "lora_aware": True},
    )
    masks = read_masks(run)
    check_masks_file(masks, 0.3)
    assert masks["group_lasso"] == {"mode": "prox", "pruned_slice_norm": 0.0}
    assert (run / "adapter_model.safetensors").is_file()
    assert (run / "checkpoint-3" / "atp_state.pt").is_file()
    assert "base Linear class Linear)" in log
    assert "fused LoRA kernels are off" in log
    for metric in ("atp/budget_loss", "atp/calibration_loss", "atp/remaining_ratio", "atp/mask_flips"):
        assert metric in log, metric
    assert "masks frozen at step 3" in log


def test_train_qlora_4bit(tmp_path, tiny_llama, tiny_data):
    run, log = train(
        tmp_path,
        tiny_llama,
        tiny_data,
        adapter="qlora",
        load_in_4bit=True,
        atp={"prune_ratio": 0.25, "control_steps": 3, "layout": "uniform"},
    )
    assert "base Linear class Linear4bit)" in log
    masks = read_masks(run)
    check_masks_file(masks, 0.25)
    counts = {len(layer["mlp"]) for layer in masks["layers"]}
    assert len(counts) == 1  # uniform layout
    assert (run / "adapter_model.safetensors").is_file()


def test_group_lasso_loss_mode(tmp_path, tiny_llama, tiny_data):
    run, log = train(tmp_path, tiny_llama, tiny_data, atp={"group_lasso": "loss", "group_lasso_strength": 0.01})
    assert "atp/group_lasso_penalty" in log
    assert read_masks(run)["group_lasso"]["mode"] == "loss"


RESUME = dict(
    max_steps=8,
    save_strategy="steps",
    save_steps=1,
    save_total_limit=10,
    auto_resume_from_checkpoints=True,
    atp={"prune_ratio": 0.3, "control_steps": 4},
)


def same_adapter(a_dir: Path, b_dir: Path) -> None:
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama, tiny_data) -> Path:
    """The reference: 8 steps, the masks freeze at step 4, a checkpoint after every step."""
    run, _ = train(tmp_path_factory.mktemp("uninterrupted"), tiny_llama, tiny_data, **RESUME)
    return run


def interrupt_after(full: Path, dest: Path, step: int, partial_save: bool) -> None:
    """What a kill leaves: the checkpoints up to `step`; with `partial_save`, the next one half-written
    (the adapter only: no optimizer, trainer state or ATP state)."""
    dest.mkdir(parents=True)
    for n in range(1, step + 1):
        shutil.copytree(full / f"checkpoint-{n}", dest / f"checkpoint-{n}")
    if partial_save:
        half = dest / f"checkpoint-{step + 1}"
        half.mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(full / f"checkpoint-{step + 1}" / name, half / name)


@pytest.mark.parametrize(
    ("point", "step", "partial_save"),
    [("during the control phase", 2, False), ("right after the freeze", 5, False), ("while saving", 5, True)],
)
def test_killed_run_resumes_to_the_same_masks_and_adapter(
    tmp_path, tiny_llama, tiny_data, uninterrupted, point, step, partial_save
):
    interrupt_after(uninterrupted, tmp_path / "run", step, partial_save)
    resumed, log = train(tmp_path, tiny_llama, tiny_data, **RESUME)  # auto-resume, as after a crash
    assert f"restored generator, masks and decision from {tmp_path / 'run' / f'checkpoint-{step}'}" in log
    if partial_save:
        assert (
            f"skipping checkpoint(s) whose save was interrupted: {tmp_path / 'run' / f'checkpoint-{step + 1}'}" in log
        )
    assert read_masks(resumed)["layers"] == read_masks(uninterrupted)["layers"], point
    same_adapter(uninterrupted, resumed)


def test_sigkill_mid_run_then_auto_resume(tmp_path, tiny_llama, tiny_data, uninterrupted):
    """A real SIGKILL wherever it lands after the second checkpoint; the resumed run ends the same."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.kit import OFFLINE_ENV

    cfg = write_config(tmp_path / "cfg.yml", base_config(tiny_llama, tiny_data, tmp_path, **RESUME))
    bindir = Path(sys.executable).parent
    env = {**os.environ, **OFFLINE_ENV, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(bindir / "axolotl"), "train", str(cfg), "--launcher", "python"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "atp_masks.json").exists(), "the run finished before the kill"
    resumed, log = train(tmp_path, tiny_llama, tiny_data, name="resume", **RESUME)
    assert "restored generator, masks and decision" in log
    assert read_masks(resumed)["layers"] == read_masks(uninterrupted)["layers"]
    same_adapter(uninterrupted, resumed)


def test_resume_without_atp_state_is_refused(tmp_path, tiny_llama, tiny_data):
    common = dict(save_strategy="steps", save_steps=2, max_steps=4, atp={"prune_ratio": 0.3, "control_steps": 2})
    full, _ = train(tmp_path / "a", tiny_llama, tiny_data, **common)
    broken = tmp_path / "b" / "run" / "checkpoint-2"
    shutil.copytree(full / "checkpoint-2", broken)
    (broken / "atp_state.pt").unlink()
    cfg = base_config(tiny_llama, tiny_data, tmp_path / "b", resume_from_checkpoint=str(broken), **common)
    result = run_cli(["axolotl", "train", str(write_config(tmp_path / "b.yml", cfg)), "--launcher", "python"])
    assert result.returncode != 0
    assert "has no atp_state.pt" in result.stdout + result.stderr


@pytest.mark.parametrize("corrupt", [b"", b"not a torch file"])
def test_corrupt_atp_state_is_refused(tmp_path, corrupt):
    from axolotl_atp.training.checkpoint_state import ATPStateError, load_state

    (tmp_path / "atp_state.pt").write_bytes(corrupt)
    with pytest.raises(ATPStateError, match="is corrupt"):
        load_state(tmp_path)


def test_data_parallel_on_two_cpu_processes(tmp_path, tiny_llama, tiny_data):
    """`torchrun` with 2 CPU processes (gloo DDP): every rank trains with the same masks at every step,
    and only rank 0 writes the checkpoint's atp_state.pt and the masks file, which hold those masks."""
    import os
    import re
    import subprocess
    import sys

    import torch

    from axolotl_atp.training.checkpoint_state import load_state
    from axolotl_atp.training.distributed import kept_digest, masks_digest
    from tests.kit import OFFLINE_ENV

    root = Path(__file__).parents[1]
    cfg = base_config(
        tiny_llama,
        tiny_data,
        tmp_path,
        save_strategy="steps",
        save_steps=3,
        atp={"prune_ratio": 0.3, "control_steps": 3, "offset": 0.0},  # offset 0: the masks move from step 0
    )
    path = write_config(tmp_path / "cfg.yml", cfg)
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "ACCELERATE_USE_CPU": "true",  # accelerate's MULTI_CPU (gloo) data parallel
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tests.ddp_cpu_train", str(path)]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    run = Path(cfg["output_dir"])

    # One trainer over two processes (not two single-process runs): one summary, one metrics line per step.
    assert log.count("'train_runtime'") == 1, log[-4000:]
    assert log.count("'atp/budget_loss'") == 3

    used: dict[int, dict[int, str]] = {0: {}, 1: {}}
    for rank, digest, step in re.findall(r"rank (\d) of 2 uses hard masks ([0-9a-f]+) from step (\d+)", log):
        used[int(rank)][int(step)] = digest
    assert used[0] and used[0] == used[1], used
    assert {0, 1, 2, 3} <= set(used[0]), used  # the generator moved the masks each step, then the freeze
    final = dict(re.findall(r"rank (\d) of 2 ends with decision ([0-9a-f]+)", log))
    assert final.keys() == {"0", "1"} and final["0"] == final["1"] == used[0][3]

    # Only rank 0 wrote, and the files hold the masks that both ranks used.
    writes = re.findall(r"(\[RANK:\d\] )?axolotl-atp: (wrote|saved generator, masks and decision to) (\S+)", log)
    assert sorted((w[1], Path(w[2]).name) for w in writes) == [
        ("saved generator, masks and decision to", "checkpoint-3"),
        ("saved generator, masks and decision to", "checkpoint-6"),
        ("wrote", "atp_masks.json"),
    ], writes
    assert not any(w[0] for w in writes), writes  # no "[RANK:1]" writer
    masks = read_masks(run)
    check_masks_file(masks, 0.3)
    kept = {
        s: [layer["kv_heads" if s == "attention_heads" else "mlp"] for layer in masks["layers"]]
        for s in masks["structures"]
    }
    assert kept_digest(kept) == final["0"]
    state = load_state(run / "checkpoint-3")  # saved after steps 0-2: the masks of step 2
    assert masks_digest(state["hard_masks"]) == used[0][2]
    assert not [p.name for p in run.rglob(".atp_state.pt.tmp-*")]
    assert isinstance(state["generator"], dict) and all(torch.isfinite(v).all() for v in state["generator"].values())
