"""Reading: open checkpoint files lazily and safely, and say what they are.

* :mod:`.opening` opens any checkpoint (only its index is read) and hands it to its
  format's reader;
* :mod:`.checkpoint` holds :class:`Checkpoint` (tensor bytes read on demand) and
  :class:`TensorInfo`;
* :mod:`.safetensors` parses safetensors headers against their schema, in bounded memory;
* :mod:`.torchfile` reads torch's zip and legacy formats as torch reads them (or refuses);
  :mod:`.ziplist` lists a zip archive's entries (plain ones itself, others by zipfile);
* :mod:`.unpickle` is the restricted pickle machine behind the torch formats: it never
  runs code, and bounds its work and memory by the size of the pickle.
"""

from .checkpoint import Checkpoint, TensorInfo
from .opening import open_checkpoint

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]
