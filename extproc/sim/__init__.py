"""The vLLM simulator behind `extproc sim`."""
