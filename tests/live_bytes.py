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
    storages that existed before the region count nothing (an in-place op's output is its
    input), and freeing them counts nothing.
    The mode's own bookkeeping is Python objects, not tensors: it does not count itself."""

    def __init__(self, device_type="cpu"):
        super().__init__()
        self.device_type = device_type
        self.storages = {}            # data_ptr -> (weak reference, bytes, serial number)
        self.now = self.peak = 0
        self.events = []              # (serial, +bytes made | -bytes freed), in order, for peak_without

    def peak_without(self, tensors):
        """The peak had the storages of `tensors` (say, the parameters' .grad that backward
        made, which a plan counts as standing memory) never been counted."""
        live = [self.storages.get(t.untyped_storage().data_ptr()) for t in tensors]
        skip = {entry[2] for entry in live if entry is not None}      # (an address can be reused)
        now = peak = 0
        for serial, delta in self.events:
            if serial not in skip:
                now += delta
                peak = max(peak, now)
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # an in-place op returns its input, a view op a view of it: neither makes a storage
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _, _) in self.storages.items() if ref.expired()]:
            _, freed, serial = self.storages.pop(key)
            self.now -= freed
            self.events.append((serial, -freed))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                storage = t.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in self.storages and storage.data_ptr() not in inputs:
                    serial = len(self.events)
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes(), serial)
                    self.now += storage.nbytes()
                    self.events.append((serial, storage.nbytes()))
        self.peak = max(self.peak, self.now)
        return out
