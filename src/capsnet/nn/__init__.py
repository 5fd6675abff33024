"""The paper's maths, in pure torch: routing, layers, models, losses.

May import torch and einops only: nothing of Lightning, Hydra or the rest of capsnet.
"""
