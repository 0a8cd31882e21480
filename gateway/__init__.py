"""The local REST edge: a development stand-in for Envoy's gRPC-JSON transcoder."""

from gateway.app import create_app
from gateway.config import Settings

__all__ = ["Settings", "create_app"]
