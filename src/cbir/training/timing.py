"""How long a training will take, from a few measured pieces, and what to change to shorten it.

:func:`estimate` extrapolates measured costs to the whole run::

    per epoch  = steps × t_step + mined images × t_embed + (validation pass if due that epoch)
    steps      = min(queries_per_epoch, queries) // (batch_tuples × processes)
    total      = Σ over the epochs still to run

``t_step`` is the time of one real training step (forward and backward of ``batch_tuples`` tuples
of ``2 + negatives`` images at ``data.imsize``), ``t_embed`` the time to describe one image for
mining, and the validation pass is timed as it runs (epoch 0) or scaled from ``t_embed``. The
trainer measures them (``cbir.training.trainer``) and prints :meth:`TimeEstimate.text`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["TimeEstimate", "estimate", "format_seconds"]


def format_seconds(s: float) -> str:
    """12 s, 4.5 min, 2.3 h."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


@dataclass
class TimeEstimate:
    """Seconds for the epochs still to run, and the measured pieces they are made of."""

    total_s: float
    epochs: int
    steps_per_epoch: int
    step_s: float
    mining_images: int
    embed_s: float
    validation_s: float
    validations: int
    validation_measured: bool

    @property
    def train_s(self) -> float:
        return self.epochs * self.steps_per_epoch * self.step_s

    @property
    def mining_s(self) -> float:
        return self.epochs * self.mining_images * self.embed_s

    @property
    def all_validation_s(self) -> float:
        return self.validations * self.validation_s

    def to_dict(self) -> dict:
        return {**asdict(self), "train_s": self.train_s, "mining_s": self.mining_s,
                "all_validation_s": self.all_validation_s}

    def text(self, cfg) -> str:
        """Two lines: the estimate with its parts, and the config keys that shorten it (``cfg``: a TrainConfig)."""
        val = (f" + {self.validations} validation passes × {format_seconds(self.validation_s)}"
               f"{'' if self.validation_measured else ' (scaled from the mining speed)'}") if self.validations else ""
        head = (f"estimated time: {format_seconds(self.total_s)} = {self.epochs} epochs × ({self.steps_per_epoch} steps "
                f"× {self.step_s:.2f} s + mining {self.mining_images} photos × {self.embed_s:.3f} s){val} "
                f"[training {_share(self.train_s, self.total_s)}, mining {_share(self.mining_s, self.total_s)}, "
                f"validation {_share(self.all_validation_s, self.total_s)}; measured on this machine, now]")
        m, o, d = cfg.mining, cfg.optim, cfg.data
        tips = [f"optim.epochs={o.epochs} (time ∝ epochs)",
                f"mining.queries_per_epoch={m.queries_per_epoch} (tuples per epoch: time ∝ tuples)",
                f"data.imsize={d.imsize} (time ∝ pixels: 256 takes half of 362)",
                f"mining.negatives={m.negatives} (images per tuple = 2 + negatives)"]
        if cfg.validation is not None:
            tips.append(f"validation.every={cfg.validation.every} / validation.imsize={cfg.validation.imsize}")
        return head + "\nto shorten it, lower: " + "; ".join(tips)


def _share(part: float, total: float) -> str:
    return f"{100.0 * part / total:.0f} %" if total > 0 else "0 %"


def estimate(*, epochs: int, steps_per_epoch: int, step_s: float, mining_images: int, embed_s: float,
             validation_s: float = 0.0, every: int | None = None, validation_measured: bool = True) -> TimeEstimate:
    """The run's time from its measured pieces (module docstring). ``every``: validate every ``every``
    epochs (None: no validation); the epoch-0 validation, already done when measured, is not counted."""
    if epochs < 0 or steps_per_epoch < 0 or mining_images < 0:
        raise ValueError("epochs, steps and images must be >= 0")
    validations = 0 if every is None else epochs // max(1, int(every))
    total = epochs * (steps_per_epoch * step_s + mining_images * embed_s) + validations * validation_s
    return TimeEstimate(total_s=float(total), epochs=int(epochs), steps_per_epoch=int(steps_per_epoch),
                        step_s=float(step_s), mining_images=int(mining_images), embed_s=float(embed_s),
                        validation_s=float(validation_s), validations=int(validations),
                        validation_measured=validation_measured)
