"""Transfer-aware task aggregation: probe task affinities, fit laws, choose groups and weights (advice.json)."""
