"""What the tests and the benchmark check the library against: float64 NumPy references
(:mod:`calibjax.testing.references`). Not imported by the library itself."""
