"""Datasets as in-memory LightningDataModules, one class each: MNIST, expanded MNIST + the
affNIST-style set, MultiMNIST, CIFAR-10, smallNORB (and its novel viewpoints), SVHN, and a
folder of your own images.  ``base.py`` holds what they share.

May import torch, torchvision, Lightning, numpy/scipy/PIL and capsnet.data itself; nothing of
capsnet.nn, capsnet.run or capsnet.reporting.
"""
