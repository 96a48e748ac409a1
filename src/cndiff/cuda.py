"""The CUDA backend of :mod:`cndiff.engine` (imported only for ``device="cuda"``).

Each chunk in flight owns pinned host buffers and a CUDA stream: a worker thread reads
the control and base chunk from disk straight into pinned memory, copies them to the GPU
without blocking, subtracts and casts there, and copies the result back into pinned
memory; the caller's thread writes it out. With several workers, reading, transfers and
compute of different chunks overlap, and GPU memory stays bounded by the chunks in flight.
In a batch, a base chunk is read and sent to the GPU once for all control files.
"""

from __future__ import annotations

import torch

from .engine import _compare_embedded, _read, _Slot, _Task
from .errors import CndiffError

__all__ = ["CudaCompute"]


def _pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class _CudaSlot(_Slot):
    def __init__(self, chunk: int, device: torch.device) -> None:
        self.chunk = chunk
        self.c_pin = _pinned(chunk * 8)
        self.b_pin = _pinned(chunk * 8)
        self.c_raw = self.c_pin.numpy()
        self.b_raw = self.b_pin.numpy()
        self.e_raw = _pinned(chunk * 8).numpy()
        self.matches = []
        self.o_pins: list[torch.Tensor] = []
        self.outs = []
        self.results = []
        self.max_abs = []
        self.stream = torch.cuda.Stream(device)

    def out(self, j: int):
        while len(self.o_pins) <= j:
            self.o_pins.append(_pinned(self.chunk * 4))
            self.outs.append(self.o_pins[-1].numpy())
        return self.outs[j]


class CudaCompute:
    """Callable ``(slot, task) -> slot`` computing one chunk on a CUDA device."""

    def __init__(self, device: str, chunk: int) -> None:
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.chunk = chunk

    def make_slot(self) -> _CudaSlot:
        return _CudaSlot(self.chunk, self.device)

    def __call__(self, slot: _Slot, task: _Task) -> _Slot:
        assert isinstance(slot, _CudaSlot)
        n = task.count
        slot.results = []
        slot.max_abs = []
        slot.matches = []
        maxes: list[torch.Tensor | None] = []
        with torch.cuda.device(self.device), torch.cuda.stream(slot.stream):
            b = None
            braw = None
            first_stream, first_item = task.members[0]
            if first_item.base_key is not None:
                assert first_stream.base is not None
                binfo = first_stream.base.info(first_item.base_key)
                braw = _read(first_stream.base, first_item.base_key, slot.b_raw, task.start, n)
                b_host = slot.b_pin[: n * binfo.itemsize].view(binfo.dtype.to_torch())
                b = b_host.to(self.device, non_blocking=True)
            for j, (s, item) in enumerate(task.members):
                try:
                    cinfo = s.control.info(item.control_key)
                    # the pinned read buffer is reused: wait until the last copy left it
                    slot.stream.synchronize()
                    _read(s.control, item.control_key, slot.c_raw, task.start, n)
                    match = None
                    if s.embedded_prefix is not None and braw is not None:
                        match = _compare_embedded(slot, s, item, braw, task)
                except (CndiffError, OSError) as exc:
                    if len(task.members) == 1:
                        raise
                    slot.results.append(exc)
                    slot.matches.append(None)
                    maxes.append(None)
                    continue
                slot.matches.append(match)
                c_host = slot.c_pin[: n * cinfo.itemsize].view(cinfo.dtype.to_torch())
                c = c_host.to(self.device, non_blocking=True)
                m = None
                if b is None:
                    d = c.float() if c.dtype == torch.float64 else c
                elif c.dtype == torch.float64 or b.dtype == torch.float64:
                    d = c.double() - b.double() if s.op == "sub" else c.double() + b.double()
                    d = d.float()
                elif s.op == "sub":
                    d = c.float() - b.float()
                else:
                    d = c.float() + b.float()
                if b is not None and s.op == "sub":
                    m = torch.linalg.vector_norm(d, float("inf"))
                out_dt = s.out_dtype
                raw = slot.out(j)
                o_host = slot.o_pins[j][: n * out_dt.itemsize].view(out_dt.to_torch())
                o_host.copy_(d.to(out_dt.to_torch()), non_blocking=True)
                slot.results.append(raw[: n * out_dt.itemsize].view(out_dt.numpy))
                maxes.append(m)
        slot.stream.synchronize()
        slot.max_abs = [float(m.item()) if m is not None else 0.0 for m in maxes]
        return slot
