"""Datasets and LightningDataModules: MNIST, expanded MNIST + affNIST-style, MultiMNIST."""
