"""
The threads of the offload pipeline (offload.OffloadedRows): a Lane runs functions in order
on a thread of its own (a one-thread concurrent.futures executor), a CopyQueue orders host
<-> device copies (a side CUDA stream, or a Lane standing in for the copy engine without
CUDA, with the same events), and pin() page-locks exactly the host memory that copies read
or write.
"""

import functools
import itertools
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def wait(event):
    """Block until a copy queue's mark is reached: a CUDA event, or a Lane's future (whose
    error, if its job failed, is raised here)."""
    if isinstance(event, Future):
        event.result()
    else:
        event.synchronize()


class Lane:
    """Functions run one after another on a thread of their own (torch releases the GIL in
    its kernels, so they overlap the training thread). delay=(seed, max_seconds) sleeps a
    seeded random time before each function: tests use it to shake out missing waits.
    busy: the seconds spent running functions. The first error of any function is kept and
    raised by every later submit(): a failed copy never passes unnoticed."""

    numbers = itertools.count()

    def __init__(self, name, delay=None):
        self.name = f"{name} {next(Lane.numbers)}"      # its thread's name
        # OpenMP keeps its thread count per calling thread and a new thread does not get the
        # training thread's: without it the lane's torch work (the CPU's copies) runs slower
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=self.name, initializer=torch.set_num_threads,
                                           initargs=(torch.get_num_threads(),))
        self.rng, self.max_delay = (random.Random(delay[0]), delay[1]) if delay else (None, 0.0)
        self.busy, self.error = 0.0, None

    def submit(self, fn):
        """Queue fn; returns its future."""
        if self.error is not None:
            raise self.error
        return self.executor.submit(self._run, fn)

    def _run(self, fn):
        if self.rng is not None:
            time.sleep(self.rng.uniform(0, self.max_delay))
        start = time.perf_counter()
        try:
            return fn()
        except BaseException as e:          # raised where the job's result is read, and by later submits
            self.error = self.error or e
            raise
        finally:
            self.busy += time.perf_counter() - start

    def close(self):
        """The thread ends once the jobs queued have run."""
        self.executor.shutdown(wait=False)


class CopyQueue:
    """Host <-> device copies in the order they are queued: a side CUDA stream, or without
    CUDA a Lane standing in for the copy engine (same order, same events). run(fn, nbytes)
    queues the copies fn makes; mark() returns an event reached once they are done.
    copy_rate (bytes/s, CPU only, for simulate.py): the stand-in does not copy but takes
    nbytes / copy_rate, as a DMA engine would, leaving this machine's cores to the worker;
    `log` then lists what was queued, in order: nbytes of each run, ("mark", event) for
    each mark, ("wait", event) for each wait for another queue's mark."""

    def __init__(self, device, delay=None, copy_rate=None):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.lane = Lane("table copies", delay) if self.stream is None else None
        self.copy_rate, self.log = copy_rate, []

    def run(self, fn, nbytes):
        if self.lane is not None:
            if self.copy_rate is not None:
                self.log.append(nbytes)
                fn = functools.partial(time.sleep, nbytes / self.copy_rate)
            self.lane.submit(fn)
            return
        with torch.cuda.stream(self.stream):
            fn()

    def wait_for(self, event):
        """Later copies start once event is reached: the compute queued before a CUDA event
        (on the CPU None: the training thread's compute has already run), or another copy
        queue's mark."""
        if event is None:
            return
        if self.lane is not None:
            self.lane.submit(functools.partial(wait, event))
            if self.copy_rate is not None:
                self.log.append(("wait", event))
        else:
            self.stream.wait_event(event)

    def _reached(self):
        """A mark's job: fails if a copy before it failed, so the batch waiting for the
        mark learns of it."""
        if self.lane.error is not None:
            raise self.lane.error

    def mark(self):
        if self.lane is not None:
            done = self.lane.submit(self._reached)
            if self.copy_rate is not None:
                self.log.append(("mark", done))
            return done
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


def pin(tensors):
    """Page-lock exactly these host tensors (cudaHostRegister: pin_memory() would round a big
    request up to a power of two). Returns a function that releases the registration."""
    registered = []

    def unpin():
        for t in registered:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    for t in tensors:
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(err) != 0:
            unpin()                 # leave nothing registered behind the error
            raise RuntimeError(f"cudaHostRegister failed ({err}) for {t.numel() * t.element_size() / 2**30:.2f} GiB")
        registered.append(t)
    return unpin
