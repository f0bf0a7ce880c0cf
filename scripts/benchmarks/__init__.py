"""The benchmarks behind docs/benchmarks.md, one module per subcommand of scripts/benchmark.py."""
