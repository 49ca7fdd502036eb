"""A harness that trains VGG11_bn under identical schedules with the actually-sparse loop, NNI masks,
``torch.nn.utils.prune`` and dense training, and records accuracy, latency and real memory.

Entry points: ``python -m comparison run`` (:func:`comparison.runner.run`) and
``python -m comparison plot DIR`` (:func:`comparison.plots.plot_all`). The configuration is one
frozen dataclass, :class:`comparison.config.RunConfig`; the results are one tidy table
(:mod:`comparison.records`). Methods are plug-ins under :mod:`comparison.methods`.
"""
