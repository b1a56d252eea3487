"""Region-based detectors: one file per method of the lecture, composed by :mod:`.generalized`."""
