"""What the memory plan counts, measured: the peak bytes of live tensor storage inside a
region of code, on the CPU (tests/test_memory.py holds the plan's working sets to it)."""

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage created inside a region, on one device type:

        with LiveBytes() as live:
            loss.backward()
        live.peak          # bytes above what was live when the region began

    Every op's outputs (backward's too) pass through here: a storage is counted from the op
    that made it until no tensor holds it (a weak reference tells, checked at every op, so
    a free is seen before the next allocation). Views of a counted storage count nothing;
    storages that existed before the region count nothing, and freeing them counts nothing.
    The mode's own bookkeeping is Python objects, not tensors: it does not count itself."""

    def __init__(self, device_type="cpu"):
        super().__init__()
        self.device_type = device_type
        self.storages = {}            # data_ptr -> (weak reference, bytes)
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.storages.items() if ref.expired()]:
            self.now -= self.storages.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in self.storages:
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out
