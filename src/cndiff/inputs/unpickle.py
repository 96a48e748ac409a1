"""A restricted unpickler for torch checkpoints that never runs code from the file.

A torch checkpoint is a pickle that names Python callables (``GLOBAL`` opcodes) and calls
them to rebuild its objects. Whoever wrote the file chooses those callables, so a hostile
``.ckpt`` can call ``os.system``. This module does not use :mod:`pickle` at all: it is
its own pickle virtual machine, written in Python, that resolves every global against a
short allow-list of inert stand-ins:

* tensors become :class:`TensorRef` records (storage key, dtype, offset, shape, stride):
  no tensor data is read while unpickling;
* the extra objects that real Stable Diffusion checkpoints carry beside the weights
  (PyTorch Lightning's ``ModelCheckpoint`` callback state, numpy scalars and dtypes,
  ``_codecs.encode`` for bytes) become :class:`Opaque` placeholders, so those files load
  without pytorch_lightning installed;
* ``collections.OrderedDict`` builds a plain dict (its pickled state, torch's
  ``_metadata``, is dropped: no attribute of a loaded object can shadow a method);
* anything else raises :class:`~cndiff.errors.UnsafeCheckpointError` naming the global.

The machine also bounds its own work by the size of the pickle, so that a small file
cannot make it run for hours (with Ctrl-C ignored inside C loops) or fill the memory:

* every object it builds is charged to a memory budget (bytes copied included, e.g. by
  ``_codecs.encode`` called a thousand times on one memoized string);
* every step is charged to a work budget, hashing included: the cost of hashing a tuple
  is known when the tuple is built (a memoized DAG of tuples 40 levels deep is
  2**40 steps to hash, and is refused before it is hashed, not after);
* dict and set keys that are not strings may not collide (a dict of 100,000 integers
  with one hash is 5 billion comparisons);
* tuples may not nest more than :data:`MAX_NESTING` deep (hashing them recurses in C);
* each storage has one dtype and one size, however often the pickle names it.

Being a Python loop, it also answers Ctrl-C and SIGTERM at once.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..dtypes import DType, by_name
from ..errors import CheckpointError, UnsafeCheckpointError
from ..text import escape, safe_repr

try:  # the same machine in C for a state dict's opcodes (setup.py; optional)
    from .. import _pickle_vm as native_vm
except ImportError:  # not built: this module reads every pickle
    native_vm = None

__all__ = [
    "StorageRef",
    "TensorRef",
    "Opaque",
    "Unpickled",
    "restricted_load",
    "native_load",
    "NATIVE_MAX_BYTES",
    "PickleEndsError",
    "STORAGE_DTYPES",
    "MAX_NESTING",
    "MAX_NDIM",
    "MAX_NUMEL",
    "shape_too_large",
    "work_limit",
]

#: deepest nesting of tuples a checkpoint's pickle may use (a state dict needs < 15;
#: hashing a tuple nested ~100,000 deep crashes CPython with a C stack overflow)
MAX_NESTING = 100
#: most dimensions a tensor may have (numpy's own limit is 64)
MAX_NDIM = 64
#: more elements than any storage can hold
MAX_NUMEL = 1 << 62
#: the objects the unpickler may build, in (estimated) bytes, when the caller sets no budget
DEFAULT_BUDGET = 1 << 30
#: most arguments an allowed callable may be called with (torch's take at most 7)
MAX_CALL_ARGS = 16
#: largest pickle given to the native machine first (a state dict's is about 150 bytes a
#: tensor: 0.2 MB for SD 1.5); it bounds that machine's memo table to 8 bytes a byte
NATIVE_MAX_BYTES = 4 << 20

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

    describe = "a storage"


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it: a view (offset, shape, stride) into a storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    describe = "a tensor"


class Opaque:
    """Inert stand-in for an allowed non-tensor object (Lightning callback, numpy scalar).

    It keeps its constructor arguments and pickled state for display; it never calls
    anything.
    """

    qualname = "?"

    def __init__(self, args: tuple = ()) -> None:
        self.args = args
        self.state: Any = None

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class _OrderedDict(dict):
    """What ``collections.OrderedDict(...)`` builds: a plain dict that accepts (and drops)
    pickled state. No instance attributes: a pickle cannot shadow ``items`` or ``get``."""

    __slots__ = ()


class _StorageType:
    """What ``torch.FloatStorage`` and friends resolve to: just the dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = STORAGE_DTYPES[name]

    @property
    def describe(self) -> str:
        return f"torch.{self.name}"


class _Global:
    """An allowed global: ``call`` (None when it may not be called) and, for a class whose
    instances the pickle may create with NEWOBJ/INST, ``new``."""

    __slots__ = ("qualname", "call", "new", "value")

    def __init__(
        self,
        qualname: str,
        call: Callable[[tuple], Any] | None,
        new: Callable[[], Any] | None = None,
        value: Any = None,
    ) -> None:
        self.qualname = qualname
        self.call = call
        self.new = new
        self.value = value

    @property
    def describe(self) -> str:
        return self.qualname

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


def _describe(obj: Any) -> str:
    d = getattr(type(obj), "describe", None)
    if isinstance(obj, (_Global, _StorageType)):
        return obj.describe
    if isinstance(d, str):
        return d
    if isinstance(obj, Opaque):
        return obj.qualname
    return f"a {type(obj).__name__}"


