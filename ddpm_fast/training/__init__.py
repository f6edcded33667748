"""Training: the loop (EMA, clipping, AMP, DDP, exact resume), its checkpoints, the run folder, datasets."""
from .checkpoint import (CheckpointError, export_model, load_train_checkpoint, read_train_checkpoint,
                         read_train_config, save_train_checkpoint)
from .loop import (CHECKPOINT_NAME, LOSS_COLUMNS, LOSS_LOG, MODEL_NAME, DivergedError, TrainResult, ema_decay_at,
                   ema_update, sample_grid, train)

__all__ = ["train", "TrainResult", "DivergedError", "CheckpointError", "ema_decay_at", "ema_update", "sample_grid",
           "export_model", "load_train_checkpoint", "read_train_checkpoint", "read_train_config",
           "save_train_checkpoint", "CHECKPOINT_NAME", "MODEL_NAME", "LOSS_LOG", "LOSS_COLUMNS"]
