"""Per-sample training dynamics of one peer: what training already knows about each label (issue 21).

Every step, for each sample of the batch and each peer, three things are added on the device into
``[num_train]`` accumulators indexed by the sample ids the batch carries (positions in the training set):

- the **margin** of the given label, z_y - max_{j != y} z_j of the peer's training logits; its mean over the
  epochs a sample was seen is the *area under the margin* (AUM, Pleiss et al., "Identifying Mislabeled Data
  using the Area Under the Margin Ranking", NeurIPS 2020, Eq. 1-2): a label the network keeps contradicting
  has a low or negative AUM;
- a **confident disagreement**: the peer's prediction is confident by the test the exchange applies
  (H(p) < chi, Eq. 8-9 with chi of Eq. 12) and its argmax is not the given label. Counted once per epoch (each
  sample is seen once per epoch), so the sum is the number of epochs with a confident disagreement, the
  per-sample analogue of the counts CMD distils (and of Toneva et al.'s forgetting events, ICLR 2019);
- the epoch's **prediction** (argmax) and its probability, of which the record keeps the last epoch's.

After each epoch the margins are also folded into a **late-weighted AUM**: the mean margin with epoch e of E
weighted by :func:`epoch_weight` = 2^(e / (E / 5)), so the weight doubles every fifth of the planned training.
Plain AUM weighs the first epochs, in which the network has learned little and every margin is small, as much
as the last; measured on digits (docs/label_issues.md, chosen on seeds 10-12 and kept for the benchmark's
seeds 0-2), the late-weighted mean ranks the wrong labels better after short and after full training. The half
life is a fraction of the planned epochs, so the weighting means the same for 8 and for 200 epochs.

Memory is O(num_train): a per-epoch buffer ``[5, num_train]`` and the record (7 tensors of ``num_train``),
never O(num_train x epochs).

How it stays correct

- *Under a whole-step CUDA graph* (``GraphedStep``): :meth:`SampleDynamics.record` only reads the step's tensors
  (the batch ids are one of the graph's static inputs, copied in before every replay, as for the entropies) and
  adds in place (``index_add_``) into the preallocated ``epoch`` buffer, whose address never changes: no host
  read, no ``.item()``, no Python branch on a tensor value. :meth:`SampleDynamics.end_epoch` runs outside the
  graph, after the epoch, on the same stream, and also updates in place. Capturing a graph records without
  running, so a captured step is not counted twice; the eager warm-up steps and the eager last batch are real
  steps and are counted once, like the replays.
- *Under replicas* (DDP, ``ray.replicas_per_peer``): each replica sees a disjoint slice of every global batch,
  so each sample lands in exactly one replica's ``epoch`` buffer per epoch (zeros in the others). The trainer
  sums the buffer over the peer's replicas (``Exchange.sum_over_replicas``) *before* :meth:`end_epoch` folds it
  into the record; the prediction is stored as pred + 1 (0 = not seen), so the sum gives it back. Every
  replica then holds the same record, the one a single worker would hold.
- *On resume*: the record is part of the peer's checkpoint state (:meth:`state_dict`); a resumed run continues
  it, and a checkpoint written before this record existed simply has none (the record then starts empty).

Pure tensors: no Ray, no ``torch.distributed``, no device moves inside the step.
"""

from __future__ import annotations

import torch

#: Rows of the per-epoch buffer (added per visit; each sample is visited once per epoch).
EPOCH_ROWS = ("margin", "seen", "disagree", "pred_plus_one", "prob")
#: The record a checkpoint holds, per peer.
RECORD_KEYS = ("margin_sum", "seen", "disagree", "last_pred", "last_prob", "weighted_margin_sum", "weight_sum")
#: The late-weighted AUM's half life, as a fraction of the planned epochs (see :func:`epoch_weight`).
HALF_LIFE = 0.2


def epoch_weight(epoch: int, epochs: int) -> float:
    """The weight of (0-based) ``epoch`` of ``epochs`` planned in the late-weighted AUM: 2^(epoch / (HALF_LIFE x
    epochs)), from 1 for the first epoch to 2^5 = 32 at the planned end (the weight doubles every fifth of
    training; a run extended past its plan keeps doubling)."""
    return 2.0 ** (epoch / (HALF_LIFE * max(int(epochs), 1)))


