"""Training: the fold ensemble with Ray Train (DDP), tracked in MLflow.

- :mod:`chemmap.train.trainer`: the stage on the driver (:func:`~chemmap.train.trainer.train_ensemble`,
  :func:`~chemmap.train.trainer.training_dir`, :func:`~chemmap.train.trainer.model_config`);
- :mod:`chemmap.train.loop`: one fold on each Ray Train worker;
- :mod:`chemmap.train.objective`: the paper's loss for a sample of one or more scans;
- :mod:`chemmap.train.data`: views of the dataset's scans, augmentation, prefetching, sharding.

Nothing is imported here: ``chemmap --help`` stays instant.
"""
