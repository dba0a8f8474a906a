"""modelloop: train, export, serve and monitor PyTorch models, and close the loop."""

__version__ = "0.1.0"
