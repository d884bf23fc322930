"""What both server and clients need to learn: network, losses, metrics, local training."""
