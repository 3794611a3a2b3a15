"""Prefect flows of prefect-nst: stylize_batch and its helpers, and the `nst` CLI."""
