"""The training half of convserve: the CNN zoo, convolution arithmetic, data, training, export.

Importing this package imports nothing heavy; `models.arithmetic` is pure Python so the serving
half can use it without torch.
"""
