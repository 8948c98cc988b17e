"""Two CUDA streams, generation and training, ordered by events instead of device-wide synchronisation.

Two things are shared between them (SPEC §4), and events order exactly those two:

* the student's weights: the trainer writes them, the generator reads them for L_adv. The generator owns a
  *snapshot*, written by the train stream at the end of tick n−1 and read by the gen stream in tick n;
* the replay buffer: the generator's finished images of tick n−1 are written into it on the train stream at the
  start of tick n, so the trainer of tick n reads the buffer as of tick n−1 and the generator never writes it.

Per tick n (engine/loop.py, 4a-4c)::

    train:  wait(generated) -> buffer.add(finished in n−1)              (``generated`` still holds tick n−1's record)
    gen:    wait(snapshotted) -> one step for every sample in flight -> record(generated)
    train:  student steps (overlap the gen stream's work) -> wait(generated) -> snapshot ← student
            -> record(snapshotted)

so the adversarial term of tick n sees the weights written by the updates of tick n−1, the snapshot is never
overwritten while the generator still reads it, and the UNet work of tick n runs beside the student steps of tick
n. Tensors made on one stream and consumed on the other are handed over (``record_stream``) so the caching
allocator does not reuse their memory early. On CPU (or with ``--no-streams``) every method is a no-op and the same
loop runs in program order.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class StreamPair:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled and device.type == "cuda"
        if self.enabled:
            self.gen = torch.cuda.Stream(device)
            self.train = torch.cuda.Stream(device)
            self.events = {name: torch.cuda.Event() for name in ("snapshotted", "generated")}

    def begin(self) -> None:
        """Both streams wait for the work queued so far on the current stream (set-up, restored checkpoint)."""
        if self.enabled:
            current = torch.cuda.current_stream()
            self.gen.wait_stream(current)
            self.train.wait_stream(current)

    def hand_over(self, *tensors: torch.Tensor, to: str) -> None:
        """Tensors made on the other stream are used on ``to`` from now: keep their memory until it is done."""
        if self.enabled:
            for t in tensors:
                t.record_stream(getattr(self, to))

    def on(self, which: str):
        """Context that runs the enclosed kernels on the ``gen`` or ``train`` stream."""
        return torch.cuda.stream(getattr(self, which)) if self.enabled else contextlib.nullcontext()

    def record(self, event: str, which: str) -> None:
        if self.enabled:
            self.events[event].record(getattr(self, which))

    def wait(self, which: str, event: str) -> None:
        if self.enabled:
            getattr(self, which).wait_event(self.events[event])

    def join(self) -> None:
        """Make the default stream wait for both (before host reads at log/checkpoint points)."""
        if self.enabled:
            current = torch.cuda.current_stream()
            current.wait_stream(self.gen)
            current.wait_stream(self.train)


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module) -> None:
    """Copy parameters and buffers (BN running stats) of ``source`` into the same-shaped ``target``."""
    torch._foreach_copy_(list(target.parameters()), list(source.parameters()))
    for t, s in zip(target.buffers(), source.buffers()):
        t.copy_(s)
