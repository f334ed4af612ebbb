"""The Kubeflow Pipelines side of edgeface: pipeline builder, KFP client and `edgeface pipeline`.

This package imports kfp; the library (`edgeface/`) never imports it.
"""
