"""XLab: train GPT-style language models from scratch with PyTorch Lightning."""
