"""edgeface: federated face-recognition training across edge nodes."""

__version__ = "0.1.0"