def label_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUM's margin (Pleiss et al. 2020, Eq. 1): z_y - max_{j != y} z_j per row, the given label's logit minus
    the largest other logit (negative where the network prefers another class)."""
    given = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return given - others.amax(1)


def confident_disagreement(
    probs: torch.Tensor, entropies: torch.Tensor, labels: torch.Tensor, chi: torch.Tensor | float
) -> torch.Tensor:
    """1 where the prediction is confident by Eq. (8)-(9) (H(p) < chi, chi of Eq. 12) and its argmax is not the
    given label, else 0 (float, per row)."""
    return ((entropies < chi) & (probs.argmax(1) != labels)).float()


class SampleDynamics:
    """One peer's per-sample record over training (see the module docstring), on the training device."""

    def __init__(self, num_train: int, device: torch.device | str = "cpu") -> None:
        self.num_train = int(num_train)
        f32 = dict(device=device, dtype=torch.float32)
        #: This epoch's sums per sample (rows: EPOCH_ROWS), filled by :meth:`record` inside the step.
        self.epoch = torch.zeros(len(EPOCH_ROWS), self.num_train, **f32)
        self.margin_sum = torch.zeros(self.num_train, **f32)
        self.seen = torch.zeros(self.num_train, **f32)  # epochs in which the sample was trained on
        self.disagree = torch.zeros(self.num_train, **f32)
        self.last_pred = torch.full((self.num_train,), -1, device=device, dtype=torch.long)  # -1: never seen
        self.last_prob = torch.zeros(self.num_train, **f32)
        self.weighted_margin_sum = torch.zeros(self.num_train, **f32)  # sum of epoch_weight x margin
        self.weight_sum = torch.zeros(self.num_train, **f32)  # sum of epoch_weight over the epochs seen

    def record(
        self,
        ids: torch.Tensor,
        logits: torch.Tensor,
        probs: torch.Tensor,
        entropies: torch.Tensor,
        labels: torch.Tensor,
        chi: torch.Tensor | float,
    ) -> None:
        """One batch of this peer: add margins, visits, confident disagreements and predictions at ``ids``.

        Graph-safe: reads only the step's tensors and adds in place into ``epoch`` (see the module docstring).
        """
        z, p = logits.detach().float(), probs.detach().float()
        top, pred = p.max(1)
        rows = torch.stack(
            [
                label_margin(z, labels),
                torch.ones_like(top),
                confident_disagreement(p, entropies.detach(), labels, chi),
                (pred + 1).float(),
                top,
            ]
        )
        self.epoch.index_add_(1, ids, rows)

    def begin_epoch(self) -> None:
        """Empty the epoch buffer (in place: a captured graph keeps its address)."""
        self.epoch.zero_()

    def end_epoch(self, weight: float = 1.0) -> None:
        """Fold the epoch into the record (after summing ``epoch`` over the replicas), then empty the buffer.

        ``weight``: this epoch's :func:`epoch_weight` in the late-weighted AUM. Samples not seen this epoch (e.g.
        an unreadable image) keep their last prediction and add no weight.
        """
        e = self.epoch
        seen = e[1] > 0
        self.margin_sum.add_(e[0])
        self.seen.add_(e[1])
        self.weighted_margin_sum.add_(e[0], alpha=float(weight))
        self.weight_sum.add_(e[1], alpha=float(weight))
        self.disagree.add_(e[2])
        self.last_pred.copy_(torch.where(seen, e[3].round().long() - 1, self.last_pred))
        self.last_prob.copy_(torch.where(seen, e[4], self.last_prob))
        e.zero_()

    def aum(self) -> torch.Tensor:
        """Area under the margin: the mean margin over the epochs a sample was seen (NaN where never seen)."""
        return self.margin_sum / self.seen

    def late_aum(self) -> torch.Tensor:
        """The late-weighted AUM: the margins' mean weighted by :func:`epoch_weight` (NaN where never seen)."""
        return self.weighted_margin_sum / self.weight_sum

    def state_dict(self) -> dict:
        """The record, for the peer's checkpoint (the epoch buffer is empty between epochs and not saved)."""
        return {"num_train": self.num_train, **{k: getattr(self, k) for k in RECORD_KEYS}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` in place (ValueError when it was recorded on another training set size).

        A record saved before the late-weighted AUM existed has no weighted sums: they start from the plain sums
        (every earlier epoch weighted 1, each later one by :func:`epoch_weight`)."""
        if int(state["num_train"]) != self.num_train:
            raise ValueError(
                f"the per-sample record holds {int(state['num_train'])} training samples, this training set "
                f"{self.num_train}"
            )
        fallback = {"weighted_margin_sum": "margin_sum", "weight_sum": "seen"}
        for k in RECORD_KEYS:
            getattr(self, k).copy_(state[k] if k in state else state[fallback[k]])

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> SampleDynamics:
        """A record rebuilt from :meth:`state_dict` (e.g. a checkpoint's), on ``device``."""
        dyn = cls(int(state["num_train"]), device)
        dyn.load_state_dict(state)
        return dyn
