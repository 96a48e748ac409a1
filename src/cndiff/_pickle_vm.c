/*
 * cndiff._pickle_vm: a fast path for cndiff.inputs.unpickle.restricted_load, in C.
 *
 * Why: opening a torch checkpoint is reading its pickle, tens of thousands of opcodes for
 * a state dict, and the Python machine of unpickle.py spends about 1-2 us on each: 30-40
 * ms per SD 1.5 file, most of a batch's wait before its first byte is written. This one
 * reads them in about 3 ms.
 *
 * What: the same machine, for the opcodes torch.save writes for a state dict (and only
 * those), with the same allow-list, the same checks, the same budgets (memory charged
 * and steps counted exactly as the Python machine counts them) and the same objects
 * built (the caller's TensorRef, StorageRef, _OrderedDict and allowed globals). It never
 * raises on a pickle and never decides what is wrong with one: wherever the pickle uses
 * another opcode, another global or call, an unusual form (an empty tensor, a tensor's
 * metadata, a key that is not a string, numbers past int64), or anything the Python
 * machine would refuse, it returns None, and the caller runs the Python machine from
 * the start: that one gives the answer or the error. tests/test_unpickle.py checks that
 * both give the same result for every pickle the fast path accepts, on torch's pickles
 * and on thousands of mutated ones.
 *
 * Safety: every read is checked against the pickle's length; the stack, the marks and
 * the memo grow with the opcodes read (the memo's indices are bounded by the opcode
 * count, as in the Python machine), and the caller passes pickles of a few MiB at most.
 * Every step is one the Python machine counts, except looking into the tuples a new
 * tuple holds (how deep it nests), which has a budget of its own of the same size.
 * Nothing from the file is called: the only calls are the caller's record classes and,
 * for rare steps, the Python machine's own methods.
 *
 * The module is optional: when it cannot be built, the Python machine reads every pickle.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

/* the Python machine's costs (unpickle.py): keep them equal */
#define OBJECT_COST 64
#define ITEM_COST 16
#define TUPLE_META_COST 120
#define MAX_NDIM 64
#define MAX_NUMEL (1LL << 62)

typedef struct {
    const unsigned char *data;
    Py_ssize_t n, pos;
    long long budget, cost, work_left, ops;
    /* this machine's own steps beyond the Python machine's: looking into the tuples a new
       tuple holds (a memoized tuple of 100,000 items, held 100,000 times, is 10**10) */
    long long scan_left;
    PyObject **stack;
    Py_ssize_t sp, stack_cap;
    Py_ssize_t *marks;
    Py_ssize_t nmarks, marks_cap;
    PyObject **memo;
    Py_ssize_t memo_cap;
    /* from the caller: its Python machine and what that one would build */
    PyObject *machine, *allowed, *rebuild, *odict, *storage_type_cls, *odict_cls, *opaque_cls,
        *tensor_cls, *storage_cls;
    /* the records' field names, in their order: TensorRef's, StorageRef's */
    PyObject *tensor_fields[4], *storage_fields[4];
    PyObject *storages; /* key -> StorageRef, in the order first named */
    int abort;          /* Ctrl-C (or another BaseException) while Python code ran: raise it */
} VM;

/* after a failed C-API call: an Exception is the pickle's doing (the Python machine will
   say what), anything else (KeyboardInterrupt in a record's __init__) goes to the caller */
static void clear(VM *vm) {
    if (!PyErr_Occurred()) return;
    if (PyErr_ExceptionMatches(PyExc_Exception))
        PyErr_Clear();
    else
        vm->abort = 1;
}

/* -1: give the pickle to the Python machine */
#define BAIL (-1)

/* `buf` (`*cap` items) with room for `need` items, the new ones zeroed (the memo's unset
   entries are NULL); NULL when out of memory (`buf` is then unchanged) */
