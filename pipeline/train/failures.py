"""Failure tracking (ganhacks tip 10, "track failures early"): detectors over the logged lines.

Each logged interval, `FailureTracker.check(record)` looks at the means of that interval and
returns the failures that fired, each with the step at which its symptom began:

- `d_loss_zero`: a D loss (`loss_d*`) at or below `d_loss_below` for `intervals` lines in a row
  (losses bounded below by 0 only: not under wgan_gp, whose critic loss is unbounded);
- `grad_norm`: a gradient norm (`grad_norm_*`) above `grad_norm_above` (the tip: "if they are over
  100 things are screwing up");
- `g_fooling`: D's mean logit on the fakes above its mean on the real images for `intervals` lines
  in a row while G's loss falls ("if loss of generator steadily decreases, then it's fooling D with
  garbage"; a falling G loss alone is no symptom: under the hinge loss it is D's fake logit rising,
  which healthy training shows early on);
- `diversity`: the mean pairwise distance between G's images of a fixed latent batch (pixel space,
  2x2-pooled) below `diversity_below` x its value at the first check (mode collapse).

What the run does about it (`train.failures.on_failure`) is the loop's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Failure:
    detector: str
    message: str
    since_step: int  # the first logged step showing the symptom


@dataclass
class FailureTracker:
    settings: object  # FailureSpec
    bounded_d_loss: bool  # the D losses are bounded below by 0
    history: list[dict] = field(default_factory=list)
    diversity_start: float | None = None

    def check(self, record: dict, diversity: float | None = None) -> list[Failure]:
        s, step = self.settings, record["step"]
        self.history = [*self.history, record][-(s.intervals + 1) :]
        found = []
        window = self.history[-s.intervals :]
        if self.bounded_d_loss and len(window) == s.intervals:
            for key in sorted(k for k in record if k.startswith("loss_d")):
                if all(key in r and r[key] <= s.d_loss_below for r in window):
                    found.append(
                        Failure(
                            "d_loss_zero",
                            f"{key} at or below {s.d_loss_below} for {s.intervals} logged intervals "
                            f"(now {record[key]:.3g}): D wins outright and G gets no gradient",
                            window[0]["step"],
                        )
                    )
        for key in sorted(k for k in record if k.startswith("grad_norm_")):
            if record[key] > s.grad_norm_above:
                found.append(Failure("grad_norm", f"{key} is {record[key]:.3g}, above {s.grad_norm_above}", step))
        logits = len(window) == s.intervals and all("d_fake" in r and "d_real" in r for r in window)
        fooled = logits and all(r["d_fake"] > r["d_real"] for r in window)
        if s.g_fooling and fooled and window[-1].get("loss_g", 0) < window[0].get("loss_g", 0):
            found.append(
                Failure(
                    "g_fooling",
                    f"D scored the fakes above the real images for {s.intervals} logged intervals while G's "
                    f"loss fell (d_fake {record['d_fake']:.3g}, d_real {record['d_real']:.3g}): G is fooling "
                    "a failing D",
                    window[0]["step"],
                )
            )
        if diversity is not None and s.diversity_below > 0:
            if self.diversity_start is None:
                self.diversity_start = diversity
            elif diversity < s.diversity_below * self.diversity_start:
                found.append(
                    Failure(
                        "diversity",
                        f"the samples of a fixed latent batch are {diversity / self.diversity_start:.0%} as "
                        f"different from each other as at the first check (mode collapse)",
                        step,
                    )
                )
        return found

    def reset(self) -> None:
        """After a rollback: windows start again (the diversity reference is kept)."""
        self.history = []


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the images of a batch, after 2x2 average pooling."""
    x = images.float()
    if x.shape[-1] > 1:
        x = F.avg_pool2d(x, 2)
    x = x.flatten(1)
    d = torch.cdist(x, x)
    n = x.shape[0]
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0
