"""Two CUDA streams, generation and training, ordered by events instead of device-wide synchronisation.

The one true dependency between them (SPEC §4) is the student's weights: the trainer writes them, the generator
reads them for L_adv. We double-buffer: the generator owns a *snapshot* of the student. Once per tick
    gen stream:   wait(trained) -> copy student weights into the snapshot -> record(snapshotted)
    train stream: wait(snapshotted) -> optimizer steps (overwrite the weights) -> record(trained)
so the adversarial term of tick n+1 sees exactly the weights written by the updates of tick n, the optimizer
never overwrites weights the copy is still reading, and the UNet work of tick n+1 overlaps the student steps.
The replay buffer is ordered the same way: the trainer waits for the generator's writes (``generated``).
On CPU (or with ``--no-streams``) every method is a no-op and the same loop runs in program order.
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
            self.events = {name: torch.cuda.Event() for name in ("trained", "snapshotted", "generated")}

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
