"""Plain-PyTorch implementations: the CPU path and the oracle of the tests."""
