"""Classification + localization and human pose: one object, regressed numbers on top of a classifier's features."""
