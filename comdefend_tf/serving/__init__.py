"""Serving: settings, in-graph request checks and tiling, the signatures, the versioned export
and the TF Serving client."""
