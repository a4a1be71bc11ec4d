"""keepsrc: an xDS control plane for Envoy that keeps the real client address end to end."""

__version__ = "0.1.0"
