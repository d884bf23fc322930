"""Hospital sites: the on-disk site format, its loader/validator, the built-in cohorts."""
