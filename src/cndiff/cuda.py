"""The CUDA backend of :mod:`cndiff.engine` (imported only for ``device="cuda"``).

Each chunk in flight owns pinned host buffers and a CUDA stream: a worker thread reads
the control and base chunk from disk straight into pinned memory, copies them to the GPU
without blocking, subtracts and casts there, and copies the result back into pinned
memory; the caller's thread writes it out. With several workers, reading, transfers and
compute of different chunks overlap, and GPU memory stays bounded by the chunks in flight.
"""

from __future__ import annotations

import torch

from .dtypes import F32, F64
from .engine import _read, _Slot, _Task

__all__ = ["CudaCompute"]


class _CudaSlot(_Slot):
    def __init__(self, chunk: int, device: torch.device) -> None:
        self.chunk = chunk
        self.c_pin = torch.empty(chunk * 8, dtype=torch.uint8, pin_memory=True)
        self.b_pin = torch.empty(chunk * 8, dtype=torch.uint8, pin_memory=True)
        self.o_pin = torch.empty(chunk * 4, dtype=torch.uint8, pin_memory=True)
        self.c_raw = self.c_pin.numpy()
        self.b_raw = self.b_pin.numpy()
        self.out_raw = self.o_pin.numpy()
        self.stream = torch.cuda.Stream(device)
        self.result = None
        self.max_abs = 0.0


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
        s, item, n = task.stream, task.item, task.count
        out_dt = s.out_dtype
        cinfo = s.control.info(item.control_key)
        _read(s.control, item.control_key, slot.c_raw, task.start, n)
        c_host = slot.c_pin[: n * cinfo.itemsize].view(cinfo.dtype.to_torch())
        out_t = out_dt.to_torch()
        o_host = slot.o_pin[: n * out_dt.itemsize].view(out_t)
        m = None
        with torch.cuda.device(self.device), torch.cuda.stream(slot.stream):
            c = c_host.to(self.device, non_blocking=True)
            if item.base_key is None:
                d = c
            else:
                assert s.base is not None
                binfo = s.base.info(item.base_key)
                _read(s.base, item.base_key, slot.b_raw, task.start, n)
                b_host = slot.b_pin[: n * binfo.itemsize].view(binfo.dtype.to_torch())
                b = b_host.to(self.device, non_blocking=True)
                if cinfo.dtype is F64 or binfo.dtype is F64:
                    d = (c.double() - b.double()).float()
                else:
                    d = c.float() - b.float()
                m = torch.linalg.vector_norm(d, float("inf"))
            if out_dt is F32 and d.dtype == torch.float64:
                d = d.float()
            o_host.copy_(d.to(out_t), non_blocking=True)
            max_host = m.to("cpu", non_blocking=True) if m is not None else None
        slot.stream.synchronize()
        slot.max_abs = float(max_host) if max_host is not None else 0.0
        slot.result = slot.out_raw[: n * out_dt.itemsize].view(out_dt.numpy)
        return slot
