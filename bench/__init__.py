"""eventrelay's benchmark suite (issue 9): `python -m bench` or `make bench`; see docs/benchmarks.md."""
