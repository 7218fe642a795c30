"""The runs layer: where a run's files live and how they are read and written, a folder or a URI alike.

:mod:`~cmd_dist.runs.fs` (one filesystem interface: :class:`~cmd_dist.runs.fs.LocalFolder` and
:class:`~cmd_dist.runs.fs.Remote`), :mod:`~cmd_dist.runs.checkpoint` (the checkpoint folder format and the
policy that picks, keeps and clears checkpoints), :mod:`~cmd_dist.runs.storage` (:class:`RunStore`: a run folder
as the training code sees it, staged locally behind a URI), :mod:`~cmd_dist.runs.lock` (the run folder's lock)
and :mod:`~cmd_dist.runs.run_folder` (the driver's side: a run folder made ready, its files, its report files).
Imports only :mod:`cmd_dist.errors`, pyarrow and (to (de)serialize a checkpoint) torch; never Ray.
"""
