"""Transfer-aware scaling laws: measurements, robust fits, transfer, allocation, plots and the CLI.

pretraining runs -> measurements.jsonl -> fit (powerlaw, transfer) -> fits.json -> allocate ->
allocation.json -> the next pretraining's Grain mixture (allocation_io.read_allocation_weights).
"""
