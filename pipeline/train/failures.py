"""Failure tracking (ganhacks tip 10, "track failures early"): detectors over the logged lines.

Each logged interval, `FailureTracker.check(record)` looks at the means of that interval and
returns the failures that fired, each with the step at which its symptom began:

- `d_loss_zero`: a D loss (`loss_d*`) at or below `d_loss_below` for `intervals` lines in a row
  (losses bounded below by 0 only: not under wgan_gp, whose critic loss is unbounded);
- `grad_norm`: a gradient norm (`grad_norm_*`) more than `grad_norm_change` times above, or below
  1/`grad_norm_change` of, the median of its last `NORM_WINDOW` logged values, once it has
  `grad_norm_warmup` of them: judged against the run's own history, since healthy norms differ by
  model, batch and resolution (the tip's fixed "over 100 things are screwing up" fires at step 1 of
  the demo at batch 8, and on dcgan_demo; it stays as `grad_norm_above`, off by default). Falling
  counts as much as rising: a D learning rate raised 25x mid-run killed D, whose gradient norm fell
  14x while its hinge loss sat at 2 (logits 0). The history is kept in checkpoints;
- `g_fooling`: D's mean logit on the fakes above its mean on the real images for `intervals` lines
  in a row while G's loss falls ("if loss of generator steadily decreases, then it's fooling D with
  garbage"; a falling G loss alone is no symptom: under the hinge loss it is D's fake logit rising,
  which healthy training shows early on);
- `diversity`: the mean pairwise distance between G's images of a fixed latent batch (pixel space,
  2x2-pooled) below `diversity_below` x its value at the first check (mode collapse).

What the run does about it (`train.failures.on_failure`) is the loop's business.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.spec.schema import FailureSpec


@dataclass(frozen=True)
class Failure:
    detector: str
    message: str
    since_step: int  # the first logged step showing the symptom
    key: str | None = None  # the logged value that fired, where one did (grad_norm_d: D's engine)


NORM_WINDOW = 10  # logged values of a gradient norm whose median is its reference


@dataclass
class FailureTracker:
    settings: FailureSpec
    bounded_d_loss: bool  # the D losses are bounded below by 0
    history: list[dict] = field(default_factory=list)
    diversity_start: float | None = None
    norms: dict[str, list[float]] = field(default_factory=dict)  # each gradient norm's last NORM_WINDOW values

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
            found += self._judge_norm(key, record[key], step)
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

    def _judge_norm(self, key: str, value: float, step: int) -> list[Failure]:
        """A value that fires does not join the history: a lasting symptom goes on firing instead of
        becoming the reference within a few lines."""
        s, known = self.settings, self.norms.get(key, [])
        found = []
        if s.grad_norm_above is not None and value > s.grad_norm_above:
            found = [Failure("grad_norm", f"{key} is {value:.3g}, above {s.grad_norm_above}", step, key)]
        elif s.grad_norm_change is not None and len(known) >= s.grad_norm_warmup:
            median = statistics.median(known)
            ratio = value / median if median > 0 else 1.0  # no reference in a history of zeros
            if not 1 / s.grad_norm_change <= ratio <= s.grad_norm_change:  # NaN fires too
                if math.isnan(ratio) or ratio == 0:
                    times = "against"
                else:
                    times = f"{ratio:.3g}x above" if ratio > 1 else f"{1 / ratio:.3g}x below"
                found = [
                    Failure(
                        "grad_norm",
                        f"{key} is {value:.3g}, {times} the median of its last {len(known)} logged values "
                        f"({median:.3g})",
                        step,
                        key,
                    )
                ]
        if not found and math.isfinite(value):
            self.norms[key] = [*known, value][-NORM_WINDOW:]
        return found

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the gradient norms' history (a resumed run judges against it)."""
        return {"norms": self.norms}

    def reset(self, state: dict | None = None) -> None:
        """After a rollback or a resume: the windows start again, the gradient norms' history is the
        checkpoint's (the diversity reference is kept)."""
        self.history = []
        norms = (state or {}).get("norms", {}) if isinstance(state, dict) else {}
        self.norms = {  # what is not a list of finite numbers is no history (an older or damaged state.json)
            k: [float(v) for v in values][-NORM_WINDOW:]
            for k, values in (norms.items() if isinstance(norms, dict) else [])
            if isinstance(values, list) and all(_finite(v) for v in values)
        }


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise L2 distance between the images of a batch, after 2x2 average pooling."""
    x = images.float()
    if x.shape[-1] > 1:
        x = F.avg_pool2d(x, 2)
    x = x.flatten(1)
    d = torch.cdist(x, x)
    n = x.shape[0]
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0
