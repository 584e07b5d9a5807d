"""Ray Tune sweeps over the Long-PT chain (`run_sweep`) and their report."""