static void *grown(void *buf, Py_ssize_t *cap, Py_ssize_t need, size_t item) {
    if (need <= *cap) return buf;
    Py_ssize_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *p = PyMem_Realloc(buf, (size_t)c * item);
    if (!p) return NULL;
    memset((char *)p + (size_t)*cap * item, 0, (size_t)(c - *cap) * item);
    *cap = c;
    return p;
}

static Py_ssize_t segment(VM *vm) { return vm->nmarks ? vm->marks[vm->nmarks - 1] : 0; }

static int charge(VM *vm, long long nbytes) {
    vm->cost += nbytes;
    return vm->cost > vm->budget ? BAIL : 0;
}

/* put a new reference (stolen, also on failure) on the stack, uncharged (the Python
   machine's stack.append) */
static int append(VM *vm, PyObject *obj) {
    if (!obj) return BAIL;
    PyObject **stack = grown(vm->stack, &vm->stack_cap, vm->sp + 1, sizeof *stack);
    if (!stack) {
        Py_DECREF(obj);
        return BAIL;
    }
    vm->stack = stack;
    vm->stack[vm->sp++] = obj;
    return 0;
}

/* the same, charged as the Python machine's push */
static int push(VM *vm, PyObject *obj, long long nbytes) {
    if (append(vm, obj) < 0) return BAIL;
    return charge(vm, OBJECT_COST + nbytes);
}

static int take(VM *vm, Py_ssize_t k, Py_ssize_t *at) {
    if (k > vm->n - vm->pos) return BAIL;
    *at = vm->pos;
    vm->pos += k;
    return 0;
}

static uint32_t u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* a non-negative int below `limit`, as a C value; BAIL for anything else */
static int small_index(PyObject *v, long long limit, long long *out) {
    if (!PyLong_CheckExact(v)) return BAIL;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    /* (an exact int raises nothing here; were it to, the error is cleared at the end) */
    if (overflow || (x == -1 && PyErr_Occurred()) || x < 0 || x >= limit) return BAIL;
    *out = x;
    return 0;
}

static int push_text(VM *vm, Py_ssize_t k) {
    Py_ssize_t at;
    if (take(vm, k, &at) < 0) return BAIL;
    vm->work_left -= k >> 6;
    if (vm->work_left < 0) return BAIL;
    PyObject *s = PyUnicode_DecodeUTF8((const char *)vm->data + at, k, "surrogatepass");
    if (!s) {
        clear(vm);
        return BAIL;
    }
    return push(vm, s, k);
}

/* a tuple of the top k items, charged as the Python machine's make_tuple; tuples may hold
   tuples of non-tuples only (deeper ones are for the Python machine, which bounds them) */
static int make_tuple(VM *vm, Py_ssize_t k) {
    Py_ssize_t from = vm->sp - k;
    if (k == 0) return append(vm, PyTuple_New(0));
    for (Py_ssize_t i = from; i < vm->sp; i++) {
        PyObject *x = vm->stack[i];
        if (PyTuple_Check(x)) {
            if (!PyTuple_CheckExact(x)) return BAIL;
            vm->scan_left -= PyTuple_GET_SIZE(x);
            if (vm->scan_left < 0) return BAIL;
            for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(x); j++)
                if (PyTuple_Check(PyTuple_GET_ITEM(x, j)) || PyAnySet_Check(PyTuple_GET_ITEM(x, j)))
                    return BAIL;
        } else if (PyAnySet_Check(x)) {
            return BAIL;
        }
    }
    PyObject *t = PyTuple_New(k);
    if (!t) return BAIL;
    for (Py_ssize_t i = 0; i < k; i++) PyTuple_SET_ITEM(t, i, vm->stack[from + i]);
    vm->sp = from;
    if (append(vm, t) < 0) return BAIL;
    return charge(vm, OBJECT_COST + TUPLE_META_COST + ITEM_COST * (long long)k);
}

static void drop(VM *vm, Py_ssize_t to) {
    while (vm->sp > to) {
        vm->sp--;
        Py_DECREF(vm->stack[vm->sp]);
    }
}

