"""A restricted unpickler for torch checkpoints that never runs code from the file.

A torch checkpoint is a pickle that names Python callables (``GLOBAL`` opcodes) and calls
them to rebuild its objects. Whoever wrote the file chooses those callables, so a hostile
``.ckpt`` can call ``os.system``. This module resolves every global against a short
allow-list and maps the ones it allows to inert stand-ins:

* tensors become :class:`TensorRef` records (storage key, dtype, offset, shape, stride):
  no tensor data is read while unpickling;
* the extra objects that real Stable Diffusion checkpoints carry beside the weights
  (PyTorch Lightning's ``ModelCheckpoint`` callback state, numpy scalars and dtypes,
  ``_codecs.encode`` for bytes) become :class:`Opaque` placeholders, so those files load
  without pytorch_lightning installed;
* anything else raises :class:`~cndiff.errors.UnsafeCheckpointError` naming the global.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

from .dtypes import DType, by_name
from .errors import CheckpointError, UnsafeCheckpointError

__all__ = ["StorageRef", "TensorRef", "Opaque", "restricted_load", "STORAGE_DTYPES"]

#: torch's legacy typed-storage class names and the dtype of their elements.
STORAGE_DTYPES: dict[str, DType] = {
    name + "Storage": by_name(dt)
    for name, dt in [
        ("Double", "float64"),
        ("Float", "float32"),
        ("Half", "float16"),
        ("BFloat16", "bfloat16"),
        ("Long", "int64"),
        ("Int", "int32"),
        ("Short", "int16"),
        ("Char", "int8"),
        ("Byte", "uint8"),
        ("Bool", "bool"),
        ("Untyped", "uint8"),
    ]
}

_TORCH_DTYPE_NAMES = [
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool", "double", "float", "half", "long", "int", "short",
]  # fmt: skip


@dataclass(frozen=True)
class StorageRef:
    """A storage named by a checkpoint: its key in the archive, element dtype and size."""

    key: str
    dtype: DType
    numel: int
    location: str


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it: a view (offset, shape, stride) into a storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class Opaque:
    """Inert stand-in for an allowed non-tensor object (Lightning callback, numpy scalar).

    It accepts any constructor arguments and pickled state and keeps them for display;
    it never calls anything.
    """

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


def _opaque_class(qualname: str) -> type:
    return type("Opaque", (Opaque,), {"qualname": qualname})


class _StorageType:
    """What ``torch.FloatStorage`` and friends resolve to: just the dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _check_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(f"corrupt checkpoint: tensor {what} is {value!r:.80}, not sizes")
    return value


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any
) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise CheckpointError("corrupt checkpoint: a tensor refers to something not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointError(f"corrupt checkpoint: tensor storage offset {storage_offset!r}")
    shape = _check_int_tuple(size, "shape")
    strides = _check_int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise CheckpointError("corrupt checkpoint: tensor shape and stride differ in length")
    # The last element the view touches must lie inside the storage; torch's own mmap
    # loading once accepted views larger than their storage and read past it.
    if all(shape):
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= storage.numel:
            raise CheckpointError(
                f"corrupt checkpoint: a tensor of shape {list(shape)} reaches element {last} "
                f"of storage {storage.key!r}, which holds only {storage.numel}"
            )
    return TensorRef(storage, storage_offset, shape, strides)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _codecs_encode(text: Any, encoding: str = "utf-8", *_rest: Any) -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CheckpointError("corrupt checkpoint: unexpected _codecs.encode call")
    return text.encode(encoding)


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _check_int_tuple(tuple(dims), "size")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any] | type | object]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): _torch_size,
        ("_codecs", "encode"): _codecs_encode,
    }
    for name in STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
    allowed[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")
    for name in _TORCH_DTYPE_NAMES:
        allowed[("torch", name)] = by_name(name)
    # Objects real SD checkpoints pickle beside the weights; kept as inert placeholders.
    for module, name in [
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
    ]:
        allowed[(module, name)] = _opaque_class(f"{module}.{name}")
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storage: Callable[[tuple], StorageRef] | None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storage = storage
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load: the checkpoint's pickle asks for '{module}.{name}', which "
                "cndiff does not allow (it could run code); only plain state dicts of tensors "
                "are supported"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._storage is None or not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"corrupt checkpoint: unsupported persistent id {pid!r:.80}")
        return self._storage(pid)


def restricted_load(file: BinaryIO, storage: Callable[[tuple], StorageRef] | None = None) -> Any:
    """Unpickle the next pickle in ``file`` with the allow-list; never runs code.

    ``storage`` turns a persistent id ``('storage', type, key, location, numel, ...)`` into
    a :class:`StorageRef` (see :func:`storage_from_pid`). Any malformed pickle raises
    :class:`~cndiff.errors.CheckpointError`.
    """
    try:
        return _RestrictedUnpickler(file, storage).load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError("corrupt checkpoint: the pickle nests too deeply") from None
    except MemoryError:
        raise CheckpointError("corrupt checkpoint: the pickle asks for too much memory") from None
    except Exception as exc:  # any malformed pickle: EOF, bad opcode, wrong arguments...
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:200]
        raise CheckpointError(
            f"corrupt or truncated checkpoint: its pickle cannot be read ({detail})"
        ) from None


def storage_from_pid(pid: tuple) -> StorageRef:
    """Validate a ``('storage', type, key, location, numel, ...)`` id and describe it."""
    if len(pid) < 5:
        raise CheckpointError(f"corrupt checkpoint: malformed storage id {pid!r:.80}")
    _, storage_type, key, location, numel = pid[:5]
    if not isinstance(storage_type, _StorageType):
        raise CheckpointError(f"corrupt checkpoint: unknown storage type {storage_type!r:.80}")
    if isinstance(key, int):
        key = str(key)
    if not isinstance(key, str) or not isinstance(location, str):
        raise CheckpointError(f"corrupt checkpoint: malformed storage id {pid!r:.80}")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise CheckpointError(f"corrupt checkpoint: storage {key!r} has size {numel!r}")
    return StorageRef(key, storage_type.dtype, numel, location)
