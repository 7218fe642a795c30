"""What ``cmd-dist evaluate`` measures of a model (a peer, or the peers' ensemble), batch by batch, on the device.

- top-1 and top-5 accuracy (top-k with k = min(5, classes));
- the mean cross-entropy against the split's labels, ``-log p_y``, from log-probabilities (a peer's log-softmax;
  the ensemble's ``log mean_k softmax_k``, computed as a logsumexp so a tiny probability never becomes ``log 0``);
- the expected calibration error (ECE) of Naeini et al. (2015) as Guo et al. (2017, "On Calibration of Modern
  Neural Networks", Sec. 2, Eq. 3) define it: the confidence max_c p_c in M = 15 equal-width bins
  B_m = ((m-1)/M, m/M], ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| (15 bins, as there);
- accuracy per class (images of that class whose top-1 is right).

The per-batch parts are pure tensor functions; :class:`Scores` only adds them up (no host read until
:meth:`Scores.result`).
"""

from __future__ import annotations

import math

import torch

#: Equal-width confidence bins of the expected calibration error (Guo et al. 2017 use 15).
ECE_BINS = 15


def ensemble_log_probs(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the members' softmax outputs: logsumexp_k(log p_k) - log K."""
    return torch.logsumexp(torch.stack(log_probs), 0) - math.log(len(log_probs))


def calibration_bins(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bin B_m = ((m-1)/M, m/M]: (samples, sum of confidences, sum of correct), each float64 [M]."""
    index = (torch.ceil(confidence.double() * bins).long() - 1).clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64, device=confidence.device)
    conf_sum, hit_sum = torch.zeros_like(count), torch.zeros_like(count)
    count.index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
    conf_sum.index_add_(0, index, confidence.double())
    hit_sum.index_add_(0, index, correct.double())
    return count, conf_sum, hit_sum


def expected_calibration_error(count: torch.Tensor, conf_sum: torch.Tensor, hit_sum: torch.Tensor) -> torch.Tensor:
    """Guo et al. (2017) Eq. 3 from the bins' sums: sum_m |hits_m - conf_m| / n (|B_m|/n * |acc - conf|)."""
    return (hit_sum - conf_sum).abs().sum() / count.sum().clamp_min(1)


class Scores:
    """The running sums of one model's scores over a split."""

    def __init__(self, num_classes: int, device: torch.device | str) -> None:
        self.num_classes = num_classes
        zeros = dict(dtype=torch.float64, device=device)
        self.sums = torch.zeros(4, **zeros)  # images, top-1 hits, top-5 hits, summed loss
        self.class_images = torch.zeros(num_classes, **zeros)
        self.class_hits = torch.zeros(num_classes, **zeros)
        self.bins = torch.zeros(3, ECE_BINS, **zeros)

    def update(self, log_probs: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch: the model's log-probabilities [B, C] and the labels [B]."""
        probs = log_probs.float().exp()
        confidence, top1 = probs.max(1)
        correct = top1 == y
        k = min(5, self.num_classes)
        top5 = (log_probs.topk(k, 1).indices == y[:, None]).any(1)
        loss = -log_probs.double().gather(1, y[:, None]).sum()
        self.sums[0] += y.shape[0]
        self.sums[1] += correct.sum()
        self.sums[2] += top5.sum()
        self.sums[3] += loss
        self.class_images += torch.bincount(y, minlength=self.num_classes).double()
        self.class_hits += torch.bincount(y[correct], minlength=self.num_classes).double()
        self.bins += torch.stack(calibration_bins(confidence, correct))

    def result(self, class_names: list[str]) -> dict:
        """top1, top5 (%), loss (mean nats), ece (%), per_class: [{class, images, top1 (%, null: no image)}]."""
        n, hits1, hits5, loss = self.sums.tolist()
        images, hits = self.class_images.tolist(), self.class_hits.tolist()
        return {
            "images": int(n),
            "top1": 100.0 * hits1 / n if n else None,
            "top5": 100.0 * hits5 / n if n else None,
            "loss": loss / n if n else None,
            "ece": 100.0 * float(expected_calibration_error(*self.bins)) if n else None,
            "per_class": [
                {"class": name, "images": int(m), "top1": 100.0 * h / m if m else None}
                for name, m, h in zip(class_names, images, hits)
            ],
        }