/* cls(v0, v1, v2, v3) for one of the caller's frozen dataclasses of four fields, built as
   its __init__ builds it (object.__setattr__ of each field, in order) but without a Python
   frame per record: one of each per tensor of the file */
static PyObject *record(VM *vm, PyObject *cls, PyObject *const *fields, PyObject *v0,
                        PyObject *v1, PyObject *v2, PyObject *v3) {
    PyObject *values[4] = {v0, v1, v2, v3};
    PyObject *empty = PyTuple_New(0);
    PyObject *obj = empty ? PyBaseObject_Type.tp_new((PyTypeObject *)cls, empty, NULL) : NULL;
    Py_XDECREF(empty);
    for (int i = 0; obj && i < 4; i++)
        if (PyObject_GenericSetAttr(obj, fields[i], values[i]) < 0) Py_CLEAR(obj);
    if (!obj) clear(vm);
    return obj;
}

/* torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, requires_grad, hooks) */
static PyObject *rebuild_tensor(VM *vm, PyObject *args) {
    if (PyTuple_GET_SIZE(args) != 6) return NULL; /* 7: tensor metadata, for Python */
    PyObject *storage = PyTuple_GET_ITEM(args, 0), *offset = PyTuple_GET_ITEM(args, 1);
    PyObject *shape = PyTuple_GET_ITEM(args, 2), *stride = PyTuple_GET_ITEM(args, 3);
    long long off, numel;
    if (!PyObject_TypeCheck(storage, (PyTypeObject *)vm->storage_cls)) return NULL;
    if (small_index(offset, LLONG_MAX, &off) < 0) return NULL;
    if (!PyTuple_Check(shape) || !PyTuple_Check(stride)) return NULL;
    Py_ssize_t nd = PyTuple_GET_SIZE(shape);
    if (nd > MAX_NDIM || PyTuple_GET_SIZE(stride) != nd) return NULL;
    PyObject *numel_obj = PyObject_GetAttrString(storage, "numel");
    if (!numel_obj) {
        clear(vm);
        return NULL;
    }
    int bad = small_index(numel_obj, MAX_NUMEL, &numel);
    Py_DECREF(numel_obj);
    if (bad < 0) return NULL;
    /* the last element the view touches lies in the storage; an empty view reads nothing
       (it may start anywhere) but its other sizes may not multiply past MAX_NUMEL */
    long long last = off, product = 1;
    int empty = 0, overflow = 0;
    for (Py_ssize_t i = 0; i < nd; i++) {
        long long n, s, step;
        if (small_index(PyTuple_GET_ITEM(shape, i), LLONG_MAX, &n) < 0) return NULL;
        if (small_index(PyTuple_GET_ITEM(stride, i), LLONG_MAX, &s) < 0) return NULL;
        if (n == 0) {
            empty = 1;
            continue;
        }
        if (!overflow)
            overflow = __builtin_mul_overflow(n - 1, s, &step) ||
                       __builtin_add_overflow(last, step, &last);
        if (__builtin_mul_overflow(product, n, &product) || product >= MAX_NUMEL) return NULL;
    }
    if (!empty && (overflow || last >= numel)) return NULL;
    return record(vm, vm->tensor_cls, vm->tensor_fields, storage, offset, shape, stride);
}

