"""Reading parents (local folders or Hub ids) and writing merged model folders."""

from shoal.checkpoint.reader import Checkpoint, open_checkpoint, resolve_model
from shoal.checkpoint.writer import ModelFolderWriter, atomic_output_dir

__all__ = ["Checkpoint", "ModelFolderWriter", "atomic_output_dir", "open_checkpoint", "resolve_model"]
