"""Reading: open checkpoint files lazily and safely, and say what they are.

* :mod:`.checkpoint` opens safetensors, torch zip and legacy torch files (only the index
  is read; tensor bytes on demand);
* :mod:`.unpickle` is the restricted unpickler behind the torch formats.
"""

from .checkpoint import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