/* BINPERSID: ('storage', storage type, key, location, numel), the zip format's */
static PyObject *persistent_load(VM *vm, PyObject *pid) {
    if (!PyTuple_CheckExact(pid) || PyTuple_GET_SIZE(pid) != 5) return NULL;
    PyObject *tag = PyTuple_GET_ITEM(pid, 0), *stype = PyTuple_GET_ITEM(pid, 1);
    PyObject *key = PyTuple_GET_ITEM(pid, 2), *location = PyTuple_GET_ITEM(pid, 3);
    PyObject *numel = PyTuple_GET_ITEM(pid, 4);
    long long count;
    if (!PyUnicode_CheckExact(tag) || PyUnicode_CompareWithASCIIString(tag, "storage") != 0)
        return NULL;
    if (!PyObject_TypeCheck(stype, (PyTypeObject *)vm->storage_type_cls)) return NULL;
    if (!PyUnicode_CheckExact(key) || !PyUnicode_CheckExact(location)) return NULL;
    if (small_index(numel, MAX_NUMEL, &count) < 0) return NULL;
    PyObject *dtype = PyObject_GetAttrString(stype, "dtype");
    if (!dtype) {
        clear(vm);
        return NULL;
    }
    PyObject *ref = PyDict_GetItemWithError(vm->storages, key);
    if (ref) {
        /* named before: the same dtype and size, or the Python machine says what is wrong */
        PyObject *d = PyObject_GetAttrString(ref, "dtype");
        PyObject *k = PyObject_GetAttrString(ref, "numel");
        int same = d && k && PyObject_RichCompareBool(d, dtype, Py_EQ) == 1 &&
                   PyObject_RichCompareBool(k, numel, Py_EQ) == 1;
        Py_XDECREF(d);
        Py_XDECREF(k);
        Py_DECREF(dtype);
        clear(vm);
        if (!same) return NULL;
        Py_INCREF(ref);
        return ref;
    }
    if (PyErr_Occurred()) {
        clear(vm);
        Py_DECREF(dtype);
        return NULL;
    }
    ref = record(vm, vm->storage_cls, vm->storage_fields, key, dtype, numel, location);
    Py_DECREF(dtype);
    if (!ref || PyDict_SetItem(vm->storages, key, ref) < 0) {
        clear(vm);
        Py_XDECREF(ref);
        return NULL;
    }
    return ref;
}

static int global(VM *vm) {
    const unsigned char *p = vm->data + vm->pos, *end = vm->data + vm->n;
    const unsigned char *nl1 = memchr(p, '\n', (size_t)(end - p));
    if (!nl1) return BAIL;
    const unsigned char *nl2 = memchr(nl1 + 1, '\n', (size_t)(end - nl1 - 1));
    if (!nl2) return BAIL;
    vm->pos = (nl2 + 1) - vm->data;
    vm->work_left -= ((nl1 - p) + (nl2 - nl1 - 1)) >> 6;
    if (vm->work_left < 0) return BAIL;
    PyObject *key = Py_BuildValue("(s#s#)", (const char *)p, (Py_ssize_t)(nl1 - p),
                                  (const char *)(nl1 + 1), (Py_ssize_t)(nl2 - nl1 - 1));
    if (!key) {
        clear(vm); /* not UTF-8: for Python */
        return BAIL;
    }
    PyObject *obj = PyDict_GetItemWithError(vm->allowed, key);
    Py_DECREF(key);
    if (!obj) {
        clear(vm); /* not allowed: Python names it */
        return BAIL;
    }
    Py_INCREF(obj);
    return push(vm, obj, 0);
}

/* machine.<method>(a, b[, c]) for the rare steps (a Lightning callback's or a numpy
   scalar's stand-in, _codecs.encode, NEWOBJ, a key that is not a string): the Python
   machine checks and charges them itself, on its counters, which are this machine's for
   the call */
static PyObject *call_back(VM *vm, const char *method, PyObject *a, PyObject *b, PyObject *c) {
    PyObject *cost = PyLong_FromLongLong(vm->cost), *work = PyLong_FromLongLong(vm->work_left);
    PyObject *result = NULL;
    if (cost && work && PyObject_SetAttrString(vm->machine, "cost", cost) == 0 &&
        PyObject_SetAttrString(vm->machine, "work_left", work) == 0) {
        PyObject *name = PyUnicode_FromString(method);
        if (name) result = PyObject_CallMethodObjArgs(vm->machine, name, a, b, c, NULL);
        Py_XDECREF(name);
    }
    Py_XDECREF(cost);
    Py_XDECREF(work);
    if (result) {
        PyObject *spent = PyObject_GetAttrString(vm->machine, "cost");
        PyObject *left = PyObject_GetAttrString(vm->machine, "work_left");
        int overflow = 0;
        if (spent && left) {
            vm->cost = PyLong_AsLongLongAndOverflow(spent, &overflow);
            if (!overflow) vm->work_left = PyLong_AsLongLongAndOverflow(left, &overflow);
        }
        if (!spent || !left || overflow || PyErr_Occurred()) Py_CLEAR(result);
        Py_XDECREF(spent);
        Py_XDECREF(left);
    }
    if (!result) clear(vm); /* refused: the Python machine says why */
    return result;
}

