"""``python -m mtl_lightning.calibration CKPT --val DATA --output OUT``: calibrate a checkpoint on a validation split.

The data module is the default one (``ParquetDataModule``) over ``--val``, with the checkpoint's tasks and the
state (features, encoders, statistics) saved in the checkpoint; the calibrated checkpoint is the given one plus
``checkpoint["calibration"]`` (see ``mtl_lightning.calibration``), written atomically.
"""

from __future__ import annotations

import argparse

import lightning as L

from ..checkpoint_files import atomic_save, load_checkpoint
from ..config import DEFAULT_DATAMODULE, default_class
from ..module import MultiTaskLightningModule
from . import METHODS, calibrate, save_calibration


def main(argv: list[str] | None = None) -> None:
    """``python -m mtl_lightning.calibration CKPT --val DATA --output OUT [--method isotonic|platt] [--by-scenario]``."""
    parser = argparse.ArgumentParser(description="Calibrate a MultiTaskLightningModule checkpoint on a validation split.")
    parser.add_argument("checkpoint", help="a checkpoint written by training (it holds the data module's state)")
    parser.add_argument("--val", required=True, help="the validation Parquet data (file, folder or glob)")
    parser.add_argument("--output", required=True, help="where to write the calibrated checkpoint")
    parser.add_argument("--method", choices=METHODS, default="isotonic")
    parser.add_argument("--by-scenario", action="store_true", help="one map per scenario (domain feature)")
    parser.add_argument("--scenario", default=None, help="the data's scenario column, when it is not the domain feature")
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args(argv)
    module = MultiTaskLightningModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
    checkpoint = load_checkpoint(args.checkpoint, map_location="cpu")
    reader = default_class(DEFAULT_DATAMODULE, L.LightningDataModule, "datamodule")
    datamodule = reader(val=args.val, tasks=list(module.tasks), features=list(module.model.features), batch_size=args.batch_size, scenario=args.scenario,
                        ignore_label=module.hparams.get("ignore_label", -1), progress=False)
    state = checkpoint.get(reader.__qualname__)
    if state:
        datamodule.load_state_dict(dict(state))
    calibrate(module, datamodule, args.method, args.by_scenario)
    save_calibration(module, checkpoint)
    atomic_save(checkpoint, args.output)
    print(f"calibrated checkpoint ({args.method}): {args.output}")


if __name__ == "__main__":
    main()
