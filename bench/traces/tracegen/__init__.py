"""Generative models of KV-cache workloads, written as Mooncake-format traces."""