/* d[key] = value: a string key here; another key through the Python machine, which charges
   its hashing and refuses colliding keys (not a tuple: what hashing one costs is known to
   the Python machine only for the tuples it built) */
static int setitem(VM *vm, PyObject *d, PyObject *key, PyObject *value) {
    if (!PyDict_Check(d)) return BAIL;
    if (!PyUnicode_CheckExact(key)) {
        if (PyTuple_Check(key) || PyAnySet_Check(key)) return BAIL;
        PyObject *r = call_back(vm, "setitem", d, key, value);
        if (!r) return BAIL;
        Py_DECREF(r);
        return 0;
    }
    if (PyDict_SetItem(d, key, value) < 0) {
        clear(vm);
        return BAIL;
    }
    return charge(vm, ITEM_COST);
}

static int reduce(VM *vm) {
    if (vm->sp - segment(vm) < 2) return BAIL;
    PyObject *args = vm->stack[vm->sp - 1], *fn = vm->stack[vm->sp - 2];
    if (!PyTuple_CheckExact(args)) return BAIL;
    PyObject *result;
    if (fn == vm->rebuild || fn == vm->odict) {
        vm->work_left -= PyTuple_GET_SIZE(args);
        if (vm->work_left < 0) return BAIL;
        if (fn == vm->rebuild) {
            result = rebuild_tensor(vm, args);
        } else if (PyTuple_GET_SIZE(args) == 0) {
            result = PyObject_CallNoArgs(vm->odict_cls);
            if (!result) clear(vm);
        } else {
            return BAIL; /* OrderedDict(items): its keys' hashing is the Python machine's */
        }
        if (!result || charge(vm, OBJECT_COST) < 0) {
            Py_XDECREF(result);
            return BAIL;
        }
    } else {
        result = call_back(vm, "call", fn, args, NULL);
        if (!result) return BAIL;
    }
    drop(vm, vm->sp - 2);
    return append(vm, result);
}

static int memo_put(VM *vm, long long idx) {
    if (idx >= vm->ops || vm->sp == segment(vm)) return BAIL;
    PyObject **memo = grown(vm->memo, &vm->memo_cap, (Py_ssize_t)idx + 1, sizeof *memo);
    if (!memo) return BAIL;
    vm->memo = memo;
    PyObject *old = vm->memo[idx];
    Py_INCREF(vm->stack[vm->sp - 1]);
    vm->memo[idx] = vm->stack[vm->sp - 1];
    Py_XDECREF(old);
    return charge(vm, ITEM_COST);
}

static int memo_get(VM *vm, long long idx) {
    if (idx >= vm->memo_cap || !vm->memo[idx]) return BAIL;
    Py_INCREF(vm->memo[idx]);
    return append(vm, vm->memo[idx]);
}

