"""Running chemmap on a Ray cluster that is already there.

- :mod:`chemmap.cluster.jobs`: ``chemmap run`` submitted as a Ray job through the cluster's
  dashboard (:func:`~chemmap.cluster.jobs.submit`), and the jobs listed, followed and stopped.

Nothing is imported here: ``chemmap --help`` stays instant.
"""
