"""The infer layer: use what was trained. :mod:`~cmd_dist.infer.loading` opens one checkpoint of a run (a folder or
a URI) as a :class:`~cmd_dist.infer.loading.TrainedRun`; the commands that score, predict with and export its peers
build on it. At the layer of :mod:`cmd_dist.train` and independent of it: imports config, models, data, method, runs
and errors, never train, launch, report, tune or Ray (a Ray path, e.g. evaluating on a cluster, lives in
:mod:`cmd_dist.launch`).
"""
