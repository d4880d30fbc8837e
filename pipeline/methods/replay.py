"""A pool of past generated images that D is shown again: CycleGAN's image history (Shrivastava
et al. 2017; Zhu et al. 2017) and ganhacks' experience replay, one mechanism.

Until the pool holds `size` images, each new image is kept and shown. After, each new image is
replaced with probability `probability` by a random kept one (which the new image replaces in the
pool), else shown as it is. A class-conditional D gets each replayed image's own label with it.
Draws come from the pool's own generator; its contents and that generator's state are
checkpointed, so a resumed run sees the same history.
"""

from __future__ import annotations

from typing import cast

import torch


class ImageHistory:
    def __init__(self, size: int, seed: int, probability: float = 0.5):
        self.size, self.probability = size, probability
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor | None] = []
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, batch: torch.Tensor, labels: torch.Tensor | None = None):
        """The batch to show D (and its labels, when given)."""
        if self.size == 0:
            return batch if labels is None else (batch, labels)
        if self.images and self.images[0].device != batch.device:  # restored from a checkpoint on the CPU
            self.images = [t.to(batch.device) for t in self.images]
            self.labels = [None if t is None else t.to(batch.device) for t in self.labels]
        out: list[torch.Tensor] = []
        out_labels: list[torch.Tensor | None] = []
        for j, image in enumerate(batch.detach()):
            label = None if labels is None else labels[j]
            if len(self.images) < self.size:
                self.images.append(image.clone())
                self.labels.append(label)
                out.append(image)
                out_labels.append(label)
            elif torch.rand((), generator=self.rng) < self.probability:
                i = int(torch.randint(0, self.size, (), generator=self.rng))
                out.append(self.images[i])
                out_labels.append(self.labels[i])
                self.images[i], self.labels[i] = image.clone(), label
            else:
                out.append(image)
                out_labels.append(label)
        images = torch.stack(out)
        if labels is None:
            return images
        # a labelled pool: every kept label is a tensor
        return images, torch.stack(cast(list[torch.Tensor], out_labels))

    def state_dict(self) -> dict:
        state = {"images": [t.cpu() for t in self.images], "rng": self.rng.get_state()}
        if any(t is not None for t in self.labels):
            state["labels"] = [t.cpu() for t in cast(list[torch.Tensor], self.labels)]  # labelled: all tensors
        return state

    def load_state_dict(self, state: dict) -> None:
        self.images = list(state["images"])
        self.labels = list(state.get("labels", [None] * len(self.images)))
        self.rng.set_state(state["rng"])
