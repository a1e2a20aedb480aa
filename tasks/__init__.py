"""Thin Prefect tasks over lafite_core functions: resolve references, call core, write, return refs."""
