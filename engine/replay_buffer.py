"""A tensor ring buffer of finished synthetic images on the training device (SPEC §4), not PNG files.

Images are stored as uint8 at the teacher's resolution (what a PNG would keep, 4x less memory than float),
with the teacher's logits at synthesis, the soft target labels (CutMix keeps two classes) and the sample seeds.
Each slot also counts how often it has been drawn (``draws``): the exposure an image got, which ``sample`` can
balance and ``exposure`` reports.
"""

from __future__ import annotations

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, image_shape: tuple[int, int, int], num_classes: int, device="cpu"):
        self.capacity = capacity
        self.images = torch.zeros((capacity, *image_shape), dtype=torch.uint8, device=device)  # (N, C, H, W)
        self.logits = torch.zeros((capacity, num_classes), device=device)
        self.targets = torch.zeros((capacity, num_classes), device=device)
        self.seeds = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.draws = torch.zeros((capacity,), dtype=torch.long, device=device)  # times each slot was drawn
        self.size = 0  # filled slots (host-side counters: no device sync to know the fill)
        self.cursor = 0  # next slot to write
        self.total_added = 0

    def __len__(self) -> int:
        return self.size

    def add(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, seeds: torch.Tensor) -> None:
        """Append a batch (images in [0, 1]); the oldest entries are overwritten once full. The slots are contiguous
        ranges (two where the ring wraps), so no index tensor is built or copied to the device."""
        n = len(images)
        if n > self.capacity:
            raise ValueError(f"a batch of {n} does not fit a replay buffer of {self.capacity}")
        pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
        head = min(n, self.capacity - self.cursor)
        parts = ((slice(self.cursor, self.cursor + head), slice(0, head)), (slice(0, n - head), slice(head, n)))
        for dst, src in parts:
            if src.stop > src.start:
                self.images[dst] = pixels[src]
                self.logits[dst] = logits[src].detach().float()
                self.targets[dst] = targets[src].detach().float()
                self.seeds[dst] = seeds[src].to(self.seeds.device, non_blocking=True)
                self.draws[dst] = 0
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.total_added += n

    def sample(self, batch_size: int, generator: torch.Generator | None = None, balance: float = 0.0):
        """A random batch: (images float [0, 1], cached teacher logits, soft targets). The indices are drawn on the
        buffer's device (``generator`` lives there), so nothing is copied over from the host.

        Uniform when ``balance`` is 0. Otherwise slot i is drawn with probability ∝ (1 + draws_i)^−balance, so
        images seen less (the newest, in a growing buffer) are drawn more and exposure evens out; the larger the
        exponent, the closer to least-drawn-first (an inverse-CDF draw on the device: no host sync)."""
        if self.size == 0:
            raise RuntimeError("the replay buffer is empty")
        device = self.images.device
        if balance:
            cdf = (1.0 + self.draws[: self.size].double()).pow(-balance).cumsum(0)
            u = torch.rand((batch_size,), generator=generator, device=device, dtype=torch.float64) * cdf[-1]
            idx = torch.searchsorted(cdf, u, right=True).clamp_max(self.size - 1)
        else:
            idx = torch.randint(0, self.size, (batch_size,), generator=generator, device=device)
        self.draws.index_add_(0, idx, torch.ones_like(idx))
        return self.images[idx].float() / 255.0, self.logits[idx], self.targets[idx]

    def exposure(self, parts: int = 10) -> dict:
        """How often the stored images were drawn, oldest first, in ``parts`` equal groups by arrival (a host read:
        for the summary, not the loop): mean draws per group, and the min / mean / max over every image."""
        draws = self.draws[self._order()].double().cpu()
        if len(draws) == 0:
            return {}
        groups = [g.mean().item() for g in torch.tensor_split(draws, min(parts, len(draws)))]
        return {"mean_draws_by_arrival": [round(g, 2) for g in groups], "min": int(draws.min()),
                "mean": round(draws.mean().item(), 2), "max": int(draws.max())}

    def _order(self) -> torch.Tensor:
        """Slot indices, oldest entry first (once full, the oldest entry is at the cursor)."""
        start = 0 if self.size < self.capacity else self.cursor
        return ((start + torch.arange(self.size)) % self.capacity).to(self.images.device)

    def contents(self):
        """Everything stored, oldest first: (images float, logits, targets, seeds)."""
        order = self._order()
        return self.images[order].float() / 255.0, self.logits[order], self.targets[order], self.seeds[order]

    def state_dict(self) -> dict:
        return {"images": self.images[: self.size].cpu(), "logits": self.logits[: self.size].cpu(),
                "targets": self.targets[: self.size].cpu(), "seeds": self.seeds[: self.size].cpu(),
                "draws": self.draws[: self.size].cpu(), "cursor": self.cursor, "total_added": self.total_added}

    @classmethod
    def from_state_dicts(cls, states: list[dict], num_classes: int) -> ReplayBuffer:
        """One CPU buffer holding the contents of several (e.g. every process's), in order."""
        total = sum(len(s["images"]) for s in states)
        merged = cls(max(total, 1), tuple(states[0]["images"].shape[1:]), num_classes)
        for s in states:
            if len(s["images"]):
                merged.add(s["images"].float() / 255, s["logits"], s["targets"], s["seeds"])
        return merged

    def load_state_dict(self, state: dict) -> None:
        n = len(state["images"])
        self.images[:n] = state["images"].to(self.images.device)
        self.logits[:n] = state["logits"].to(self.logits.device)
        self.targets[:n] = state["targets"].to(self.targets.device)
        self.seeds[:n] = state["seeds"].to(self.seeds.device)
        if "draws" in state:  # checkpoints from before the draw counts: zero
            self.draws[:n] = state["draws"].to(self.draws.device)
        self.size, self.cursor, self.total_added = n, state["cursor"], state["total_added"]