def shape_too_large(shape: tuple[int, ...]) -> bool:
    """True when the product of the non-zero dimensions cannot be an element count."""
    n = 1
    for d in shape:
        n *= d or 1
        if n >= MAX_NUMEL:
            return True
    return False


def _corrupt(why: str) -> CheckpointError:
    return CheckpointError(f"corrupt or truncated checkpoint: its pickle cannot be read ({why})")


class PickleEndsError(CheckpointError):
    """The pickle runs past the end of the data (a longer read may complete it)."""

    def __init__(
        self,
        message: str = "corrupt or truncated checkpoint: its pickle ends before its STOP opcode",
    ) -> None:
        super().__init__(message)


def _check_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    ok = isinstance(value, tuple) and len(value) <= MAX_NDIM
    if ok:
        for v in value:  # (a loop: faster than all() over a generator, per tensor)
            if type(v) is not int or v < 0:
                ok = False
                break
    if not ok:
        raise CheckpointError(
            f"corrupt checkpoint: tensor {what} is {safe_repr(value)}, not up to {MAX_NDIM} sizes"
        )
    return value


def _is_index(v: Any) -> bool:
    return type(v) is int and 0 <= v < MAX_NUMEL


# -- the callables a pickle may use -------------------------------------------------------


def _rebuild_tensor_v2(args: tuple) -> TensorRef:
    # torch's signature: (storage, storage_offset, size, stride, requires_grad,
    # backward_hooks, metadata=None); torch refuses fewer arguments, so do we.
    if not 6 <= len(args) <= 7:
        raise CheckpointError(
            f"corrupt checkpoint: a tensor is rebuilt with {len(args)} arguments, not 6 or 7"
        )
    storage, storage_offset, size, stride = args[:4]
    if len(args) == 7:
        _check_tensor_metadata(args[6])
    if not isinstance(storage, StorageRef):
        raise CheckpointError("corrupt checkpoint: a tensor refers to something not a storage")
    # (an int64, as torch's: an empty view may start anywhere, even past its storage)
    if type(storage_offset) is not int or not 0 <= storage_offset < 1 << 63:
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
        last = storage_offset
        for n, s in zip(shape, strides):
            last += (n - 1) * s
        if last >= storage.numel:
            raise CheckpointError(
                f"corrupt checkpoint: a tensor of shape {safe_repr(list(shape))} reaches "
                f"element {safe_repr(last)} of storage {safe_repr(storage.key)}, which holds "
                f"only {storage.numel}"
            )
    # (an empty view may start past its storage: torch.save writes t[1:] of a (1, 0)
    # tensor so, and it reads nothing)
    elif shape_too_large(shape):
        # An empty view reads nothing, but numpy still refuses absurd shapes: (0, 2**70).
        raise CheckpointError(
            f"corrupt checkpoint: tensor shape {safe_repr(list(shape))} is too large"
        )
    return TensorRef(storage, storage_offset, shape, strides)


def _check_tensor_metadata(metadata: Any) -> None:
    # torch.save records a tensor's negative/conjugate view bits here: torch.load then
    # negates the stored values. Reading the bytes as they are would be silently wrong.
    if metadata is None:
        return
    if (
        not isinstance(metadata, dict)
        or len(metadata) > 2
        or not all(
            isinstance(k, str) and k in ("neg", "conj") and type(v) is bool
            for k, v in metadata.items()
        )
    ):
        raise CheckpointError(
            "corrupt checkpoint: a tensor carries metadata cndiff does not know; "
            "resave the checkpoint with plain tensors"
        )
    if any(metadata.values()):
        bits = " and ".join(k for k, v in metadata.items() if v)
        raise CheckpointError(
            f"unsupported checkpoint: a tensor was saved as a lazy {bits} view (its values "
            "are the stored ones negated or conjugated); resave it after .resolve_neg() / "
            ".resolve_conj() or .clone()"
        )


def _rebuild_parameter(args: tuple) -> Any:
    # (data, requires_grad, backward_hooks) or, with state, 4 arguments
    if len(args) not in (3, 4) or not isinstance(args[0], TensorRef):
        raise CheckpointError("corrupt checkpoint: a parameter is not rebuilt from a tensor")
    return args[0]


def _torch_size(args: tuple) -> tuple[int, ...]:
    if len(args) > 1:
        raise CheckpointError("corrupt checkpoint: torch.Size called with several arguments")
    dims = args[0] if args else ()
    if (
        not isinstance(dims, (tuple, list))
        or len(dims) > MAX_NDIM
        or not all(type(v) is int and abs(v) < MAX_NUMEL for v in dims)
    ):
        raise CheckpointError(f"corrupt checkpoint: torch.Size of {safe_repr(dims)}")
    return tuple(dims)


_ENCODINGS = ("latin1", "latin-1", "utf-8", "utf8")

# (the opcodes a state dict's pickle is made of read their arguments with these, in place)
_U16 = struct.Struct("<H").unpack_from
_I32 = struct.Struct("<i").unpack_from
_U32 = struct.Struct("<I").unpack_from


# -- the machine ---------------------------------------------------------------------------

#: what :meth:`_Machine.hash_cost` says of an object of these types (None: unhashable),
#: looked up first when a tuple is built
_TYPE_COST: dict[type, int | None] = {
    bytes: 1, float: 1, bool: 1, type(None): 1,
    StorageRef: 8, _Global: 8, _StorageType: 8,
    list: None, dict: None, set: None, bytearray: None, _OrderedDict: None,
}  # fmt: skip

