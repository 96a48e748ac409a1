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

Before the C unpickler sees a pickle, :func:`scan_pickle` walks its opcodes and refuses
what would make the unpickler itself allocate or recurse without bound (memo indexes far
beyond anything stored, lengths past the data, tuples nested so deep that hashing them
overflows the C stack, or more objects than the file justifies). The stand-ins above
refuse ``BUILD`` (pickled state), so a pickle cannot rewrite a validated tensor view, a
dtype or a storage type after the fact.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..dtypes import DType, by_name
from ..errors import CheckpointError, UnsafeCheckpointError
from ..text import safe_repr

__all__ = [
    "StorageRef",
    "TensorRef",
    "Opaque",
    "restricted_load",
    "scan_pickle",
    "PickleEndsError",
    "STORAGE_DTYPES",
    "MAX_NESTING",
    "MAX_NDIM",
]

#: deepest nesting of containers a checkpoint's pickle may use (a state dict needs < 15;
#: hashing a tuple nested ~100,000 deep crashes CPython with a C stack overflow)
MAX_NESTING = 100
#: most dimensions a tensor may have (numpy's own limit is 64)
MAX_NDIM = 64
#: the objects the unpickler may build, in (estimated) bytes, when the caller sets no budget
DEFAULT_BUDGET = 1 << 30

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


def _refuse_state(self: object, state: object) -> None:
    # Pickle's BUILD opcode calls __setstate__ when there is one; without it, it would
    # write the pickled state straight into the object's __dict__ (even a frozen
    # dataclass's), e.g. to enlarge a tensor view after it was checked.
    what = getattr(self, "describe", type(self).__name__)
    raise CheckpointError(f"corrupt checkpoint: its pickle tries to set the state of {what}")


@dataclass(frozen=True)
class StorageRef:
    """A storage named by a checkpoint: its key in the archive, element dtype and size."""

    key: str
    dtype: DType
    numel: int
    location: str

    __setstate__ = _refuse_state
    describe = "a storage"


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it: a view (offset, shape, stride) into a storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    __setstate__ = _refuse_state
    describe = "a tensor"


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

    __slots__ = ("name", "dtype")
    __setstate__ = _refuse_state

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    @property
    def describe(self) -> str:
        return f"torch.{self.name}"


class _Global:
    """An allowed global that is not a class (a function, a dtype): calls go to ``value``
    when it is callable; pickled state is refused (see :func:`_refuse_state`)."""

    __slots__ = ("qualname", "value")
    __setstate__ = _refuse_state

    def __init__(self, qualname: str, value: Any) -> None:
        self.qualname = qualname
        self.value = value

    def __call__(self, *args: Any) -> Any:
        if not callable(self.value):
            raise CheckpointError(f"corrupt checkpoint: its pickle calls {self.qualname}")
        return self.value(*args)

    @property
    def describe(self) -> str:
        return self.qualname

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


def _check_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, tuple)
        or len(value) > MAX_NDIM
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise CheckpointError(
            f"corrupt checkpoint: tensor {what} is {safe_repr(value)}, not up to {MAX_NDIM} sizes"
        )
    return value


