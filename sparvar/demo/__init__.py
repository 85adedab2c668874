"""The demo model: its data set (Fashion-MNIST from an installed package), tokenizer and training."""
