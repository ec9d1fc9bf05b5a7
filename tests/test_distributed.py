"""Data parallel: two gloo processes run the controller on different calibration data and stay in lockstep."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 7
CONTROL_STEPS = 5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.kit import tiny_config

    torch.manual_seed(0)  # the same weights on every rank, as DDP's initial broadcast would make them
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return get_peft_model(model.eval(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))


def run_controller(rank: int, *, average: bool, check: bool) -> dict:
    """STEPS controller steps on rank-specific calibration data; what each rank saw, step by step."""
    from axolotl_atp.args import ATPConfig
    from axolotl_atp.training import distributed
    from axolotl_atp.training.controller import ATPController

    real_average, real_check = distributed.average_gradients, distributed.check_same
    record: dict = {"masks": [], "params": [], "grads_local": [], "grads_used": [], "calibration_loss": []}

    def recording_average(params):
        params = list(params)
        record["grads_local"].append([p.grad.clone() for p in params])
        if average:
            real_average(params)
        record["grads_used"].append([p.grad.clone() for p in params])

    distributed.average_gradients = recording_average
    if not check:
        distributed.check_same = lambda *a, **k: None
    try:
        model = tiny_lora_model()
        # offset 0 and a high generator lr: the masks move from the first steps, so agreement is not trivial.
        cfg = ATPConfig(prune_ratio=0.4, control_steps=CONTROL_STEPS, offset=0.0, generator_lr=0.05)
        ctl = ATPController(model, cfg, total_steps=STEPS, peak_lr=1e-3, seed=11)
        data = torch.Generator().manual_seed(1000 + rank)  # each rank its own calibration rows

        def calibration_loss():
            ids = torch.randint(0, 64, (2, 12), generator=data)
            return model(input_ids=ids, labels=ids).loss

        try:
            for step in range(STEPS):
                ctl.begin_step(step, calibration_loss)
                record["masks"].append({s: m.clone() for s, m in ctl.hard_masks.items()})
                record["params"].append([p.detach().clone() for p in ctl.generator.parameters()])
                record["calibration_loss"].append(ctl.metrics.get("atp/calibration_loss"))
                ctl.end_step(step)
            record["decision"] = ctl.decision.kept if ctl.decision else None
        except distributed.RankDivergenceError as err:
            record["error"] = str(err)
    finally:
        distributed.average_gradients, distributed.check_same = real_average, real_check
    return record


def worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {
            "synced": run_controller(rank, average=True, check=True),
            # Without gradient averaging: the divergence check must stop both ranks ...
            "unaveraged": run_controller(rank, average=False, check=True),
            # ... and without the check either, the ranks really do drift apart.
            "unsynced": run_controller(rank, average=False, check=False),
        }
    except BaseException:
        results = {"crash": traceback.format_exc()}
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    return results


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_ranks_use_identical_masks_generator_and_decision(ranks):
    r0, r1 = (r["synced"] for r in ranks)
    assert "error" not in r0 and "error" not in r1, r0.get("error")
    assert len(r0["masks"]) == STEPS
    for step in range(STEPS):
        assert same(r0["masks"][step], r1["masks"][step]), f"hard masks differ at step {step}"
        assert same(r0["params"][step], r1["params"][step]), f"generator parameters differ at step {step}"
    assert r0["decision"] is not None and r0["decision"] == r1["decision"]
    # The masks did move (agreement is not the trivial all-ones), and the freeze pruned something.
    assert any(not same(r0["masks"][0], m) for m in r0["masks"][1:])
    assert any(float(m.mean()) < 1.0 for m in r0["masks"][-1].values())
    # The logged calibration loss is the ranks' mean, the same on both.
    assert r0["calibration_loss"][:CONTROL_STEPS] == r1["calibration_loss"][:CONTROL_STEPS]


def test_generator_gradient_is_the_mean_of_the_ranks_gradients(ranks):
    r0, r1 = (r["synced"] for r in ranks)
    assert len(r0["grads_local"]) == CONTROL_STEPS
    for step in range(CONTROL_STEPS):
        local0, local1 = r0["grads_local"][step], r1["grads_local"][step]
        # Different calibration data per rank: different local gradients (else the check below is empty).
        assert not same(local0, local1), f"step {step}: the ranks' local gradients are equal"
        for g0, g1, used0, used1 in zip(local0, local1, r0["grads_used"][step], r1["grads_used"][step], strict=True):
            assert torch.equal(used0, used1)
            torch.testing.assert_close(used0, (g0 + g1) / 2, rtol=1e-5, atol=1e-7)


def test_without_gradient_averaging_the_divergence_check_stops_every_rank(ranks):
    for r, res in enumerate(ranks):
        error = res["unaveraged"].get("error")
        assert error is not None, f"rank {r} did not notice that the ranks diverged"
        assert "after the generator step at optimizer step 0" in error
        assert "pruning-decision generator's parameters" in error and "Fix:" in error


def test_without_any_sync_the_ranks_drift_apart(ranks):
    """The sync is what keeps the first test green: without it, the generators differ."""
    r0, r1 = (r["unsynced"] for r in ranks)
    assert not same(r0["params"][-1], r1["params"][-1])
    assert (
        any(not same(a, b) for a, b in zip(r0["masks"], r1["masks"], strict=True)) or r0["decision"] != r1["decision"]
    )


def test_helpers_are_no_ops_on_one_process():
    from axolotl_atp.training import distributed

    assert not distributed.is_distributed()
    assert distributed.world_size() == 1 and distributed.rank() == 0
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    distributed.check_same([torch.ones(2)], "masks", "now")
    masks = {"mlp_channels": torch.tensor([[1.0, 0.0, 1.0]])}
    assert distributed.masks_digest(masks) == distributed.kept_digest({"mlp_channels": [[0, 2]]})


@pytest.mark.parametrize(("flag", "name"), [("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")])
def test_a_trainer_under_fsdp_or_deepspeed_is_stopped_when_training_begins(flag, name):
    """The last line of defence when FSDP/DeepSpeed came from somewhere the config validation cannot see."""
    from types import SimpleNamespace

    from axolotl_atp.args import ATPConfig
    from axolotl_atp.training.callback import ATPCallback

    callback = ATPCallback(SimpleNamespace(**{flag: True}), ATPConfig(), None, seed=0, base_model=None)
    with pytest.raises(
        ValueError, match=rf"runs under {name} \(trainer.{flag} = True.*Fix: launch plain data parallel"
    ):
        callback.on_train_begin(SimpleNamespace(), SimpleNamespace(), SimpleNamespace())


def test_checksum_sees_a_one_ulp_change_and_a_swap():
    """The divergence check sends a checksum, not the tensors: it must still tell any difference."""
    from axolotl_atp.training.distributed import checksum

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 8, generator=g), torch.randn(5, generator=g)]
    reference = checksum(params)
    assert reference.shape == (2,) and reference.dtype == torch.int64  # two integers cross the network
    assert torch.equal(checksum([p.clone() for p in params]), reference)
    one_ulp = [params[0].clone(), params[1].clone()]
    one_ulp[1][2] = torch.nextafter(one_ulp[1][2], torch.tensor(float("inf")))
    assert not torch.equal(checksum(one_ulp), reference)
    swapped = [params[0].clone(), params[1].clone()]
    swapped[0][[3, 40]] = swapped[0][[40, 3]]
    assert not torch.equal(checksum(swapped), reference)
    masks = torch.tensor([[1.0, 0.0, 1.0]])
    assert not torch.equal(checksum([masks]), checksum([torch.tensor([[0.0, 1.0, 1.0]])]))
