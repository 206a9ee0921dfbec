"""The soak and load scripts here run for minutes: never collect them as tests (CI runs the small variants in
tests/test_faults.py and tests/test_load_small.py)."""

collect_ignore_glob = ["*.py"]