/* one opcode; 1 at STOP (the result on top), 0 to go on, BAIL */
static int step(VM *vm) {
    Py_ssize_t at, base = segment(vm);
    if (vm->pos >= vm->n) return BAIL;
    unsigned char code = vm->data[vm->pos++];
    vm->ops++;
    vm->work_left--;
    switch (code) {
    case 0x80: /* PROTO */
        return take(vm, 1, &at);
    case 0x95: /* FRAME */
        if (take(vm, 8, &at) < 0) return BAIL;
        {
            uint64_t k = (uint64_t)u32(vm->data + at) | (uint64_t)u32(vm->data + at + 4) << 32;
            if (k > (uint64_t)(vm->n - vm->pos)) return BAIL;
        }
        return 0;
    case '.': /* STOP */
        return vm->sp > base ? 1 : BAIL;
    case '(': /* MARK */
        {
            Py_ssize_t *marks = grown(vm->marks, &vm->marks_cap, vm->nmarks + 1, sizeof *marks);
            if (!marks) return BAIL;
            vm->marks = marks;
        }
        vm->marks[vm->nmarks++] = vm->sp;
        return 0;
    case 'N':
        Py_INCREF(Py_None);
        return push(vm, Py_None, 0);
    case 0x88: /* NEWTRUE */
        Py_INCREF(Py_True);
        return push(vm, Py_True, 0);
    case 0x89: /* NEWFALSE */
        Py_INCREF(Py_False);
        return push(vm, Py_False, 0);
    case 'J': /* BININT */
        if (take(vm, 4, &at) < 0) return BAIL;
        return push(vm, PyLong_FromLong((long)(int32_t)u32(vm->data + at)), 0);
    case 'K': /* BININT1 */
        if (take(vm, 1, &at) < 0) return BAIL;
        return push(vm, PyLong_FromLong(vm->data[at]), 0);
    case 'M': /* BININT2 */
        if (take(vm, 2, &at) < 0) return BAIL;
        return push(vm, PyLong_FromLong(vm->data[at] | vm->data[at + 1] << 8), 0);
    case 0x8c: /* SHORT_BINUNICODE */
        if (take(vm, 1, &at) < 0) return BAIL;
        return push_text(vm, vm->data[at]);
    case 'X': /* BINUNICODE */
        if (take(vm, 4, &at) < 0) return BAIL;
        return push_text(vm, (Py_ssize_t)u32(vm->data + at));
    case 'G': /* BINFLOAT: big-endian IEEE double */ {
        if (take(vm, 8, &at) < 0) return BAIL;
        uint64_t bits = 0;
        double x;
        for (int i = 0; i < 8; i++) bits = bits << 8 | vm->data[at + i];
        memcpy(&x, &bits, sizeof x);
        return push(vm, PyFloat_FromDouble(x), 0);
    }
    case 'C': /* SHORT_BINBYTES */
    case 'B': /* BINBYTES */ {
        Py_ssize_t k;
        if (take(vm, code == 'C' ? 1 : 4, &at) < 0) return BAIL;
        k = code == 'C' ? (Py_ssize_t)vm->data[at] : (Py_ssize_t)u32(vm->data + at);
        if (take(vm, k, &at) < 0) return BAIL;
        vm->work_left -= k >> 6;
        if (vm->work_left < 0) return BAIL;
        return push(vm, PyBytes_FromStringAndSize((const char *)vm->data + at, k), k);
    }
    case ']': /* EMPTY_LIST */
        return push(vm, PyList_New(0), 0);
    case 'a': /* APPEND */
        if (vm->sp - base < 2 || !PyList_CheckExact(vm->stack[vm->sp - 2])) return BAIL;
        if (PyList_Append(vm->stack[vm->sp - 2], vm->stack[vm->sp - 1]) < 0) return BAIL;
        drop(vm, vm->sp - 1);
        return charge(vm, ITEM_COST);
    case 'e': /* APPENDS */ {
        if (!vm->nmarks) return BAIL;
        vm->nmarks--;
        Py_ssize_t k = vm->sp - base, below = segment(vm);
        if (base - below < 1 || !PyList_CheckExact(vm->stack[base - 1])) return BAIL;
        for (Py_ssize_t i = base; i < vm->sp; i++)
            if (PyList_Append(vm->stack[base - 1], vm->stack[i]) < 0) return BAIL;
        drop(vm, base);
        return charge(vm, ITEM_COST * (long long)k);
    }
    case '}': /* EMPTY_DICT */
        return push(vm, PyDict_New(), 0);
    case ')': /* EMPTY_TUPLE */
        return push(vm, PyTuple_New(0), 0);
    case 't': /* TUPLE */
        if (!vm->nmarks) return BAIL;
        vm->nmarks--;
        return make_tuple(vm, vm->sp - base);
    case 0x85: /* TUPLE1 */
    case 0x86: /* TUPLE2 */
    case 0x87: /* TUPLE3 */
        if (vm->sp - base < code - 0x84) return BAIL;
        return make_tuple(vm, code - 0x84);
    case 's': /* SETITEM */
        if (vm->sp - base < 3) return BAIL;
        if (setitem(vm, vm->stack[vm->sp - 3], vm->stack[vm->sp - 2], vm->stack[vm->sp - 1]) < 0)
            return BAIL;
        drop(vm, vm->sp - 2);
        return 0;
    case 'u': /* SETITEMS */ {
        if (!vm->nmarks) return BAIL;
        vm->nmarks--;
        Py_ssize_t k = vm->sp - base, below = segment(vm);
        if (base - below < 1 || k % 2) return BAIL;
        PyObject *d = vm->stack[base - 1];
        vm->work_left -= k;
        if (vm->work_left < 0) return BAIL;
        for (Py_ssize_t i = base; i < vm->sp; i += 2)
            if (setitem(vm, d, vm->stack[i], vm->stack[i + 1]) < 0) return BAIL;
        drop(vm, base);
        return 0;
    }
    case 'q': /* BINPUT */
        if (take(vm, 1, &at) < 0) return BAIL;
        return memo_put(vm, vm->data[at]);
    case 'r': /* LONG_BINPUT */
        if (take(vm, 4, &at) < 0) return BAIL;
        return memo_put(vm, u32(vm->data + at));
    case 'h': /* BINGET */
        if (take(vm, 1, &at) < 0) return BAIL;
        return memo_get(vm, vm->data[at]);
    case 'j': /* LONG_BINGET */
        if (take(vm, 4, &at) < 0) return BAIL;
        return memo_get(vm, u32(vm->data + at));
    case 'c': /* GLOBAL */
        return global(vm);
    case 'R': /* REDUCE */
        return reduce(vm);
    case 'b': /* BUILD: an OrderedDict's state (torch's _metadata) is dropped, a stand-in's
                 kept; anything else is for the Python machine (which refuses it) */ {
        if (vm->sp - base < 2) return BAIL;
        PyObject *state = vm->stack[vm->sp - 1], *inst = vm->stack[vm->sp - 2];
        if ((PyObject *)Py_TYPE(inst) == vm->odict_cls) {
            if (state != Py_None && !PyDict_Check(state)) return BAIL;
        } else if (PyObject_TypeCheck(inst, (PyTypeObject *)vm->opaque_cls)) {
            if (PyObject_SetAttrString(inst, "state", state) < 0) return BAIL;
        } else {
            return BAIL;
        }
        drop(vm, vm->sp - 1);
        return 0;
    }
    case 0x81: /* NEWOBJ: an allowed stand-in, through the Python machine */ {
        if (vm->sp - base < 2) return BAIL;
        PyObject *obj = call_back(vm, "instantiate", vm->stack[vm->sp - 2], vm->stack[vm->sp - 1],
                                  NULL);
        if (!obj) return BAIL;
        drop(vm, vm->sp - 2);
        return append(vm, obj);
    }
    case 'Q': /* BINPERSID */ {
        if (vm->sp == base) return BAIL;
        PyObject *ref = persistent_load(vm, vm->stack[vm->sp - 1]);
        if (!ref) return BAIL;
        drop(vm, vm->sp - 1);
        return push(vm, ref, 0);
    }
    default:
        return BAIL;
    }
}

