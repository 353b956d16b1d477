"""extproc-router: an Envoy ext_proc endpoint picker for vLLM, and a vLLM simulator."""

__version__ = "0.1.0"
