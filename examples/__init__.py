"""Runnable examples: ``make demo`` runs ``examples.report``."""
