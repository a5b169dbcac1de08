"""The benchmarks behind ``python -m lib_dynfuse.bench``: one UNet step (main), the FLUX-shaped transformer (flux),
the guided step (guidance) and the operation counter (opcount). Nothing outside bench/ imports it, except the
quality comparison, which ``--quality`` hands over to."""
