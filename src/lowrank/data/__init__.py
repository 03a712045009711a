"""Data sets shipped with lowrank (small, written for the project)."""
