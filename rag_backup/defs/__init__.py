"""Dagster objects only: assets, checks, jobs, schedules, sensors, resources, one module each."""
