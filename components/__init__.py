"""Kubeflow Pipelines components of edgeface: thin wrappers around `edgeface.steps`.

`components.definitions.build_components(image)` returns every component built for one
container image. `components.runtime` contains what the components run, against local paths,
so it can be called and tested without KFP. Importing this package imports neither, because
the component containers import only `components.runtime`.
"""
