"""Prefect tasks of prefect-nst: thin wrappers; storage and IO live here."""
