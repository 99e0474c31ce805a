"""Training: the purifier, the classifiers, summaries, precision and provenance."""
