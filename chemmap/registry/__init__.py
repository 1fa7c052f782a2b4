"""The register stage: chemmap bundles in the MLflow model registry (see :mod:`chemmap.registry.registry`)."""
