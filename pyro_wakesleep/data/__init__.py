"""Data shipped with pyro-wakesleep: ``digits.npz``, read by ``datasets.load_digits``."""
