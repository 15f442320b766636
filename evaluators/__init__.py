"""How good and how fast: data, teacher, distillation proxy, latency, metrics."""
