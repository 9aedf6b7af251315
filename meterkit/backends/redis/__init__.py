"""The Redis backends: one EVALSHA per check, standalone or Cluster."""
