"""The compute backends: numpy and torch give the bytes torch's own arithmetic gives.

The oracle is torch itself, applied the way the reference script does it:
``(c.to(P) - b.to(P)).to(out)`` with ``P`` = torch's type promotion of the two inputs
and float32 (float64 when either is float64), and float64 results rounded through float32
(what torch's ``.to()`` does). Every dtype pair the readers accept, both backends, both
operations, every output dtype; then whole commands through both backends, byte for byte.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cndiff
from cndiff import synthetic
from cndiff.backends import Raw, select_backend
from cndiff.backends.numpy_backend import (
    NumpyBackend,
    cast_from_float32,
    float8_table,
    native_kernels,
)
from cndiff.backends.torch_backend import TorchBackend
from cndiff.dtypes import BF16, F8_E4M3, F8_E5M2, F16, F32, by_name

INPUT_DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                "uint8", "bool", "float8_e4m3fn", "float8_e5m2"]  # fmt: skip
OUT_DTYPES = ["float16", "bfloat16", "float32"]
BACKENDS = {"numpy": NumpyBackend(native=False), "torch": TorchBackend("cpu")}
if native_kernels is not None:
    BACKENDS["native"] = NumpyBackend(native=True)
needs_native = pytest.mark.skipif(native_kernels is None, reason="cndiff._kernels not built")


def _all_patterns(step: int) -> np.ndarray:
    """Every ``step``-th float32 bit pattern, plus every special neighbourhood."""
    u = np.arange(0, 1 << 32, step, dtype=np.uint64).astype(np.uint32)
    specials = []
    for centre in [0, 0x33000000, 0x387FE000, 0x38800000, 0x477FE000, 0x477FF000, 0x47800000,
                   0x7F800000, 0x7FC00000, 0x3F800000, 0x7F7F8000]:  # fmt: skip
        specials.append(np.arange(centre - 4096, centre + 4096, dtype=np.int64))
    sp = np.concatenate(specials) % (1 << 32)
    sp = np.concatenate([sp, sp | (1 << 31)]).astype(np.uint32)
    return np.concatenate([u, sp])


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_float32_casts_match_torch_bit_for_bit(dtype):
    u = _all_patterns(251)
    x = u.view(np.float32)
    out = np.empty(x.size, dtype=dtype.numpy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cast_from_float32(x, dtype, out, np.empty(x.size, np.uint32), np.empty(x.size, np.uint32))
    ref = torch.from_numpy(x).to(dtype.to_torch()).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out.view(np.uint16), ref)  # NaN payloads included


@needs_native
@pytest.mark.parametrize("simd", [True, False], ids=["avx2-f16c", "scalar"])
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_native_kernels_match_torch_bit_for_bit(dtype, simd):
    """Both native paths (F16C/AVX2 and the portable scalar loop) against torch, over the
    same float32 patterns: as a copy (the rounding) and as a subtraction."""
    u = _all_patterns(251)
    x = u.view(np.float32)
    y = np.roll(x, 7)
    previous = native_kernels.set_simd(simd)
    try:
        for op, ref in ((0, torch.from_numpy(x)),
                        (1, torch.from_numpy(x) - torch.from_numpy(y))):  # fmt: skip
            out = np.empty(x.size, dtype.numpy)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kind = {F32: 0, F16: 1, BF16: 2}[dtype]
                m = native_kernels.combine(x, y if op else None, out, op, kind)
            want = ref.to(dtype.to_torch()).view(torch.uint8).numpy()
            got = out.view(np.uint8)
            both_nan = (np.isnan(x) & np.isnan(y)) if op else np.zeros(x.size, bool)
            w = dtype.itemsize
            keep = np.repeat(~both_nan, w)
            assert np.array_equal(got[keep], want[keep])
            assert np.isnan(m)  # the patterns hold NaN
    finally:
        native_kernels.set_simd(previous)


@needs_native
@pytest.mark.parametrize("simd", [True, False], ids=["avx2-f16c", "scalar"])
def test_native_half_to_float_is_numpys_cast_for_every_pattern(simd):
    """Every float16 bit pattern, at every start offset mod 8 (the SIMD loop and its
    tail): the native conversion gives numpy's bits (NaN payloads unquieted, which the
    numpy fallback keeps), and torch's values for every non-NaN pattern."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = h.view(np.float16).astype(np.float32).view(np.uint32)
    by_torch = torch.from_numpy(h.view(np.int16)).view(torch.float16).float().numpy()
    finite = ~np.isnan(by_torch)
    assert np.array_equal(want[finite], by_torch.view(np.uint32)[finite])
    previous = native_kernels.set_simd(simd)
    try:
        for start in range(9):
            out = np.full(h.size - start, np.nan, np.float32)
            native_kernels.half_to_float(h[start:], out)
            assert np.array_equal(out.view(np.uint32), want[start:]), start
        with pytest.raises(ValueError):
            native_kernels.half_to_float(h, np.empty(h.size - 1, np.float32))
    finally:
        native_kernels.set_simd(previous)


