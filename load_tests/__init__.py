"""Load generators, benchmarks and autoscaling experiments for serve_app (loopback only)."""
