"""fastpo.engine: data, batching, forward passes, losses and the DeepSpeed trainer."""