@pytest.mark.parametrize("dtype", [F8_E4M3, F8_E5M2])
def test_float8_table_matches_torch(dtype):
    ref = torch.arange(256, dtype=torch.uint8).view(dtype.to_torch()).float().numpy()
    assert np.array_equal(float8_table(dtype).view(np.uint32), ref.view(np.uint32))


def _values(dtype: str, n: int, seed: int) -> torch.Tensor:
    """Values of every kind for ``dtype``: normal, tiny, huge, zeros, NaN, inf."""
    g = torch.Generator().manual_seed(seed)
    t = by_name(dtype).to_torch()
    if t == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if not t.is_floating_point:
        info = torch.iinfo(t)
        return torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(t)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
    x[: n // 8] *= 1e-6  # near subnormal in fp16
    x[n // 8 : n // 4] *= 1e6  # overflow in fp16
    x[n // 4 : n // 4 + 4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    x[n // 4 + 4 : n // 4 + 6] = float("nan")
    return x.to(t)


@needs_native
@pytest.mark.parametrize("simd", [True, False], ids=["avx2-f16c", "scalar"])
@pytest.mark.parametrize("half", ["c", "b", "both"])
def test_native_pass_reading_float16_is_the_numpy_path(simd, half):
    """The native pass converts a float16 input as it reads it (sub and add): every
    float16 pattern, NaN payloads included, at every start offset mod 8, against the
    numpy-only backend (which converts first), for every output dtype, whole and in
    segments."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    rng = np.random.default_rng(7)
    other32 = _all_patterns(1 << 16)[: h.size].view(np.float32)
    rng.shuffle(other32)
    other16 = np.roll(h, 12345)
    c = h if half in ("c", "both") else other32
    b = h if half == "b" else other16 if half == "both" else other32
    plain, native = NumpyBackend(native=False), NumpyBackend(native=True)
    both_nan = np.isnan(c.astype(np.float32)) & np.isnan(b.astype(np.float32))
    previous = native_kernels.set_simd(simd)
    try:
        for op, out_name, start in itertools.product(["sub", "add"], OUT_DTYPES, range(9)):
            odt = by_name(out_name)
            rc = Raw(c[start:], by_name(str(c.dtype)))
            rb = Raw(b[start:], by_name(str(b.dtype)))
            want, got = np.empty(c.size - start, odt.numpy), np.empty(c.size - start, odt.numpy)
            with np.errstate(all="ignore"):
                m_want = plain.combine(op, rc, rb, want, odt)
                m_got = native.combine(op, rc, rb, got, odt)
            keep = ~both_nan[start:]
            assert np.array_equal(_elements(got, odt)[keep], _elements(want, odt)[keep]), (
                op,
                out_name,
                start,
            )
            assert np.isnan(m_got) and np.isnan(m_want)
            if start == 0:
                starts = np.array([0, 5, 5, 4000, 65536], np.int64)
                seg = np.empty(c.size, odt.numpy)
                maxes = native.combine_many(op, rc, rb, seg, odt, starts)
                assert np.array_equal(_elements(seg, odt)[keep], _elements(got, odt)[keep])
                with np.errstate(all="ignore"):
                    for j in range(4):
                        lo, hi = starts[j], starts[j + 1]
                        one = np.empty(hi - lo, odt.numpy)
                        mj = plain.combine(op, Raw(c[lo:hi], rc.dtype), Raw(b[lo:hi], rb.dtype),
                                           one, odt)  # fmt: skip
                        assert maxes[j] == mj or (np.isnan(maxes[j]) and np.isnan(mj))
    finally:
        native_kernels.set_simd(previous)
    with pytest.raises(ValueError, match="input kinds"):
        native_kernels.combine(h.view(np.uint16), None, np.empty(h.size, np.float32), 0, 0, True)
    with pytest.raises(ValueError, match="sizes"):
        native_kernels.combine(
            h.view(np.uint16), h.view(np.uint16), np.empty(h.size, np.float32), 1, 0, True
        )


def _raw(t: torch.Tensor) -> Raw:
    dt = by_name(str(t.dtype))
    arr = t.view(torch.uint8).numpy().view(dt.numpy) if dt.raw else t.numpy()
    return Raw(arr, dt)


def _elements(a: np.ndarray, dt) -> np.ndarray:
    """The raw bits of each element (uint16/uint32), whatever the array's dtype."""
    return np.ascontiguousarray(a).view(np.uint8).view({2: np.uint16, 4: np.uint32}[dt.itemsize])


def _oracle(op: str, c: torch.Tensor, b: torch.Tensor | None, out: str) -> np.ndarray:
    odt = by_name(out).to_torch()
    if b is None:
        r = c if c.dtype == odt else c.to(torch.float64 if c.dtype == torch.float64 else
                                          torch.float32)  # fmt: skip
    else:
        # torch promotes no float8: those go through float32, the floor anyway
        c, b = (x.float() if x.element_size() == 1 and x.is_floating_point() else x
                for x in (c, b))  # fmt: skip
        p = torch.promote_types(torch.promote_types(c.dtype, b.dtype), torch.float32)
        r = c.to(p) - b.to(p) if op == "sub" else c.to(p) + b.to(p)
    if r.dtype == torch.float64:
        r = r.to(torch.float32)
    return r.to(odt).view(torch.uint8).numpy()


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("out", OUT_DTYPES)
@pytest.mark.parametrize("op", ["sub", "add"])
def test_every_dtype_pair_like_torch(backend, out, op):
    be = BACKENDS[backend]
    odt = by_name(out)
    n = 256
    for i, (cd, bd) in enumerate(itertools.product(INPUT_DTYPES, INPUT_DTYPES)):
        c, b = _values(cd, n, i), _values(bd, n, 1000 + i)
        buf = np.empty(n, odt.numpy)
        with np.errstate(all="ignore"):
            m = be.combine(op, _raw(c), _raw(b), buf, odt)
        got, want = _elements(buf, odt), _elements(_oracle(op, c, b, out), odt)
        # where both inputs are NaN, which payload survives is the hardware's choice
        both = (c.float().isnan() & b.float().isnan()).numpy()
        assert np.array_equal(got[~both], want[~both]), (cd, bd)
        vals = (got.astype(np.uint32) << 16).view(np.float32) if odt is BF16 else buf
        assert np.all(np.isnan(vals[both].astype(np.float32)))
        assert np.isnan(m) or m >= 0


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("out", OUT_DTYPES)
def test_copies_like_torch(backend, out):
    be = BACKENDS[backend]
    odt = by_name(out)
    for i, cd in enumerate(INPUT_DTYPES):
        c = _values(cd, 300, i)
        buf = np.empty(300, odt.numpy)
        be.combine(None, _raw(c), None, buf, odt)
        assert np.array_equal(buf.view(np.uint8), _oracle("copy", c, None, out)), cd


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("out", OUT_DTYPES)
@pytest.mark.parametrize("cd", ["float32", "float16", "bfloat16", "int8"])
def test_combine_many_is_combine_per_segment(backend, out, cd):
    # a pack of small tensors: the bytes torch gives for each, and each one's own max
    # (NaN only in the segment holding it, inf in its own, empty segments 0)
    be = BACKENDS[backend]
    odt = by_name(out)
    sizes = [3, 0, 17, 1, 40, 9]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(starts[-1])
    c, b = _values(cd, n, 7), torch.randn(n, generator=torch.Generator().manual_seed(8))
    if c.is_floating_point():  # segments: [0,3) [3,3) [3,20) [20,21) [21,61) [61,70)
        c[:3] = torch.tensor([1.0, -5.0, 2.0]).to(c.dtype)
        c[3:20] = 0.5
        c[5] = float("nan")
        c[20] = float("inf")
    for op in ("sub", None):
        buf = np.empty(n, odt.numpy)
        bb = None if op is None else _raw(b)
        with np.errstate(all="ignore"):
            maxes = be.combine_many(op, _raw(c), bb, buf, odt, starts)
        assert np.array_equal(buf.view(np.uint8), _oracle(op or "copy", c,
                                                          None if op is None else b, out))
        want = []
        for lo, hi in zip(starts[:-1], starts[1:]):
            d = c[lo:hi].double() if op is None else c[lo:hi].double() - b[lo:hi].double()
            want.append(float("nan") if d.isnan().any() else float(d.abs().max()) if hi > lo
                        else 0.0)  # fmt: skip
        assert maxes.shape == (len(sizes),)
        np.testing.assert_allclose(maxes, want, rtol=1e-6)  # (NaN where NaN)
        if c.is_floating_point():
            assert np.isnan(maxes[2]) and not np.isnan(maxes[0]) and maxes[0] == pytest.approx(
                5.0 if op is None else float((c[:3].double() - b[:3].double()).abs().max()),
                rel=1e-6)  # fmt: skip
            assert maxes[1] == 0.0 and maxes[3] == np.inf and np.isfinite(maxes[5])


def test_max_abs_reports_nan_and_inf():
    be = NumpyBackend()
    x = np.array([1.0, -3.0, 2.0], np.float32)
    buf = np.empty(3, np.float16)
    assert be.combine("sub", Raw(x, F32), Raw(np.zeros(3, np.float32), F32), buf, F16) == 3.0
    x[1] = np.inf
    assert be.combine(None, Raw(x, F32), None, buf, F16) == np.inf
    x[0] = np.nan
    for be in BACKENDS.values():
        assert np.isnan(be.combine(None, Raw(x, F32), None, buf, F16))


def test_native_and_numpy_paths_write_the_same_files(sd15_pair, tmp_path, monkeypatch):
    import cndiff.backends.numpy_backend as nb

    control, base = sd15_pair
    a = cndiff.extract(control, base, tmp_path / "a.safetensors", dtype="bf16")
    monkeypatch.setattr(nb, "native_kernels", None)  # a machine where nothing was compiled
    b = cndiff.extract(control, base, tmp_path / "b.safetensors", dtype="bf16")
    assert a.output.read_bytes() == b.output.read_bytes()


def test_select_backend():
    assert isinstance(select_backend("cpu", "auto"), NumpyBackend)
    assert isinstance(select_backend("cpu", "torch"), TorchBackend)
    if not torch.cuda.is_available():
        assert isinstance(select_backend("auto", "auto"), NumpyBackend)
        with pytest.raises(cndiff.CndiffError, match="no CUDA GPU"):
            select_backend("cuda", "auto")


# -- whole commands through both backends ----------------------------------------------------


def _both(fn, tmp_path, name):
    """Run ``fn(out, backend)`` with each backend; return both outputs' bytes."""
    outs = []
    for backend in ("numpy", "torch"):
        out = tmp_path / f"{backend}_{name}"
        r = fn(out, backend)
        assert r.backend == backend
        outs.append(r.output.read_bytes())
    return outs


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("check_base", [True, False])
def test_extract_same_bytes_on_both_backends(sd15_pair, tmp_path, dtype, check_base):
    control, base = sd15_pair
    a, b = _both(lambda o, be: cndiff.extract(control, base, o, dtype=dtype, backend=be,
                                              check_base=check_base), tmp_path, "x.safetensors")
    assert a == b


@pytest.mark.parametrize("kw", [dict(base_dtype=torch.float16, base_fmt="safetensors"),
                                dict(control_dtype=torch.float16, control_fmt="safetensors"),
                                dict(base_dtype=torch.bfloat16, base_fmt="safetensors")],
                         ids=["fp16 base", "fp16 control", "bf16 base"])  # fmt: skip
def test_mixed_input_dtypes_same_bytes(pair_factory, tmp_path, kw):
    control, base = pair_factory(**kw)
    for dtype in ("fp16", "bf16"):
        a, b = _both(lambda o, be, dt=dtype: cndiff.extract(control, base, o, dtype=dt,
                                                            backend=be),
                     tmp_path, f"{dtype}.safetensors")  # fmt: skip
        assert a == b


def _float64_pair(tmp_path, control_wide: bool, other: torch.dtype):
    """A tiny pair where one side is float64 and the other ``other``."""
    arch = synthetic.tiny()
    c = synthetic.control_state_dict(arch)
    b = synthetic.base_state_dict(arch)
    c = {k: v.to(torch.float64 if control_wide else other) if v.is_floating_point() else v
         for k, v in c.items() if k.startswith("control_model.")}  # fmt: skip
    b = {k: v.to(other if control_wide else torch.float64) if v.is_floating_point() else v
         for k, v in b.items() if k.startswith("model.diffusion_model.")}  # fmt: skip
    cp, bp = tmp_path / "c64.safetensors", tmp_path / "b64.safetensors"
    save_file(c, str(cp))
    save_file(b, str(bp))
    return cp, bp


@pytest.mark.parametrize("control_wide", [True, False], ids=["f64 control", "f64 base"])
@pytest.mark.parametrize("other", [torch.bfloat16, torch.float16, torch.float32])
def test_float64_against_narrow_inputs(tmp_path, control_wide, other):
    cp, bp = _float64_pair(tmp_path, control_wide, other)
    a, b = _both(lambda o, be: cndiff.extract(cp, bp, o, dtype="fp16", backend=be), tmp_path,
                 "x.safetensors")  # fmt: skip
    assert a == b
    got = load_file(str(tmp_path / "numpy_x.safetensors"))
    c, base = load_file(str(cp)), load_file(str(bp))
    for k, v in c.items():
        bk = "model.diffusion_model." + k[len("control_model.") :]
        want = (v.double() - base[bk].double()).float().half() if bk in base else v.float().half()
        assert torch.equal(got[k].view(torch.int16), want.view(torch.int16)), k


def test_drop_unchanged_base_self_batch_apply_same_bytes(tmp_path):
    arch = synthetic.tiny()
    folder = tmp_path / "m"
    base = synthetic.make_base(folder / "base.ckpt", arch)
    controls = [synthetic.make_control(folder / f"control_{i}.pth", arch, seed=i, base_seed=0)
                for i in range(3)]  # fmt: skip
    for kw in (dict(drop_unchanged=True), dict(check_base=False)):
        outs = {}
        for be in ("numpy", "torch"):
            res = cndiff.extract_many(controls, base, tmp_path / be / "batch", backend=be, **kw,
                                      overwrite=True)  # fmt: skip
            outs[be] = [r.output.read_bytes() for r in res]
        assert outs["numpy"] == outs["torch"]
    a, b = _both(lambda o, be: cndiff.extract(controls[0], "self", o, backend=be), tmp_path,
                 "self.safetensors")  # fmt: skip
    assert a == b
    diff = cndiff.extract(controls[0], base, tmp_path / "d.safetensors")
    a, b = _both(lambda o, be: cndiff.apply_diff(diff.output, base, o, backend=be), tmp_path,
                 "applied.safetensors")  # fmt: skip
    assert a == b


@needs_native
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_verify_figures_are_the_same_with_and_without_native_kernels(
    pair_factory, tmp_path, monkeypatch, dtype
):
    import cndiff.backends.numpy_backend as nb

    control, base = pair_factory(base_dtype=torch.float16, base_fmt="safetensors")
    d = cndiff.extract(control, base, tmp_path / "d.safetensors", dtype=dtype)
    t = load_file(str(d.output))
    k = "control_model.input_blocks.4.1.proj_in.weight"
    t[k].view(-1)[5] += 1e-2  # one element far off: a failing key
    bad = tmp_path / "bad.safetensors"
    save_file(t, str(bad))
    other = synthetic.make_base(tmp_path / "o.ckpt", synthetic.tiny(), seed=4)
    runs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(nb, "native_kernels", None)
        runs.append([cndiff.verify(p, control, b, check_base=False).to_dict()
                     for p, b in ((d.output, base), (bad, base), (d.output, other))])  # fmt: skip
    assert runs[0] == runs[1]
    assert runs[0][0]["passed"] and runs[0][1]["failing"] == [k] and not runs[0][2]["passed"]


def test_parallel_map_hands_out_ahead_items_behind_a_long_one():
    """With ``ahead`` large, later items run while an early one still works (the
    Control-LoRA export's big layers), and the results still come in order; an error
    is raised at its item's turn."""
    import threading

    from cndiff.engine import parallel_map

    sixth_started = threading.Event()

    def fn(i: int) -> int:
        if i == 5:
            sixth_started.set()
        if i == 0 and not sixth_started.wait(timeout=20):
            raise TimeoutError("item 5 never started while item 0 ran")
        if i == 9:
            raise ValueError("nine")
        return i * i

    got = []
    with pytest.raises(ValueError, match="nine"):
        for r in parallel_map(fn, list(range(12)), 2, ahead=8):
            got.append(r)
    assert got == [i * i for i in range(9)]


def test_a_lent_output_buffer_is_not_reused_until_it_is_given_back(tmp_path):
    """The scheduler's output buffers may be lent (a writer keeps one instead of copying
    it): while lent, no other chunk is computed into it; given back, it is used again."""
    from safetensors.numpy import save_file

    from cndiff import open_checkpoint
    from cndiff.engine import Stream, run_streams
    from cndiff.plan import PlanItem

    rng = np.random.default_rng(3)
    tensors = {f"t{i}": rng.standard_normal(5000 + 37 * i).astype(np.float32) for i in range(12)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    items = [PlanItem(k, k, None, v.shape) for k, v in tensors.items()]
    held: list[tuple[np.ndarray, object]] = []  # (the bytes as delivered, the buffer)
    seen: list[bytes] = []
    back: list = []

    def kernel(ch):
        out = ch.out[: ch.count * 4].view(np.float32)
        out[:] = ch.c.data
        return out

    def sink(item, out, ch):
        for _, buf in held:  # never a buffer still lent
            assert not np.shares_memory(buf, out)
        seen.append(out.tobytes())
        release = ch.lend_out()
        assert release is not None
        held.append((out.copy(), out))
        back.append(release)
        if len(back) == 5:  # give the oldest back: it may be used again
            back.pop(0)()
            old, buf = held.pop(0)
            assert np.array_equal(buf, old)  # untouched while lent

    with open_checkpoint(path) as ck:
        stream = Stream(items, ck, kernel, sink=sink)
        run_streams([stream], NumpyBackend(native=False), chunk=2048, workers=2)
    want = [v[s : s + 2048].tobytes() for v in tensors.values() for s in range(0, v.size, 2048)]
    assert seen == want
    for old, buf in held:
        assert np.array_equal(buf, old)
