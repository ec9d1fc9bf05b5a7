"""`axolotl train CFG` for a data-parallel test on CPU processes (torchrun, gloo).

Run as `torchrun --nproc_per_node 2 -m tests.ddp_cpu_train CFG`. compat(axolotl 0.19): axolotl 0.19 places rank r's model on
accelerator device r (`device_map = {"": LOCAL_RANK}` in `normalize_config`) whenever world_size > 1,
which cannot load on a machine without one. This puts the model on the CPU and otherwise runs axolotl's
own training entry point (`axolotl.cli.train.do_train`), exactly as `axolotl train` does.
"""

from __future__ import annotations

import sys

import torch


def main(config: str) -> None:
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train

    cfg = load_cfg(config)
    if not torch.cuda.is_available():
        cfg.device_map = {"": "cpu"}
    do_train(cfg, TrainerCliArgs())


if __name__ == "__main__":
    main(sys.argv[1])
