"""Recipes: data and training set-ups built on top of the training package."""
