"""capsnet: a faithful, tested reproduction of Dynamic Routing Between Capsules (Sabour et al., 2017)."""

__version__ = "0.1.0"
