"""Flower ClientApp: one hospital site's local training and evaluation."""