static void release_names(VM *vm) {
    for (int i = 0; i < 4; i++) {
        Py_CLEAR(vm->tensor_fields[i]);
        Py_CLEAR(vm->storage_fields[i]);
    }
}

static PyObject *py_load(PyObject *self, PyObject *args) {
    Py_buffer buf;
    VM vm;
    memset(&vm, 0, sizeof vm);
    if (!PyArg_ParseTuple(args, "y*OOOOOOOO", &buf, &vm.machine, &vm.rebuild, &vm.odict,
                          &vm.storage_type_cls, &vm.odict_cls, &vm.opaque_cls, &vm.tensor_cls,
                          &vm.storage_cls))
        return NULL;
    if (!PyType_Check(vm.storage_type_cls) || !PyType_Check(vm.odict_cls) ||
        !PyType_Check(vm.opaque_cls) || !PyType_Check(vm.tensor_cls) ||
        !PyType_Check(vm.storage_cls)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_TypeError, "load: the record arguments must be classes");
        return NULL;
    }
    static const char *tensor_names[4] = {"storage", "offset", "shape", "stride"};
    static const char *storage_names[4] = {"key", "dtype", "numel", "location"};
    for (int i = 0; i < 4; i++) {
        if (!(vm.tensor_fields[i] = PyUnicode_InternFromString(tensor_names[i])) ||
            !(vm.storage_fields[i] = PyUnicode_InternFromString(storage_names[i]))) {
            release_names(&vm);
            PyBuffer_Release(&buf);
            return NULL;
        }
    }
    /* the machine's budgets as they stand (a fresh machine: nothing spent) and its globals */
    PyObject *b = PyObject_GetAttrString(vm.machine, "budget");
    PyObject *w = PyObject_GetAttrString(vm.machine, "work_left");
    vm.allowed = PyObject_GetAttrString(vm.machine, "allowed");
    int ok = b && w && vm.allowed && PyDict_CheckExact(vm.allowed);
    if (ok) {
        vm.budget = PyLong_AsLongLong(b);
        vm.work_left = PyLong_AsLongLong(w);
        vm.scan_left = vm.work_left;
        ok = !PyErr_Occurred();
    }
    Py_XDECREF(b);
    Py_XDECREF(w);
    if (!ok) {
        Py_XDECREF(vm.allowed);
        release_names(&vm);
        PyBuffer_Release(&buf);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "load: not a cndiff unpickler machine");
        return NULL;
    }
    vm.data = buf.buf;
    vm.n = buf.len;
    PyObject *result = NULL;
    vm.storages = PyDict_New();
    if (vm.storages) {
        int r;
        do {
            r = step(&vm);
            if (r == 0 && vm.work_left < 0) r = BAIL;
        } while (r == 0);
        if (r == 1) {
            result = Py_BuildValue("(OnO)", vm.stack[vm.sp - 1], vm.pos, vm.storages);
        }
    }
    clear(&vm); /* nothing else raises: None gives the pickle to the Python machine */
    /* Ctrl-C: raised after the clean-up, which runs with no exception set */
    PyObject *exc_type = NULL, *exc_value = NULL, *exc_tb = NULL;
    if (vm.abort) {
        Py_CLEAR(result);
        PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
    }
    drop(&vm, 0);
    for (Py_ssize_t i = 0; i < vm.memo_cap; i++) Py_XDECREF(vm.memo[i]);
    PyMem_Free(vm.memo);
    PyMem_Free(vm.stack);
    PyMem_Free(vm.marks);
    Py_XDECREF(vm.storages);
    Py_DECREF(vm.allowed);
    release_names(&vm);
    PyBuffer_Release(&buf);
    if (vm.abort) {
        PyErr_Restore(exc_type, exc_value, exc_tb);
        return NULL;
    }
    if (!result) Py_RETURN_NONE;
    return result;
}

static PyMethodDef methods[] = {
    {"load", py_load, METH_VARARGS,
     "load(data, machine, rebuild, odict, storage_type_cls, odict_cls, opaque_cls, tensor_cls, "
     "storage_cls) -> (obj, end, storages) or None: the restricted machine of "
     "cndiff.inputs.unpickle (a fresh _Machine, its budgets and allowed globals) for a torch "
     "state dict's opcodes (zip storages); None where the pickle needs anything else, and the "
     "Python machine reads it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pickle_vm",
                                    "cndiff's fast path for torch pickles (optional).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__pickle_vm(void) { return PyModule_Create(&module); }
