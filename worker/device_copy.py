"""Host values onto the device without making the host wait for the GPU.

A copy from pageable host memory (`torch.tensor(values).to("cuda")`, with non_blocking=True
too) makes the host wait until every kernel already queued on the stream has finished:
under async scheduling that is the whole forward of the step in flight, so the GPU then
idles while the host schedules the next step. Staged through pinned memory, the copy is
queued behind the forward like a kernel and the host runs on; torch's caching host
allocator keeps the pinned block until the copy's stream event has completed.
"""

from __future__ import annotations

import torch


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (on the host) on `device`, without a host sync when `device` is a GPU."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def host_tensor(values: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host values (lists, numpy arrays) on `device`, without a host sync."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)
