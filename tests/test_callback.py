"""The training-loop glue (`training/callback.py`) without a Trainer: its entry point's steps."""

from __future__ import annotations

from types import SimpleNamespace

from axolotl_atp.args import ATPConfig
from axolotl_atp.training.callback import ATPCallback
from tests.tiny_models import lora_model


def test_train_begin_builds_the_controller_and_logs_the_plan(tmp_path, monkeypatch):
    from axolotl_atp.training import callback as callback_module

    logged: list[str] = []
    monkeypatch.setattr(callback_module.LOG, "info", lambda msg, *args, **kw: logged.append(msg % args))
    trainer = SimpleNamespace(model=lora_model("llama"), data_collator=None)
    callback = ATPCallback(trainer, ATPConfig(prune_ratio=0.3, control_steps=4), None, seed=0, base_model=None)
    args = SimpleNamespace(learning_rate=1e-3, output_dir=str(tmp_path), per_device_train_batch_size=2)
    callback.on_train_begin(args, SimpleNamespace(max_steps=10, global_step=0), SimpleNamespace())
    assert callback.controller is not None and callback.controller.control_steps == 4
    assert callback.sampler is None  # no calibration rows: a fixed decision or a test
    assert logged[0].startswith("axolotl-atp: 2 layers (base Linear class Linear), 2 attention_heads per layer")
    assert "target prune ratio 0.300 of" in logged[1] and "trains for 4 of 10 steps" in logged[1]
