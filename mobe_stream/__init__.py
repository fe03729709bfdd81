"""mobe-stream: streaming Mixture-of-Basis-Experts compression for giant MoE checkpoints."""

__version__ = "0.1.0"