def shape_too_large(shape: tuple[int, ...]) -> bool:
    """True when the product of the non-zero dimensions cannot be an element count."""
    n = 1
    for d in shape:
        n *= d or 1
    return n >= 1 << 62


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, *_rest: Any
) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise CheckpointError("corrupt checkpoint: a tensor refers to something not a storage")
    if (
        not isinstance(storage_offset, int)
        or isinstance(storage_offset, bool)
        or storage_offset < 0
    ):
        raise CheckpointError(
            f"corrupt checkpoint: tensor storage offset {safe_repr(storage_offset)}"
        )
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
                f"corrupt checkpoint: a tensor of shape {safe_repr(list(shape))} reaches "
                f"element {safe_repr(last)} of storage {storage.key!r}, which holds only "
                f"{safe_repr(storage.numel)}"
            )
    elif storage_offset > storage.numel:
        raise CheckpointError(
            f"corrupt checkpoint: an empty tensor starts at element {safe_repr(storage_offset)}"
            f" of storage {storage.key!r}, which holds only {safe_repr(storage.numel)}"
        )
    elif shape_too_large(shape):
        # An empty view reads nothing, but numpy still refuses absurd shapes: (0, 2**70).
        raise CheckpointError(
            f"corrupt checkpoint: tensor shape {safe_repr(list(shape))} is too large"
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
    # Fresh objects for every unpickler: nothing a pickle does to them outlives it.
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for (module, name), fn in [
        (("torch._utils", "_rebuild_tensor_v2"), _rebuild_tensor_v2),
        (("torch._utils", "_rebuild_parameter"), _rebuild_parameter),
        (("torch._utils", "_rebuild_parameter_with_state"), _rebuild_parameter),
        (("torch", "Size"), _torch_size),
        (("_codecs", "encode"), _codecs_encode),
    ]:
        allowed[(module, name)] = _Global(f"{module}.{name}", fn)
    for name in STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
    allowed[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")
    for name in _TORCH_DTYPE_NAMES:
        allowed[("torch", name)] = _Global(f"torch.{name}", by_name(name))
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
            raise CheckpointError(f"corrupt checkpoint: unsupported persistent id {safe_repr(pid)}")
        return self._storage(pid)


# -- the opcode scan ------------------------------------------------------------------------

_OBJECT_COST = 64  # bytes, about what a small Python object costs
_ITEM_COST = 16  # bytes per item added to a container

# What the scan needs of each opcode: its kind, how many stack items below a MARK it
# consumes (or, without MARK, in all), how many it pushes, and whether it pops to a MARK.
_STOP, _MARK, _PUT, _MEMOIZE, _GET, _REFUSED, _FRAME, _POP, _DUP, _MUTATE, _OTHER = range(11)
_KINDS = {
    "STOP": _STOP, "MARK": _MARK, "PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT,
    "MEMOIZE": _MEMOIZE, "GET": _GET, "BINGET": _GET, "LONG_BINGET": _GET,
    # protocol-5 out-of-band buffers: never in a checkpoint
    "NEXT_BUFFER": _REFUSED, "READONLY_BUFFER": _REFUSED, "FRAME": _FRAME, "POP": _POP,
    "DUP": _DUP,
    # these add to the container below them and leave it on the stack
    "APPEND": _MUTATE, "APPENDS": _MUTATE, "SETITEM": _MUTATE, "SETITEMS": _MUTATE,
    "ADDITEMS": _MUTATE, "BUILD": _MUTATE,
}  # fmt: skip
_OPS: dict[object, tuple[int, int, int, bool, str]] = {}
for _op in pickletools.opcodes:
    _marked = pickletools.markobject in _op.stack_before
    _below = _op.stack_before.index(pickletools.markobject) if _marked else len(_op.stack_before)
    _OPS[_op] = (_KINDS.get(_op.name, _OTHER), _below, len(_op.stack_after), _marked, _op.name)


def _corrupt(why: str) -> CheckpointError:
    return CheckpointError(f"corrupt or truncated checkpoint: its pickle cannot be read ({why})")


class PickleEndsError(CheckpointError):
    """The pickle runs past the end of the data scanned (a longer read may complete it)."""

    def __init__(
        self,
        message: str = "corrupt or truncated checkpoint: its pickle ends before its STOP opcode",
    ) -> None:
        super().__init__(message)


def scan_pickle(data: bytes | bytearray | memoryview, budget: int = DEFAULT_BUDGET) -> int:
    """Check the pickle at the start of ``data`` before unpickling it; returns its length
    (the offset just past its ``STOP``).

    Simulates the unpickler's stack without building anything and raises
    :class:`~cndiff.errors.CheckpointError` for a pickle that is malformed or would make
    the C unpickler misbehave: a memo index beyond the opcodes read so far (the memo table
    is sized by the largest index: a 12-byte pickle could allocate gigabytes), nesting
    deeper than :data:`MAX_NESTING`, out-of-band buffers, or objects estimated at more
    than ``budget`` bytes; :class:`PickleEndsError` when a length runs past the data.
    About a microsecond per opcode (a state dict's pickle has ~50,000).
    """
    f = io.BytesIO(data)
    stack: list[int] = []  # nesting depth of each item on the unpickler's stack
    marks: list[int] = []
    memo: dict[int, int] = {}
    cost = 0
    ops = 0
    try:
        for op, arg, pos in pickletools.genops(f):
            ops += 1
            kind, below, pushes, marked, name = _OPS[op]
            fence = marks[-1] if marks else 0
            if kind == _OTHER and not marked and not below:  # a constant, a global...
                cost += _OBJECT_COST
                if isinstance(arg, (str, bytes, bytearray)):
                    cost += len(arg)
                elif isinstance(arg, int) and arg.bit_length() > 64:
                    cost += arg.bit_length() >> 3
                if cost > budget:
                    raise _corrupt(f"it would build more than {budget >> 20} MiB of objects")
                if pushes:
                    stack.append(0)
                continue
            if kind == _STOP:
                if len(stack) <= fence:
                    raise _corrupt(f"STOP with nothing to return, at byte {pos}")
                return pos + 1
            if kind == _MARK:
                marks.append(len(stack))
                continue
            if kind in (_PUT, _MEMOIZE):
                if len(stack) <= fence:
                    raise _corrupt(f"memo store of nothing at byte {pos}")
                idx = len(memo) if kind == _MEMOIZE else arg
                if not isinstance(idx, int) or not 0 <= idx < ops:
                    raise _corrupt(f"memo index {safe_repr(idx)} at byte {pos}")
                memo[idx] = stack[-1]
                cost += _ITEM_COST
                continue
            if kind == _GET:
                if arg not in memo:
                    raise _corrupt(f"memo index {safe_repr(arg)} never stored, at byte {pos}")
                stack.append(memo[arg])
                continue
            if kind == _REFUSED:
                raise _corrupt(f"out-of-band buffer at byte {pos}")
            if kind == _FRAME:
                if arg > len(data) - f.tell():
                    raise PickleEndsError()
                continue
            if kind == _POP and marks and fence == len(stack):
                marks.pop()  # (POP right after MARK drops the mark, as the C unpickler does)
                continue
            items: list[int] = []
            if marked:
                if not marks:
                    raise _corrupt(f"{name} without MARK at byte {pos}")
                items = stack[fence:]
                del stack[fence:]
                marks.pop()
                fence = marks[-1] if marks else 0
            if len(stack) - below < fence:
                raise _corrupt(f"stack underflow at byte {pos}")
            under = stack[len(stack) - below :] if below else []
            if below:
                del stack[-below:]
            if kind == _DUP:
                stack += under * 2
                continue
            if kind == _MUTATE:
                inner = items + under[1:]
                depth = max(under[0], 1 + max(inner, default=0))
                cost += _ITEM_COST * len(inner)
            else:
                consumed = items + under
                depth = 1 + max(consumed) if consumed else 0
                cost += _ITEM_COST * len(items) + (_OBJECT_COST if pushes else 0)
            if depth > MAX_NESTING:
                raise _corrupt(f"containers nested more than {MAX_NESTING} deep")
            if cost > budget:
                raise _corrupt(f"it would build more than {budget >> 20} MiB of objects")
            if pushes:
                stack += [depth] * pushes
    except CheckpointError:
        raise
    except Exception as exc:  # genops: bad opcode, short data, undecodable argument
        if f.tell() >= len(data):
            raise PickleEndsError() from None
        raise _corrupt(safe_repr(str(exc), 200)) from None
    raise PickleEndsError()


def restricted_load(
    data: bytes | bytearray | memoryview | BinaryIO,
    storage: Callable[[tuple], StorageRef] | None = None,
    *,
    budget: int = DEFAULT_BUDGET,
) -> Any:
    """Unpickle the pickle at the start of ``data`` (or of what is left in a binary file)
    with the allow-list, after :func:`scan_pickle`; never runs code.

    ``storage`` turns a persistent id ``('storage', type, key, location, numel, ...)`` into
    a :class:`StorageRef` (see :func:`storage_from_pid`). Any malformed pickle raises
    :class:`~cndiff.errors.CheckpointError`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = data.read()
    scan_pickle(data, budget)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), storage).load()
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
        raise CheckpointError(f"corrupt checkpoint: malformed storage id {safe_repr(pid)}")
    _, storage_type, key, location, numel = pid[:5]
    if not isinstance(storage_type, _StorageType):
        raise CheckpointError(f"corrupt checkpoint: unknown storage type {safe_repr(storage_type)}")
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 1 << 64:
        key = str(key)
    if not isinstance(key, str) or not isinstance(location, str):
        raise CheckpointError(f"corrupt checkpoint: malformed storage id {safe_repr(pid)}")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise CheckpointError(
            f"corrupt checkpoint: storage {safe_repr(key)} has size {safe_repr(numel)}"
        )
    return StorageRef(key, storage_type.dtype, numel, location)
