"""Files: atomic writes, model checkpoints (ours, labml .pt), images and grids."""
from .atomic import write_atomic
from .checkpoint import (default_checkpoint_path, load_checkpoint, load_extra_tensors, load_labml_state_dict,
                         save_checkpoint)
from .images import image_format_for_path, image_mode, make_grid, save_image_atomic

__all__ = ["write_atomic", "default_checkpoint_path", "load_checkpoint", "load_extra_tensors",
           "load_labml_state_dict", "save_checkpoint", "image_format_for_path", "image_mode", "make_grid",
           "save_image_atomic"]
