"""One module per store: backup, verify, restore, fingerprint. Plain Python, no Dagster."""
