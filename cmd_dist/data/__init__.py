"""The data layer: shared types, resident (in-memory) datasets, streamed image datasets, label noise and human
labels. Imports only torch/numpy and :mod:`cmd_dist.errors`; never Ray or ``torch.distributed``.
"""
