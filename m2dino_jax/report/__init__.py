"""Reports on trained runs: the TS / CG / AU paradigm comparison (tables and plots) and prediction export."""
