"""convserve: train AlexNet-style CNNs (convserve.models), serve them over KServe V2 gRPC
(convserve.service); convserve.contract is the model repository both halves agree on, and
convserve.cli drives both.

Importing this package imports nothing else, so `import convserve.service` never pulls in torch.
"""

__version__ = "0.1.0"
