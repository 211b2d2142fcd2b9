"""Set blocks and the sequence-of-sets VAE core."""
