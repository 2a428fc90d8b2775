"""The soak run (soak.py) and the mixed DICOMweb workload it shares with the scale-out test (workload.py)."""