_OBJECT_COST = 64  # bytes, about what a small Python object costs
_ITEM_COST = 16  # bytes per item held by a container or the memo
_TUPLE_META_COST = 120  # bytes to remember what hashing a tuple costs

#: the opcodes of pickle protocol 0 that write numbers and strings as text: torch.save
#: never writes them, torch.load(weights_only=True) refuses them, and the C and Python
#: unpicklers parse some of them differently ("010", "0x10")
_TEXT_OPCODES = {
    ord("I"): "INT",
    ord("L"): "LONG",
    ord("F"): "FLOAT",
    ord("S"): "STRING",
    ord("V"): "UNICODE",
    ord("g"): "GET",
    ord("p"): "PUT",
}


@dataclass
class Unpickled:
    """What :func:`restricted_load` returns."""

    obj: Any
    #: offset just past the pickle's STOP opcode
    end: int
    #: every storage the pickle names, by key, in the order it first names them
    storages: dict[str, StorageRef] = field(default_factory=dict)


class _Machine:
    def __init__(self, data: bytes, pids: str | None, budget: int, work: int) -> None:
        self.data = data
        self.n = len(data)
        self.pos = 0
        self.pids = pids
        self.budget = budget
        self.cost = 0
        self.work_left = work
        self.work_limit = work
        self.ops = 0
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        # tuples and frozensets built by the pickle: (object, nesting depth, hash cost or
        # None when unhashable); holding the object keeps its id unique
        self.meta: dict[int, tuple[Any, int, int | None]] = {}
        # for each dict or set given non-string keys: (itself, the hashes of those keys)
        self.hashes: dict[int, tuple[Any, set[int]]] = {}
        self.storages: dict[str, StorageRef] = {}
        self.allowed = self._allowed_globals()
        table: list[Callable[[], bool | None] | None] = [None] * 256
        for name in dir(self):
            if name.startswith("op_"):
                code = _CODES[name[3:]]
                table[code] = getattr(self, name)
        self.table = table

    # -- budgets -------------------------------------------------------------------------
    def charge(self, nbytes: int) -> None:
        self.cost += nbytes
        if self.cost > self.budget:
            raise _corrupt(f"it would build more than {self.budget >> 20} MiB of objects")

    def spend(self, steps: int) -> None:
        self.work_left -= steps
        if self.work_left < 0:
            raise _corrupt(
                f"reading it would take more than {self.work_limit:,} steps, far more than a "
                "checkpoint of its size needs"
            )

    # -- reading the opcode stream --------------------------------------------------------
    def advance(self, n: int) -> int:
        """Step over the next ``n`` bytes; where they start (the frequent opcodes unpack
        their arguments there, in place)."""
        pos = self.pos
        if pos + n > self.n:
            raise PickleEndsError()
        self.pos = pos + n
        return pos

    def read(self, n: int) -> bytes:
        pos = self.advance(n)
        return self.data[pos : pos + n]

    def readline(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise PickleEndsError()
        line = self.data[self.pos : end]
        self.pos = end + 1
        return line

    def run(self) -> Any:
        data = self.data
        n = len(data)
        table = self.table
        while True:
            pos = self.pos
            if pos >= n:
                raise PickleEndsError()
            code = data[pos]
            self.pos = pos + 1
            self.ops += 1
            self.work_left -= 1
            op = table[code]
            if op is None:
                if code in _TEXT_OPCODES:
                    raise _corrupt(
                        f"it uses the text opcode {_TEXT_OPCODES[code]} of pickle protocol 0, "
                        f"which torch never writes, at byte {pos}"
                    )
                raise _corrupt(f"unknown opcode {code:#04x} at byte {pos}")
            if op():
                return self.stack_pop_result(pos)
            if self.work_left < 0:
                self.spend(0)

    def stack_pop_result(self, pos: int) -> Any:
        if not self.stack:
            raise _corrupt(f"STOP with nothing to return, at byte {pos}")
        return self.stack.pop()

    # -- the stack -------------------------------------------------------------------------
    def pop(self) -> Any:
        if not self.stack:
            raise _corrupt(f"stack underflow at byte {self.pos - 1}")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise _corrupt(f"stack underflow at byte {self.pos - 1}")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise _corrupt(f"an opcode needs a MARK, at byte {self.pos - 1}")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def push(self, obj: Any, nbytes: int = 0) -> None:
        self.cost += _OBJECT_COST + nbytes
        if self.cost > self.budget:
            self.charge(0)
        self.stack.append(obj)

    # -- hashing: what it costs, and no collisions ------------------------------------------
    def hash_cost(self, obj: Any) -> int | None:
        """Steps to hash ``obj`` (or to compare it with an equal one); None: unhashable."""
        t = type(obj)
        if t is str or t is bytes or t is float or t is bool or obj is None:
            return 1
        if t is int:
            return 1 + (obj.bit_length() >> 6)
        if t is tuple or t is frozenset:
            m = self.meta.get(id(obj))
            if m is not None:
                return m[2]
            return self._flat_cost(obj)  # built by a stand-in (torch.Size): ints only
        if t is TensorRef:
            return 16 + len(obj.shape) + len(obj.stride)
        if t is StorageRef or t is _Global or t is _StorageType or isinstance(obj, Opaque):
            return 8
        return None  # list, dict, set, bytearray

    def _flat_cost(self, obj: tuple | frozenset) -> int | None:
        cost = 1
        for x in obj:
            c = self.hash_cost(x) if type(x) is not tuple else None
            if c is None:
                return None
            cost += c
        return cost

    def depth(self, obj: Any) -> int:
        t = type(obj)
        if t is tuple or t is frozenset:
            m = self.meta.get(id(obj))
            return m[1] if m is not None else 1
        return 0

    def make_tuple(self, items: list[Any] | tuple) -> tuple:
        t = tuple(items)
        if not t:
            return ()
        depth = 0
        cost = 1
        hashable = True
        meta = self.meta
        for x in t:
            tx = type(x)
            if tx is str or tx is int and -(1 << 63) <= x < 1 << 63:
                cost += 1
                continue
            if tx is tuple or tx is frozenset:
                m = meta.get(id(x))
                d, c = (m[1], m[2]) if m is not None else (1, self.hash_cost(x))
                if d > depth:
                    depth = d
            else:
                c = _TYPE_COST.get(tx, -1)
                if c == -1:
                    c = self.hash_cost(x)
            if c is None:
                hashable = False
            else:
                cost += c
        depth += 1
        if depth > MAX_NESTING:
            raise _corrupt(f"tuples nested more than {MAX_NESTING} deep")
        self.charge(_OBJECT_COST + _TUPLE_META_COST + _ITEM_COST * len(t))
        meta[id(t)] = (t, depth, cost if hashable else None)
        return t

    def check_key(self, container: Any, key: Any) -> None:
        """Charge for hashing ``key`` into ``container`` (a dict or set); refuse
        unhashable keys and keys whose hash collides with a different key's."""
        if type(key) is str:
            return
        cost = self.hash_cost(key)
        if cost is None:
            raise _corrupt(f"a dict key or set member is {_describe(key)}, which is unhashable")
        # hashing it, and comparing it with an equal key already there
        self.spend(2 * cost)
        h = hash(key)
        entry = self.hashes.get(id(container))
        if entry is None:
            entry = self.hashes[id(container)] = (container, set())
        seen = entry[1]
        if h in seen and key not in container:
            raise _corrupt(
                "two different dict keys have the same hash (a file made to slow its reader down)"
            )
        seen.add(h)

    def setitem(self, d: Any, key: Any, value: Any) -> None:
        if not isinstance(d, dict):
            raise _corrupt(f"SETITEM on {_describe(d)}, not a dict")
        self.check_key(d, key)
        d[key] = value
        self.charge(_ITEM_COST)

    def setitems(self, d: Any, items: list[Any]) -> None:
        if len(items) % 2:
            raise _corrupt(f"an odd number of items for a dict, at byte {self.pos - 1}")
        if not isinstance(d, dict):
            raise _corrupt(f"SETITEMS on {_describe(d)}, not a dict")
        self.spend(len(items))
        for i in range(0, len(items), 2):
            self.setitem(d, items[i], items[i + 1])

    # -- the allowed globals ---------------------------------------------------------------
    def _allowed_globals(self) -> dict[tuple[str, str], Any]:
        # Fresh objects for every unpickler: nothing a pickle does to them outlives it.
        allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): _Global(
                "collections.OrderedDict", self.call_ordered_dict, _OrderedDict
            ),
        }
        for (module, name), fn in [
            (("torch._utils", "_rebuild_tensor_v2"), self.call_rebuild_tensor),
            (("torch._utils", "_rebuild_parameter"), _rebuild_parameter),
            (("torch._utils", "_rebuild_parameter_with_state"), _rebuild_parameter),
            (("torch", "Size"), _torch_size),
            (("_codecs", "encode"), self.call_codecs_encode),
        ]:
            allowed[(module, name)] = _Global(f"{module}.{name}", fn)
        for name in STORAGE_DTYPES:
            allowed[("torch", name)] = _StorageType(name)
        allowed[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")
        for name in _TORCH_DTYPE_NAMES:
            allowed[("torch", name)] = _Global(f"torch.{name}", None, value=by_name(name))
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
            cls = type("Opaque", (Opaque,), {"qualname": f"{module}.{name}"})
            allowed[(module, name)] = _Global(cls.qualname, cls, cls)
        return allowed

    def find_class(self, module: Any, name: Any) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
                # torch.save's form for dtypes without a legacy storage class: not code
                raise CheckpointError(
                    "the checkpoint holds tensors torch saves in its newer form "
                    "(torch._utils._rebuild_tensor_v3: float8, uint16/32/64 and other new "
                    "dtypes), which cndiff does not read from torch files; save the state "
                    "dict as .safetensors (safetensors.torch.save_file) and use that"
                ) from None
            raise UnsafeCheckpointError(
                f"refusing to load: the checkpoint's pickle asks for "
                f"'{escape(module, 100)}.{escape(name, 100)}', which cndiff does not allow (it "
                "could run code); only plain state dicts of tensors are supported"
            ) from None

    def call(self, fn: Any, args: Any) -> Any:
        if type(args) is not tuple:
            raise _corrupt(f"the arguments of a call are {_describe(args)}, not a tuple")
        if not isinstance(fn, _Global) or fn.call is None:
            raise CheckpointError(f"corrupt checkpoint: its pickle calls {_describe(fn)}")
        if len(args) > MAX_CALL_ARGS:
            raise CheckpointError(
                f"corrupt checkpoint: its pickle calls {fn.qualname} with {len(args)} arguments"
            )
        self.spend(len(args))
        result = fn.call(args)
        self.charge(_OBJECT_COST)
        return result

    def instantiate(self, cls: Any, args: Any) -> Any:
        """NEWOBJ, NEWOBJ_EX: a new instance of an allowed class, not initialized."""
        if not isinstance(cls, _Global) or cls.new is None:
            raise CheckpointError(
                f"corrupt checkpoint: its pickle creates an instance of {_describe(cls)}"
            )
        if type(args) is not tuple:
            raise _corrupt("NEWOBJ arguments are not a tuple")
        self.charge(_OBJECT_COST)
        obj = cls.new()
        if isinstance(obj, Opaque):
            obj.args = args
        return obj

    def call_ordered_dict(self, args: tuple) -> _OrderedDict:
        out = _OrderedDict()
        if not args:
            return out
        if len(args) > 1:
            raise CheckpointError("corrupt checkpoint: OrderedDict called with several arguments")
        (src,) = args
        # Python 2's pickles spell OrderedDict(items) as a list of [key, value] pairs
        if not isinstance(src, (dict, list, tuple)):
            raise CheckpointError(f"corrupt checkpoint: OrderedDict called with {_describe(src)}")
        # charged before the copy: a memoized dict may be copied many times
        self.spend(4 * len(src))
        self.charge(_ITEM_COST * len(src))
        pairs = list(src.items()) if isinstance(src, dict) else src
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise CheckpointError("corrupt checkpoint: OrderedDict called with a non-pair")
            key = pair[0]
            if type(key) is not str:
                self.check_key(out, key)
            out[key] = pair[1]
        return out

    def call_codecs_encode(self, args: tuple) -> bytes:
        # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
        if not 1 <= len(args) <= 2:
            raise CheckpointError("corrupt checkpoint: unexpected _codecs.encode call")
        text = args[0]
        encoding = args[1] if len(args) > 1 else "utf-8"
        if not isinstance(text, str) or encoding not in _ENCODINGS:
            raise CheckpointError("corrupt checkpoint: unexpected _codecs.encode call")
        # a copy: a memoized string encoded a thousand times is a thousand copies
        self.spend(len(text) >> 4)
        self.charge(len(text))
        try:
            return text.encode(encoding)
        except UnicodeEncodeError:
            raise CheckpointError(
                "corrupt checkpoint: _codecs.encode of text that does not fit the encoding"
            ) from None

    def call_rebuild_tensor(self, args: tuple) -> TensorRef:
        return _rebuild_tensor_v2(args)

    def persistent_load(self, pid: Any) -> StorageRef:
        if (
            self.pids is None
            or type(pid) is not tuple
            or not pid
            or type(pid[0]) is not str
            or pid[0] != "storage"
        ):
            raise CheckpointError(f"corrupt checkpoint: unsupported persistent id {safe_repr(pid)}")
        legacy = self.pids == "legacy"
        # torch unpacks ('storage', type, key, location, numel) in the zip format and
        # ('storage', type, key, location, numel, view) in the legacy one
        if len(pid) != (6 if legacy else 5):
            raise CheckpointError(f"corrupt checkpoint: malformed storage id {safe_repr(pid)}")
        _, storage_type, key, location, numel = pid[:5]
        if legacy and pid[5] is not None:
            raise CheckpointError("corrupt checkpoint: legacy storage views are not supported")
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(
                f"corrupt checkpoint: unknown storage type {safe_repr(storage_type)}"
            )
        if not legacy and type(key) is int and 0 <= key < 1 << 64:
            key = str(key)  # torch names the record f"data/{key}"
        if type(key) is not str or type(location) is not str:
            raise CheckpointError(f"corrupt checkpoint: malformed storage id {safe_repr(pid)}")
        if not _is_index(numel):
            raise CheckpointError(
                f"corrupt checkpoint: storage {safe_repr(key)} has size {safe_repr(numel)}"
            )
        dtype = storage_type.dtype
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = StorageRef(key, dtype, numel, location)
        elif ref.dtype != dtype or ref.numel != numel:
            # torch.save cannot write this; torch.load would silently use the first
            raise CheckpointError(
                f"corrupt checkpoint: storage {safe_repr(key)} is named as {ref.numel} "
                f"{ref.dtype.name} and as {numel} {dtype.name} elements; a storage has one "
                "dtype and one size"
            )
        return ref

    # -- opcodes ---------------------------------------------------------------------------
    def op_PROTO(self) -> None:
        self.read(1)  # (informative only: torch.load reads any number here)

    def op_FRAME(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > len(self.data) - self.pos:
            raise PickleEndsError()

    def op_STOP(self) -> bool:
        return True

    def op_MARK(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def op_POP(self) -> None:
        if self.stack:
            self.stack.pop()
        elif self.metastack:  # POP right after MARK drops the mark, as in C
            self.stack = self.metastack.pop()
        else:
            raise _corrupt(f"stack underflow at byte {self.pos - 1}")

    def op_POP_MARK(self) -> None:
        self.pop_mark()

    def op_DUP(self) -> None:
        self.stack.append(self.top())

    # constants
    def op_NONE(self) -> None:
        self.push(None)

    def op_NEWTRUE(self) -> None:
        self.push(True)

    def op_NEWFALSE(self) -> None:
        self.push(False)

    # (the most frequent opcodes unpack their arguments in place: a state dict's pickle is
    # tens of thousands of them, and a file's opening waits for all of them)
    def op_BININT(self) -> None:
        self.push(_I32(self.data, self.advance(4))[0])

    def op_BININT1(self) -> None:
        self.push(self.data[self.advance(1)])

    def op_BININT2(self) -> None:
        self.push(_U16(self.data, self.advance(2))[0])

    def op_LONG1(self) -> None:
        (n,) = self.read(1)
        self.push(int.from_bytes(self.read(n), "little", signed=True), n)

    def op_LONG4(self) -> None:
        (n,) = struct.unpack("<i", self.read(4))
        if n < 0:
            raise _corrupt("LONG4 with a negative length")
        raw = self.read(n)
        self.spend(n >> 6)
        self.push(int.from_bytes(raw, "little", signed=True), n)

    def op_BINFLOAT(self) -> None:
        self.push(struct.unpack(">d", self.read(8))[0])

    def _push_text(self, n: int) -> None:
        pos = self.advance(n)
        end = pos + n
        self.work_left -= n >> 6
        if self.work_left < 0:
            self.spend(0)
        try:
            text = self.data[pos:end].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise _corrupt(f"a string that is not UTF-8, before byte {end}") from None
        self.push(text, n)

    def op_SHORT_BINUNICODE(self) -> None:
        self._push_text(self.read(1)[0])

    def op_BINUNICODE(self) -> None:
        self._push_text(_U32(self.data, self.advance(4))[0])

    def op_BINUNICODE8(self) -> None:
        self._push_text(struct.unpack("<Q", self.read(8))[0])

    def _push_py2_str(self, n: int) -> None:
        # Python 2's str; torch.load decodes it as UTF-8 (strict)
        raw = self.read(n)
        self.spend(n >> 6)
        try:
            self.push(raw.decode("utf-8"), n)
        except UnicodeDecodeError:
            raise _corrupt(f"a string that is not UTF-8, before byte {self.pos}") from None

    def op_SHORT_BINSTRING(self) -> None:
        self._push_py2_str(self.read(1)[0])

    def op_BINSTRING(self) -> None:
        (n,) = struct.unpack("<i", self.read(4))
        if n < 0:
            raise _corrupt("BINSTRING with a negative length")
        self._push_py2_str(n)

    def _push_bytes(self, n: int, kind: type = bytes) -> None:
        raw = self.read(n)
        self.spend(n >> 6)
        self.push(kind(raw), n)

    def op_SHORT_BINBYTES(self) -> None:
        self._push_bytes(self.read(1)[0])

    def op_BINBYTES(self) -> None:
        self._push_bytes(struct.unpack("<I", self.read(4))[0])

    def op_BINBYTES8(self) -> None:
        self._push_bytes(struct.unpack("<Q", self.read(8))[0])

    def op_BYTEARRAY8(self) -> None:
        self._push_bytes(struct.unpack("<Q", self.read(8))[0], bytearray)

    def op_NEXT_BUFFER(self) -> None:
        raise _corrupt(f"out-of-band buffer at byte {self.pos - 1}")

    op_READONLY_BUFFER = op_NEXT_BUFFER

    # containers
    def op_EMPTY_LIST(self) -> None:
        self.push([])

    def op_EMPTY_DICT(self) -> None:
        self.push({})

    def op_EMPTY_SET(self) -> None:
        self.push(set())

    def op_EMPTY_TUPLE(self) -> None:
        self.push(())

    def op_LIST(self) -> None:
        items = self.pop_mark()
        self.push(items, _ITEM_COST * len(items))

    def op_TUPLE(self) -> None:
        items = self.pop_mark()
        self.stack.append(self.make_tuple(items))

    def _tuple_n(self, n: int) -> None:
        if len(self.stack) < n:
            raise _corrupt(f"stack underflow at byte {self.pos - 1}")
        items = self.stack[-n:]
        del self.stack[-n:]
        self.stack.append(self.make_tuple(items))

    def op_TUPLE1(self) -> None:
        self._tuple_n(1)

    def op_TUPLE2(self) -> None:
        self._tuple_n(2)

    def op_TUPLE3(self) -> None:
        self._tuple_n(3)

    def op_DICT(self) -> None:
        items = self.pop_mark()
        d: dict[Any, Any] = {}
        self.charge(_OBJECT_COST)
        self.setitems(d, items)
        self.stack.append(d)

    def op_APPEND(self) -> None:
        value = self.pop()
        target = self.top()
        if type(target) is not list:
            raise _corrupt(f"APPEND to {_describe(target)}, not a list")
        target.append(value)
        self.charge(_ITEM_COST)

    def op_APPENDS(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if type(target) is not list:
            raise _corrupt(f"APPENDS to {_describe(target)}, not a list")
        target.extend(items)
        self.charge(_ITEM_COST * len(items))

    def op_SETITEM(self) -> None:
        value = self.pop()
        key = self.pop()
        self.setitem(self.top(), key, value)

    def op_SETITEMS(self) -> None:
        items = self.pop_mark()
        self.setitems(self.top(), items)

    def op_ADDITEMS(self) -> None:
        items = self.pop_mark()
        target = self.top()
        if type(target) is not set:
            raise _corrupt(f"ADDITEMS to {_describe(target)}, not a set")
        for x in items:
            self.check_key(target, x)
            target.add(x)
        self.charge(_ITEM_COST * len(items))

    def op_FROZENSET(self) -> None:
        items = self.pop_mark()
        scratch: set[Any] = set()
        depth = 0
        cost = 1 + len(items)
        for x in items:
            self.check_key(scratch, x)
            scratch.add(x)
            depth = max(depth, self.depth(x))
        if depth + 1 > MAX_NESTING:
            raise _corrupt(f"tuples nested more than {MAX_NESTING} deep")
        self.hashes.pop(id(scratch), None)
        fs = frozenset(scratch)
        self.charge(_OBJECT_COST + _TUPLE_META_COST + _ITEM_COST * len(fs))
        self.meta[id(fs)] = (fs, depth + 1, cost)
        self.stack.append(fs)

    # the memo
    def _memo_put(self, idx: int) -> None:
        # a pickler numbers memo entries in order: an index beyond the opcodes read so far
        # is corrupt (and the C unpickler sized its memo table by it: gigabytes)
        if not 0 <= idx < self.ops:
            raise _corrupt(f"memo index {idx} at byte {self.pos}")
        stack = self.stack
        if not stack:
            raise _corrupt(f"stack underflow at byte {self.pos - 1}")
        self.memo[idx] = stack[-1]
        self.cost += _ITEM_COST
        if self.cost > self.budget:
            self.charge(0)

    def op_BINPUT(self) -> None:
        self._memo_put(self.data[self.advance(1)])

    def op_LONG_BINPUT(self) -> None:
        self._memo_put(_U32(self.data, self.advance(4))[0])

    def op_MEMOIZE(self) -> None:
        self._memo_put(len(self.memo))

    def _memo_get(self, idx: int) -> None:
        try:
            self.stack.append(self.memo[idx])
        except KeyError:
            raise _corrupt(f"memo index {idx} never stored, at byte {self.pos}") from None

    def op_BINGET(self) -> None:
        self._memo_get(self.data[self.advance(1)])

    def op_LONG_BINGET(self) -> None:
        self._memo_get(struct.unpack("<I", self.read(4))[0])

    # globals, calls, objects
    def _global_names(self) -> tuple[str, str]:
        module, name = self.readline(), self.readline()
        self.spend((len(module) + len(name)) >> 6)
        try:
            return module.decode("utf-8"), name.decode("utf-8")
        except UnicodeDecodeError:
            raise _corrupt(f"a global name that is not UTF-8, before byte {self.pos}") from None

    def op_GLOBAL(self) -> None:
        self.push(self.find_class(*self._global_names()))

    def op_STACK_GLOBAL(self) -> None:
        name = self.pop()
        module = self.pop()
        if type(module) is not str or type(name) is not str:
            raise _corrupt("STACK_GLOBAL names that are not strings")
        self.push(self.find_class(module, name))

    def op_REDUCE(self) -> None:
        stack = self.stack
        if len(stack) < 2:
            raise _corrupt(f"stack underflow at byte {self.pos - 1}")
        args = stack.pop()
        stack[-1] = self.call(stack[-1], args)

    def op_INST(self) -> None:
        cls = self.find_class(*self._global_names())
        args = self.make_tuple(self.pop_mark())
        self.stack.append(self.call(cls, args))

    def op_OBJ(self) -> None:
        items = self.pop_mark()
        if not items:
            raise _corrupt(f"OBJ without a class, at byte {self.pos - 1}")
        self.stack.append(self.call(items[0], self.make_tuple(items[1:])))

    def op_NEWOBJ(self) -> None:
        args = self.pop()
        cls = self.pop()
        self.stack.append(self.instantiate(cls, args))

    def op_NEWOBJ_EX(self) -> None:
        kwargs = self.pop()
        args = self.pop()
        cls = self.pop()
        if type(kwargs) is not dict:
            raise _corrupt("NEWOBJ_EX keyword arguments are not a dict")
        self.stack.append(self.instantiate(cls, args))

    def op_BUILD(self) -> None:
        state = self.pop()
        inst = self.top()
        if type(inst) is _OrderedDict:
            # torch pickles a state dict's _metadata here; plain data keeps no attributes
            if state is not None and not isinstance(state, dict):
                raise _corrupt("the pickled state of an OrderedDict is not a dict")
            return
        if isinstance(inst, Opaque):
            inst.state = state
            return
        # e.g. a checked tensor view enlarged after the fact, a dtype's itemsize rewritten
        raise CheckpointError(
            f"corrupt checkpoint: its pickle tries to set the state of {_describe(inst)}"
        )

    def _ext(self) -> None:
        raise _corrupt(f"extension code (copyreg registry) at byte {self.pos - 1}")

    def op_EXT1(self) -> None:
        self.read(1)
        self._ext()

    def op_EXT2(self) -> None:
        self.read(2)
        self._ext()

    def op_EXT4(self) -> None:
        self.read(4)
        self._ext()

    def op_PERSID(self) -> None:
        raise CheckpointError(
            f"corrupt checkpoint: unsupported persistent id {safe_repr(self.readline())}"
        )

    def op_BINPERSID(self) -> None:
        pid = self.pop()
        self.push(self.persistent_load(pid))


_CODES = {
    "PROTO": 0x80, "FRAME": 0x95, "STOP": ord("."), "MARK": ord("("), "POP": ord("0"),
    "POP_MARK": ord("1"), "DUP": ord("2"), "NONE": ord("N"), "NEWTRUE": 0x88,
    "NEWFALSE": 0x89, "BININT": ord("J"), "BININT1": ord("K"), "BININT2": ord("M"),
    "LONG1": 0x8A, "LONG4": 0x8B, "BINFLOAT": ord("G"), "SHORT_BINUNICODE": 0x8C,
    "BINUNICODE": ord("X"), "BINUNICODE8": 0x8D, "SHORT_BINSTRING": ord("U"),
    "BINSTRING": ord("T"), "SHORT_BINBYTES": ord("C"), "BINBYTES": ord("B"),
    "BINBYTES8": 0x8E, "BYTEARRAY8": 0x96, "NEXT_BUFFER": 0x97, "READONLY_BUFFER": 0x98,
    "EMPTY_LIST": ord("]"), "EMPTY_DICT": ord("}"), "EMPTY_SET": 0x8F,
    "EMPTY_TUPLE": ord(")"), "LIST": ord("l"), "TUPLE": ord("t"), "TUPLE1": 0x85,
    "TUPLE2": 0x86, "TUPLE3": 0x87, "DICT": ord("d"), "APPEND": ord("a"),
    "APPENDS": ord("e"), "SETITEM": ord("s"), "SETITEMS": ord("u"), "ADDITEMS": 0x90,
    "FROZENSET": 0x91, "BINPUT": ord("q"), "LONG_BINPUT": ord("r"), "MEMOIZE": 0x94,
    "BINGET": ord("h"), "LONG_BINGET": ord("j"), "GLOBAL": ord("c"), "STACK_GLOBAL": 0x93,
    "REDUCE": ord("R"), "INST": ord("i"), "OBJ": ord("o"), "NEWOBJ": 0x81,
    "NEWOBJ_EX": 0x92, "BUILD": ord("b"), "EXT1": 0x82, "EXT2": 0x83, "EXT4": 0x84,
    "PERSID": ord("P"), "BINPERSID": ord("Q"),
}  # fmt: skip


def work_limit(nbytes: int) -> int:
    """Steps the machine may take for a pickle of ``nbytes`` bytes: 8 per byte (a state
    dict's pickle takes 1 to 3), and a million more (a fraction of a second)."""
    return 1_000_000 + 8 * nbytes


def native_load(
    data: bytes, *, budget: int = DEFAULT_BUDGET, work: int | None = None
) -> Unpickled | None:
    """The C machine's reading (``cndiff._pickle_vm``) of the zip-format pickle at the
    start of ``data``, or None: where that machine is not built, where the pickle is over
    :data:`NATIVE_MAX_BYTES`, or where it needs what only the Python machine does (an
    opcode, call or form a plain state dict does not use, or anything that machine
    would refuse). Same budgets and results as :func:`restricted_load`'s Python machine;
    it never raises for a pickle."""
    data = bytes(data)
    if native_vm is None or len(data) > NATIVE_MAX_BYTES:
        return None
    m = _Machine(data, "zip", budget, work_limit(len(data)) if work is None else work)
    got = native_vm.load(
        data, m,
        m.allowed[("torch._utils", "_rebuild_tensor_v2")],
        m.allowed[("collections", "OrderedDict")],
        _StorageType, _OrderedDict, Opaque, TensorRef, StorageRef,
    )  # fmt: skip
    if got is None:
        return None
    obj, end, storages = got
    return Unpickled(obj, end, storages)


def restricted_load(
    data: bytes,
    *,
    pids: str | None = None,
    budget: int = DEFAULT_BUDGET,
    work: int | None = None,
    native: bool = True,
) -> Unpickled:
    """Unpickle the pickle at the start of ``data`` with the allow-list; never runs code.

    ``pids`` says which persistent ids name storages: ``"zip"`` (``('storage', type, key,
    location, numel)``), ``"legacy"`` (the same and a view, which must be None) or None
    (none may appear). ``budget`` bounds the estimated bytes of the objects built, ``work``
    the steps taken (by default :func:`work_limit` of ``len(data)``). Any malformed or
    too costly pickle raises :class:`~cndiff.errors.CheckpointError`;
    :class:`PickleEndsError` when it runs past the end of ``data`` (a longer read of a
    legacy file may complete it).

    ``native`` (zip storages only): :func:`native_load` first, about 10x faster on a
    state dict (3 ms against 30-40 ms for an SD 1.5 file); where it gives nothing, this
    module's machine reads the pickle from the start, so the results and errors are this
    machine's either way.
    """
    data = bytes(data)
    if native and pids == "zip":
        got = native_load(data, budget=budget, work=work)
        if got is not None:
            return got
    m = _Machine(data, pids, budget, work_limit(len(data)) if work is None else work)
    try:
        obj = m.run()
    except CheckpointError:
        raise
    except RecursionError:
        raise _corrupt("it nests too deeply") from None
    except MemoryError:
        raise _corrupt("it asks for too much memory") from None
    except Exception as exc:  # a bug here must still end in a clear error
        raise _corrupt(f"{type(exc).__name__} at byte {m.pos}") from None
    return Unpickled(obj, m.pos, m.storages)
