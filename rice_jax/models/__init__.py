"""Backbone (MLCD/RICE ViT), region layers and the RICE training model."""
